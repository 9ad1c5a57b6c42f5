"""The DataModule of a fit: training and validation loaders of images, or of cached features.

Epochs that train the head alone on a frozen backbone (every epoch of ``freeze``, lp-ft's probe
epochs) read pre-logits features computed once (``features.extract``); the other epochs read
images. Which epoch reads what is the ``reads_features`` rule the module follows too; the cache
is built the first time an epoch asks for it, so a run resumed past the probe phase never builds
it. Samplers shard by rank themselves (Lightning's distributed sampler is off): an epoch means
one view of each image on every launch, and the order is a function of (seed, epoch) alone.

Image epochs decode through the run's ``DecodeRule`` and, with the decode cache on, keep each
picture after its first read (``decoded.py``): the cache is made before the first image epoch's
workers start, in memory or in ``RUN/cache/rank<r>/``, so every later epoch's workers share it.
"""
from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, Dataset

from transferkit.pipelines.data.datasets import EpochSampler, ImageDataset, Sample, ShardSampler, drop_tiny_last
from transferkit.pipelines.data.decoded import DecodeCache, DecodeRule, where_to_keep
from transferkit.pipelines.data.failures import FailureLog
from transferkit.pipelines.data.features import FeatureDataset

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class FeatureCache:
    """Frozen features ``(views, n, d)`` of the training split and ``(1, n, d)`` of validation,
    and the samples whose files could be read (None: all)."""

    train: torch.Tensor
    val: torch.Tensor
    train_rows: list[int] | None = None
    val_rows: list[int] | None = None


