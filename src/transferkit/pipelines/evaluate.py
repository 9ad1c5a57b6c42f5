"""Metrics (scikit-learn), plots, and loading a trained model back from its run directory."""
from __future__ import annotations

import csv
import logging
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader

from transferkit.backbones import factory
from transferkit.backbones.factory import DataConfig
from transferkit.errors import CheckpointError
from transferkit.pipelines.config import FitConfig
from transferkit.pipelines.run import RunDir, safe_load

log = logging.getLogger(__name__)


def reliability_bins(probs: np.ndarray, labels: np.ndarray, bins: int = 15) -> dict[str, np.ndarray]:
    """Equal-width confidence bins: mean confidence, accuracy and count per bin (NaN when empty).

    scikit-learn's ``calibration_curve`` bins one class's probability, not the top-1 confidence.
    """
    conf = probs.max(1)
    correct = probs.argmax(1) == labels
    edges = np.linspace(0.0, 1.0, bins + 1)
    which = np.clip(np.searchsorted(edges, conf, side="left") - 1, 0, bins - 1)  # (lo, hi] per bin
    count = np.bincount(which, minlength=bins).astype(float)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_conf = np.bincount(which, weights=conf, minlength=bins) / count
        accuracy = np.bincount(which, weights=correct.astype(float), minlength=bins) / count
    return {"edges": edges, "confidence": mean_conf, "accuracy": accuracy, "count": count}


def expected_calibration_error(probs: np.ndarray, labels: np.ndarray, bins: int = 15) -> float:
    """ECE with equal-width confidence bins (Guo et al. 2017); no library offers it for numpy."""
    b = reliability_bins(probs, labels, bins)
    used = b["count"] > 0
    if not used.any():
        return 0.0
    gap = np.abs(b["accuracy"][used] - b["confidence"][used])
    return float(np.sum(b["count"][used] / b["count"].sum() * gap))


def classification_metrics(probs: np.ndarray, labels: np.ndarray, classes: Sequence[str]) -> dict:
    from sklearn.metrics import (
        accuracy_score,
        classification_report,
        confusion_matrix,
        f1_score,
        log_loss,
        top_k_accuracy_score,
    )

    k = len(classes)
    pred = probs.argmax(1)
    ids = list(range(k))
    out = {
        "accuracy": float(accuracy_score(labels, pred)),
        "macro_f1": float(f1_score(labels, pred, average="macro", labels=ids, zero_division=0)),
        "nll": float(log_loss(labels, np.clip(probs, 1e-12, 1.0), labels=ids)),
        "ece": expected_calibration_error(probs, labels),
        "count": int(len(labels)),
    }
    if k >= 5:
        out["top5_accuracy"] = float(top_k_accuracy_score(labels, probs, k=5, labels=ids))
    report = classification_report(labels, pred, labels=ids, target_names=list(classes),
                                   output_dict=True, zero_division=0)
    out["per_class"] = {c: {m: float(report[c][m]) for m in ("precision", "recall", "f1-score", "support")}
                        for c in classes}
    out["confusion_matrix"] = confusion_matrix(labels, pred, labels=ids).tolist()
    return out


@torch.inference_mode()
def predict_proba(model: nn.Module, loader: DataLoader, device: torch.device | str = "cpu",
                  desc: str = "predicting", progress: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """Softmax probabilities and labels for every batch of (images, labels, ...)."""
    from tqdm.auto import tqdm

    model.eval().to(device)
    probs, labels = [], []
    for batch in tqdm(loader, desc=desc, leave=False, disable=not progress):
        x, y = batch[0], batch[1]
        probs.append(torch.softmax(model(x.to(device)).float(), -1).cpu())
        labels.append(torch.as_tensor(y))
    return torch.cat(probs).numpy(), torch.cat(labels).numpy()


def run_config(run: RunDir) -> FitConfig:
    return FitConfig.from_dict(run.read_config()["fit"], source=str(run.config))


def build_model(run: RunDir) -> tuple[nn.Module, DataConfig]:
    """The run's architecture with random weights (nothing is downloaded) and its data config."""
    cfg = run_config(run)
    return factory.create(cfg.backbone, len(run.classes()), pretrained=False, plugin=cfg.backbone_plugin,
                          image_size=cfg.image_size, quiet=True)


def load_weights(model: nn.Module, state_dict: dict) -> nn.Module:
    """Load a LightningModule state_dict (keys ``model.…``) into the bare network; eval mode."""
    model.load_state_dict({k[len("model."):]: v for k, v in state_dict.items() if k.startswith("model.")})
    return model.eval()


def load_model(run: RunDir, checkpoint: str = "best", key: str = "state_dict") -> tuple[nn.Module, DataConfig]:
    """Rebuild the run's architecture (no download) and load a checkpoint's weights safely;
    ``key="ema_state_dict"`` loads the averaged weights of a ``fit --ema`` run."""
    model, data_cfg = build_model(run)
    ckpt = safe_load(run.checkpoint(checkpoint))
    if key not in ckpt:
        raise CheckpointError(f"{run.checkpoint(checkpoint)} holds no {key}; use a checkpoint written by"
                              " `transferkit fit`" + (" --ema" if key == "ema_state_dict" else ""))
    return load_weights(model, ckpt[key]), data_cfg


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
