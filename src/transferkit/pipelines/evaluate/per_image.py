"""Per-image predictions, and what a person reads off them first.

Every run leaves ``predictions-<split>.csv``: one row per scored image, ``path,label,predicted,
probability,loss,correct`` and the next classes by probability (``predicted_k``,
``probability_k``). From the same rows: the most confused class pairs (counts, the off-diagonal
cells of the confusion matrix, largest first) and the top losses (the misclassified images, most
confidently wrong first).
"""
from __future__ import annotations

import csv
from pathlib import Path
from typing import Sequence

import numpy as np

from transferkit.pipelines.data.splits import CSV_TEXT
from transferkit.pipelines.rundir import atomic_write

# Caps on what report.json, evaluation.json and report.html carry; the CSV holds every image.
TOP_LOSSES = 50
MOST_CONFUSED = 20
BASE_COLUMNS = ("path", "label", "predicted", "probability", "loss", "correct")


def per_image_rows(paths: Sequence[str], probs: np.ndarray, labels: np.ndarray, classes: Sequence[str],
                   top_k: int = 3) -> list[dict]:
    """One row per image; ``predicted`` is the argmax (the first of tied classes, as the confusion
    matrix counts it) and ``loss`` the cross-entropy of the true class."""
    probs = np.asarray(probs, dtype=np.float64)
    labels = np.asarray(labels)
    if not (len(paths) == len(probs) == len(labels)):
        raise ValueError(f"{len(paths)} paths, {len(probs)} probability rows and {len(labels)} labels")
    k = max(1, min(top_k, len(classes)))
    rows = []
    for path, p, y in zip(paths, probs, labels):
        top = np.argsort(-p, kind="stable")[:k]
        pred = int(np.argmax(p))
        row = {"path": str(path), "label": classes[int(y)], "predicted": classes[pred],
               "probability": float(p[pred]), "loss": float(-np.log(max(p[int(y)], 1e-12))),
               "correct": pred == int(y)}
        for j, c in enumerate(top[1:], start=2):  # top[0] is the argmax: a stable sort keeps the first tie
            row[f"predicted_{j}"], row[f"probability_{j}"] = classes[int(c)], float(p[c])
        rows.append(row)
    return rows


def write_per_image(rows: Sequence[dict], path: str | Path) -> Path:
    path = Path(path)
    extra = sorted({key for r in rows for key in r if key not in BASE_COLUMNS},
                   key=lambda key: (int(key.rsplit("_", 1)[1]), key))
    with atomic_write(path, "w", **CSV_TEXT) as f:
        w = csv.writer(f)
        w.writerow([*BASE_COLUMNS, *extra])
        for r in rows:
            w.writerow([_cell(r.get(c, "")) for c in (*BASE_COLUMNS, *extra)])
    return path


def _cell(v) -> str:
    if isinstance(v, bool):
        return "1" if v else "0"
    if isinstance(v, float):
        return f"{v:.6g}"
    return str(v)


def read_per_image(path: str | Path) -> list[dict]:
    """The rows of a predictions CSV, numbers as numbers."""
    with open(path, **CSV_TEXT) as f:
        rows = list(csv.DictReader(f))
    for r in rows:
        r["correct"] = r["correct"] == "1"
        for key in list(r):
            if key in ("probability", "loss") or key.startswith("probability_"):
                r[key] = float(r[key]) if r[key] != "" else float("nan")
    return rows


def most_confused(rows: Sequence[dict], limit: int | None = MOST_CONFUSED) -> list[dict]:
    """``{"label", "predicted", "count"}`` for every pair of distinct classes that occurs, largest
    count first (ties by the true then the predicted class)."""
    counts: dict[tuple[str, str], int] = {}
    for r in rows:
        if not r["correct"]:
            key = (r["label"], r["predicted"])
            counts[key] = counts.get(key, 0) + 1
    pairs = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))
    return [{"label": a, "predicted": b, "count": n} for (a, b), n in pairs[:limit]]


def top_losses(rows: Sequence[dict], limit: int | None = TOP_LOSSES) -> list[dict]:
    """The misclassified images, highest loss first: ``path, label, predicted, probability, loss``."""
    wrong = sorted((r for r in rows if not r["correct"]), key=lambda r: (-r["loss"], r["path"]))
    return [{k: r[k] for k in ("path", "label", "predicted", "probability", "loss")} for r in wrong[:limit]]


def summary(rows: Sequence[dict]) -> dict:
    """What report.json and evaluation.json carry of the rows."""
    return {"most_confused": most_confused(rows), "top_losses": top_losses(rows)}
