"""Where a fit's time goes: phases add up, setup is what no phase claimed, epochs split from validation."""
from __future__ import annotations

import time
from types import SimpleNamespace

import pytest
import torch

from transferkit.pipelines.train.timings import PHASES, EpochClock, Timings, describe, process_started


def test_setup_is_what_no_phase_claimed_and_the_total_covers_every_phase():
    t = Timings(started=time.time() - 10.0)
    with t.phase("scan"):
        time.sleep(0.05)
    t.add("training", 3.0)
    t.mark_setup_done()
    out = t.to_dict()
    assert out["scan"] >= 0.05 and out["training"] == 3.0
    assert out["setup"] == pytest.approx(10.05 - out["scan"] - 3.0, abs=0.1)
    assert sum(out[k] for k in PHASES) == pytest.approx(out["total"], abs=0.1)
    assert out["train_images_per_second"] is None and out["train_epochs"] == []


def test_the_clock_counts_images_inside_epochs_and_keeps_validation_out():
    t = Timings()
    clock = EpochClock(t)
    trainer, module = SimpleNamespace(), SimpleNamespace()
    for _ in range(2):
        clock.on_train_epoch_start(trainer, module)
        for _ in range(3):
            time.sleep(0.01)
            clock.on_train_batch_end(trainer, module, None, (torch.zeros(4, 3), torch.zeros(4), None), 0)
        clock.on_validation_epoch_start(trainer, module)
        time.sleep(0.2)
        clock.on_validation_epoch_end(trainer, module)
        clock.on_train_epoch_end(trainer, module)  # Lightning calls it after validation
    out = t.to_dict()
    assert [e["images"] for e in out["train_epochs"]] == [12, 12]
    assert all(0.03 <= e["seconds"] < 0.2 for e in out["train_epochs"])  # the validation's 0.2 s is not in it
    assert out["validation"] >= 0.4
    assert out["train_images_per_second"] == pytest.approx(24 / sum(e["seconds"] for e in out["train_epochs"]),
                                                           rel=0.05)


def test_one_line_names_the_phases_that_took_time():
    line = describe({"setup": 5.04, "scan": 0.6, "advisor": 0.0, "features": 0.0, "training": 7.0,
                     "validation": 2.9, "final_evaluation": 0.03, "report": 0.4, "total": 16.0,
                     "train_images_per_second": 117.6})
    assert line == ("time 16.0 s: setup 5.0, scan 0.6, training 7.0, validation 2.9, final evaluation 0.0,"
                    " report 0.4 (training 118 images/s)")


def test_the_process_start_is_read_from_proc():
    started = process_started()
    if started is None:
        pytest.skip("no /proc here: setup is counted from fit()'s call")
    assert time.time() - 3600 * 24 < started <= time.time()
