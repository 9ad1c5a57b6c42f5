"""Drive `transferkit fit`, `evaluate` and `predict` the way a user would."""
from __future__ import annotations

import csv
import json

import pytest
import torch
import yaml

from transferkit.cli.main import main

FAST = ["--backbone", "test_resnet", "--image-size", "40", "--workers", "0", "--batch-size", "16"]


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    from conftest import make_color_folder

    root = tmp_path_factory.mktemp("fit")
    data = make_color_folder(root / "data", per_class=24)
    out = root / "run"
    rc = main(["fit", str(data), "--no-pretrained", "--epochs", "8", "--out", str(out), *FAST])
    assert rc == 0
    return data, out


def test_fit_learns_an_easy_task_and_writes_the_run_directory(trained_run):
    data, out = trained_run
    report = json.loads((out / "report.json").read_text())
    assert report["accuracy"] >= 0.9
    assert 0.0 <= report["macro_f1"] <= 1.0 and report["macro_f1"] >= 0.85
    assert set(report["metrics"]["per_class"]) == {"blue", "green", "red"}
    assert report["finetune"]["strategy"] == "full"
    assert "random weights" in report["finetune"]["reason"]
    for name in ("config.yaml", "classes.json", "splits/train.csv", "splits/val.csv", "skipped.csv",
                 "checkpoints/best.ckpt", "checkpoints/last.ckpt", "metrics.csv",
                 "plots/curves.png", "plots/confusion.png"):
        assert (out / name).is_file(), name
    assert json.loads((out / "classes.json").read_text()) == ["blue", "green", "red"]
    with (out / "splits/val.csv").open() as f:
        val = list(csv.DictReader(f))
    with (out / "splits/train.csv").open() as f:
        train = list(csv.DictReader(f))
    assert len(val) + len(train) == 72
    assert not {r["path"] for r in val} & {r["path"] for r in train}
    assert {r["label"] for r in val} == {"blue", "green", "red"}  # stratified
    with (out / "metrics.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert [int(r["epoch"]) for r in rows] == list(range(1, len(rows) + 1))
    cfg = yaml.safe_load((out / "config.yaml").read_text())
    assert cfg["fit"]["backbone"] == "test_resnet" and cfg["fit"]["pretrained"] is False
    assert cfg["resolved"]["data_config"]["input_size"] == [3, 40, 40]
    ckpt = torch.load(out / "checkpoints/best.ckpt", weights_only=True)
    assert any(k.startswith("model.") for k in ckpt["state_dict"])


def test_evaluate_uses_the_saved_split_and_matches_the_report(trained_run, capsys):
    _, out = trained_run
    assert main(["evaluate", str(out)]) == 0
    body = json.loads((out / "evaluation.json").read_text())
    (res,) = body["results"]
    report = json.loads((out / "report.json").read_text())
    assert res["accuracy"] == pytest.approx(report["accuracy"])
    assert {"accuracy", "macro_f1", "nll"} <= set(res)
    assert res["count"] == report["images"]["val"]
    assert "accuracy" in capsys.readouterr().out


def test_predict_writes_labels_and_top_k(trained_run, tmp_path):
    data, out = trained_run
    csv_out = tmp_path / "pred.csv"
    assert main(["predict", str(out), str(data / "red"), str(data / "blue" / "blue_000.png"),
                 "--out", str(csv_out), "--top-k", "2"]) == 0
    with csv_out.open() as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 25
    assert list(rows[0]) == ["path", "label", "probability", "label_2", "probability_2", "error"]
    assert all(r["error"] == "" for r in rows)
    assert all(float(r["probability"]) >= float(r["probability_2"]) for r in rows)
    red = [r for r in rows if "/red/" in r["path"]]
    assert sum(r["label"] == "red" for r in red) >= 0.9 * len(red)


def test_config_replays_a_run_into_a_new_directory(trained_run, tmp_path):
    _, out = trained_run
    before = {f: f.stat().st_mtime_ns for f in out.rglob("*") if f.is_file()}
    new = tmp_path / "replay"
    assert main(["fit", "--config", str(out / "config.yaml"), "--out", str(new), "--epochs", "2"]) == 0
    old_cfg = yaml.safe_load((out / "config.yaml").read_text())["fit"]
    new_cfg = yaml.safe_load((new / "config.yaml").read_text())["fit"]
    assert {k: v for k, v in new_cfg.items() if k not in ("out", "epochs")} == \
        {k: v for k, v in old_cfg.items() if k not in ("out", "epochs")}
    assert new_cfg["epochs"] == 2 and new_cfg["out"] == str(new)
    assert {f: f.stat().st_mtime_ns for f in out.rglob("*") if f.is_file()} == before  # old run untouched


def test_config_replay_without_out_never_reuses_the_old_directory(trained_run, tmp_path, monkeypatch):
    _, out = trained_run
    monkeypatch.chdir(tmp_path)
    assert main(["fit", "--config", str(out / "config.yaml"), "--epochs", "1"]) == 0
    (run,) = (tmp_path / "runs").iterdir()
    assert run.name.startswith("test_resnet-") and (run / "report.json").is_file()


def test_print_config_prints_what_config_yaml_would_hold_and_writes_nothing(color_folder, tmp_path, capsys):
    from transferkit.pipelines.settings import FitConfig

    out = tmp_path / "never"
    assert main(["fit", str(color_folder), "--out", str(out), "--epochs", "3", "--logger", "csv",
                "--print-config"]) == 0
    body = yaml.safe_load(capsys.readouterr().out)
    assert body["transferkit"] == 1 and body["fit"]["epochs"] == 3 and body["fit"]["logger"] == "csv"
    assert FitConfig.build(body["fit"]).out == str(out)
    assert not out.exists()
    assert main(["fit", str(color_folder), "--epochs", "0", "--print-config"]) == 2  # checked like a fit
