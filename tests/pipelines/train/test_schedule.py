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


def test_schedule_factors_equal_their_closed_forms():
    from transferkit.pipelines.train.schedule import Schedule

    spe = 4
    head, body = Schedule(epochs=5, warmup_epochs=1).factors(spe)
    total, warm = 20, 4
    assert [head(s) for s in range(warm)] == pytest.approx([0.25, 0.5, 0.75, 1.0])
    for s in (4, 9, 19):
        want = 0.01 + 0.99 * 0.5 * (1 + math.cos(math.pi * (s - warm) / (total - warm)))
        assert head(s) == pytest.approx(want) and body(s) == pytest.approx(want)
    step, _ = Schedule(epochs=6, kind="step", warmup_epochs=0, step_epochs=2, step_gamma=0.1).factors(spe)
    assert [step(s) for s in (0, 7, 8, 15, 16, 23)] == pytest.approx([1, 1, 0.1, 0.1, 0.01, 0.01])
    const, _ = Schedule(epochs=3, kind="constant", warmup_epochs=0).factors(spe)
    assert {const(s) for s in range(12)} == {1.0}
    swa, _ = Schedule(epochs=8, warmup_epochs=0, swa=True).factors(spe)  # flat over epochs 7-8
    assert swa(6 * spe) == swa(7 * spe) == swa(8 * spe - 1) > 0.01


def test_lp_ft_probe_phase_trains_the_head_alone_then_every_group_warms_up_again():
    from transferkit.pipelines.train.schedule import Schedule

    spe = 2
    sched = Schedule(epochs=6, warmup_epochs=1, probe_epochs=3, probe_lr_scale=10.0)
    head, body = sched.factors(spe)
    assert [body(s) for s in range(6)] == [0.0] * 6  # the backbone does not move during the probe
    assert head(0) == pytest.approx(10 * 0.5) and head(1) == pytest.approx(10.0)
    cosine = 0.01 + 0.99 * 0.5 * (1 + math.cos(math.pi * 3 / 4))  # step 5 of 6, after 2 warmup steps
    assert head(5) == pytest.approx(10 * cosine)  # the probe's own cosine
    assert head(6) == body(6) == pytest.approx(0.5)  # fine-tuning starts with its own warmup
    assert head(11) == body(11) == pytest.approx(cosine)
    assert sched.judged_epochs() == {4, 5, 6}  # early stopping waits for the fine-tuning phase
    assert Schedule(epochs=8, cycles=2, probe_epochs=2).snapshot_epochs() == [5, 8]


@pytest.mark.parametrize("kind", ["cosine", "step", "linear", "inverse-sqrt", "constant"])
def test_every_schedule_kind_equals_its_closed_form_at_chosen_steps(kind):
    from transferkit.pipelines.train.schedule import Schedule

    spe, epochs, warm_epochs, floor = 10, 12, 2, 0.01
    total, w = spe * epochs, spe * warm_epochs
    head, body = Schedule(epochs, kind=kind, warmup_epochs=warm_epochs, min_lr_ratio=floor, step_epochs=4,
                          step_gamma=0.5).factors(spe)
    closed = {
        "cosine": lambda s: floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * (s - w) / (total - w))),
        "step": lambda s: 0.5 ** ((s - w) // 40),
        "linear": lambda s: 1 - (1 - floor) * (s - w) / (total - w),
        "inverse-sqrt": lambda s: 1 / math.sqrt(1 + (s - w) / spe),
        "constant": lambda s: 1.0,
    }[kind]
    for s in (0, 9, 19):  # linear warmup over the first two epochs
        assert head(s) == pytest.approx((s + 1) / w)
    for s in (20, 21, 45, 59, 60, 99, 119):
        assert head(s) == pytest.approx(closed(s)) and body(s) == head(s)
    assert head(total - 1) <= 1.0


def test_gradual_stages_start_each_group_at_its_epoch_and_warm_up_again():
    from transferkit.pipelines.train.schedule import Schedule

    spe = 4
    s = Schedule(epochs=5, warmup_epochs=0.5, unfreeze_every=1, groups=3)
    head, top, bottom = (s.for_group(spe, d) for d in (0, 1, 3))
    assert [s.join_epoch(d) for d in range(4)] == [0, 1, 2, 3]
    assert [top(t) for t in range(4)] == [0.0] * 4 and top(4) > 0  # joins at epoch 1
    assert all(bottom(t) == 0.0 for t in range(12)) and bottom(12) > 0
    for start, length in ((0, 4), (4, 4), (8, 4), (12, 8)):  # stages; the last lasts to the end
        assert head(start) == pytest.approx(1 / 2)  # warmup of half an epoch (2 steps) restarts
        assert head(start + 1) == pytest.approx(1.0)
        assert head(start + length - 1) < head(start + 1)  # then the cosine falls within the stage
    assert top(4) == head(4) and bottom(19) == head(19)  # joined groups share the stage's shape
    assert s.judged_epochs() == {4, 5}
    assert Schedule(epochs=6).for_group(4, 2)(8) == Schedule(epochs=6).factors(4)[1](8)  # not gradual: as before
