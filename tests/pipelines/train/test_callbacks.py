"""RankZeroDecides hands rank 0's decision over before the model is set up; EpochSeed reseeds."""
from __future__ import annotations

import random

import pytorch_lightning as pl
import torch

from transferkit.pipelines.train.callbacks import EpochSeed, RankZeroDecides


class _Trainer:
    world_size = 1
    current_epoch = 3


def test_a_single_process_applies_its_own_decision_in_setup():
    got = []
    RankZeroDecides({"plan": "freeze"}, got.append).setup(_Trainer(), None, "fit")
    assert got == [{"plan": "freeze"}]


def test_every_epoch_start_seeds_from_seed_and_epoch_alone():
    cb = EpochSeed(7)
    cb.on_train_epoch_start(_Trainer(), None)
    a = (torch.rand(2), random.random())
    torch.manual_seed(123)  # whatever happened before
    cb.on_train_epoch_start(_Trainer(), None)
    b = (torch.rand(2), random.random())
    assert torch.equal(a[0], b[0]) and a[1] == b[1]
    pl.seed_everything(0, verbose=False)
