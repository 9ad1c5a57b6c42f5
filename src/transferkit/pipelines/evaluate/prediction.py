"""`transferkit predict` and ``Run.predict``: labels for files, folders and in-memory images.

Rows carry ``path`` (or the position of an in-memory image), the top label and probability, the
next ``top_k - 1`` labels, every class's probability, and ``error`` for a file that could not be
read: one unreadable file costs its row, not the batch.
"""
from __future__ import annotations

import csv
import logging
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from transferkit.errors import ConfigError, DataError
from transferkit.pipelines.data.folders import collect_images
from transferkit.pipelines.data.images import DECODE_ERRORS, describe_error, load_rgb
from transferkit.pipelines.data.splits import CSV_TEXT
from transferkit.pipelines.evaluate.export import ExportedModel
from transferkit.pipelines.evaluate.predictor import Predictor, parse_ensemble_list, parse_tta_list
from transferkit.pipelines.rundir import RunDir, atomic_write

log = logging.getLogger(__name__)


class _Items(Dataset):
    """(tensor, -1, index, error) for file paths, PIL images and HWC uint8 arrays."""

    def __init__(self, items: Sequence[Any], transform):
        self.items, self.transform = list(items), transform
        self._blank: torch.Tensor | None = None

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int):
        item = self.items[i]
        try:
            image = load_rgb(item) if isinstance(item, (str, Path)) else item
            return self.transform(image), -1, i, ""
        except DECODE_ERRORS as exc:
            if self._blank is None:
                self._blank = self.transform(np.zeros((8, 8, 3), np.uint8))
            return self._blank, -1, i, f"cannot read: {describe_error(exc)}"


def expand_inputs(inputs: Any) -> list[Any]:
    """Paths and folders expanded to image files; PIL images and arrays kept as they are."""
    if isinstance(inputs, (str, Path)) or _is_image(inputs):
        inputs = [inputs]
    out: list[Any] = []
    for item in inputs:
        if isinstance(item, (str, Path)):
            files, skipped = collect_images([item])
            for path, reason in skipped:
                log.warning("skipping %s: %s", path, reason)
            out.extend(files)
        elif _is_image(item):
            out.append(item)
        else:
            raise DataError(f"cannot predict on a {type(item).__name__}; pass file paths, folders, PIL images"
                            " or HWC uint8 arrays")
    return out


def _is_image(x: Any) -> bool:
    return hasattr(x, "convert") and hasattr(x, "size") or isinstance(x, np.ndarray)


def predict_items(predictor: Predictor | ExportedModel, items: Sequence[Any], classes: Sequence[str], *,
                  top_k: int = 1,
                  batch_size: int = 32, workers: int = 0, progress: bool = True) -> list[dict]:
    """One row per item: ``path``, ``label``, ``probability``, ``label_k``/``probability_k`` up to
    ``top_k``, ``probabilities`` (every class, in class order) and ``error`` ("" when read)."""
    if not 1 <= top_k <= len(classes):
        raise ConfigError(f"--top-k {top_k} must be between 1 and the number of classes ({len(classes)})")
    if len(predictor.combinations) != 1:
        raise ConfigError("prediction takes one --tta spec and one --ensemble; compare several with"
                          " `transferkit evaluate`")
    ds = _Items(items, predictor.transform)
    loader = DataLoader(ds, batch_size=predictor.images_per_batch(batch_size), num_workers=workers)
    from tqdm.auto import tqdm

    rows: list[dict] = []
    for x, _, idx, errors in tqdm(loader, desc="predicting", leave=False, disable=not progress):
        (probs,) = predictor.merged(x)
        for i, p, err in zip(idx.tolist(), probs.numpy(), errors):
            item = items[i]
            row: dict[str, Any] = {"path": str(item) if isinstance(item, (str, Path)) else f"<image {i}>"}
            if err:
                log.warning("could not read %s (%s)", row["path"], err)
                row.update(label="", probability=float("nan"), probabilities=[], error=err)
            else:
                order = np.argsort(-p, kind="stable")[:top_k]
                row.update(label=classes[order[0]], probability=float(p[order[0]]))
                for k, j in enumerate(order[1:], start=2):
                    row[f"label_{k}"], row[f"probability_{k}"] = classes[j], float(p[j])
                row.update(probabilities=[float(v) for v in p], error="")
            rows.append(row)
    return rows


