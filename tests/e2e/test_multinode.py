"""Launches by the tools of a cluster: two torchrun "machines" and two SLURM tasks, on this one.

Lightning's own launcher (``--devices 2``, tests/e2e/test_ddp.py) starts the second process
itself; here the processes are started from outside, as a cluster starts them, and Lightning
has to recognise the launcher from the environment (TorchElasticEnvironment, SLURMEnvironment).
Every process runs the real command line in a subprocess over gloo on the CPU. Both "machines"
share this file system, as the README's multi-machine example asks (the same --out on a shared
filesystem).

A 22-image train split in batches of 4 takes 3 steps an epoch when two processes share it and 6
when one process has it all, so the checkpoints' ``global_step`` tells the world size the run had.
"""
from __future__ import annotations

import csv
import json
import os
import random
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from transferkit.cli.main import main

pytestmark = pytest.mark.slow

TESTS = Path(__file__).resolve().parents[1]
TIMEOUT = 240.0  # seconds for one launch of both processes (10 to 25 s each on 2 busy CPU cores)
EPOCHS = 3
ARGS = ["--backbone", "test_resnet", "--no-pretrained", "--image-size", "32", "--workers", "0",
        "--batch-size", "4", "--lr", "0.0003", "--patience", "0", "--seed", "5", "--finetune", "full",
        "--accelerator", "cpu"]  # a low rate: val accuracy below 1, so that a miscount would show
STEPS_PER_EPOCH = {1: 6, 2: 3}  # 22 train images, batches of 4: by the number of processes

# Variables of an enclosing launcher that must not leak into the processes started here.
_LAUNCHER_VARS = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "GROUP_RANK", "ROLE_RANK", "NODE_RANK",
                  "MASTER_ADDR", "MASTER_PORT", "JSM_NAMESPACE_RANK")

