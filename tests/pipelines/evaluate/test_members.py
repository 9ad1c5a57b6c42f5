"""Which weights each --ensemble merges; what a run lacks names the fit flag that makes it."""
from __future__ import annotations

import pytest
import torch

from transferkit.errors import CheckpointError
from transferkit.pipelines.evaluate.members import RunWeights, snapshot_names
from transferkit.pipelines.rundir import RunDir, atomic_torch_save


def _run(tmp_path, names, ema=False):
    run = RunDir.create(tmp_path / "run")
    for step, name in enumerate(names):
        body = {"state_dict": {"w": torch.zeros(1)}, "global_step": step}
        if ema:
            body["ema_state_dict"] = {"w": torch.ones(1)}
        atomic_torch_save(body, run.checkpoint(name))
    return run


def test_snapshots_come_in_cycle_order_and_all_counts_a_file_once(tmp_path):
    run = _run(tmp_path, ["snapshot-10", "snapshot-2", "best", "snapshot-1"], ema=True)
    assert snapshot_names(run) == ["snapshot-1", "snapshot-2", "snapshot-10"]
    weights = RunWeights(run)
    assert weights.available() == ["none", "ema", "snapshots", "all"]
    assert [m.name for m in weights.members("all")] == ["best", "best:ema", "snapshot-1", "snapshot-2", "snapshot-10"]


def test_an_ensemble_the_run_cannot_give_names_the_fit_flag(tmp_path):
    weights = RunWeights(_run(tmp_path, ["best"]))
    with pytest.raises(CheckpointError, match="train with `transferkit fit --ema`"):
        weights.members("ema")
    with pytest.raises(CheckpointError, match="train with `transferkit fit --swa`"):
        weights.members("swa")
    with pytest.raises(CheckpointError, match="`transferkit fit --snapshots 3`"):
        weights.members("snapshots")
