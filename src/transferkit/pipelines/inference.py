"""`evaluate` and `predict` on a finished run: the same loading and forward code for both."""
from __future__ import annotations

import csv
import logging
import os
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader

from transferkit.augment.image import eval_transform
from transferkit.errors import DataError
from transferkit.pipelines.data import ImageDataset, Sample, read_split_csv, scan_folder
from transferkit.pipelines.evaluate import (classification_metrics, load_model, plot_confusion,
                                            predict_proba, run_config)
from transferkit.pipelines.images import is_image_file, probe_image
from transferkit.pipelines.run import RunDir

log = logging.getLogger(__name__)


def _device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def eval_samples(run: RunDir, data: str | Path | None, split: str, classes: Sequence[str]) -> list[Sample]:
    """The images to evaluate: the run's saved split, or a folder given now."""
    if data is None:
        path = run.splits / f"{split}.csv"
        if not path.exists():
            raise DataError(f"the run has no saved {split} split ({path}); pass DATA with a {split}/ folder")
        return read_split_csv(path, classes)
    scan = scan_folder(data)
    if scan.presplit:
        if split not in scan.splits:
            raise DataError(f"{data} has no {split}/ folder; use --split val, or pass a folder of class folders")
        samples = scan.splits[split]
    else:
        samples = scan.splits["train"]
    if list(scan.classes) != list(classes):
        raise DataError(f"{data} has classes {scan.classes} but the run was trained on {list(classes)};"
                        " evaluate on a folder with the same class sub-folders")
    return samples


def evaluate_run(run_dir: str | Path, data: str | Path | None = None, split: str = "val",
                 checkpoint: str = "best", batch_size: int | None = None, workers: int = 0,
                 progress: bool = True) -> dict:
    """Metrics of a checkpoint on a split; writes RUN/evaluation.json and a confusion plot."""
    run = RunDir.open(run_dir)
    classes = run.classes()
    cfg = run_config(run)
    samples = eval_samples(run, data, split, classes)
    model, dc = load_model(run, checkpoint)
    tf = eval_transform(dc.input_size[1:], dc.mean, dc.std, dc.crop_pct, dc.interpolation)
    loader = DataLoader(ImageDataset(samples, tf), batch_size=batch_size or cfg.batch_size,
                        num_workers=workers)
    probs, labels = predict_proba(model, loader, _device(), desc=f"evaluating {split}", progress=progress)
    metrics = classification_metrics(probs, labels, classes)
    result = {"split": split, "data": str(data) if data else "run split", "checkpoint": checkpoint,
              "tta": "none", "ensemble": "none", **metrics}
    body = {"run": str(run.path), "classes": classes, "results": [result]}
    run.write_json(run.evaluation, body)
    plot_confusion(metrics["confusion_matrix"], classes, run.plots / f"confusion-{split}.png",
                   title=f"{split}: accuracy {metrics['accuracy']:.3f}")
    return body


def collect_images(paths: Sequence[str | Path]) -> tuple[list[Path], list[tuple[str, str]]]:
    """Image files from files and folders (recursively), and the unusable ones with reasons."""
    found: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            for dirpath, dirnames, files in os.walk(p):
                dirnames.sort()
                found += [Path(dirpath) / f for f in sorted(files) if is_image_file(Path(f))]
        elif p.is_file():
            found.append(p)
        else:
            raise DataError(f"{p} does not exist; pass image files or folders of images")
    good, bad = [], []
    for f in found:
        reason = probe_image(f) if is_image_file(f) else f"not an image extension ({f.suffix or 'none'})"
        (bad.append((str(f), reason)) if reason else good.append(f))
    for path, reason in bad:
        log.warning("skipping %s: %s", path, reason)
    if not good:
        raise DataError(f"no readable images in {', '.join(map(str, paths))}; pass image files or folders")
    return good, bad


def predict_paths(run_dir: str | Path, paths: Sequence[str | Path], out: str | Path = "predictions.csv",
                  top_k: int = 1, checkpoint: str = "best", batch_size: int = 32, workers: int = 0,
                  progress: bool = True) -> Path:
    """Write `path,label,probability` (+ label_k, probability_k up to top_k) for every image."""
    run = RunDir.open(run_dir)
    classes = run.classes()
    if not 1 <= top_k <= len(classes):
        raise DataError(f"--top-k {top_k} must be between 1 and the number of classes ({len(classes)})")
    files, _ = collect_images(paths)
    model, dc = load_model(run, checkpoint)
    tf = eval_transform(dc.input_size[1:], dc.mean, dc.std, dc.crop_pct, dc.interpolation)
    loader = DataLoader(ImageDataset([Sample(str(f), -1) for f in files], tf), batch_size=batch_size,
                        num_workers=workers)
    probs, _ = predict_proba(model, loader, _device(), progress=progress)
    order = np.argsort(-probs, axis=1)[:, :top_k]
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    header = ["path", "label", "probability"]
    for k in range(2, top_k + 1):
        header += [f"label_{k}", f"probability_{k}"]
    tmp = out.with_suffix(out.suffix + ".tmp")
    with tmp.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        for path, row, top in zip(files, probs, order):
            cells = [str(path)]
            for j in top:
                cells += [classes[j], f"{row[j]:.6f}"]
            w.writerow(cells)
    tmp.replace(out)
    return out
