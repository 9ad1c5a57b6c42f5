"""`fit --ema --swa --snapshots`, then `evaluate` / `predict` with TTA and ensembles, as a user runs them."""
from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader

from transferkit.augment.image import eval_transform
from transferkit.augment.tta import TTA, predict_proba_ensemble
from transferkit.cli.main import main
from transferkit.pipelines.data.datasets import ImageDataset, Sample
from transferkit.pipelines.data.splits import read_split_csv
from transferkit.pipelines.evaluate.loading import load_model
from transferkit.pipelines.evaluate.metrics import classification_metrics
from transferkit.pipelines.evaluate.predictor import Predictor
from transferkit.pipelines.rundir import RunDir

FAST = ["--backbone", "test_resnet", "--no-pretrained", "--image-size", "32", "--workers", "0",
        "--batch-size", "8", "--patience", "0", "--seed", "5"]


class LrRecorder(pl.Callback):
    """The lr multiplier each optimizer step runs with, by step."""

    def __init__(self):
        self.factors: dict[int, float] = {}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        sched = trainer.lr_scheduler_configs[0].scheduler
        self.factors[trainer.global_step] = trainer.optimizers[0].param_groups[0]["lr"] / sched.base_lrs[0]


def _fit_with(callback: pl.Callback, args: list[str]) -> int:
    from conftest import fit_with_callbacks

    return fit_with_callbacks(args, callback)


@pytest.fixture(scope="module")
def averaged(tmp_path_factory):
    """A run with EMA, SWA and three snapshot cycles over six epochs, and its lr per step."""
    from conftest import make_color_folder

    root = tmp_path_factory.mktemp("averaged")
    data = make_color_folder(root / "data", per_class=16, size=32)
    out = root / "run"
    rec = LrRecorder()
    assert _fit_with(rec, ["fit", str(data), "--out", str(out), "--epochs", "6", "--snapshots", "3", "--ema",
                           "--swa", *FAST]) == 0
    return data, out, rec.factors


def _val_loader(out: Path, predictor: Predictor | None = None, transform=None) -> DataLoader:
    run = RunDir(out)
    samples = read_split_csv(run.splits / "val.csv", run.classes())
    return DataLoader(ImageDataset(samples, transform or predictor.transform), batch_size=8)


