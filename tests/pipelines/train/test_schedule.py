"""The learning-rate schedule as data: warmup, cosine, snapshot cycles, SWA hold, lp-ft's probe phase."""
from __future__ import annotations

import math

import pytest

from transferkit.errors import ConfigError
from transferkit.pipelines.train.schedule import cycle_ends, snapshot_factor, swa_epochs


def test_cycles_split_the_epochs_and_the_last_takes_the_rest():
    assert cycle_ends(6, 3) == [2, 4, 6]
    assert cycle_ends(10, 3) == [3, 6, 10]
    assert cycle_ends(3, 3) == [1, 2, 3]
    with pytest.raises(ConfigError, match="--epochs 4 or more"):
        cycle_ends(3, 4)
    assert swa_epochs(20) == [16, 17, 18, 19, 20]
    assert swa_epochs(5) == [4, 5]
    assert swa_epochs(1) == [1]
    assert swa_epochs(9, snapshots=3) == [3, 6, 9]


def test_snapshot_schedule_restarts_and_ends_every_cycle_at_its_minimum():
    per_epoch, epochs, cycles, floor = 5, 7, 3, 0.01
    total = per_epoch * epochs
    f = [snapshot_factor(s, total, 3, cycles, floor, per_epoch) for s in range(total)]
    ends = [e * per_epoch for e in cycle_ends(epochs, cycles)]  # steps 10, 20, 35
    assert ends == [10, 20, 35]
    assert f[:3] == pytest.approx([1 / 3, 2 / 3, 1.0])  # warmup, first cycle only
    for start, end in zip([0, *ends[:-1]], ends):
        assert f[end - 1] == pytest.approx(floor)
        assert min(f[start:end]) == pytest.approx(floor)
        assert all(a >= b for a, b in zip(f[max(start, 3):end], f[max(start, 3) + 1:end]))  # decreasing
    assert f[10] == f[20] == 1.0  # warm restarts
    assert f[22] == pytest.approx(floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * 2 / 14)))
    assert snapshot_factor(total, total, 3, cycles, floor, per_epoch) == floor
