"""Samplers shard by rank themselves; head-only epochs read the feature cache, built once."""
from __future__ import annotations

import torch

from transferkit.pipelines.data.datamodule import FeatureCache, FitDataModule
from transferkit.pipelines.data.datasets import EpochSampler, Sample, ShardSampler


def test_two_ranks_see_every_index_in_equal_shares_and_the_same_order_each_time():
    n = 11
    shards = [list(EpochSampler(n, 7, torch.Generator(), epoch=3, rank=r, world=2)) for r in (0, 1)]
    assert len(shards[0]) == len(shards[1]) == 6
    assert set(shards[0]) | set(shards[1]) == set(range(n))
    assert shards[0] == list(EpochSampler(n, 7, torch.Generator(), epoch=3, rank=0, world=2))
    assert shards[0] != list(EpochSampler(n, 7, torch.Generator(), epoch=4, rank=0, world=2))
    val = [list(ShardSampler(5, r, 2)) for r in (0, 1)]
    assert val == [[0, 2, 4], [1, 3, 0]]  # padded with a repeat; validation counts each index once


def test_head_only_epochs_read_features_and_the_cache_is_built_once():
    samples = [Sample(f"{i}.png", i % 2) for i in range(6)]
    built = []

    def build(device, rank, path):
        built.append((device.type, rank))
        return FeatureCache(torch.randn(2, 4, 4), torch.randn(1, 2, 4))

    dm = FitDataModule(samples[:4], samples[4:], None, None, batch_size=2, reads_features=lambda e: e < 1,
                       build_cache=build)
    x, y, i = next(iter(dm.train_dataloader()))
    assert x.shape == (2, 4) and built == [("cpu", 0)]
    assert next(iter(dm.val_dataloader()))[0].shape == (2, 4)
    assert built == [("cpu", 0)] and dm.cache is not None
    dm.reads_features = lambda e: False
    assert dm.train_dataloader().dataset is dm.train_ds  # images again


def test_a_balanced_datamodule_draws_the_minority_as_often_on_features_and_on_images():
    samples = [Sample(f"{i}.png", int(i >= 36)) for i in range(40)]  # 36:4
    dm = FitDataModule(samples, samples[:2], None, None, batch_size=8, reads_features=lambda e: True,
                       build_cache=lambda *a: FeatureCache(torch.randn(1, 40, 4), torch.randn(1, 2, 4)),
                       balanced=True)
    labels = torch.cat([y for _, y, _ in dm.train_dataloader()])
    assert len(labels) == 40 and 12 <= int(labels.sum()) <= 28  # a shuffle gives exactly 4
    dm.reads_features = lambda e: False
    sampler = dm.train_dataloader().sampler
    assert sampler.weights is not None and float(sampler.weights[39] / sampler.weights[0]) == 9.0
    plain = FitDataModule(samples, samples[:2], None, None, batch_size=8)
    assert plain.train_dataloader().sampler.weights is None