def write_predictions(rows: Sequence[dict], out: str | Path, top_k: int) -> Path:
    out = Path(out)
    if out.is_dir():
        raise ConfigError(f"--out {out} is a folder; pass a file name such as {out / 'predictions.csv'}")
    header = ["path", "label", "probability"]
    for k in range(2, top_k + 1):
        header += [f"label_{k}", f"probability_{k}"]
    header.append("error")
    with atomic_write(out, "w", **CSV_TEXT) as f:
        w = csv.writer(f)
        w.writerow(header)
        for r in rows:
            cells = [r["path"]]
            for key in header[1:-1]:
                v = r.get(key, "")
                cells.append(f"{v:.6f}" if isinstance(v, float) and v == v else ("" if isinstance(v, float) else v))
            cells.append(r["error"])
            w.writerow(cells)
    return out


def prediction_defaults(run: RunDir, tta: str | None, ensemble: str | None,
                        merge: str | None) -> tuple[str, str, str]:
    """The TTA spec, ensemble and merge to predict with: as given, else what ``evaluate --select``
    recorded in RUN/selected.json, else plain, none and mean."""
    chosen = run.read_json(run.selected) if run.selected.exists() else {}
    if chosen and (tta is None or ensemble is None):
        log.info("predicting with --tta %s --ensemble %s, selected by `evaluate --select` (%s)",
                 tta or chosen["tta"], ensemble or chosen["ensemble"], run.selected)
    return (tta or chosen.get("tta", "plain"), ensemble or chosen.get("ensemble", "none"),
            merge or chosen.get("merge", "mean"))


def predict_paths(run_dir: str | Path, paths: Sequence[str | Path], out: str | Path = "predictions.csv",
                  top_k: int = 1, checkpoint: str = "best", batch_size: int = 32, workers: int = 0,
                  progress: bool = True, tta: str | None = None, ensemble: str | None = None,
                  merge: str | None = None, accelerator: str = "auto") -> Path:
    """Write `path,label,probability` (+ label_k, probability_k up to top_k, and error) for every
    image, predicted with one TTA spec and one ensemble (left out: see ``prediction_defaults``).
    `run_dir` may also be an onnx or torchscript export (``transferkit export``), whose views
    are in its graph."""
    if Path(out).is_dir():
        raise ConfigError(f"--out {out} is a folder; pass a file name such as {Path(out) / 'predictions.csv'}")

    if ExportedModel.is_export(run_dir):
        given = [flag for flag, v in (("--tta", tta), ("--ensemble", ensemble), ("--merge", merge)) if v is not None]
        if given or checkpoint != "best":
            raise ConfigError(f"{run_dir} is an export: its weights, views and merge are in the graph; drop "
                              f"{', '.join(given + (['--checkpoint'] if checkpoint != 'best' else []))}")
        predictor: Any = ExportedModel(run_dir)
        classes = predictor.classes
    else:
        run = RunDir.open(run_dir)
        classes = run.classes()
        tta, ensemble, merge = prediction_defaults(run, tta, ensemble, merge)
        if len(parse_tta_list(tta)) != 1 or len(parse_ensemble_list(ensemble)) != 1:
            raise ConfigError(f"predict takes one --tta spec and one --ensemble (got {tta!r} and {ensemble!r});"
                              " compare several with `transferkit evaluate`")
        predictor = None
    if not 1 <= top_k <= len(classes):
        raise ConfigError(f"--top-k {top_k} must be between 1 and the number of classes ({len(classes)})")
    items = expand_inputs(list(paths))
    if predictor is None:
        predictor = Predictor.for_run(run, tta, ensemble, checkpoint=checkpoint, merge=merge, accelerator=accelerator)
    rows = predict_items(predictor, items, classes, top_k=top_k, batch_size=batch_size, workers=workers,
                         progress=progress)
    return write_predictions(rows, out, top_k)
