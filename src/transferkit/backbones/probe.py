"""The linear probe: multinomial logistic regression on frozen features, solved, not trained.

A frozen backbone makes fitting its head a convex problem, so the head is solved to convergence
(full batch, torch's L-BFGS with a strong-Wolfe line search) on standardised
features, with the L2 strength chosen by stratified k-fold cross-validation over a log grid,
the way linear-probe evaluations are done (Kornblith et al., 2019; CLIP; SimCLR). The
standardisation is folded back into the weights, so the result is an ordinary ``nn.Linear`` on
the raw features. One implementation serves both the advisor's probe and the ``freeze`` head:
the probe accuracy the advisor reports is the cross-validated accuracy of the head ``freeze``
delivers.

Training rows may hold several views of each image (augmented draws from the feature cache);
folds split images, never views, and held-out images are scored on their first (clean) view.
The same inputs on the same machine give the same head to the bit.
"""
from __future__ import annotations

import logging
import time
from contextlib import contextmanager
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

log = logging.getLogger(__name__)

# L2 strengths (of the mean loss: loss = CE + l2/2 * |W|^2), strongest first: each fit starts
# from the previous, simpler solution, which is where L-BFGS converges fastest.
GRID = tuple(float(10.0**e) for e in range(2, -7, -1))
MAX_FOLDS = 5
# float32: 8x faster than float64 here on 4,800 x 1,280 rows, with the same choices and accuracy.
DTYPE = torch.float32
# Below this many multiply-adds per pass one thread is faster: a thread pool on two busy cores
# spun 8x slower than one thread on 1,000 x 256 rows.
ONE_THREAD_WORK = 5e7
# L-BFGS stops when no gradient entry exceeds this (the mean loss's scale).
TOLERANCE = 1e-6
# The grid walk stops after this many strengths in a row that raise no held-out accuracy: weaker
# strengths only overfit more, and on separable data they are the slow fits. Among the strengths
# walked, the best held-out accuracy wins and ties go to the strongest (the simplest head, as
# scikit-learn's LogisticRegressionCV does): breaking ties by held-out log-loss instead lost 1.3
# points on two of four few-shot cells of benchmarks/freeze_head.py and won none.
PATIENCE = 2
# Used when no fold can be held out (a class with one image): a moderate strength.
FALLBACK_L2 = 1e-2


@dataclass(frozen=True)
class ProbeFit:
    """A solved head: ``weight`` (classes, dims) and ``bias`` on the raw features, and how it was chosen."""

    weight: torch.Tensor
    bias: torch.Tensor
    l2: float
    folds: int
    cv_accuracy: float | None         # held-out accuracy over every image, at the chosen l2
    fold_accuracy: list[float] = field(default_factory=list)
    grid: dict[str, float] = field(default_factory=dict)   # l2 -> held-out accuracy
    iterations: int = 0               # L-BFGS iterations of the final fit
    seconds: float = 0.0

    def to_dict(self) -> dict:
        return {"solver": "lbfgs", "l2": self.l2, "folds": self.folds, "cv_accuracy": self.cv_accuracy,
                "fold_accuracy": self.fold_accuracy, "grid": self.grid, "iterations": self.iterations,
                "seconds": round(self.seconds, 3)}

    def load_into(self, linear: nn.Linear) -> None:
        with torch.no_grad():
            linear.weight.copy_(self.weight.to(linear.weight))
            linear.bias.copy_(self.bias.to(linear.bias))


