"""The plots a run leaves in RUN/plots: curves, confusion matrix, reliability diagram (matplotlib, Agg)."""
from __future__ import annotations

import csv
from pathlib import Path
from typing import Sequence

import numpy as np

from transferkit.pipelines.evaluate.metrics import expected_calibration_error, reliability_bins


def plot_curves(metrics_csv: Path, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with metrics_csv.open(newline="") as f:
        rows = list(csv.DictReader(f))
    if not rows:
        return
    ep = [int(r["epoch"]) for r in rows]
    col = lambda k: [float(r[k]) if r.get(k) else np.nan for r in rows]  # noqa: E731
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 4))
    a1.plot(ep, col("train_loss"), "o-", label="train")
    a1.plot(ep, col("val_loss"), "o-", label="val")
    a1.set(xlabel="epoch", ylabel="loss", title="loss")
    a2.plot(ep, col("train_acc"), "o-", label="train")
    a2.plot(ep, col("val_acc"), "o-", label="val")
    a2.set(xlabel="epoch", ylabel="accuracy", title="accuracy", ylim=(0, 1.02))
    for a in (a1, a2):
        a.grid(alpha=0.3)
        a.legend()
    fig.tight_layout()
    fig.savefig(out, dpi=100)
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
