"""How well a frozen backbone suits a labelled dataset: cross-validated probes and the LogME
score on its features, and the distance between the data's activation statistics and the
BatchNorm running statistics learnt in pretraining.

The probes and LogME work on plain arrays (``features``: images x dims, ``labels``: one integer
per image), so they are tested on synthetic features without a network.
"""
from __future__ import annotations

import logging

import numpy as np
import torch
from sklearn.model_selection import StratifiedKFold, cross_val_predict, train_test_split
from sklearn.neighbors import KNeighborsClassifier
from threadpoolctl import threadpool_limits
from timm.layers import FrozenBatchNormAct2d
from torch import nn
from torchvision.ops.misc import FrozenBatchNorm2d

from transferkit.backbones.probe import solve_probe

logger = logging.getLogger(__name__)

# The probes subsample a large dataset to this many images (stratified): similarity is clear
# from a few thousand images, and the logistic regression's cost grows with every one.
PROBE_MAX_IMAGES = 3000
# Folds of the cross-validation, lowered to the smallest class's count when that is smaller.
PROBE_FOLDS = 5
# Neighbours of the k-NN probe, lowered so a small class is not outvoted by construction.
KNN_NEIGHBORS = 10
# These problems are small: one BLAS thread ran the probes 10x faster on two busy cores than
# BLAS's own thread pool, which spins against torch's threads.
BLAS_THREADS = 1


def _check(features: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    features = np.asarray(features, dtype=np.float64)
    labels = np.asarray(labels)
    if features.ndim != 2 or labels.ndim != 1 or len(features) != len(labels):
        raise ValueError(f"need features (n, d) and labels (n,), got {features.shape} and {labels.shape}")
    if not np.isfinite(features).all():
        raise ValueError("features contain NaN or infinite values")
    return features, labels


def subsample(features: np.ndarray, labels: np.ndarray, max_images: int, seed: int = 0
              ) -> tuple[np.ndarray, np.ndarray]:
    """At most ``max_images`` rows, stratified by label (classes with one image left out)."""
    if len(labels) <= max_images:
        return features, labels
    _, counts = np.unique(labels, return_counts=True)
    # train_test_split cannot stratify a class with one image; those are left out of the probe anyway.
    keep = np.isin(labels, np.unique(labels)[counts >= 2])
    features, labels = features[keep], labels[keep]
    features, _, labels, _ = train_test_split(
        features, labels, train_size=max_images, stratify=labels, random_state=seed)
    return features, labels


def probe_accuracy(features: np.ndarray, labels: np.ndarray, *, seed: int = 0,
                   knn: bool = True) -> dict:
    """Cross-validated accuracy of a linear and a nearest-neighbour probe on fixed features.

    The linear probe is ``probe.solve_probe``, the very solver of the ``freeze`` head (L2 chosen
    on the folds; ``l2`` reports it), so its accuracy is what freeze is expected to deliver; k-NN
    uses cosine distance on the raw features. Folds are stratified, ``k = min(5, smallest class count)``. A class with a single
    image cannot be both trained on and tested, so it is left out of the probe (``dropped``
    counts those images); with fewer than two classes left, the accuracies are ``None``.

    Returns ``logreg``, ``knn``, ``chance`` (the majority class's share, what always guessing it
    scores), ``relative`` (accuracy minus chance per probe), ``normalized`` (``(acc - chance) /
    (1 - chance)``: 0 at chance, 1 when perfect), ``folds``, ``images`` (used) and ``dropped``.
    """
    features, labels = _check(features, labels)
    classes, counts = np.unique(labels, return_counts=True)
    keep = np.isin(labels, classes[counts >= 2])
    dropped = int((~keep).sum())
    if dropped:
        logger.warning("probe: %d class(es) with a single image left out of the probe", int((counts < 2).sum()))
    features, labels = features[keep], labels[keep]
    features, labels = subsample(features, labels, PROBE_MAX_IMAGES, seed)
    classes, counts = np.unique(labels, return_counts=True)
    out: dict = {"logreg": None, "knn": None, "chance": None, "relative": {}, "normalized": {},
                 "folds": 0, "images": int(len(labels)), "dropped": dropped}
    if len(classes) < 2:
        return out
    chance = float(counts.max() / counts.sum())
    folds = int(min(PROBE_FOLDS, counts.min()))
    cv = StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed)
    # solve_probe draws the same folds (same k, same seed); labels are renumbered 0..c-1 for it.
    linear = solve_probe(features, np.unique(labels, return_inverse=True)[1], seed=seed)
    accuracy = {"logreg": linear.cv_accuracy}
    out.update(chance=chance, folds=folds, l2=linear.l2)
    if knn:
        # Each training fold holds at least counts.min() - 1 images of the smallest class.
        k = int(max(1, min(KNN_NEIGHBORS, counts.min() - 1)))
        with threadpool_limits(BLAS_THREADS, user_api="blas"):
            predicted = cross_val_predict(KNeighborsClassifier(n_neighbors=k, metric="cosine"), features, labels, cv=cv)
        accuracy["knn"] = float(np.mean(predicted == labels))
    for name, acc in accuracy.items():
        out[name] = acc
        out["relative"][name] = acc - chance
        out["normalized"][name] = (acc - chance) / (1.0 - chance) if chance < 1.0 else 0.0
    return out


def _one_hot(labels: np.ndarray) -> np.ndarray:
    _, index = np.unique(labels, return_inverse=True)
    return np.eye(index.max() + 1)[index]