# `transferkit ARGS` with a Ctrl-C raised in every process at the start of one epoch: the
# interrupt of tests/e2e/test_resume.py, which always lands at the same place (a signal sent from
# here would land anywhere, and differently on each machine).
_INTERRUPTED_FIT = '''
import sys

sys.path.insert(0, {tests!r})
import pytorch_lightning as pl
from conftest import fit_with_callbacks


class InterruptAt(pl.Callback):
    def on_train_epoch_start(self, trainer, pl_module):
        if trainer.current_epoch == {epoch}:
            raise KeyboardInterrupt


sys.exit(fit_with_callbacks(sys.argv[1:], InterruptAt()))
'''


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    from conftest import make_color_folder

    # 27 images: a stratified val split of 5 (odd: one process's share is padded), train 22
    return make_color_folder(tmp_path_factory.mktemp("multinode") / "data", per_class=9, size=32)


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if k not in _LAUNCHER_VARS and not k.startswith(("SLURM_", "TORCHELASTIC_", "PMI_", "OMPI_"))}
    # One thread a process, as torchrun sets for several processes a machine: two processes of
    # two threads each on two cores train about ten times slower.
    return {**env, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1", **extra}


def _free_port(low: int | None = None, high: int | None = None) -> int:
    """A port nothing listens on now: the system's pick, or one in [low, high]."""
    for _ in range(200):
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", random.randint(low, high) if low is not None else 0))
            except OSError:
                continue
            return s.getsockname()[1]
    raise RuntimeError(f"no free port in [{low}, {high}]")


def _descendants(pid: int) -> list[int]:
    """`pid`'s processes and theirs (torchrun starts its workers in sessions of their own)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(children.get(p, []))
    return out


class Launch:
    """Processes started together, one command each, with their output in files."""

    def __init__(self, commands: list[tuple[list[str], dict[str, str]]], cwd: Path, logs: Path):
        self.cwd, self.logs = cwd, logs
        logs.mkdir(parents=True, exist_ok=True)
        self.procs: list[subprocess.Popen] = []
        self.t0, self.seconds = time.monotonic(), None
        try:
            for i, (cmd, env) in enumerate(commands):
                with (logs / f"{i}.out").open("w") as out, (logs / f"{i}.err").open("w") as err:
                    self.procs.append(subprocess.Popen(cmd, cwd=cwd, env=env, stdout=out, stderr=err,
                                                       start_new_session=True))
        except BaseException:
            self.kill()
            raise

    def wait(self, timeout: float = TIMEOUT, grace: float = 30.0) -> list[int]:
        """Every process's exit status; all of them are killed at `timeout`, or `grace` seconds
        after one of them failed (its partners would wait for it in a collective for 30 minutes)."""
        deadline = time.monotonic() + timeout
        try:
            while any(p.poll() is None for p in self.procs):
                if any(p.returncode not in (None, 0) for p in self.procs):
                    deadline = min(deadline, time.monotonic() + grace)
                    grace = float("inf")
                if time.monotonic() > deadline:
                    pytest.fail(f"processes still running after the time limit:\n{self.output()}")
                time.sleep(0.1)
        finally:
            self.kill()
        self.seconds = time.monotonic() - self.t0
        print(f"{self.logs.name}: {self.seconds:.1f} s")
        return [p.returncode for p in self.procs]

    def kill(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                for pid in _descendants(p.pid):
                    try:
                        os.kill(pid, signal.SIGKILL)
                    except ProcessLookupError:
                        pass
                p.wait(timeout=30)

    def out(self, i: int) -> str:
        return (self.logs / f"{i}.out").read_text()

    def err(self, i: int) -> str:
        return (self.logs / f"{i}.err").read_text()

    def output(self) -> str:
        return "\n".join(f"--- process {i}: exit {p.returncode}\n{self.out(i)}{self.err(i)[-6000:]}"
                         for i, p in enumerate(self.procs))


def _torchrun(args: list[str], *, cwd: Path, logs: Path, script: Path | None = None) -> Launch:
    """Two machines of one process each: `torchrun --nnodes 2 --node-rank 0|1` started together."""
    port = _free_port()
    commands = []
    for node in (0, 1):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node", "1",
               "--node-rank", str(node), "--master-addr", "127.0.0.1", "--master-port", str(port),
               *([str(script)] if script else ["-m", "transferkit.cli.main"]), *args]
        commands.append((cmd, _env()))
    return Launch(commands, cwd, logs)


def _rows(path: Path) -> list[dict]:
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


def _no_copies(run: Path) -> None:
    """One set of checkpoints and files: nothing a second process, a version counter or
    Lightning's default logger would add."""
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["best.ckpt", "last.ckpt"]
    names = [p.name for p in run.rglob("*")]
    assert not [n for n in names if "rank" in n or "-v1" in n or n in ("lightning_logs", "logs", "cache")], names


def _refused(env: dict[str, str], args: list[str], launcher: str, data: Path, tmp_path: Path, monkeypatch,
             capsys) -> str:
    """Process 0 of a launch whose --devices x --num-nodes disagree with the launcher's: a one-line
    error before anything is written (in this process: it ends before a process group exists)."""
    for k in list(os.environ):
        if k in _LAUNCHER_VARS or k.startswith(("SLURM_", "TORCHELASTIC_")):
            monkeypatch.delenv(k)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    bad = tmp_path / "refused"
    capsys.readouterr()
    assert main(["fit", str(data), "--out", str(bad), *args, "--epochs", "1"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"transferkit: error: {launcher} launched this process, but --devices") and \
        err.count("\n") == 1, err
    assert not bad.exists()
    print(err, end="")
    return err


def test_two_torchrun_machines_write_one_run_that_resumes_the_same_way(data, tmp_path):
    """`torchrun --nnodes 2` twice on this machine, as on two machines (README), then `--resume`.

    The fit: one run directory and one set of checkpoints, report.json written once (by global
    rank 0), the world size 2 in the step count, and the val accuracy (and loss) gathered over the
    two machines during training equal to a one-process `transferkit evaluate` of the best
    checkpoint.

    The resume: config.yaml keeps `--num-nodes 2` and `fit --resume RUN` takes no settings, so a
    resumed multi-machine run is launched as it was first launched, one torchrun per machine
    (a lone `transferkit fit --resume RUN` waits for a second machine that never comes, for
    Lightning's 30-minute process-group timeout). A second run of the same command is stopped
    after its first epoch (a Ctrl-C raised in both processes at the same place, so that the test
    is exact), resumed with plain `transferkit fit --resume` under two torchruns, and must end
    where the uninterrupted run ended, weights and metrics.csv alike.
    """
    args = [*ARGS, "--epochs", str(EPOCHS), "--devices", "1", "--num-nodes", "2"]
    work = tmp_path / "work"
    work.mkdir()
    fit = _torchrun(["fit", str(data), "--out", "run", *args], cwd=work, logs=tmp_path / "logs-fit")
    assert fit.wait() == [0, 0], fit.output()
    for i in (0, 1):
        assert "Traceback" not in fit.err(i), fit.output()
    assert fit.out(0).count("val accuracy") == 1 and "val accuracy" not in fit.out(1)
    assert (fit.err(0) + fit.err(1)).count("report written to") == 1, fit.output()  # report.json once

    run = work / "run"
    assert sorted(p.name for p in work.iterdir()) == ["run"]  # no second run directory, no logs
    _no_copies(run)
    assert yaml.safe_load((run / "config.yaml").read_text())["fit"]["num_nodes"] == 2
    rows = _rows(run / "metrics.csv")
    assert [r["epoch"] for r in rows] == [str(e) for e in range(1, EPOCHS + 1)]  # one row per epoch
    assert all(r["val_count"] == "5" for r in rows), rows
    last = torch.load(run / "checkpoints/last.ckpt", weights_only=True)
    assert last["epoch"] == EPOCHS - 1
    assert last["global_step"] == EPOCHS * STEPS_PER_EPOCH[2]  # two processes shared each epoch

    report = json.loads((run / "report.json").read_text())
    assert report["images"] == {"train": 22, "val": 5, "test": 0, "skipped": 0}
    assert (report["world_size"], report["num_nodes"]) == (2, 2)
    assert report["metrics"]["count"] == 5
    best = max(rows, key=lambda r: float(r["val_acc"]))  # the first best epoch: ModelCheckpoint's best.ckpt
    assert float(best["val_acc"]) * 5 == pytest.approx(round(float(best["val_acc"]) * 5), abs=1e-4)  # k of 5
    assert report["best_val_acc_during_training"] == pytest.approx(float(best["val_acc"]), abs=1e-5)

    assert main(["evaluate", str(run)]) == 0  # one process, the best checkpoint
    (single,) = json.loads((run / "evaluation.json").read_text())["results"]
    assert single["checkpoint"] == "best" and single["count"] == 5
    assert single["accuracy"] == pytest.approx(report["accuracy"], abs=1e-6)
    assert single["nll"] == pytest.approx(report["metrics"]["nll"], abs=1e-5)
    # what the two machines gathered during training is what one process computes
    assert single["accuracy"] == pytest.approx(float(best["val_acc"]), abs=1e-5)
    assert single["nll"] == pytest.approx(float(best["val_loss"]), abs=1e-4)
    print(f"torchrun x2: report.json accuracy {report['accuracy']} nll {report['metrics']['nll']}; metrics.csv"
          f" epoch {best['epoch']} val_acc {best['val_acc']} val_loss {best['val_loss']}; evaluate accuracy"
          f" {single['accuracy']} nll {single['nll']}")

    # the same command, stopped after its first epoch on both machines, then resumed
    script = tmp_path / "interrupted_fit.py"
    script.write_text(_INTERRUPTED_FIT.format(tests=str(TESTS), epoch=1))
    cut_work = tmp_path / "cut-work"
    cut_work.mkdir()
    stopped = _torchrun(["fit", str(data), "--out", "cut", *args], cwd=cut_work, logs=tmp_path / "logs-cut",
                        script=script)
    assert 0 not in stopped.wait(), stopped.output()  # torchrun reports its worker's exit status 130
    for i in (0, 1):
        assert "transferkit: error: stopped by Ctrl-C;" in stopped.err(i), stopped.output()
    assert "continue with `transferkit fit --resume cut`" in stopped.err(0), stopped.output()
    cut = cut_work / "cut"
    assert len(_rows(cut / "metrics.csv")) == 1 and not (cut / "report.json").exists()

    resumed = _torchrun(["fit", "--resume", str(cut)], cwd=cut_work, logs=tmp_path / "logs-resume")
    assert resumed.wait() == [0, 0], resumed.output()
    assert "Traceback" not in resumed.err(0) + resumed.err(1), resumed.output()
    assert resumed.out(0).count("val accuracy") == 1 and "val accuracy" not in resumed.out(1)
    assert (resumed.err(0) + resumed.err(1)).count("report written to") == 1, resumed.output()
    assert sorted(p.name for p in cut_work.iterdir()) == ["cut"]
    _no_copies(cut)
    for name in ("last", "best"):
        a = torch.load(run / f"checkpoints/{name}.ckpt", weights_only=True)
        b = torch.load(cut / f"checkpoints/{name}.ckpt", weights_only=True)
        assert (a["epoch"], a["global_step"]) == (b["epoch"], b["global_step"]), name
        for k, v in a["state_dict"].items():
            assert torch.equal(v, b["state_dict"][k]), (name, k)
    strip = lambda rows: [{k: v for k, v in r.items() if k != "seconds"} for r in rows]  # noqa: E731
    assert strip(_rows(cut / "metrics.csv")) == strip(rows)
    assert json.loads((cut / "report.json").read_text())["accuracy"] == report["accuracy"]


def test_a_torchrun_launch_without_its_num_nodes_is_refused(data, tmp_path, monkeypatch, capsys):
    """Two torchrun machines and a fit without --num-nodes 2: Lightning would run each process
    alone (one device, one node), every one of them training into the same run directory."""
    torchrun = {"TORCHELASTIC_RUN_ID": "none", "WORLD_SIZE": "2", "RANK": "0", "LOCAL_RANK": "0",
                "GROUP_RANK": "0", "LOCAL_WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29500"}
    _refused(torchrun, [*ARGS, "--devices", "1"], "torchrun", data, tmp_path, monkeypatch, capsys)


def _slurm_env(task: int, ntasks: int, job_id: str) -> dict[str, str]:
    """What `srun --nodes 1 --ntasks-per-node N` gives task `task`, and nothing more: no
    MASTER_ADDR or MASTER_PORT, which Lightning derives from SLURM_NODELIST and SLURM_JOB_ID."""
    return _env(SLURM_NTASKS=str(ntasks), SLURM_NTASKS_PER_NODE=str(ntasks), SLURM_TASKS_PER_NODE=str(ntasks),
                SLURM_NNODES="1", SLURM_JOB_NUM_NODES="1", SLURM_PROCID=str(task), SLURM_LOCALID=str(task),
                SLURM_NODEID="0", SLURM_NODELIST="localhost", SLURM_JOB_NODELIST="localhost",
                SLURM_JOB_ID=job_id, SLURM_JOB_NAME="transferkit-test")  # "bash"/"interactive": not SLURM's


def test_two_slurm_tasks_take_their_ranks_from_slurm_and_write_one_run(data, tmp_path, monkeypatch, capsys):
    """Two processes with the environment `srun --ntasks-per-node 2` gives its tasks, running
    `transferkit fit --devices 2` (the README's SLURM line on one node).

    Lightning must take SLURMEnvironment (its log says so, and the ranks and world size it
    reports are SLURM's), start no processes of its own (with --devices 2 its launcher would
    otherwise start a second process in each task), and the two tasks must write one run: one
    directory, report.json from task 0 only, and two processes' steps in the checkpoint. A
    --devices that disagrees with SLURM's tasks per node fails (with Lightning's hint) before
    anything is written: Lightning itself does not check it under SLURM, and with --devices 1 each
    task would train alone into the same run directory.
    """
    # Lightning takes the port from the job id: 15000 + its last 4 digits.
    port = _free_port(15000, 24999)
    job_id = f"7{port - 15000:04d}"
    epochs = 2
    work = tmp_path / "work"
    work.mkdir()
    cmd = [sys.executable, "-m", "transferkit.cli.main", "-v", "fit", str(data), "--out", "run", *ARGS,
           "--epochs", str(epochs), "--devices", "2"]
    tasks = Launch([(cmd, _slurm_env(t, 2, job_id)) for t in (0, 1)], work, tmp_path / "logs")
    assert tasks.wait() == [0, 0], tasks.output()
    for t in (0, 1):
        err = tasks.err(t)
        assert "Traceback" not in err, tasks.output()
        assert "SLURM auto-requeueing enabled" in err, tasks.output()  # SLURMEnvironment was chosen
        assert f"GLOBAL_RANK: {t}, MEMBER: {t + 1}/2" in err, tasks.output()  # SLURM_PROCID, SLURM_NTASKS
    assert "All distributed processes registered. Starting with 2 processes" in tasks.err(0)
    assert tasks.out(0).count("val accuracy") == 1 and "val accuracy" not in tasks.out(1)
    assert "report written to" in tasks.err(0) and "report written to" not in tasks.err(1)

    run = work / "run"
    assert sorted(p.name for p in work.iterdir()) == ["run"]
    _no_copies(run)
    rows = _rows(run / "metrics.csv")
    assert [r["epoch"] for r in rows] == [str(e) for e in range(1, epochs + 1)]
    assert all(r["val_count"] == "5" for r in rows), rows
    last = torch.load(run / "checkpoints/last.ckpt", weights_only=True)
    assert last["global_step"] == epochs * STEPS_PER_EPOCH[2]  # two processes shared each epoch
    report = json.loads((run / "report.json").read_text())
    assert report["metrics"]["count"] == 5 and report["images"]["val"] == 5
    assert (report["world_size"], report["num_nodes"]) == (2, 1)

    # --devices must equal SLURM's tasks per node
    err = _refused({k: v for k, v in _slurm_env(0, 2, job_id).items() if k.startswith("SLURM_")},
                   [*ARGS, "--devices", "1"], "SLURM", data, tmp_path, monkeypatch, capsys)
    assert "--ntasks-per-node=2" in err and "Set `devices=2`" in err, err

