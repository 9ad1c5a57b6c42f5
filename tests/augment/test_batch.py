"""Mixup / CutMix: exact mixing and label weights in every mode and batch size, statistics, errors."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from transferkit.augment.batch import BatchMixer, smooth_one_hot, soft_target_cross_entropy
from transferkit.errors import ConfigError

MODES = ["batch", "pair", "elem"]


def constant_batch(b: int, h: int = 12, w: int = 20) -> tuple[torch.Tensor, torch.Tensor]:
    """Image i is filled with the value i + 1 and has label i: every pixel tells where it came from."""
    x = (torch.arange(b, dtype=torch.float32) + 1).view(b, 1, 1, 1).expand(b, 3, h, w).contiguous()
    return x, torch.arange(b)


def mixer(b: int, seed: int = 0, **kwargs) -> BatchMixer:
    return BatchMixer(num_classes=b, generator=torch.Generator().manual_seed(seed), **kwargs)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("b", [2, 5, 8])
def test_mixup_output_is_the_weighted_sum_with_the_target_weights(mode, b):
    x = torch.randn(b, 3, 6, 6, generator=torch.Generator().manual_seed(1))
    y = torch.arange(b)
    for seed in range(5):
        mixed, targets = mixer(b, seed, mixup_alpha=0.4, mode=mode)(x, y)
        for i in range(b):
            p = b - 1 - i
            if p == i:  # the middle of an odd batch: its own partner, left alone
                assert torch.equal(mixed[i], x[i])
                assert torch.equal(targets[i], F.one_hot(y[i], b).float())
                continue
            lam, partner = targets[i, i], targets[i, p]
            assert torch.equal(mixed[i], x[i] * lam + x[p] * partner)
            assert lam + partner == pytest.approx(1.0, abs=1e-6)
            assert targets[i].sum() == pytest.approx(1.0, abs=1e-6)
        lams = targets[torch.arange(b), y]
        if mode == "batch":  # one lambda for all (but an odd batch's middle element)
            assert torch.all(lams[torch.arange(b) != (b - 1) / 2] == lams[0])
        if mode == "pair":  # partners share their lambda
            assert torch.equal(lams, lams.flip(0))


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("b", [1, 2, 3, 7, 8])
def test_cutmix_label_weight_is_exactly_the_pasted_area_fraction(mode, b):
    x, y = constant_batch(b)
    h, w = x.shape[2:]
    for seed in range(8):
        mixed, targets = mixer(b, seed, cutmix_alpha=1.0, mode=mode)(x, y)
        for i in range(b):
            p = b - 1 - i
            pasted = mixed[i, 0] == p + 1
            assert torch.all(mixed[i] == torch.where(pasted, x[p], x[i]))
            assert targets[i].sum() == pytest.approx(1.0, abs=1e-6)
            if p == i:
                assert torch.equal(targets[i], F.one_hot(y[i], b).float())
                continue
            count = int(pasted.sum())
            assert targets[i, p] == torch.tensor(count / (h * w), dtype=torch.float32)  # exact
            if count:  # one rectangle
                rows, cols = pasted.any(1).nonzero(), pasted.any(0).nonzero()
                assert count == (rows.max() - rows.min() + 1) * (cols.max() - cols.min() + 1)


def test_mixup_lambda_follows_its_beta_distribution():
    b, alpha = 2001, 0.4
    x, y = constant_batch(b, 2, 2)
    _, targets = mixer(b, mixup_alpha=alpha, mode="elem")(x, y)
    lam = targets[torch.arange(b), y].double()
    lam = torch.cat([lam[: b // 2], lam[b // 2 + 1:]])
    assert lam.mean() == pytest.approx(0.5, abs=0.03)
    assert lam.var() == pytest.approx(1 / (4 * (2 * alpha + 1)), abs=0.015)


def test_mixing_probability_and_switch_probability():
    b = 2000
    x, y = constant_batch(b, 4, 4)
    mixed, targets = mixer(b, mixup_alpha=1.0, cutmix_alpha=1.0, prob=0.6, switch_prob=0.25, mode="elem")(x, y)
    distinct = torch.tensor([len(torch.unique(m[0])) for m in mixed])
    was_mixed = targets[torch.arange(b), y] < 1
    cut = was_mixed & (distinct == 2)
    assert was_mixed.float().mean() == pytest.approx(0.6, abs=4 * math.sqrt(0.24 / b) + 1 / 16)
    assert (cut.sum() / was_mixed.sum()).item() == pytest.approx(0.25, abs=0.06)


def test_label_smoothing_is_folded_into_the_soft_targets():
    b, s = 6, 0.1
    x, y = constant_batch(b)
    plain = mixer(b, label_smoothing=s)
    assert not plain.enabled
    same, targets = plain(x, y)
    assert same is x
    assert torch.allclose(targets, F.one_hot(y, b) * (1 - s) + s / b)
    _, mixed = mixer(b, mixup_alpha=1.0, label_smoothing=s, mode="elem")(x, y)
    smooth = smooth_one_hot(y, b, s)
    lam = (mixed[torch.arange(b), y] - s / b) / (1 - s)  # the class's weight before smoothing
    expected = lam.view(-1, 1) * smooth + (1 - lam.view(-1, 1)) * smooth.flip(0)
    assert torch.allclose(mixed, expected, atol=1e-6)
    assert torch.allclose(mixed.sum(1), torch.ones(b), atol=1e-6)


def test_smooth_one_hot_values():
    t = smooth_one_hot(torch.tensor([2, 0]), 4, 0.2)
    assert torch.equal(t, torch.tensor([[0.05, 0.05, 0.85, 0.05], [0.85, 0.05, 0.05, 0.05]]))


def test_soft_target_cross_entropy_matches_torch_on_smoothed_one_hot_targets():
    logits = torch.randn(5, 4, generator=torch.Generator().manual_seed(0))
    y = torch.tensor([0, 3, 1, 1, 2])
    expected = F.cross_entropy(logits, y, label_smoothing=0.1)
    assert soft_target_cross_entropy(logits, smooth_one_hot(y, 4, 0.1)) == pytest.approx(expected.item(), abs=1e-6)
    with pytest.raises(ValueError, match="differ in shape"):
        soft_target_cross_entropy(logits, torch.zeros(5, 3))


def test_disabling_returns_the_batch_unchanged():
    x, y = constant_batch(4)
    m = mixer(4, cutmix_alpha=1.0)
    m.enabled = False
    out, targets = m(x, y)
    assert out is x and torch.equal(targets, F.one_hot(y, 4).float())


def test_the_same_seed_reproduces_the_mix():
    x, y = constant_batch(6)
    a = mixer(6, seed=3, mixup_alpha=0.4, cutmix_alpha=1.0, mode="elem")(x, y)
    b = mixer(6, seed=3, mixup_alpha=0.4, cutmix_alpha=1.0, mode="elem")(x, y)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    global_rng = BatchMixer(6, mixup_alpha=0.4, mode="elem")
    torch.manual_seed(0)
    c = global_rng(x, y)
    torch.manual_seed(0)
    assert torch.equal(c[0], global_rng(x, y)[0])


@pytest.mark.parametrize("kwargs, message", [
    ({"num_classes": 0}, "num_classes=0 is invalid"),
    ({"mixup_alpha": -0.2}, r"mixup_alpha=-0.2 is invalid: give a number in \[0, inf\]"),
    ({"cutmix_alpha": float("nan")}, "cutmix_alpha=nan is invalid: give a number"),
    ({"prob": 1.5}, r"mixing prob=1.5 is invalid: give a number in \[0, 1\]"),
    ({"switch_prob": "half"}, "switch_prob='half' is invalid"),
    ({"mode": "pairs"}, "mixing mode 'pairs' is unknown; valid ones: batch, pair, elem"),
    ({"label_smoothing": 1.0}, r"label_smoothing=1.0 is invalid: give a number in \[0, 1\)"),
])
def test_bad_settings_raise_config_error(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        BatchMixer(**{"num_classes": 3, **kwargs})