def logme(features: np.ndarray, labels: np.ndarray, *, max_iter: int = 100, tol: float = 1e-4) -> float:
    """LogME (You et al., ICML 2021): the log marginal evidence per image of the labels under a
    Bayesian linear model on the features, maximised over its two precisions, averaged over classes.

    For each class's one-hot column ``y`` the model is ``y = F w + noise`` with ``w ~ N(0, 1/alpha)``
    and ``noise ~ N(0, 1/beta)``; one SVD of ``F`` serves every class, and ``alpha, beta`` come from
    MacKay's fixed-point updates. Higher is better; it only ranks features on the same labels.
    Unchanged by a global rescaling of the features. No library implements it (checked:
    scikit-learn's ``ARDRegression`` / ``BayesianRidge`` fit one target with their own loop and an
    SVD per call, and report no evidence per image), so it is written here from the paper.
    The H-score (Bao et al., 2019) was tried beside it and dropped: with fewer images than feature
    dimensions, even its shrinkage-regularised form broke the noise ordering LogME keeps.
    """
    features, labels = _check(features, labels)
    n, dim = features.shape
    targets = _one_hot(labels)
    with threadpool_limits(BLAS_THREADS, user_api="blas"):
        u, s, _ = np.linalg.svd(features, full_matrices=False)
    keep = s > (s.max() if s.size else 0.0) * max(n, dim) * np.finfo(np.float64).eps
    u, s = u[:, keep], s[keep]
    sigma = s**2
    rank = len(s)
    scores = []
    for y in targets.T:
        z = u.T @ y
        outside = max(float(y @ y - z @ z), 0.0)  # the part of y no feature direction reaches
        alpha, beta = 1.0, 1.0
        for _ in range(max_iter):
            shrink = alpha + beta * sigma
            gamma = float(np.sum(beta * sigma / shrink))
            m2 = float(np.sum((beta * s * z / shrink) ** 2))
            residual = float(np.sum((alpha * z / shrink) ** 2)) + outside
            new_alpha = gamma / max(m2, 1e-12)
            new_beta = max(n - gamma, 1e-12) / max(residual, 1e-12)
            done = abs(new_alpha - alpha) / alpha < tol and abs(new_beta - beta) / beta < tol
            alpha, beta = new_alpha, new_beta
            if done:
                break
        shrink = alpha + beta * sigma
        m2 = float(np.sum((beta * s * z / shrink) ** 2))
        residual = float(np.sum((alpha * z / shrink) ** 2)) + outside
        evidence = (n * np.log(beta) + dim * np.log(alpha) - n * np.log(2 * np.pi)
                    - beta * residual - alpha * m2
                    - np.sum(np.log(shrink)) - (dim - rank) * np.log(alpha)) / 2
        scores.append(evidence / n)
    return float(np.mean(scores))


_BATCHNORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm, FrozenBatchNorm2d,
               FrozenBatchNormAct2d)


class BatchNormInputs:
    """Per-channel mean and variance of what each BatchNorm layer receives, over all batches.

    Forward pre-hooks on the model in eval mode. Considered instead: letting torch's BatchNorm
    re-estimate its running statistics (train mode, ``momentum=None``) on a copy; but in train
    mode each layer normalises with batch statistics, which changes what every deeper layer sees.
    """

    def __init__(self, model: nn.Module):
        self.layers = {name: m for name, m in model.named_modules()
                       if isinstance(m, _BATCHNORMS) and getattr(m, "running_mean", None) is not None}
        self.stats: dict[str, tuple[float, torch.Tensor, torch.Tensor]] = {}
        self.handles = [m.register_forward_pre_hook(self._hook(name)) for name, m in self.layers.items()]

    def _hook(self, name: str):
        def hook(module, args):
            x = args[0].detach()
            if x.ndim == 4 and x.shape[2] * x.shape[3] >= 256:
                # Every other row and column: a quarter of the positions estimates a channel's
                # mean and variance as well, at half the cost of the hook on large maps.
                x = x[:, :, ::2, ::2]
            dims = [0, *range(2, x.ndim)]
            n = float(x.numel() // x.shape[1])
            # float32 within a batch (torch's var_mean is two-pass), float64 across batches.
            var, mean = (t.to(torch.float64) for t in torch.var_mean(x.float(), dim=dims, correction=0))
            if name not in self.stats:
                self.stats[name] = (n, mean, var * n)
                return
            # Chan et al.'s pairwise merge: stable where E[x^2] - E[x]^2 is not.
            count, old_mean, m2 = self.stats[name]
            delta = mean - old_mean
            total = count + n
            self.stats[name] = (total, old_mean + delta * n / total, m2 + var * n + delta**2 * count * n / total)
        return hook

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()

    def shift(self) -> float | None:
        """Mean over layers of the mean over channels of the squared Hellinger distance between
        N(data mean, data var) and N(running mean, running var), both variances plus the layer's eps.

        Hellinger rather than KL: it is bounded (0 = the same Gaussian, 1 = disjoint), so one dead
        channel with a near-zero variance cannot dominate the average.
        """
        if not self.stats:
            return None
        per_layer = []
        for name, (count, mean, m2) in self.stats.items():
            layer = self.layers[name]
            eps = float(getattr(layer, "eps", 1e-5))
            var = m2 / count + eps
            run_mean = layer.running_mean.detach().to("cpu", torch.float64)
            run_var = layer.running_var.detach().to("cpu", torch.float64) + eps
            mean, var = mean.cpu(), var.cpu()
            total = var + run_var
            overlap = torch.sqrt(2 * torch.sqrt(var * run_var) / total)
            h2 = 1 - overlap * torch.exp(-(mean - run_mean) ** 2 / (4 * total))
            per_layer.append(float(h2.mean()))
        return float(np.mean(per_layer))
