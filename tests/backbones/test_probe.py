"""The solved linear probe: the optimum scikit-learn finds, folds of images not views, the same bits twice."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from transferkit.backbones.probe import FALLBACK_L2, GRID, solve_probe


def _blobs(n=120, d=16, k=3, scale=1.5, seed=0):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, k, n)
    x = rng.normal(size=(n, d)) + scale * rng.normal(size=(k, d))[y]
    return x, y


@pytest.mark.parametrize("d", [16, 200])  # 200 > 120 images: solved in the span of the rows
def test_a_fixed_strength_finds_the_optimum_scikit_learn_finds(d):
    from sklearn.linear_model import LogisticRegression

    x, y = _blobs(d=d)
    x = (x - x.mean(0)) / x.std(0)  # standardised already, so both penalise the same weights
    l2 = 1e-2
    fit = solve_probe(x, y, grid=(l2,), cross_validate=False)
    theirs = LogisticRegression(C=1.0 / (l2 * len(y)), tol=1e-10, max_iter=10_000).fit(x, y)
    ours = torch.softmax(torch.as_tensor(x, dtype=torch.float32) @ fit.weight.T + fit.bias, 1).numpy()
    assert np.abs(ours - theirs.predict_proba(x)).max() < 2e-3
    assert fit.l2 == l2 and fit.cv_accuracy is None


def test_the_standardisation_is_folded_into_a_plain_linear_head():
    x, y = _blobs()
    x = x * np.linspace(0.01, 100, x.shape[1]) + 7.0  # wildly different scales and an offset
    fit = solve_probe(x, y)
    head = torch.nn.Linear(x.shape[1], 3)
    fit.load_into(head)
    with torch.no_grad():
        acc = float((head(torch.as_tensor(x, dtype=torch.float32)).argmax(1).numpy() == y).mean())
    assert acc > 0.95
    assert set(fit.grid) <= {f"{g:g}" for g in GRID} and fit.l2 in GRID
    assert len(fit.fold_accuracy) == fit.folds == 5 and fit.iterations > 0


def test_the_same_inputs_give_the_same_head_to_the_bit():
    x, y = _blobs()
    views = np.stack([x, x + 0.1, x - 0.1])
    a, b = solve_probe(views, y, label_smoothing=0.1, seed=3), solve_probe(views, y, label_smoothing=0.1, seed=3)
    assert torch.equal(a.weight, b.weight) and torch.equal(a.bias, b.bias) and a.l2 == b.l2


def test_folds_hold_out_images_never_their_views():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(100, 30))
    y = rng.integers(0, 2, 100)  # labels carry no signal
    views = np.stack([x] * 4)    # four identical views: a held-out view would be remembered
    fit = solve_probe(views, y)
    assert fit.cv_accuracy < 0.7


def test_too_few_images_to_hold_any_out_fall_back_to_a_moderate_strength():
    x, y = _blobs(n=7)
    y[:] = [0, 0, 0, 1, 1, 1, 2]  # class 2 has a single image
    fit = solve_probe(x, y)
    assert (fit.folds, fit.l2, fit.cv_accuracy, fit.fold_accuracy) == (0, FALLBACK_L2, None, [])


def test_stronger_penalties_are_walked_first_and_the_walk_stops_when_accuracy_stops_rising():
    x, y = _blobs(scale=4.0)  # separable: every weak strength ties at the top
    fit = solve_probe(x, y)
    walked = list(fit.grid)
    assert walked == [f"{g:g}" for g in GRID[:len(walked)]] and len(walked) < len(GRID)
