"""The linear probe: multinomial logistic regression on frozen features, solved, not trained.

A frozen backbone makes fitting its head a convex problem, so the head is solved to convergence
(full batch, torch's L-BFGS with a strong-Wolfe line search, in float64) on standardised
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


def _fit(z: torch.Tensor, y: torch.Tensor, l2: float, w: torch.Tensor, b: torch.Tensor, smoothing: float,
         max_iter: int) -> tuple[torch.Tensor, torch.Tensor, int]:
    w = w.clone().requires_grad_(True)
    b = b.clone().requires_grad_(True)
    opt = torch.optim.LBFGS([w, b], lr=1.0, max_iter=max_iter, history_size=20, tolerance_grad=1e-7,
                            tolerance_change=1e-12, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(z @ w + b, y, label_smoothing=smoothing) + 0.5 * l2 * (w * w).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    return w.detach(), b.detach(), int(opt.state[w].get("n_iter", 0))


def _held_out(z: torch.Tensor, y: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> tuple[int, float]:
    logits = z @ w + b
    return int((logits.argmax(1) == y).sum()), float(F.cross_entropy(logits, y, reduction="sum"))


def solve_probe(features, labels, *, num_classes: int | None = None, label_smoothing: float = 0.0,
                grid: tuple[float, ...] = GRID, seed: int = 0, max_iter: int = 500,
                cross_validate: bool = True) -> ProbeFit:
    """Solve the head on `features` ``(n, d)`` or ``(views, n, d)`` and `labels` ``(n,)``.

    The L2 strength is the grid value with the best held-out accuracy (ties: the lower held-out
    log-loss), over ``k = min(5, smallest class)`` stratified folds of the images; then the head
    is fitted on every row with it. Without enough images to hold any out (or with
    ``cross_validate=False`` and a one-value grid) the first grid value, or FALLBACK_L2, is used.
    """
    from sklearn.model_selection import StratifiedKFold

    start = time.perf_counter()
    x = torch.as_tensor(np.asarray(features), dtype=torch.float64)
    if x.ndim == 2:
        x = x[None]
    views, n, d = x.shape
    y = torch.as_tensor(np.asarray(labels), dtype=torch.long)
    if len(y) != n:
        raise ValueError(f"features hold {n} images but labels {len(y)}")
    k = int(num_classes if num_classes is not None else int(y.max()) + 1)
    flat = x.reshape(-1, d)
    mean = flat.mean(0)
    std = flat.std(0, correction=0)
    std = torch.where(std > 1e-8, std, torch.ones_like(std))  # a constant feature carries nothing
    z = (x - mean) / std
    zero_w, zero_b = torch.zeros(d, k, dtype=torch.float64), torch.zeros(k, dtype=torch.float64)

    counts = np.bincount(y.numpy(), minlength=k)
    present = counts[counts > 0]
    folds = int(min(MAX_FOLDS, present.min())) if cross_validate and len(present) > 1 else 0
    chosen, cv_acc, fold_acc, table = (grid[0] if len(grid) == 1 else FALLBACK_L2), None, [], {}
    if folds >= 2 and len(grid) > 1:
        splitter = StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed)
        correct = np.zeros((len(grid), folds))
        nll = np.zeros(len(grid))
        for f, (tr, te) in enumerate(splitter.split(np.zeros(n), y.numpy())):
            tr, te = torch.as_tensor(tr), torch.as_tensor(te)
            rows, row_y = z[:, tr].reshape(-1, d), y[tr].repeat(views)
            w, b = zero_w, zero_b
            for g, l2 in enumerate(grid):
                w, b, _ = _fit(rows, row_y, l2, w, b, label_smoothing, max_iter)
                c, loss = _held_out(z[0, te], y[te], w, b)
                correct[g, f], nll[g] = c, nll[g] + loss
        sizes = np.array([len(te) for _, te in splitter.split(np.zeros(n), y.numpy())])
        acc = correct.sum(1) / n
        best = min(range(len(grid)), key=lambda g: (-acc[g], nll[g]))
        chosen, cv_acc = grid[best], float(acc[best])
        fold_acc = [float(c) for c in correct[best] / sizes]
        table = {f"{l2:g}": float(a) for l2, a in zip(grid, acc)}
    w, b, iterations = _fit(z.reshape(-1, d), y.repeat(views), chosen, zero_w, zero_b, label_smoothing, max_iter)
    weight = (w / std[:, None]).T.contiguous()
    bias = b - (mean / std) @ w
    fit = ProbeFit(weight.float(), bias.float(), chosen, folds, cv_acc, fold_acc, table, iterations,
                   time.perf_counter() - start)
    log.debug("solved a %d-class head on %d x %d rows: l2 %g, held-out accuracy %s, %d iterations, %.1f s",
              k, views * n, d, chosen, cv_acc, iterations, fit.seconds)
    return fit