class FitDataModule(pl.LightningDataModule):
    def __init__(self, train: Sequence[Sample], val: Sequence[Sample], train_transform: Callable,
                 eval_transform: Callable, *, batch_size: int = 32, num_workers: int = 0, seed: int = 0,
                 run_path: Path | None = None, reads_features: Callable[[int], bool] = lambda epoch: False,
                 build_cache: Callable[[torch.device, int, Path], FeatureCache] | None = None,
                 failures: FailureLog | None = None, balanced: bool = False, few_cores: bool | None = None):
        super().__init__()
        self.train_samples, self.val_samples = list(train), list(val)
        self.train_ds = ImageDataset(train, train_transform, replace_failed=True, stage="training",
                                     failures=failures)
        # A replaced validation image returns its stand-in's index, and the classifier counts
        # each index once: the broken file drops out of val metrics instead of ending the run.
        self.val_ds = ImageDataset(val, eval_transform, replace_failed=True, stage="validation", failures=failures)
        self.batch_size, self.num_workers, self.seed = batch_size, num_workers, seed
        self.balanced = balanced  # --sampler balanced: draw each class equally often
        self.reads_features = reads_features
        self._build_cache = build_cache
        self._cache: FeatureCache | None = None
        self.run_path = run_path  # where a large cache is memory-mapped (RUN/cache/rank<r>/)
        self.decode_cache, self._kept = "off", None
        # Where the network trains on a CPU of few cores, its forward and backward take every core:
        # once the pictures are cached, worker processes only add their start and their copies
        # (hymenoptera, 2 cores: 1.65 s an epoch in-process, 2.0 s with 2 workers).
        self.few_cores = (os.cpu_count() or 1) <= 4 if few_cores is None else few_cores

    def set_decoding(self, rule: DecodeRule, cache: str = "off") -> None:
        """Files decode through `rule`; `cache` (``auto``, ``memory``, ``disk`` or ``off``) keeps
        the decoded pictures, where the rule resizes (a full-size rule is never cached)."""
        for ds in (self.train_ds, self.val_ds):
            ds.rule, ds.cache = (rule if rule.short_side is not None else None), None
        self.decode_cache = cache if rule.short_side is not None else "off"
        self._kept = None

    def decode_record(self) -> dict:
        """What report.json says about decoding: the rule, and where pictures were kept."""
        rule = self.train_ds.rule
        out = {"asked": self.decode_cache, "short_side": rule.short_side if rule else None, "kept": self._kept}
        for name, ds in (("train", self.train_ds), ("val", self.val_ds)):
            if ds.cache is not None:
                out[f"{name}_pictures"] = ds.cache.filled()
                out[f"{name}_megabytes"] = round(ds.cache.nbytes / 1e6, 1)
        return out

    def _keep_decoded(self) -> None:
        """Make the decode caches of train and val, once, before an image epoch's workers start."""
        if self.decode_cache == "off" or self._kept is not None:
            return
        t = time.monotonic()
        rank = self.trainer.global_rank if getattr(self, "trainer", None) is not None else 0
        folder = Path(self.run_path or ".") / "cache" / f"rank{rank}"
        rule = self.train_ds.rule
        shapes = {name: DecodeCache.measure([s.path for s in ds.samples], rule)
                  for name, ds in (("train", self.train_ds), ("val", self.val_ds))}
        nbytes = sum(h * w * 3 for v in shapes.values() for s in v if s for h, w in [s])
        self._kept = where_to_keep(self.decode_cache, nbytes, folder, self.num_workers)
        if self._kept == "off":
            return
        for name, ds in (("train", self.train_ds), ("val", self.val_ds)):
            ds.cache = DecodeCache([s.path for s in ds.samples], rule, shapes[name],
                                   file=folder / f"decoded-{name}.u8" if self._kept == "disk" else None)
        log.info("decode cache: %d pictures at shorter side %d, %.0f MB %s (headers read in %.1f s)",
                 len(self.train_ds) + len(self.val_ds), rule.short_side, nbytes / 1e6,
                 "in memory" if self._kept == "memory" else f"in {folder}", time.monotonic() - t)

    @property
    def cache(self) -> FeatureCache | None:
        """The feature cache, if an epoch has asked for it."""
        return self._cache

    def features(self) -> FeatureCache:
        """The feature cache, built on first use (on this rank's device, in its folder of the run)."""
        if self._cache is None:
            assert self._build_cache is not None, "an epoch reads features but no cache was provided"
            trainer = getattr(self, "trainer", None)
            device = trainer.strategy.root_device if trainer is not None else torch.device("cpu")
            rank = trainer.global_rank if trainer is not None else 0
            self._cache = self._build_cache(device, rank, Path(self.run_path or "."))
        return self._cache

    def _place(self) -> tuple[int, int, int]:
        trainer = getattr(self, "trainer", None)
        if trainer is None:
            return 0, 1, 0
        return trainer.global_rank, trainer.world_size, trainer.current_epoch

    def _loader(self, ds: Dataset, sampler, generator=None, drop_last: bool = False, batch_size: int | None = None,
                workers: int | None = None) -> DataLoader:
        # Workers are not persistent: each epoch's workers take fresh seeds drawn from `generator`.
        workers = self.num_workers if workers is None else workers
        return DataLoader(ds, batch_size=batch_size or self.batch_size, sampler=sampler, generator=generator,
                          num_workers=workers, pin_memory=torch.cuda.is_available() and workers > 0,
                          drop_last=drop_last)

    def train_dataloader(self) -> DataLoader:
        rank, world, epoch = self._place()
        g = torch.Generator()
        if self.reads_features(epoch):
            cache = self.features()
            ds = FeatureDataset(cache.train, [s.label for s in self.train_samples], cache.train_rows)
            labels = ds.labels[ds.rows].tolist() if self.balanced else None
            sampler = EpochSampler(ds.n, self.seed, g, epoch, rank=rank, world=world, views=ds.views, labels=labels)
            workers = 0  # rows of a tensor: a worker process only adds its start-up
        else:
            self._keep_decoded()
            ds = self.train_ds
            labels = [sample.label for sample in self.train_samples] if self.balanced else None
            sampler = EpochSampler(len(ds), self.seed, g, epoch, rank=rank, world=world, labels=labels)
            workers = 0 if self._all_cached(ds) else None
        return self._loader(ds, sampler, g, drop_tiny_last(len(sampler), self.batch_size), workers=workers)

    def val_dataloader(self) -> DataLoader:
        rank, world, epoch = self._place()
        if self.reads_features(epoch):
            cache = self.features()
            ds = FeatureDataset(cache.val, [s.label for s in self.val_samples], cache.val_rows)
            return self._loader(ds, ShardSampler(len(ds), rank, world), batch_size=max(self.batch_size, 256),
                                workers=0)
        self._keep_decoded()
        return self._loader(self.val_ds, ShardSampler(len(self.val_ds), rank, world),
                            workers=0 if self._all_cached(self.val_ds) else None)

    def _all_cached(self, ds: ImageDataset) -> bool:
        """Whether every picture of `ds` is in the decode cache and loading it in-process is the faster
        way here (a CPU of few cores trains the network)."""
        trainer = getattr(self, "trainer", None)
        on_cpu = trainer is None or trainer.strategy.root_device.type == "cpu"
        return self.few_cores and on_cpu and ds.cache is not None and ds.cache.filled() == len(ds)
