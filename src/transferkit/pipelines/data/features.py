"""The fast frozen path: features of a frozen backbone, computed once and trained on.

When the backbone is frozen its features do not change, so running it every epoch only repeats
work. A frozen fit extracts pooled pre-logits features in one pass (``views`` augmented views per
training image, one clean view per validation image), then trains the classifier on the cached
tensors. The cache lives in memory, or memory-mapped under the run directory when it would be
large. Checkpoints still hold the whole model.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from transferkit.pipelines.data.decoded import DecodeRule
from transferkit.pipelines.data.datasets import ImageDataset, Sample, epoch_seed
from transferkit.pipelines.data.failures import FailureLog

log = logging.getLogger(__name__)

IN_MEMORY_BYTES = 2 * 1024**3  # larger caches are memory-mapped files in RUN/cache/


def feature_batch(batch_size: int) -> int:
    """Images per frozen forward pass: the advisor's pass and the cache use the same, so that the
    features they compute are the same to the bit (a CPU's results depend on the batch shape)."""
    return max(batch_size, 64)


def pre_logits(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """What timm's classifier sees: pooled (and, for some families, normed) features."""
    return model.forward_head(model.forward_features(x), pre_logits=True)


def head_matches(model: nn.Module, x: torch.Tensor) -> bool:
    """True when classifier(pre_logits(x)) is model(x): the cache is exact for this architecture."""
    was = model.training
    model.eval()
    with torch.inference_mode():
        ok = torch.allclose(model.get_classifier()(pre_logits(model, x)), model(x), atol=1e-4, rtol=1e-4)
    model.train(was)
    return ok


def _storage(shape: tuple[int, ...], path: Path | None) -> torch.Tensor:
    nbytes = int(np.prod(shape)) * 4
    if path is None or nbytes <= IN_MEMORY_BYTES:
        return torch.empty(shape, dtype=torch.float32)
    path.parent.mkdir(parents=True, exist_ok=True)
    log.info("feature cache of %.1f GB is memory-mapped at %s", nbytes / 1024**3, path)
    return torch.from_numpy(np.lib.format.open_memmap(path, mode="w+", dtype=np.float32, shape=shape))


@torch.inference_mode()
def extract(model: nn.Module, samples: Sequence[Sample], transform, *, views: int = 1, augment=None,
            first_view: torch.Tensor | None = None, seed: int = 0, batch_size: int = 64, workers: int = 0,
            device: str | torch.device = "cpu", cache_file: Path | None = None, progress: bool = True,
            desc: str = "features", failures: FailureLog | None = None,
            rule: DecodeRule | None = None) -> torch.Tensor:
    """Features ``(views, n, d)`` of the frozen `model` over `samples`.

    View 0 goes through `transform` (or is `first_view`, features computed already); views
    1.. go through `augment` (default `transform`), view k drawn with torch seeded from
    (seed, k), so the same seed gives the same cache. A file that cannot be read is reported to
    `failures` (stage "feature cache") and its rows hold a stand-in's features: leave them out
    with ``FeatureDataset``'s `rows`.
    """
    from tqdm.auto import tqdm

    was = model.training
    model.eval().to(device)
    out: torch.Tensor | None = None
    if first_view is not None:
        out = _storage((views, len(samples), first_view.shape[1]), cache_file)
        out[0] = first_view
    try:
        for k in range(1 if first_view is not None else 0, views):
            ds = ImageDataset(samples, transform if k == 0 else (augment or transform), replace_failed=True,
                              stage="feature cache", failures=failures, rule=rule)
            torch.manual_seed(epoch_seed(seed, 10_000 + k) % 2**63)
            g = torch.Generator().manual_seed(epoch_seed(seed, 20_000 + k))
            loader = DataLoader(ds, batch_size=batch_size, num_workers=workers, generator=g)
            pos = 0
            label = f"{desc} (view {k + 1}/{views})" if views > 1 else desc
            for x, _, _ in tqdm(loader, desc=label, leave=False, disable=not progress):
                f = pre_logits(model, x.to(device)).float().cpu()
                if out is None:
                    out = _storage((views, len(samples), f.shape[1]), cache_file)
                out[k, pos:pos + len(f)] = f
                pos += len(f)
    finally:
        model.train(was)
    assert out is not None, "no samples to extract features from"
    return out


class FeatureDataset(Dataset):
    """Rows of a (views, n, d) cache addressed as view * len(rows) + j; yields (feature, label, i)
    for sample i = rows[j]. `rows` (default: all) leaves out samples whose file could not be read."""

    def __init__(self, features: torch.Tensor, labels: Sequence[int], rows: Sequence[int] | None = None):
        self.features = features
        self.labels = torch.as_tensor(list(labels), dtype=torch.long)
        self.rows = list(range(features.shape[1])) if rows is None else list(rows)
        self.views, self.n = features.shape[0], len(self.rows)

    def __len__(self) -> int:
        return self.views * self.n

    def __getitem__(self, flat: int):
        view, j = divmod(flat, self.n)
        i = self.rows[j]
        return self.features[view, i], self.labels[i], i
