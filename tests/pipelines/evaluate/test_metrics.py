"""Metrics of predicted probabilities: calibration bins and ECE, by hand and against torchmetrics."""
from __future__ import annotations

import numpy as np
import pytest

from transferkit.pipelines.evaluate.metrics import expected_calibration_error, reliability_bins


def test_calibration_bins_and_ece_by_hand():
    probs = np.array([[0.93, 0.07], [0.85, 0.15], [0.28, 0.72], [0.44, 0.56], [0.03, 0.97]])
    labels = np.array([0, 1, 1, 0, 1])
    b = reliability_bins(probs, labels, bins=10)
    assert b["count"].tolist() == [0, 0, 0, 0, 0, 1, 0, 1, 1, 2]
    assert b["accuracy"][9] == 1.0 and b["confidence"][9] == pytest.approx(0.95)
    assert b["accuracy"][8] == 0.0 and np.isnan(b["accuracy"][0])
    # 15 bins: every sample alone in its bin
    gaps = [1 - 0.93, 0.85, 1 - 0.72, 0.56, 1 - 0.97]
    assert expected_calibration_error(probs, labels, bins=15) == pytest.approx(sum(gaps) / 5)


def test_ece_equals_torchmetrics_on_random_predictions():
    import torch
    from torchmetrics.functional.classification import multiclass_calibration_error

    rng = np.random.default_rng(0)
    logits = rng.normal(0, 2, (500, 4))
    probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    labels = rng.integers(0, 4, 500)
    theirs = multiclass_calibration_error(torch.tensor(probs), torch.tensor(labels), num_classes=4, n_bins=15,
                                          norm="l1")
    assert expected_calibration_error(probs, labels, bins=15) == pytest.approx(float(theirs), abs=1e-6)
