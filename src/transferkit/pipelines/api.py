"""The Python API: ``fit`` returns a ``Run`` you keep using; ``load`` gives a model back from a
checkpoint file alone.

    import transferkit
    run = transferkit.fit("data/", backbone="resnet50", epochs=10)
    run.report["accuracy"], run.advice
    rows = run.evaluate(tta="plain,hflip")           # one row per (TTA, ensemble) combination
    preds = run.predict(["photo.jpg", pil_image], top_k=3)
    model = transferkit.load("runs/x/checkpoints/best.ckpt")

Settings are the CLI's flags with underscores (``batch_size=16``), checked by the same table
(``settings.CONSTRAINTS``) with the same one-line ``UserError`` messages.
"""
from __future__ import annotations

import logging
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from transferkit.pipelines.rundir import RunDir
from transferkit.pipelines.settings import FitConfig, default_out

log = logging.getLogger(__name__)


def _progress(progress: bool | None) -> bool:
    return sys.stderr.isatty() if progress is None else progress


def fit(data: str | Path, *, backbone: str = "resnet50", finetune: str = "auto", epochs: int = 20,
        out: str | Path | None = None, progress: bool | None = None, **settings: Any) -> "Run":
    """Fine-tune `backbone` on the image folder `data` and return the ``Run``.

    `settings` are the other ``transferkit fit`` flags, spelt with underscores. `out` defaults to
    ``runs/<backbone>-<time>``. With several processes every rank returns the same run; its files
    are written by rank 0.
    """
    from transferkit.pipelines.advise import fit_best
    from transferkit.pipelines.train.recipe import fit as fit_recipe

    values = {"data": str(Path(data).expanduser().absolute()), "backbone": backbone, "finetune": finetune,
              "epochs": epochs, **settings}
    values["out"] = str(out) if out is not None else default_out(backbone)
    for key in ("weights", "backbone_plugin"):
        if isinstance(values.get(key), Path):
            values[key] = str(values[key])
    cfg = FitConfig.build(values, source="api")
    (fit_best if "," in cfg.backbone else fit_recipe)(cfg, progress=_progress(progress))
    return Run(cfg.out)


def resume(run_dir: str | Path, *, progress: bool | None = None) -> "Run":
    """Continue an interrupted run from its last complete epoch; the ``Run``."""
    from transferkit.pipelines.train.recipe import resume as resume_recipe

    resume_recipe(run_dir, progress=_progress(progress))
    return Run(run_dir)


def advise(data: str | Path, *, backbone: str = "resnet50", progress: bool | None = None, **settings: Any):
    """The advisor's ``Advice`` for `data` (what ``fit(finetune="auto")`` would train, and why)."""
    from transferkit.pipelines.advise import advise as advise_pipeline

    advice, _ = advise_pipeline(str(data), backbone, progress=_progress(progress), **settings)
    return advice


def load(checkpoint: str | Path, *, ema: bool = False, plugin: str | None = None) -> "LoadedModel":
    """The model of a checkpoint file on its own (eval mode, CPU), with its classes and data config.

    `ema`: the averaged weights of a ``fit --ema`` run. `plugin`: the ``--backbone-plugin`` file,
    when it has moved since training.
    """
    from transferkit.pipelines.evaluate.loading import load_checkpoint

    model, data_cfg, classes = load_checkpoint(checkpoint, "ema_state_dict" if ema else "state_dict", plugin)
    return LoadedModel(model, classes, data_cfg)


@dataclass
class LoadedModel:
    """A trained network with what it needs to predict: class names and its data config."""

    model: Any
    classes: list[str]
    data_config: Any

    def predict(self, inputs: Any, *, top_k: int = 1, tta: str = "plain", batch_size: int = 32,
                accelerator: str = "auto") -> list[dict]:
        """Rows as ``Run.predict`` gives them, from this model alone."""
        from transferkit.pipelines.evaluate.prediction import expand_inputs, predict_items
        from transferkit.pipelines.evaluate.predictor import Predictor

        predictor = Predictor.for_model(self.model, self.data_config, len(self.classes), tta, accelerator=accelerator)
        try:
            return predict_items(predictor, expand_inputs(inputs), self.classes, top_k=top_k, batch_size=batch_size,
                                 progress=False)
        finally:
            self.model.cpu()


