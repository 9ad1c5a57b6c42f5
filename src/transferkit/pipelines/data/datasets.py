"""Samples as torch Datasets, seeded samplers and the image DataModule that training reads."""
from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch.utils.data import Dataset, Sampler

from transferkit.errors import DataError
from transferkit.pipelines.data.decoded import DecodeCache, DecodeRule
from transferkit.pipelines.data.failures import FailureLog
from transferkit.pipelines.data.images import DECODE_ERRORS, describe_error, load_rgb


@dataclass(frozen=True)
class Sample:
    path: str
    label: int


class ImageDataset(Dataset):
    """(image tensor, label, index) triples.

    A file can pass the scan and still break later (changed on disk, a decoder edge case).
    With ``replace_failed`` the sample's place is taken by the next one that loads, which returns
    its own index: training goes on, and whatever counts each index once (validation, the final
    evaluation, ``evaluate``) leaves the broken file out instead of scoring a stand-in. The file
    is reported to `failures` under `stage` (see ``failures.py``; with ``strict`` that stops the
    run). Without ``replace_failed`` the failure is a DataError naming the file.

    Files decode through ``rule`` (None: full size), or through ``cache`` once it is set: a
    ``DecodeCache`` of these samples, in their order, which keeps each picture after its first read.
    """

    def __init__(self, samples: Sequence[Sample], transform: Callable | None = None, *,
                 replace_failed: bool = False, stage: str = "training", failures: FailureLog | None = None,
                 rule: DecodeRule | None = None):
        self.samples = list(samples)
        self.transform = transform
        self.replace_failed = replace_failed
        self.stage = stage
        self.failures = failures if failures is not None else FailureLog()
        self.rule = rule if rule is not None and rule.short_side is not None else None
        self.cache: DecodeCache | None = None

    def __len__(self) -> int:
        return len(self.samples)

    def _load(self, i: int):
        s = self.samples[i]
        if self.cache is not None:
            img = self.cache.get(i, s.path)
        else:
            img = self.rule.load(s.path) if self.rule is not None else load_rgb(s.path)
        return (self.transform(img) if self.transform else img), s.label

    def __getitem__(self, index: int):
        if not self.replace_failed:
            try:
                x, y = self._load(index)
            except DECODE_ERRORS as exc:
                raise DataError(f"{self.samples[index].path} could not be read ({describe_error(exc)});"
                                " restore the file, or pass images without it") from None
            return x, y, index
        n = len(self.samples)
        for attempt in range(min(n, 20)):
            i = (index + attempt) % n
            try:
                x, y = self._load(i)
                return x, y, i
            except DECODE_ERRORS as exc:
                self.failures.record(self.samples[i].path, self.stage, describe_error(exc))
        raise DataError(f"{min(n, 20)} images in a row failed to load, starting at {self.samples[index].path};"
                        " check the data folder")


def epoch_seed(seed: int, epoch: int) -> int:
    return (seed * 1_000_003 + epoch * 7919) % (2**63 - 1)


class EpochSampler(Sampler[int]):
    """A shuffle that is a function of (seed, epoch) alone, so a resumed run sees the same order.

    It also reseeds the DataLoader's generator, from which each epoch's worker seeds are drawn,
    so worker-side augmentation is reproducible per epoch too. torch's RandomSampler draws from
    the global generator instead, whose state a resumed process does not have.

    With several processes, rank r takes every world-th index of the same order, padded with
    repeats to equal length as torch's DistributedSampler does (validation counts each index once).
    With ``views`` > 1 (a feature cache), each image is drawn through one of its views, chosen by
    (seed, epoch), and the index is ``view * n + i``. With ``labels`` (``--sampler balanced``) an
    epoch is n draws with replacement, each class equally likely (an image's chance is inverse to
    its class's size), from the same (seed, epoch) generator: exact under resume and DDP alike.
    """

    def __init__(self, n: int, seed: int, generator: torch.Generator, epoch: int = 0, *, rank: int = 0,
                 world: int = 1, views: int = 1, labels: Sequence[int] | None = None):
        self.n, self.seed, self.generator = n, seed, generator
        self.rank, self.world, self.views = rank, world, views
        self.weights = None
        if labels is not None:
            y = torch.as_tensor(list(labels), dtype=torch.long)
            if len(y) != n:
                raise ValueError(f"{len(y)} labels for {n} samples")
            self.weights = 1.0 / torch.bincount(y).double()[y]
        self.set_epoch(epoch)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        self.generator.manual_seed(epoch_seed(self.seed, epoch))

    def __len__(self) -> int:
        return -(-self.n // self.world)

    def __iter__(self):
        g = torch.Generator().manual_seed(epoch_seed(self.seed, self.epoch) + 1)
        if self.weights is None:
            order = torch.randperm(self.n, generator=g)
        else:
            order = torch.multinomial(self.weights, self.n, replacement=True, generator=g)
        if self.views > 1:
            order = torch.randint(0, self.views, (self.n,), generator=g) * self.n + order
        return iter(shard(order.tolist(), self.rank, self.world))


class ShardSampler(Sampler[int]):
    """0..n-1 in order, rank r's share of it (padded with repeats to equal length)."""

    def __init__(self, n: int, rank: int = 0, world: int = 1):
        self.n, self.rank, self.world = n, rank, world

    def __len__(self) -> int:
        return -(-self.n // self.world)

    def __iter__(self):
        return iter(shard(list(range(self.n)), self.rank, self.world))


def shard(order: list[int], rank: int, world: int) -> list[int]:
    if world <= 1:
        return order
    per = -(-len(order) // world)
    padded = (order * (world + 1))[: per * world] if order else []
    return padded[rank::world]


def drop_tiny_last(count: int, batch_size: int) -> bool:
    """A last batch of one breaks BatchNorm in training mode; drop it only when it would be that."""
    return count % batch_size == 1 and count > batch_size
