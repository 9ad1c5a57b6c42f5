"""The plots a run leaves in RUN/plots: curves, confusion matrix, reliability diagram (matplotlib, Agg)."""
from __future__ import annotations

import csv
from pathlib import Path
from typing import Sequence

import numpy as np

from transferkit.pipelines.evaluate.metrics import expected_calibration_error, reliability_bins


def plot_curves(metrics_csv: Path, out: Path) -> None:
    """Loss, accuracy (the EMA weights' too, when they were validated) and learning rate per epoch;
    the best epoch (highest val accuracy, the one best.ckpt holds) marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with metrics_csv.open(newline="") as f:
        rows = list(csv.DictReader(f))
    if not rows:
        return
    ep = [int(r["epoch"]) for r in rows]
    col = lambda k: np.array([float(r[k]) if r.get(k) else np.nan for r in rows])  # noqa: E731
    val_acc = col("val_acc")
    best = ep[int(np.nanargmax(val_acc))] if np.isfinite(val_acc).any() else None
    fig, (a1, a2, a3) = plt.subplots(1, 3, figsize=(14, 4))
    for axis, key, title in ((a1, "loss", "loss"), (a2, "acc", "accuracy")):
        axis.plot(ep, col(f"train_{key}"), "o-", label="train")
        axis.plot(ep, col(f"val_{key}"), "o-", label="val")
        if np.isfinite(col(f"val_{key}_ema")).any():
            axis.plot(ep, col(f"val_{key}_ema"), "s--", label="val, EMA weights")
        axis.set(xlabel="epoch", ylabel=title, title=title)
    a2.set_ylim(0, 1.02)
    a3.plot(ep, col("lr"), "o-", color="gray", label="lr at the epoch end")
    a3.set(xlabel="epoch", ylabel="learning rate", title="learning rate")
    for a in (a1, a2, a3):
        if best is not None:
            a.axvline(best, color="crimson", ls=":", lw=1.5, label=f"best epoch ({best})")
        a.grid(alpha=0.3)
        a.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=90)
    plt.close(fig)


def plot_confusion(cm: Sequence[Sequence[int]], classes: Sequence[str], out: Path, title: str = "") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cm = np.asarray(cm)
    k = len(classes)
    size = min(12, 2.5 + 0.5 * k)
    fig, ax = plt.subplots(figsize=(size, size))
    ax.imshow(cm, cmap="Blues")
    ax.set(xticks=range(k), yticks=range(k), xlabel="predicted", ylabel="true", title=title or "confusion matrix")
    ax.set_xticklabels(classes, rotation=45, ha="right")
    ax.set_yticklabels(classes)
    if k <= 30:
        hi = cm.max() if cm.size else 0
        for i in range(k):
            for j in range(k):
                ax.text(j, i, str(cm[i, j]), ha="center", va="center",
                        color="white" if cm[i, j] > hi / 2 else "black", fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)


def plot_reliability(probs: np.ndarray, labels: np.ndarray, out: Path, bins: int = 15, title: str = "") -> None:
    """Reliability diagram: accuracy against mean confidence per bin, with the bin counts below."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    b = reliability_bins(probs, labels, bins)
    edges = b["edges"]
    width = edges[1] - edges[0]
    used = b["count"] > 0
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(5, 6), sharex=True, gridspec_kw={"height_ratios": [3, 1]})
    top.plot([0, 1], [0, 1], "--", color="gray", label="perfect calibration")
    top.bar(edges[:-1][used], b["accuracy"][used], width=width, align="edge", edgecolor="black",
            alpha=0.8, label="accuracy")
    top.plot(b["confidence"][used], b["accuracy"][used], "o", color="crimson", ms=4, label="mean confidence")
    ece = expected_calibration_error(probs, labels, bins)
    top.set(ylabel="accuracy", xlim=(0, 1), ylim=(0, 1.02),
            title=title or f"reliability ({bins} bins): ECE {ece:.3f}")
    top.legend(loc="upper left", fontsize=8)
    top.grid(alpha=0.3)
    bottom.bar(edges[:-1], b["count"], width=width, align="edge", edgecolor="black", color="gray")
    bottom.set(xlabel="confidence", ylabel="images")
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
