"""Metrics of predicted probabilities (scikit-learn), and the plain probability pass they read."""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader


def reliability_bins(probs: np.ndarray, labels: np.ndarray, bins: int = 15) -> dict[str, np.ndarray]:
    """Equal-width confidence bins: mean confidence, accuracy and count per bin (NaN when empty).

    scikit-learn's ``calibration_curve`` bins one class's probability, not the top-1 confidence.
    """
    return confidence_bins(probs.max(1), probs.argmax(1) == labels, bins)


def confidence_bins(conf: np.ndarray, correct: np.ndarray, bins: int = 15) -> dict[str, np.ndarray]:
    """``reliability_bins`` from each prediction's top-1 confidence and whether it was right."""
    conf, correct = np.asarray(conf, dtype=np.float64), np.asarray(correct, dtype=bool)
    edges = np.linspace(0.0, 1.0, bins + 1)
    which = np.clip(np.searchsorted(edges, conf, side="left") - 1, 0, bins - 1)  # (lo, hi] per bin
    count = np.bincount(which, minlength=bins).astype(float)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_conf = np.bincount(which, weights=conf, minlength=bins) / count
        accuracy = np.bincount(which, weights=correct.astype(float), minlength=bins) / count
    return {"edges": edges, "confidence": mean_conf, "accuracy": accuracy, "count": count}


def expected_calibration_error(probs: np.ndarray, labels: np.ndarray, bins: int = 15) -> float:
    """ECE with equal-width confidence bins (Guo et al. 2017); no library offers it for numpy."""
    return ece_of(reliability_bins(probs, labels, bins))


def ece_of(b: dict[str, np.ndarray]) -> float:
    """ECE of bins from ``reliability_bins`` or ``confidence_bins``: the count-weighted gap."""
    used = b["count"] > 0
    if not used.any():
        return 0.0
    gap = np.abs(b["accuracy"][used] - b["confidence"][used])
    return float(np.sum(b["count"][used] / b["count"].sum() * gap))


def negative_log_likelihood(probs: np.ndarray, labels: np.ndarray) -> float:
    """Mean NLL of the true labels (probabilities clipped at 1e-12), as every report states it."""
    from sklearn.metrics import log_loss

    return float(log_loss(labels, np.clip(probs, 1e-12, 1.0), labels=list(range(probs.shape[1]))))


def classification_metrics(probs: np.ndarray, labels: np.ndarray, classes: Sequence[str]) -> dict:
    from sklearn.metrics import (
        accuracy_score,
        classification_report,
        confusion_matrix,
        f1_score,
        top_k_accuracy_score,
    )

    k = len(classes)
    pred = probs.argmax(1)
    ids = list(range(k))
    out = {
        "accuracy": float(accuracy_score(labels, pred)),
        "macro_f1": float(f1_score(labels, pred, average="macro", labels=ids, zero_division=0)),
        "nll": negative_log_likelihood(probs, labels),
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
                  desc: str = "predicting", progress: bool = True) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Softmax probabilities, labels and sample indices for every batch of (images, labels, index)."""
    from tqdm.auto import tqdm

    model.eval().to(device)
    probs, labels, index = [], [], []
    for batch in tqdm(loader, desc=desc, leave=False, disable=not progress):
        x, y, i = batch[0], batch[1], batch[2]
        probs.append(torch.softmax(model(x.to(device)).float(), -1).cpu())
        labels.append(torch.as_tensor(y))
        index.append(torch.as_tensor(i))
    return torch.cat(probs).numpy(), torch.cat(labels).numpy(), torch.cat(index).numpy()
