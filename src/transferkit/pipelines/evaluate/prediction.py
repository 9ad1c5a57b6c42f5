"""`transferkit predict` and ``Run.predict``: labels for files, folders and in-memory images.

Rows carry ``path`` (or the position of an in-memory image), the top label and probability, the
next ``top_k - 1`` labels, every class's probability, and ``error`` for a file that could not be
read: one unreadable file costs its row, not the batch.

One loop makes every row: ``predict_batches`` yields them a loader batch at a time, with a
progress bar over the images. ``predict_paths`` (`transferkit predict`) streams them into the CSV
as they come, so a folder of 100,000 images is predicted in bounded memory (its list of paths
aside); the CSV goes through ``atomic_write`` (interruptible), so a predict that is interrupted or
fails leaves the old file, or none, never part of one. ``predict_items`` (the Python API) collects
the same rows in a list.
"""
from __future__ import annotations

import csv
import itertools
import logging
import os
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from transferkit.errors import ConfigError, DataError
from transferkit.pipelines.data.decoded import DecodeRule
from transferkit.pipelines.data.folders import collect_images
from transferkit.pipelines.data.images import DECODE_ERRORS, describe_error, load_rgb
from transferkit.pipelines.data.splits import CSV_TEXT
from transferkit.pipelines.evaluate.export import ExportedModel
from transferkit.pipelines.evaluate.predictor import Predictor, parse_ensemble_list, parse_tta_list
from transferkit.pipelines.rundir import RunDir, atomic_write

log = logging.getLogger(__name__)


class _Items(Dataset):
    """(tensor, -1, index, error) for file paths, PIL images and HWC uint8 arrays."""

    def __init__(self, items: Sequence[Any], transform, rule: DecodeRule | None = None):
        self.items, self.transform = list(items), transform
        self.rule = rule if rule is not None and rule.short_side is not None else None  # as the model trained
        self._blank: torch.Tensor | None = None

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int):
        item = self.items[i]
        try:
            if self.rule is None:
                image = load_rgb(item) if isinstance(item, (str, Path)) else item
            else:
                image = self.rule.load(item) if isinstance(item, (str, Path)) else self.rule.resize(item)
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


def predict_batches(predictor: Predictor | ExportedModel, items: Sequence[Any], classes: Sequence[str], *,
                    top_k: int = 1, batch_size: int = 32, workers: int = 0, progress: bool = True,
                    probabilities: bool = True) -> Iterator[list[dict]]:
    """The rows of ``predict_items``, one list per loader batch, as each batch is predicted.

    The arguments are checked here, before the first batch. `probabilities=False` leaves out the
    ``probabilities`` list (the CSV does not hold it). Nothing is kept from one batch to the next:
    the loader's prefetched batches and the batch in hand are all that is held.
    """
    if not 1 <= top_k <= len(classes):
        raise ConfigError(f"--top-k {top_k} must be between 1 and the number of classes ({len(classes)})")
    if len(predictor.combinations) != 1:
        raise ConfigError("prediction takes one --tta spec and one --ensemble; compare several with"
                          " `transferkit evaluate`")
    ds = _Items(items, predictor.transform, predictor.rule)
    loader = DataLoader(ds, batch_size=predictor.images_per_batch(batch_size), num_workers=workers)
    return _batches(predictor, loader, ds.items, list(classes), top_k, progress, probabilities)


def _batches(predictor, loader: DataLoader, items: list[Any], classes: list[str], top_k: int, progress: bool,
             probabilities: bool) -> Iterator[list[dict]]:
    from tqdm.auto import tqdm

    with tqdm(total=len(items), desc="predicting", unit="img", leave=False, disable=not progress) as bar:
        for x, _, idx, errors in loader:
            (probs,) = predictor.merged(x)
            probs = probs.numpy()
            top = np.argsort(-probs, axis=1, kind="stable")[:, :top_k]
            rows = [_row(items[i], i, p, order, err, classes, probabilities)
                    for i, p, order, err in zip(idx.tolist(), probs, top, errors)]
            bar.update(len(rows))
            yield rows


def _row(item: Any, i: int, p: np.ndarray, order: np.ndarray, err: str, classes: list[str],
         probabilities: bool) -> dict[str, Any]:
    row: dict[str, Any] = {"path": str(item) if isinstance(item, (str, Path)) else f"<image {i}>"}
    if err:
        log.warning("could not read %s (%s)", row["path"], err)
        row.update(label="", probability=float("nan"))
        if probabilities:
            row["probabilities"] = []
    else:
        row.update(label=classes[order[0]], probability=float(p[order[0]]))
        for k, j in enumerate(order[1:], start=2):
            row[f"label_{k}"], row[f"probability_{k}"] = classes[j], float(p[j])
        if probabilities:
            row["probabilities"] = p.tolist()
    row["error"] = err
    return row


def predict_items(predictor: Predictor | ExportedModel, items: Sequence[Any], classes: Sequence[str], *,
                  top_k: int = 1,
                  batch_size: int = 32, workers: int = 0, progress: bool = True) -> list[dict]:
    """One row per item: ``path``, ``label``, ``probability``, ``label_k``/``probability_k`` up to
    ``top_k``, ``probabilities`` (every class, in class order) and ``error`` ("" when read)."""
    batches = predict_batches(predictor, items, classes, top_k=top_k, batch_size=batch_size, workers=workers,
                              progress=progress)
    return [row for rows in batches for row in rows]


def write_predictions(rows: Iterable[dict], out: str | Path, top_k: int) -> Path:
    """The predictions CSV, written as `rows` come (a list, or ``predict_batches``' rows chained):
    nothing at `out` changes until the last row is written."""
    out = Path(out)
    if out.is_dir():
        raise ConfigError(f"--out {out} is a folder; pass a file name such as {out / 'predictions.csv'}")
    header = ["path", "label", "probability"]
    for k in range(2, top_k + 1):
        header += [f"label_{k}", f"probability_{k}"]
    header.append("error")
    with atomic_write(out, "w", interruptible=True, **CSV_TEXT) as f:
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


def default_workers(images: int, per_batch: int) -> int:
    """Loader processes for `transferkit predict`: as fit's default, min(4, CPU count), and none
    for a single batch (starting processes would cost more than they save)."""
    return 0 if images <= per_batch else min(4, os.cpu_count() or 1)


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
                  top_k: int = 1, checkpoint: str = "best", batch_size: int = 32, workers: int | None = None,
                  progress: bool = True, tta: str | None = None, ensemble: str | None = None,
                  merge: str | None = None, accelerator: str = "auto") -> Path:
    """Write `path,label,probability` (+ label_k, probability_k up to top_k, and error) for every
    image, predicted with one TTA spec and one ensemble (left out: see ``prediction_defaults``).
    `run_dir` may also be an onnx or torchscript export (``transferkit export``), whose views
    are in its graph. Rows are written as their batch is predicted (see the module's docstring);
    `workers` left out: ``default_workers``."""
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
    if workers is None:
        workers = default_workers(len(items), predictor.images_per_batch(batch_size))
    batches = predict_batches(predictor, items, classes, top_k=top_k, batch_size=batch_size, workers=workers,
                              progress=progress, probabilities=False)
    return write_predictions(itertools.chain.from_iterable(batches), out, top_k)