def _copy_run(out: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "copy"
    shutil.copytree(out, dst)
    return dst


def test_snapshots_are_written_at_the_learning_rate_minima(averaged):
    _, out, factors = averaged
    names = sorted(p.name for p in (out / "checkpoints").glob("snapshot-*.ckpt"))
    assert names == ["snapshot-1.ckpt", "snapshot-2.ckpt", "snapshot-3.ckpt"]
    steps = [torch.load(out / "checkpoints" / n, weights_only=True)["global_step"] for n in names]
    per_epoch = steps[0] // 2
    assert steps == [2 * per_epoch, 4 * per_epoch, 6 * per_epoch]
    assert max(factors) == steps[-1] - 1  # the recorder saw every step
    for start, end in zip([0, *steps[:-1]], steps):
        cycle = [factors[s] for s in range(start, end)]
        assert factors[end - 1] == pytest.approx(0.01) == min(cycle)  # the snapshot's last step: the minimum
    assert factors[steps[0]] == factors[steps[1]] == pytest.approx(1.0)  # warm restarts
    report = json.loads((out / "report.json").read_text())
    assert report["ensembles"] == ["none", "ema", "swa", "snapshots", "all"]


def test_ema_weights_are_in_every_checkpoint_and_are_what_ensemble_ema_uses(averaged, capsys):
    _, out, _ = averaged
    for name in ("best", "last"):
        ckpt = torch.load(out / "checkpoints" / f"{name}.ckpt", weights_only=True)
        assert set(ckpt["ema_state_dict"]) == set(ckpt["state_dict"])
        assert not torch.equal(ckpt["ema_state_dict"]["model.fc.weight"], ckpt["state_dict"]["model.fc.weight"])
    assert main(["evaluate", str(out), "--tta", "plain,hflip", "--ensemble", "none,ema"]) == 0
    printed = capsys.readouterr().out
    body = json.loads((out / "evaluation.json").read_text())
    rows = body["results"]
    assert [(r["tta"], r["ensemble"]) for r in rows] == [("plain", "none"), ("hflip", "none"),
                                                          ("plain", "ema"), ("hflip", "ema")]
    for r in rows:
        assert {"accuracy", "macro_f1", "nll", "ece", "count", "confusion_matrix", "members", "views"} <= set(r)
        assert "top5_accuracy" not in r  # three classes
        assert r["members"] == (["best:ema"] if r["ensemble"] == "ema" else ["best"])
        assert r["views"] == (2 if r["tta"] == "hflip" else 1)
    assert printed.splitlines()[2].replace("*", " ").split()[:2] == ["plain", "none"]  # plain first
    # the EMA row is the model loaded with the checkpoint's averaged weights, computed here by hand
    # on fit's own eval pixels
    model, dc = load_model(RunDir(out), "best", key="ema_state_dict")
    tf = eval_transform(dc.input_size[1:], dc.mean, dc.std, dc.crop_pct, dc.interpolation)
    probs, labels = [], []
    with torch.no_grad():
        for x, y, _ in _val_loader(out, transform=tf):
            probs.append(torch.softmax(model(x), -1))
            labels.append(y)
    manual = classification_metrics(torch.cat(probs).numpy(), torch.cat(labels).numpy(), RunDir(out).classes())
    assert rows[2]["nll"] == pytest.approx(manual["nll"], rel=1e-5)
    assert rows[2]["accuracy"] == manual["accuracy"]
    assert (out / "plots" / "reliability-val.png").stat().st_size > 0
    assert (out / "plots" / "confusion-val.png").stat().st_size > 0
    # the best row is the most accurate, ties broken by the lower NLL
    top = max(rows, key=lambda r: (r["accuracy"], -r["nll"]))
    assert body["best"] == {"tta": top["tta"], "ensemble": top["ensemble"]}
    assert all(r["accuracy"] < top["accuracy"] or r["nll"] >= top["nll"] for r in rows)


def test_ten_crop_over_snapshots_is_the_merge_of_all_thirty_predictions(averaged):
    _, out, _ = averaged
    run = RunDir(out)
    predictor = Predictor.for_run(run, "ten-crop", "snapshots", accelerator="cpu")
    (got,), labels, _ = predictor.predict(_val_loader(out, predictor), progress=False)
    models = [load_model(run, f"snapshot-{i}")[0] for i in (1, 2, 3)]
    tta = TTA("ten-crop", size=32)
    want = torch.cat([predict_proba_ensemble(models, x, tta) for x, _, _ in _val_loader(out, predictor)])
    np.testing.assert_allclose(got, want.numpy(), rtol=0, atol=1e-6)
    # ... and differs from each snapshot alone (the ensemble is not one member in disguise)
    alone = torch.cat([predict_proba_ensemble(models[:1], x, tta) for x, _, _ in _val_loader(out, predictor)])
    assert np.abs(got - alone.numpy()).max() > 1e-4


def test_three_identical_snapshots_equal_the_single_model(averaged, tmp_path):
    _, out, _ = averaged
    run_dir = _copy_run(out, tmp_path)
    for i in (1, 2, 3):
        shutil.copy(run_dir / "checkpoints/best.ckpt", run_dir / f"checkpoints/snapshot-{i}.ckpt")
    assert main(["evaluate", str(run_dir), "--ensemble", "none,snapshots", "--tta", "hflip"]) == 0
    single, ensemble = json.loads((run_dir / "evaluation.json").read_text())["results"]
    assert ensemble["members"] == ["snapshot-1", "snapshot-2", "snapshot-3"]
    for key in ("accuracy", "macro_f1", "nll", "ece"):
        assert ensemble[key] == pytest.approx(single[key], rel=1e-6, abs=1e-7), key
    assert ensemble["confusion_matrix"] == single["confusion_matrix"]


def test_plain_evaluation_reproduces_the_fit_report(averaged):
    _, out, _ = averaged
    assert main(["evaluate", str(out)]) == 0
    (res,) = json.loads((out / "evaluation.json").read_text())["results"]
    report = json.loads((out / "report.json").read_text())
    assert res["accuracy"] == report["accuracy"]
    assert res["nll"] == pytest.approx(report["metrics"]["nll"], rel=1e-6)


def test_predict_takes_one_tta_spec_and_one_ensemble(averaged, tmp_path, capsys):
    data, out, _ = averaged
    csv_out = tmp_path / "pred.csv"
    assert main(["predict", str(out), str(data / "red"), "--out", str(csv_out), "--tta", "hflip",
                 "--ensemble", "snapshots", "--top-k", "2"]) == 0
    with csv_out.open() as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 16
    run = RunDir(out)
    predictor = Predictor.for_run(run, "hflip", "snapshots", accelerator="cpu")
    loader = DataLoader(ImageDataset([Sample(r["path"], -1) for r in rows], predictor.transform), batch_size=8)
    (probs,), _, _ = predictor.predict(loader, progress=False)
    classes = run.classes()
    for r, p in zip(rows, probs):
        assert r["label"] == classes[int(p.argmax())]
        assert float(r["probability"]) == pytest.approx(float(p.max()), abs=1e-6)
    assert main(["predict", str(out), str(data / "red"), "--tta", "plain,hflip"]) == 2
    assert "predict takes one --tta spec" in capsys.readouterr().err


def test_ensembles_the_run_cannot_provide_name_the_fit_flag(averaged, tmp_path, capsys):
    _, out, _ = averaged
    run_dir = _copy_run(out, tmp_path)
    for f in [*run_dir.glob("checkpoints/snapshot-*.ckpt"), run_dir / "checkpoints/swa.ckpt"]:
        f.unlink()
    ckpt = torch.load(run_dir / "checkpoints/best.ckpt", weights_only=True)
    del ckpt["ema_state_dict"]
    torch.save(ckpt, run_dir / "checkpoints/best.ckpt")
    for ensemble, flag in (("ema", "fit --ema"), ("snapshots", "fit --snapshots"), ("swa", "fit --swa")):
        assert main(["evaluate", str(run_dir), "--ensemble", f"none,{ensemble}"]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and flag in err and "Traceback" not in err, err
    assert main(["evaluate", str(run_dir), "--ensemble", "all", "--tta", "plain"]) == 0  # all: what there is
    (res,) = json.loads((run_dir / "evaluation.json").read_text())["results"]
    assert res["members"] == ["best"]
    assert main(["evaluate", str(run_dir), "--tta", "plain,0.9"]) == 2
    assert "stray number" in capsys.readouterr().err


def test_members_of_a_frozen_run_share_one_backbone_pass(tmp_path):
    from conftest import make_color_folder

    data = make_color_folder(tmp_path / "data", per_class=10, size=32)
    out = tmp_path / "run"
    assert main(["fit", str(data), "--out", str(out), "--finetune", "freeze", "--epochs", "3", "--snapshots", "3",
                 "--ema", *FAST]) == 0
    run = RunDir(out)
    predictor = Predictor.for_run(run, "plain,five-crop", "none,ema,snapshots", accelerator="cpu")
    shared, labels, _ = predictor.predict(_val_loader(out, predictor), progress=False)
    assert predictor.shared_backbone is True and len(predictor.models) == 5
    separate = Predictor.for_run(run, "plain,five-crop", "none,ema,snapshots", accelerator="cpu")
    separate.shared_backbone = False
    for a, b in zip(shared, separate.predict(_val_loader(out, predictor), progress=False)[0]):
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-5)
    ckpt = torch.load(out / "checkpoints/last.ckpt", weights_only=True)
    differs = [k for k, v in ckpt["state_dict"].items() if not torch.equal(v, ckpt["ema_state_dict"][k])]
    assert differs and all(k.startswith("model.fc.") for k in differs)  # frozen: only the head moves


def test_fit_refuses_more_snapshots_than_epochs_before_writing_anything(tmp_path, capsys):
    from conftest import make_color_folder

    data = make_color_folder(tmp_path / "data", per_class=4, size=32)
    assert main(["fit", str(data), "--out", str(tmp_path / "run"), "--epochs", "3", "--snapshots", "4",
                 *FAST]) == 2
    assert "--snapshots 4 needs at least one epoch per cycle" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


class StopAt(pl.Callback):
    def __init__(self, epoch: int):
        self.epoch = epoch

    def on_train_epoch_start(self, trainer, pl_module):
        if trainer.current_epoch == self.epoch:
            raise RuntimeError("stopped for the test")


def test_resume_restores_the_ema_swa_and_snapshot_state(tmp_path):
    from conftest import make_color_folder

    data = make_color_folder(tmp_path / "data", per_class=10, size=32)
    args = ["--epochs", "4", "--snapshots", "2", "--ema", "--swa", *FAST]
    whole, cut = tmp_path / "whole", tmp_path / "cut"
    assert main(["fit", str(data), "--out", str(whole), *args]) == 0
    with pytest.raises(RuntimeError, match="stopped for the test"):
        _fit_with(StopAt(3), ["fit", str(data), "--out", str(cut), *args])
    assert not (cut / "checkpoints/snapshot-2.ckpt").exists()
    assert main(["fit", "--resume", str(cut)]) == 0
    for name in ("last", "snapshot-1", "snapshot-2", "swa"):
        a = torch.load(whole / f"checkpoints/{name}.ckpt", weights_only=True)
        b = torch.load(cut / f"checkpoints/{name}.ckpt", weights_only=True)
        for key in ("state_dict", "ema_state_dict"):
            for k, v in a.get(key, {}).items():
                assert torch.equal(v, b[key][k]), (name, key, k)
    swa = torch.load(cut / "checkpoints/swa.ckpt", weights_only=True)
    assert swa["swa_epochs"] == [2, 4]


@pytest.mark.slow
def test_two_processes_average_and_snapshot_one_run(tmp_path, capsys):
    """DDP over gloo on the CPU: one set of snapshot and SWA files, EMA in every checkpoint."""
    from conftest import make_color_folder

    data = make_color_folder(tmp_path / "data", per_class=9, size=32)  # val split of 5: one rank pads
    work = tmp_path / "work"
    work.mkdir()
    env = {k: v for k, v in os.environ.items() if k != "TRANSFERKIT_RUN_DIR"}
    proc = subprocess.run([sys.executable, "-m", "transferkit.cli.main", "fit", str(data), "--out", "run",
                           "--backbone", "test_resnet", "--no-pretrained", "--image-size", "32", "--workers", "0",
                           "--batch-size", "4", "--epochs", "4", "--patience", "0", "--seed", "5", "--devices", "2",
                           "--accelerator", "cpu", "--ema", "--swa", "--snapshots", "2"],
                          cwd=work, env=env, capture_output=True, text=True, timeout=480)
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr
    assert proc.stderr.count("snapshot 2 of 2 written") == 1 and proc.stderr.count("SWA: averaged") == 1
    run = work / "run"
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == [
        "best.ckpt", "last.ckpt", "snapshot-1.ckpt", "snapshot-2.ckpt", "swa.ckpt"]
    last = torch.load(run / "checkpoints/last.ckpt", weights_only=True)
    snap = torch.load(run / "checkpoints/snapshot-2.ckpt", weights_only=True)
    assert all(torch.equal(v, snap["state_dict"][k]) for k, v in last["state_dict"].items())  # same epoch end
    assert set(last["ema_state_dict"]) == set(last["state_dict"])
    assert main(["evaluate", str(run), "--ensemble", "none,ema,swa,snapshots"]) == 0
    rows = json.loads((run / "evaluation.json").read_text())["results"]
    assert [r["count"] for r in rows] == [5, 5, 5, 5]


@pytest.mark.real
@pytest.mark.slow
def test_hymenoptera_compares_tta_and_ensembles_in_one_call(shared, tmp_path, capsys):
    """mobilenetv1_025, frozen, EMA and three snapshot cycles; one evaluate call compares them all."""
    data = shared / "data" / "hymenoptera"
    plugin = shared / "weights" / "mobilenetv1_025.py"
    out = tmp_path / "run"
    t0 = time.monotonic()
    assert main(["fit", str(data), "--backbone", "mobilenetv1_025", "--backbone-plugin", str(plugin),
                 "--finetune", "freeze", "--epochs", "6", "--snapshots", "3", "--ema", "--ema-decay", "0.99",
                 "--patience", "0", "--batch-size", "32", "--workers", "2", "--out", str(out)]) == 0
    fit_seconds = time.monotonic() - t0
    capsys.readouterr()
    assert main(["evaluate", str(out), "--tta", "plain,hflip,ten-crop", "--ensemble", "none,ema,snapshots",
                 "--workers", "2"]) == 0
    printed = capsys.readouterr().out
    with capsys.disabled():
        print(f"\nfit {fit_seconds:.0f} s, evaluate {time.monotonic() - t0 - fit_seconds:.0f} s\n{printed}")
    body = json.loads((out / "evaluation.json").read_text())
    rows = {(r["tta"], r["ensemble"]): r for r in body["results"]}
    assert len(rows) == 9 and all(r["count"] == 153 for r in rows.values())
    assert rows["plain", "none"]["accuracy"] >= 0.8  # the frozen features alone reach about 0.86
    assert rows["ten-crop", "snapshots"]["members"] == ["snapshot-1", "snapshot-2", "snapshot-3"]
    assert max(r["accuracy"] for r in rows.values()) >= rows["plain", "none"]["accuracy"]


def test_a_checkpoint_of_another_class_count_is_one_line(averaged, tmp_path, capsys):
    from conftest import make_color_folder

    _, out, _ = averaged
    run_dir = _copy_run(out, tmp_path)
    other = tmp_path / "two"
    assert main(["fit", str(make_color_folder(tmp_path / "d2", classes=("red", "blue"), per_class=6, size=32)),
                 "--out", str(other), *FAST, "--epochs", "1"]) == 0
    shutil.copy(other / "checkpoints/best.ckpt", run_dir / "checkpoints/best.ckpt")
    assert main(["evaluate", str(run_dir)]) == 2
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert line.startswith(f"transferkit: error: {run_dir / 'checkpoints' / 'best.ckpt'} does not fit this run's model")
    assert "other classes or another backbone" in line


def test_every_checkpoint_of_the_run_loads_on_its_own(averaged):
    import transferkit

    _, out, _ = averaged
    classes = RunDir(out).classes()
    for name in ("best", "last", "swa", "snapshot-1", "snapshot-3"):
        loaded = transferkit.load(out / "checkpoints" / f"{name}.ckpt")
        assert loaded.classes == classes, name
        want, _ = load_model(RunDir(out), name)
        for k, v in loaded.model.state_dict().items():
            assert torch.equal(v, want.state_dict()[k]), (name, k)
    ema = transferkit.load(out / "checkpoints" / "best.ckpt", ema=True)
    want, _ = load_model(RunDir(out), "best", key="ema_state_dict")
    assert all(torch.equal(v, want.state_dict()[k]) for k, v in ema.model.state_dict().items())
