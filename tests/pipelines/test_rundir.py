"""The run directory's files: written atomically, failures named, checkpoints read safely."""
from __future__ import annotations

import errno

import pytest
import torch

from transferkit.errors import CheckpointError, RunDirError
from transferkit.pipelines import rundir
from transferkit.pipelines.rundir import RunDir, atomic_torch_save, atomic_write, safe_load


def test_a_full_disk_keeps_the_old_file_and_names_the_path_and_the_cause(tmp_path, monkeypatch):
    target = tmp_path / "report.json"
    target.write_text("old")
    real_fsync = rundir.os.fsync

    def full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(rundir.os, "fsync", full)
    with pytest.raises(RunDirError, match=f"^cannot write {target}: No space left on device; free some space"):
        with atomic_write(target, "w") as f:
            f.write("new")
    monkeypatch.setattr(rundir.os, "fsync", real_fsync)
    assert target.read_text() == "old"
    assert list(tmp_path.iterdir()) == [target]  # no temporary file left behind


def test_checkpoints_round_trip_and_a_folder_is_named_as_one(tmp_path):
    atomic_torch_save({"state_dict": {"w": torch.ones(2)}}, tmp_path / "checkpoints" / "best.ckpt")
    assert torch.equal(safe_load(tmp_path / "checkpoints" / "best.ckpt")["state_dict"]["w"], torch.ones(2))
    with pytest.raises(CheckpointError, match="is a folder; pass one of its .ckpt files"):
        safe_load(tmp_path / "checkpoints")
    with pytest.raises(CheckpointError, match="does not exist"):
        safe_load(tmp_path / "missing.ckpt")


def test_a_run_is_never_silently_replaced(tmp_path):
    run = RunDir.create(tmp_path / "run")
    run.config.write_text("fit: {}")
    with pytest.raises(RunDirError, match="already holds a run; pass --overwrite"):
        RunDir(tmp_path / "run").check_creatable()
    (tmp_path / "file").write_text("x")
    with pytest.raises(RunDirError, match="is a file; pass a folder"):
        RunDir.create(tmp_path / "file")
