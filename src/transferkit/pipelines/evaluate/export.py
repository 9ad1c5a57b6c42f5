"""`transferkit export`: a trained run as files a deployment loads without the training stack.

Formats:

- ``onnx``: ``model.onnx`` through torch's exporter (``dynamo=True``), a dynamic batch dimension;
  input ``images`` (B, 3, H, W), output ``probabilities`` (B, K).
- ``torchscript``: ``model.pt`` (``torch.jit.trace``), the same input and output.
- ``timm``: ``model.safetensors`` + ``config.json`` in timm's own format, with the class names as
  ``label_names`` and the run's data config: ``timm.create_model("local-dir:DIR", pretrained=True)``
  loads it.

The onnx and torchscript graphs hold the network, any stored temperature (folded into the
classifier), the ``--tta`` views and their merge: their input is the image prepared as ``evaluate``
prepares it (``augment.tta.tta_prepare``: the eval resize, a centred region a little larger than
the input size, normalised), so one graph serves plain and TTA alike. ``transferkit-export.json``
beside the model says how to prepare that input, and ``predict`` accepts such a folder
(``ExportedModel``) as well as a run directory.
"""
from __future__ import annotations

import importlib.util
import json
import logging
import warnings
from pathlib import Path

import torch
from torch import nn

from transferkit.augment.tta import TTA, merge_probs, tta_prepare
from transferkit.errors import ConfigError, MissingExtra, RunDirError
from transferkit.pipelines.data.decoded import DecodeRule
from transferkit.pipelines.evaluate.predictor import Predictor
from transferkit.pipelines.rundir import RunDir, atomic_write

log = logging.getLogger(__name__)

FORMATS = ("onnx", "torchscript", "timm")
CHECKPOINTS = ("best", "last", "ema", "swa")
META = "transferkit-export.json"
FILES = {"onnx": "model.onnx", "torchscript": "model.pt", "timm": "model.safetensors"}


class Exported(nn.Module):
    """Prepared images (B, 3, H, W) -> merged probabilities (B, K): the views, the network, softmax
    and the merge in one graph."""

    def __init__(self, model: nn.Module, tta: TTA):
        super().__init__()
        self.model, self.tta = model.eval(), tta

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        probs = torch.softmax(self.model(self.tta.views(images)).float(), dim=-1)
        return merge_probs(probs.reshape(self.tta.num_views, images.shape[0], -1), self.tta.merge)


def export_run(run_dir: str | Path, format: str = "onnx", checkpoint: str = "best", tta: str = "plain",
               merge: str = "mean", out: str | Path | None = None) -> Path:
    """Write the run's `checkpoint` weights as `format` to `out` (default RUN/export-<format>); the folder."""
    if format not in FORMATS:
        raise ConfigError(f"--format {format!r}: use one of {', '.join(FORMATS)}")
    if checkpoint not in CHECKPOINTS:
        raise ConfigError(f"--checkpoint {checkpoint!r}: use one of {', '.join(CHECKPOINTS)}")
    if format == "timm" and tta != "plain":
        raise ConfigError("--tta is baked into onnx and torchscript graphs; a timm folder holds the network alone:"
                          " drop --tta or use --format onnx")
    run = RunDir.open(run_dir)
    ensemble = checkpoint if checkpoint in ("ema", "swa") else "none"
    predictor = Predictor.for_run(run, tta, ensemble, checkpoint="best" if ensemble != "none" else checkpoint,
                                  merge=merge, accelerator="cpu")
    if len(predictor.combinations) != 1:
        raise ConfigError(f"--tta {tta!r} holds several specs; export one, e.g. --tta hflip or --tta ten-crop")
    out = Path(out) if out is not None else run.path / f"export-{format}"
    _check_out(out)
    out.mkdir(parents=True, exist_ok=True)
    model, dc, classes = predictor.models[0].cpu().eval(), predictor.data_cfg, run.classes()
    module = Exported(model, predictor.tta).eval()
    region = predictor.transform.region
    example = torch.zeros(2, 3, *region)
    if format == "onnx":
        _onnx(module, example, out / FILES["onnx"])
    elif format == "torchscript":
        with torch.no_grad(), warnings.catch_warnings():
            # The spatial size is fixed by design (the prepared region): the tracer's warnings that
            # shapes become constants are expected. The batch dimension stays dynamic.
            warnings.simplefilter("ignore", torch.jit.TracerWarning)
            traced = torch.jit.trace(module, example, check_trace=False)
        with atomic_write(out / FILES["torchscript"]) as f:
            torch.jit.save(traced, f)
    else:
        _timm_folder(model, dc, classes, out)
    meta = {"format": format, "file": FILES[format], "classes": classes, "run": str(run.path.resolve()),
            "checkpoint": checkpoint, "backbone": run.read_config()["fit"].get("backbone"),
            "tta": predictor.combinations[0].tta, "merge": merge, "views": predictor.tta.num_views,
            "input": {"name": "images", "shape": ["batch", 3, *region], "dtype": "float32",
                      "prepare": (f"decode to a shorter side of at most {dc.decode_short_side} (PIL: JPEG draft"
                                  " mode, then bilinear), " if dc.decode_short_side else "")
                      + "resize the shorter side (OpenCV, interpolation) to floor(size / crop_pct), keep the"
                        " centred region, scale to 0..1, subtract mean, divide by std; RGB, NCHW"},
            "output": {"name": "probabilities", "shape": ["batch", len(classes)]},
            "preprocess": {"input_size": list(dc.input_size), "region": list(region), "mean": list(dc.mean),
                           "std": list(dc.std), "crop_pct": dc.crop_pct, "interpolation": dc.interpolation,
                           "decode_short_side": dc.decode_short_side}}
    with atomic_write(out / META, "w", encoding="utf-8") as f:
        json.dump(meta, f, indent=2)
    log.info("exported %s (%s, tta %s) to %s", checkpoint, format, meta["tta"], out)
    return out


