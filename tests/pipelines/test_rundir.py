"""The run directory's files: written atomically, failures named, checkpoints read safely."""
from __future__ import annotations

import errno
import os
import signal

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


@pytest.mark.parametrize("interruptible", [False, True])
def test_a_ctrl_c_during_a_write_waits_for_the_file_unless_the_write_is_interruptible(tmp_path, interruptible):
    target = tmp_path / "rows.csv"
    target.write_text("old")
    with pytest.raises(KeyboardInterrupt):
        with atomic_write(target, "w", interruptible=interruptible) as f:
            f.write("new")
            os.kill(os.getpid(), signal.SIGINT)
            f.write(" and more")
    # held: delivered once the whole new file is in place; interruptible: the old file stays
    assert target.read_text() == ("old" if interruptible else "new and more")
    assert list(tmp_path.iterdir()) == [target]


def test_checkpoints_round_trip_and_a_folder_is_named_as_one(tmp_path):
    atomic_torch_save({"state_dict": {"w": torch.ones(2)}}, tmp_path / "checkpoints" / "best.ckpt")
    assert torch.equal(safe_load(tmp_path / "checkpoints" / "best.ckpt")["state_dict"]["w"], torch.ones(2))
    with pytest.raises(CheckpointError, match="is a folder; pass one of its .ckpt files"):
        safe_load(tmp_path / "checkpoints")
    with pytest.raises(CheckpointError, match="does not exist"):
        safe_load(tmp_path / "missing.ckpt")


def test_a_run_is_never_silently_replaced(tmp_path):
    run = RunDir.create(tmp_path / "run")
    run.release()
    run.config.write_text("fit: {}")
    atomic_torch_save({"epoch": 0}, run.checkpoint("last"))
    with pytest.raises(RunDirError, match="already holds a run; pass --overwrite"):
        RunDir(tmp_path / "run").check_creatable()
    (tmp_path / "file").write_text("x")
    with pytest.raises(RunDirError, match="is a file; pass a folder"):
        RunDir.create(tmp_path / "file")


def test_a_run_that_stopped_before_its_first_checkpoint_is_reused(tmp_path):
    run = RunDir.create(tmp_path / "run")
    run.config.write_text("fit: {}")
    (run.splits).mkdir()
    (run.splits / "train.csv").write_text("path,label\n")
    run.release()
    again = RunDir.create(tmp_path / "run")  # no --overwrite needed: nothing of value is there
    assert not (again.splits / "train.csv").exists()
    again.release()


def test_a_second_holder_of_a_run_is_refused_until_the_first_lets_go(tmp_path):
    first = RunDir.create(tmp_path / "run")
    with pytest.raises(RunDirError, match=rf"run is in use by another transferkit process \(pid {os.getpid()}\);"
                                          " wait for it to finish, or pass another --out"):
        RunDir.create(tmp_path / "run")
    first.release()
    RunDir.create(tmp_path / "run").release()
    # the lock file alone does not make the folder someone else's
    assert [p.name for p in (tmp_path / "run").iterdir() if p.is_file()] == [".lock"]


def _state(epoch: int) -> dict:
    return {"epoch": epoch, "global_step": 4 * (epoch + 1), "state_dict": {"w": torch.ones(1)},
            "optimizer_states": [], "loops": {}}


def test_resume_finds_the_newest_whole_checkpoint(tmp_path):
    run = RunDir.create(tmp_path / "run")
    run.release()
    assert run.resumable() is None
    atomic_torch_save(_state(1), run.checkpoint("best"))
    atomic_torch_save(_state(2), run.checkpoint("last"))
    atomic_torch_save({"state_dict": {"w": torch.ones(1)}, "epoch": 9}, run.checkpoint("snapshot-1"))
    assert run.resumable() == run.checkpoint("last")
    run.checkpoint("last").write_bytes(b"cut short")  # the disk filled up while it was written
    assert run.resumable() == run.checkpoint("best")
    run.checkpoint("last").unlink()
    assert run.resumable() == run.checkpoint("best")
