"""Temperature scaling: the temperature that generated the labels is found, argmax never moves."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from transferkit.errors import CheckpointError
from transferkit.pipelines.evaluate.calibration import (apply_temperature, calibration_record, fit_temperature, scale,
                                                         store_temperature, temperature_of)
from transferkit.pipelines.rundir import CHECKPOINT_META, atomic_torch_save, safe_load


def _overconfident(n=4000, k=5, true_t=2.5, seed=0):
    """Logits whose labels were drawn from softmax(logits / true_t): the model is over-confident."""
    rng = np.random.default_rng(seed)
    z = rng.normal(scale=3.0, size=(n, k))
    p = np.exp(z / true_t) / np.exp(z / true_t).sum(1, keepdims=True)
    y = np.array([rng.choice(k, p=row) for row in p])
    probs = np.exp(z) / np.exp(z).sum(1, keepdims=True)
    return probs, y


def test_the_generating_temperature_is_found_and_nll_falls_with_accuracy_unchanged():
    probs, y = _overconfident()
    t = fit_temperature(probs, y)
    assert t == pytest.approx(2.5, rel=0.08)
    record = calibration_record(probs, y, t)
    assert record["after"]["nll"] < record["before"]["nll"] - 0.05
    assert record["after"]["ece"] < record["before"]["ece"]
    assert (scale(probs, t).argmax(1) == probs.argmax(1)).all()


def test_the_temperature_is_folded_into_a_linear_classifier():
    model = nn.Sequential(nn.Linear(4, 3))
    model.get_classifier = lambda: model[0]
    x = torch.randn(6, 4)
    before = model(x).detach()
    apply_temperature(model, 2.0)
    assert torch.allclose(model(x), before / 2.0, atol=1e-6)
    odd = nn.Module()
    odd.get_classifier = lambda: nn.Identity()
    with pytest.raises(CheckpointError, match="cannot apply a temperature to a Identity classifier"):
        apply_temperature(odd, 2.0)


def test_the_temperature_travels_in_the_checkpoint_and_the_weights_do_not_change(tmp_path):
    path = tmp_path / "best.ckpt"
    atomic_torch_save({"state_dict": {"model.w": torch.ones(2)}, CHECKPOINT_META: {"classes": ["a", "b"]}}, path)
    assert temperature_of(safe_load(path)) == 1.0
    store_temperature(path, 1.7)
    ckpt = safe_load(path)
    assert temperature_of(ckpt) == 1.7 and temperature_of(ckpt, "ema_state_dict") == 1.0
    assert ckpt[CHECKPOINT_META]["classes"] == ["a", "b"] and torch.equal(ckpt["state_dict"]["model.w"], torch.ones(2))