class Run:
    """A run directory written by ``fit``: its settings, report, model, and evaluation and
    prediction with TTA and ensembles (the engine the CLI uses)."""

    def __init__(self, path: str | Path):
        self._dir = RunDir.open(path)
        self._models: dict[tuple, Any] = {}

    @classmethod
    def load(cls, path: str | Path) -> "Run":
        return cls(path)

    def __repr__(self) -> str:
        return f"Run({str(self.path)!r})"

    @property
    def path(self) -> Path:
        return self._dir.path

    @property
    def classes(self) -> list[str]:
        return self._dir.classes()

    @property
    def config(self) -> FitConfig:
        from transferkit.pipelines.evaluate.loading import run_config

        return run_config(self._dir)

    @property
    def report(self) -> dict:
        """report.json as a dict."""
        return self._dir.read_json(self._dir.report)

    @property
    def advice(self) -> dict | None:
        """The advisor's measurements and reasons (``finetune: auto``), else None."""
        return self._dir.read_config().get("resolved", {}).get("finetune", {}).get("advice")

    @property
    def model(self):
        """The best checkpoint's network, in eval mode on the CPU."""
        return self.load_model()

    def load_model(self, checkpoint: str = "best", ema: bool = False, device: str = "cpu"):
        from transferkit.pipelines.evaluate.loading import load_model

        key = (checkpoint, ema, device)
        if key not in self._models:
            model, _ = load_model(self._dir, checkpoint, "ema_state_dict" if ema else "state_dict")
            self._models[key] = model.to(device).eval()
        return self._models[key]

    def evaluate(self, data: str | Path | None = None, split: str = "val", tta: str | Sequence[str] = "plain",
                 ensemble: str | Sequence[str] = "none", *, checkpoint: str = "best", merge: str = "mean",
                 batch_size: int | None = None, progress: bool | None = None, accelerator: str = "auto",
                 calibrate: bool = False, select: bool = False, per_image: str = "best") -> list[dict]:
        """Metrics of every (TTA, ensemble) combination; writes evaluation.json and
        predictions-<split>.csv as the CLI does (`calibrate`, `select`, `per_image`: as
        ``transferkit evaluate --calibrate --select --per-image``)."""
        from transferkit.pipelines.evaluate.evaluation import evaluate_run

        body = evaluate_run(self.path, data, split=split, checkpoint=checkpoint, tta=tta, ensemble=ensemble,
                            merge=merge, batch_size=batch_size, progress=_progress(progress), accelerator=accelerator,
                            calibrate=calibrate, select=select, per_image=per_image)
        return body["results"]

    def predictions(self, split: str = "val") -> list[dict]:
        """The per-image rows of predictions-<split>.csv (fit writes val's; evaluate any split's):
        ``path, label, predicted, probability, loss, correct`` and ``predicted_k``/``probability_k``."""
        from transferkit.errors import DataError
        from transferkit.pipelines.evaluate.per_image import read_per_image

        path = self._dir.predictions(split)
        if not path.is_file():
            raise DataError(f"{path} does not exist: run `transferkit evaluate {self.path} --split {split}` first")
        return read_per_image(path)

    def top_losses(self, split: str = "val", limit: int | None = 20) -> list[dict]:
        """The misclassified images of `split`, most confidently wrong first."""
        from transferkit.pipelines.evaluate.per_image import top_losses

        return top_losses(self.predictions(split), limit)

    def most_confused(self, split: str = "val", limit: int | None = None) -> list[dict]:
        """``{"label", "predicted", "count"}`` for each pair of classes confused on `split`, most first."""
        from transferkit.pipelines.evaluate.per_image import most_confused

        return most_confused(self.predictions(split), limit)

    def predict(self, inputs: Any, top_k: int = 1, tta: str | None = None, ensemble: str | None = None, *,
                checkpoint: str = "best", merge: str | None = None, batch_size: int = 32,
                accelerator: str = "auto") -> list[dict]:
        """One row per image (file paths, folders, PIL images, HWC uint8 arrays): ``path``,
        ``label``, ``probability``, ``label_k``/``probability_k``, ``probabilities``, ``error``.
        `tta`, `ensemble`, `merge` left out: what ``evaluate(select=True)`` chose, else plain/none/mean."""
        from transferkit.pipelines.evaluate.prediction import expand_inputs, predict_items, prediction_defaults
        from transferkit.pipelines.evaluate.predictor import Predictor

        tta, ensemble, merge = prediction_defaults(self._dir, tta, ensemble, merge)
        predictor = Predictor.for_run(self._dir, tta, ensemble, checkpoint=checkpoint, merge=merge,
                                      accelerator=accelerator)
        return predict_items(predictor, expand_inputs(inputs), self.classes, top_k=top_k, batch_size=batch_size,
                             progress=False)