def _fit(z: torch.Tensor, y: torch.Tensor, l2: float, w: torch.Tensor, b: torch.Tensor, loss_kw: dict,
         max_iter: int) -> tuple[torch.Tensor, torch.Tensor, int]:
    w = w.clone().requires_grad_(True)
    b = b.clone().requires_grad_(True)
    opt = torch.optim.LBFGS([w, b], lr=1.0, max_iter=max_iter, history_size=20, tolerance_grad=TOLERANCE,
                            tolerance_change=1e-12, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(z @ w + b, y, **loss_kw) + 0.5 * l2 * (w * w).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    return w.detach(), b.detach(), int(opt.state[w].get("n_iter", 0))


def _held_out(z: torch.Tensor, y: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> tuple[int, float]:
    logits = z @ w + b
    return int((logits.argmax(1) == y).sum()), float(F.cross_entropy(logits, y, reduction="sum"))


class _Rows:
    """Training rows in the basis of their own span when there are fewer rows than dimensions.

    An L2-penalised linear model's weights lie in the span of its training rows, so with
    ``rows = U S V^T`` the weights are ``V A`` and the problem shrinks from d to rank dimensions
    (the penalty ``|W|^2 = |A|^2`` is unchanged): 4x less work for 300 images of 1280-d features.
    """

    def __init__(self, rows: torch.Tensor):
        self.basis = None
        if rows.shape[0] < rows.shape[1]:
            u, sv, vh = torch.linalg.svd(rows, full_matrices=False)
            keep = sv > sv.max() * max(rows.shape) * torch.finfo(rows.dtype).eps
            self.basis = vh[keep].T                    # (d, rank)
            self.rows = u[:, keep] * sv[keep]          # rows @ basis
        else:
            self.rows = rows

    def project(self, z: torch.Tensor) -> torch.Tensor:
        return z if self.basis is None else z @ self.basis

    def weights(self, a: torch.Tensor) -> torch.Tensor:
        return a if self.basis is None else self.basis @ a

    def start(self, w: torch.Tensor) -> torch.Tensor:
        return w if self.basis is None else self.basis.T @ w


@contextmanager
def _threads_for(work: float):
    if work >= ONE_THREAD_WORK:
        yield
        return
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def solve_probe(features, labels, *, num_classes: int | None = None, label_smoothing: float = 0.0,
                class_weight=None, grid: tuple[float, ...] = GRID, seed: int = 0, max_iter: int = 500,
                cross_validate: bool = True) -> ProbeFit:
    """Solve the head on `features` ``(n, d)`` or ``(views, n, d)`` and `labels` ``(n,)``.

    The L2 strength is the grid value with the best held-out accuracy (ties: the strongest), over
    ``k = min(5, smallest class)`` stratified folds of the images; then the head
    is fitted on every row with it. `class_weight` (one per class) weighs the loss as training's
    ``--class-weights`` does. Without enough images to hold any out (or with
    ``cross_validate=False`` and a one-value grid) the first grid value, or FALLBACK_L2, is used.
    """
    x = torch.as_tensor(np.asarray(features), dtype=DTYPE)
    k = int(num_classes if num_classes is not None else int(np.max(labels)) + 1)
    with _threads_for(x.numel() * k):
        loss_kw = {"label_smoothing": label_smoothing,
                   "weight": None if class_weight is None else torch.as_tensor(class_weight, dtype=DTYPE)}
        return _solve(x, labels, k, loss_kw, grid, seed, max_iter, cross_validate)


def _solve(x: torch.Tensor, labels, k: int, loss_kw: dict, grid: tuple[float, ...], seed: int,
           max_iter: int, cross_validate: bool) -> ProbeFit:
    from sklearn.model_selection import StratifiedKFold

    start = time.perf_counter()
    if x.ndim == 2:
        x = x[None]
    views, n, d = x.shape
    y = torch.as_tensor(np.asarray(labels), dtype=torch.long)
    if len(y) != n:
        raise ValueError(f"features hold {n} images but labels {len(y)}")
    flat = x.reshape(-1, d)
    mean = flat.mean(0)
    std = flat.std(0, correction=0)
    std = torch.where(std > 1e-8, std, torch.ones_like(std))  # a constant feature carries nothing
    z = (x - mean) / std
    zero_w, zero_b = torch.zeros(d, k, dtype=DTYPE), torch.zeros(k, dtype=DTYPE)

    counts = np.bincount(y.numpy(), minlength=k)
    present = counts[counts > 0]
    folds = int(min(MAX_FOLDS, present.min())) if cross_validate and len(present) > 1 else 0
    folds = folds if folds >= 2 else 0  # one fold holds nothing out
    chosen, cv_acc, fold_acc, table = (grid[0] if len(grid) == 1 else FALLBACK_L2), None, [], {}
    if folds >= 2 and len(grid) > 1:
        splits = list(StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed).split(np.zeros(n), y.numpy()))
        fold_rows = [_Rows(z[:, tr].reshape(-1, d)) for tr, _ in splits]
        fold_y = [y[tr].repeat(views) for tr, _ in splits]
        held = [(rows.project(z[0, te]), y[te]) for rows, (_, te) in zip(fold_rows, splits)]
        state = [rows.start(zero_w) for rows in fold_rows], [zero_b] * folds
        scores, since = [], 0
        for g, l2 in enumerate(grid):
            correct, nll = [], 0.0
            for f in range(folds):
                a, bias, _ = _fit(fold_rows[f].rows, fold_y[f], l2, state[0][f], state[1][f], loss_kw,
                                  max_iter)
                state[0][f], state[1][f] = a, bias
                c, loss = _held_out(*held[f], a, bias)
                correct.append(c)
                nll += loss
            scores.append((sum(correct) / n, nll / n, correct))
            top = max(sc[0] for sc in scores[:-1]) if g else -1.0
            since = 0 if scores[g][0] > top else since + 1
            if since >= PATIENCE:
                break
        best = max(range(len(scores)), key=lambda g: (scores[g][0], -g))
        chosen, cv_acc = grid[best], float(scores[best][0])
        fold_acc = [c / len(te) for c, (_, te) in zip(scores[best][2], splits)]
        table = {f"{l2:g}": float(sc[0]) for l2, sc in zip(grid, scores)}
    rows = _Rows(z.reshape(-1, d))
    a, b, iterations = _fit(rows.rows, y.repeat(views), chosen, rows.start(zero_w), zero_b, loss_kw, max_iter)
    w = rows.weights(a)
    weight = (w / std[:, None]).T.contiguous()
    bias = b - (mean / std) @ w
    fit = ProbeFit(weight.float(), bias.float(), chosen, folds, cv_acc, fold_acc, table, iterations,
                   time.perf_counter() - start)
    log.debug("solved a %d-class head on %d x %d rows: l2 %g, held-out accuracy %s, %d iterations, %.1f s",
              k, views * n, d, chosen, cv_acc, iterations, fit.seconds)
    return fit
