"""Two processes (DDP over gloo on the CPU) write one run, and count every val image once.

Lightning starts the second process by running the same command line again, so these tests run
the real command in a subprocess. The val split has an odd size: the distributed sampler then
pads one rank with a repeated image, which must not be counted twice.
"""
from __future__ import annotations

import csv
import json
import os
import subprocess
import sys

import pytest

from transferkit.cli.main import main

pytestmark = pytest.mark.slow

ARGS = ["--backbone", "test_resnet", "--no-pretrained", "--image-size", "32", "--workers", "0",
        "--batch-size", "4", "--epochs", "2", "--patience", "0", "--seed", "5",
        "--devices", "2", "--accelerator", "cpu"]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    from conftest import make_color_folder

    # 27 images: a stratified val split of 5 (odd), train 22; and one broken file
    data = make_color_folder(tmp_path_factory.mktemp("ddp") / "data", per_class=9, size=32)
    (data / "red" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 cut short")
    return data


def _rows(path):
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


@pytest.mark.parametrize("finetune", ["full", "freeze", "partial", "lp-ft", "gradual", "auto"])
def test_two_processes_write_one_run_and_count_each_val_image_once(data, weights, tmp_path, finetune):
    work = tmp_path / "work"
    work.mkdir()
    env = dict(os.environ)
    args = list(ARGS)
    if finetune == "auto":  # rank 0 measures; the other process trains what it decided (a broadcast)
        args[args.index("--no-pretrained")] = "--weights=" + str(weights)
    proc = subprocess.run([sys.executable, "-m", "transferkit.cli.main", "fit", str(data), "--out", "run",
                           "--finetune", finetune, *args], cwd=work, env=env, capture_output=True,
                          text=True, timeout=480, check=False)
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr
    assert proc.stdout.count("val accuracy") == 1  # only rank 0 reports
    # the second process scans the same folder quietly: rank 0 reports
    assert proc.stderr.count("left out 1 unusable file(s)") == 1, proc.stderr
    run = work / "run"
    assert sorted(p.name for p in work.iterdir()) == ["run"]  # no second run directory, no logs
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["best.ckpt", "last.ckpt"]

    val = _rows(run / "splits" / "val.csv")
    assert len(val) == 5
    rows = _rows(run / "metrics.csv")
    report = json.loads((run / "report.json").read_text())
    # a solved head takes one epoch: all of freeze, lp-ft's probe (then 2 epochs of fine-tuning)
    epochs = {"freeze": 1, "lp-ft": 3}.get(report["finetune"]["strategy"], 2)
    assert [r["epoch"] for r in rows] == [str(e) for e in range(1, epochs + 1)]  # one row per epoch
    if report["finetune"]["strategy"] in ("freeze", "lp-ft"):
        assert report["head_solver"]["solver"] == "lbfgs"  # rank 0 solved it; rank 1 took its answer
    for r in rows:
        assert r["val_count"] == "5", rows
        assert float(r["val_acc"]) * 5 == pytest.approx(round(float(r["val_acc"]) * 5), abs=1e-4)

    if finetune == "auto":
        assert report["finetune"]["advice"]["strategy"] == report["finetune"]["strategy"]
        assert proc.stderr.count("transferkit: advice: ") == 1  # measured once, by rank 0
    else:
        assert report["finetune"]["strategy"] == finetune
    assert report["images"]["val"] == 5 and report["metrics"]["count"] == 5
    best_during_training = max(float(r["val_acc"]) for r in rows)
    assert report["best_val_acc_during_training"] == pytest.approx(best_during_training, abs=1e-5)
    # the metric gathered over two processes is the one a single process computes
    assert report["accuracy"] == pytest.approx(best_during_training, abs=1e-5)

    assert main(["evaluate", str(run)]) == 0
    (single,) = json.loads((run / "evaluation.json").read_text())["results"]
    assert single["count"] == 5
    assert single["accuracy"] == pytest.approx(report["accuracy"], abs=1e-6)
