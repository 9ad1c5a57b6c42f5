"""Interrupted runs end cleanly and resume to the same result; killed runs leave only whole files."""
from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch

from transferkit.cli.main import main

ARGS = ["--backbone", "test_resnet", "--no-pretrained", "--image-size", "32", "--workers", "0",
        "--batch-size", "8", "--epochs", "8", "--patience", "0", "--seed", "3"]


def _spawn(*args: str) -> subprocess.Popen:
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    return subprocess.Popen([sys.executable, "-m", "transferkit.cli.main", *args], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _rows(run: Path) -> list[dict]:
    if not (run / "metrics.csv").exists():
        return []
    with (run / "metrics.csv").open() as f:
        return list(csv.DictReader(f))


def _wait_for(pred, timeout=240.0):
    t0 = time.monotonic()
    while not pred():
        if time.monotonic() - t0 > timeout:
            raise TimeoutError
        time.sleep(0.05)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    from conftest import make_color_folder

    return make_color_folder(tmp_path_factory.mktemp("resume") / "data", per_class=16, size=32)


@pytest.fixture(scope="module")
def uninterrupted(data, tmp_path_factory):
    out = tmp_path_factory.mktemp("a") / "run"
    assert main(["fit", str(data), "--out", str(out), *ARGS]) == 0
    return out


def test_sigint_then_resume_ends_where_an_uninterrupted_run_ends(data, uninterrupted, tmp_path):
    out = tmp_path / "run"
    proc = _spawn("fit", str(data), "--out", str(out), *ARGS)
    _wait_for(lambda: len(_rows(out)) >= 2 and (out / "checkpoints/last.ckpt").exists())
    proc.send_signal(signal.SIGINT)  # somewhere inside the third epoch, or just after
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert f"transferkit fit --resume {out}" in err
    assert "Traceback" not in err
    assert 2 <= len(_rows(out)) < 8

    assert main(["fit", "--resume", str(out)]) == 0
    a = torch.load(uninterrupted / "checkpoints/last.ckpt", weights_only=True)
    b = torch.load(out / "checkpoints/last.ckpt", weights_only=True)
    assert a["epoch"] == b["epoch"] == 7
    for k, v in a["state_dict"].items():
        assert torch.equal(v, b["state_dict"][k]), k
    for sa, sb in zip(a["optimizer_states"][0]["state"].values(), b["optimizer_states"][0]["state"].values()):
        assert torch.equal(sa["exp_avg"], sb["exp_avg"])
    strip = lambda rows: [{k: v for k, v in r.items() if k != "seconds"} for r in rows]  # noqa: E731
    assert strip(_rows(out)) == strip(_rows(uninterrupted))
    assert [int(r["epoch"]) for r in _rows(out)] == list(range(1, 9))


class _InterruptAt(pl.Callback):
    """Ctrl-C at the start of a given epoch (0-based): an interrupt that always lands in time."""

    def __init__(self, epoch: int):
        self.epoch = epoch

    def on_train_epoch_start(self, trainer, pl_module):
        if trainer.current_epoch == self.epoch:
            raise KeyboardInterrupt


def _fit_interrupted_at(epoch: int, args: list[str]) -> int:
    from conftest import fit_with_callbacks

    return fit_with_callbacks(args, _InterruptAt(epoch))


def _same_end(whole: Path, cut: Path, names=("last",)) -> None:
    for name in names:
        a = torch.load(whole / f"checkpoints/{name}.ckpt", weights_only=True)
        b = torch.load(cut / f"checkpoints/{name}.ckpt", weights_only=True)
        assert ("ema_state_dict" in a) == ("ema_state_dict" in b)
        for key in ("state_dict", "ema_state_dict") if "ema_state_dict" in a else ("state_dict",):
            for k, v in a[key].items():
                assert torch.equal(v, b[key][k]), (name, key, k)
    strip = lambda rows: [{k: v for k, v in r.items() if k != "seconds"} for r in rows]  # noqa: E731
    assert strip(_rows(cut)) == strip(_rows(whole))


def test_cached_freeze_with_ema_and_snapshots_resumes_to_the_same_end(data, weights, tmp_path, capsys):
    args = [*ARGS, "--epochs", "6", "--weights", str(weights), "--finetune", "freeze", "--ema",
            "--snapshots", "2"]
    args.remove("--no-pretrained")
    whole, cut = tmp_path / "whole", tmp_path / "cut"
    assert main(["fit", str(data), "--out", str(whole), *args]) == 0
    assert _fit_interrupted_at(4, ["fit", str(data), "--out", str(cut), *args]) == 130
    assert f"transferkit fit --resume {cut}" in capsys.readouterr().err
    assert len(_rows(cut)) == 4
    assert main(["fit", "--resume", str(cut)]) == 0
    _same_end(whole, cut, ("last", "snapshot-1", "snapshot-2"))
    assert "ema_state_dict" in torch.load(cut / "checkpoints/last.ckpt", weights_only=True)
    assert _rows(cut)[-1]["val_acc_ema"]


@pytest.mark.parametrize("cache", ["1", "0"], ids=["cached probe", "probe on images"])
def test_lp_ft_interrupted_in_its_probe_phase_resumes_to_the_same_end(data, weights, tmp_path, cache):
    # a probe trained for epochs (sgd), so that there is a probe phase to interrupt
    args = [*ARGS, "--epochs", "3", "--weights", str(weights), "--finetune", "lp-ft", "--cache-views", cache,
            "--head-solver", "sgd"]
    args.remove("--no-pretrained")
    whole, cut = tmp_path / "whole", tmp_path / "cut"
    assert main(["fit", str(data), "--out", str(whole), *args]) == 0
    assert [int(r["epoch"]) for r in _rows(whole)] == list(range(1, 7))  # 3 probe + 3 fine-tuning epochs
    probe_end = torch.load(whole / "checkpoints/last.ckpt", weights_only=True)
    assert _fit_interrupted_at(2, ["fit", str(data), "--out", str(cut), *args]) == 130  # inside the probe
    assert len(_rows(cut)) == 2
    mid = torch.load(cut / "checkpoints/last.ckpt", weights_only=True)["state_dict"]
    from safetensors.torch import load_file

    pretrained = load_file(str(weights))
    for k, v in pretrained.items():  # the probe moved the head alone
        if not k.startswith("fc.") and v.is_floating_point():
            assert torch.equal(mid["model." + k], v), k
    assert main(["fit", "--resume", str(cut)]) == 0
    _same_end(whole, cut)
    moved = [k for k, v in pretrained.items() if not k.startswith("fc.") and v.is_floating_point()
             and not torch.equal(probe_end["state_dict"]["model." + k], v)]
    assert any(k.startswith("conv1") for k in moved)  # then fine-tuning moved the backbone


def test_sigterm_ends_cleanly_with_a_resume_hint(data, tmp_path):
    out = tmp_path / "run"
    proc = _spawn("fit", str(data), "--out", str(out), *ARGS)
    _wait_for(lambda: len(_rows(out)) >= 1 and (out / "checkpoints/last.ckpt").exists())
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "--resume" in err and "Traceback" not in err
    torch.load(out / "checkpoints/last.ckpt", weights_only=True)


def test_sigkill_at_any_moment_leaves_only_complete_checkpoints(data, tmp_path):
    out = tmp_path / "run"
    first = True
    for delay in (0.0, 0.4, 0.9, 1.7):
        proc = _spawn("fit", *(["--resume", str(out)] if not first else [str(data), "--out", str(out), *ARGS]))
        _wait_for(lambda: (out / "checkpoints/last.ckpt").exists() or proc.poll() is not None)
        time.sleep(delay)
        proc.kill()
        proc.communicate(timeout=60)
        first = False
        ckpts = list((out / "checkpoints").glob("*.ckpt"))
        assert ckpts
        for c in ckpts:
            ck = torch.load(c, weights_only=True)  # complete, or it would not unpickle
            assert "state_dict" in ck
    assert main(["fit", "--resume", str(out)]) == 0
    assert [int(r["epoch"]) for r in _rows(out)] == list(range(1, 9))


def test_lp_ft_with_a_solved_probe_interrupted_in_fine_tuning_resumes_to_the_same_end(data, weights, tmp_path):
    args = [*ARGS, "--epochs", "3", "--weights", str(weights), "--finetune", "lp-ft"]
    args.remove("--no-pretrained")
    whole, cut = tmp_path / "whole", tmp_path / "cut"
    assert main(["fit", str(data), "--out", str(whole), *args]) == 0
    assert [int(r["epoch"]) for r in _rows(whole)] == [1, 2, 3, 4]  # the solved probe, then 3 fine-tuning epochs
    assert _fit_interrupted_at(2, ["fit", str(data), "--out", str(cut), *args]) == 130
    assert main(["fit", "--resume", str(cut)]) == 0
    _same_end(whole, cut)
    assert json.loads((cut / "report.json").read_text())["head_solver"]["solver"] == "lbfgs"