def _check_out(out: Path) -> None:
    if out.exists() and not out.is_dir():
        raise RunDirError(f"--out {out} is a file; pass a folder to export into")
    if out.is_dir() and any(out.iterdir()) and not (out / META).is_file():
        raise RunDirError(f"--out {out} holds files that are not an export; pass a new or empty folder")


def _onnx(module: nn.Module, example: torch.Tensor, path: Path) -> None:
    missing = [m for m in ("onnx", "onnxscript") if importlib.util.find_spec(m) is None]
    if missing:  # torch's exporter needs both: say so before it does
        raise MissingExtra(f"--format onnx needs {' and '.join(missing)}: pip install 'transferkit[export]'")
    tmp = path.with_name(path.name + ".tmp")
    with torch.no_grad():
        torch.onnx.export(module, (example,), str(tmp), dynamo=True, input_names=["images"],
                          output_names=["probabilities"], dynamic_shapes={"images": {0: torch.export.Dim("batch")}},
                          external_data=False, verbose=False)
    tmp.replace(path)


def _timm_folder(model: nn.Module, dc, classes: list[str], out: Path) -> None:
    from timm.models import save_for_hf

    data_config = {"input_size": tuple(dc.input_size), "mean": tuple(dc.mean), "std": tuple(dc.std),
                   "crop_pct": dc.crop_pct, "interpolation": dc.interpolation}
    save_for_hf(model, str(out), model_config={"label_names": list(classes)}, safe_serialization=True,
                data_config=data_config)


class ExportedModel:
    """An onnx or torchscript export, ready to predict: the interface ``prediction.predict_items``
    uses (``transform``, ``combinations``, ``images_per_batch``, ``merged``)."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        try:
            self.meta = json.loads((self.folder / META).read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise RunDirError(f"{self.folder / META} cannot be read ({exc}); export the run again") from None
        fmt = self.meta.get("format")
        if fmt not in ("onnx", "torchscript"):
            raise ConfigError(f"{self.folder} is a {fmt} export; predict from an onnx or torchscript export, or from"
                              " the run directory")
        p = self.meta["preprocess"]
        self.classes = list(self.meta["classes"])
        self.transform = tta_prepare(tuple(p["input_size"][1:]), p["mean"], p["std"], p["crop_pct"],
                                     p["interpolation"])
        self.rule = DecodeRule(p.get("decode_short_side"))
        self.combinations = [self.meta["tta"]]
        self._run = self._load(self.folder / self.meta["file"], fmt)

    @staticmethod
    def is_export(path: str | Path) -> bool:
        return (Path(path) / META).is_file()

    def _load(self, path: Path, fmt: str):
        if fmt == "onnx":
            try:
                import onnxruntime as ort
            except ImportError:
                raise MissingExtra("predicting from an onnx export needs onnxruntime: pip install"
                                  " 'transferkit[export]'") from None
            session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
            return lambda x: torch.from_numpy(session.run(None, {"images": x.numpy()})[0])
        module = torch.jit.load(str(path), map_location="cpu").eval()

        def run(x: torch.Tensor) -> torch.Tensor:
            with torch.inference_mode():
                return module(x)
        return run

    def images_per_batch(self, batch_size: int) -> int:
        return max(1, batch_size // int(self.meta.get("views", 1)))

    def merged(self, x: torch.Tensor) -> list[torch.Tensor]:
        return [self._run(x.contiguous().float())]
