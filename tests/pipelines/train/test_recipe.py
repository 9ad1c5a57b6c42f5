"""The default path of fit: --finetune auto from pretrained weights, through advisor, cache and report."""
from __future__ import annotations

import csv
import json

import pytest
import timm
import torch
import yaml

import transferkit.pipelines.train.recipe as recipe
from transferkit.cli.main import main

FAST = ["--backbone", "test_resnet", "--image-size", "32", "--workers", "0", "--batch-size", "16",
        "--epochs", "12", "--patience", "0"]


def test_auto_measures_decides_caches_and_reports(color_folder, weights, tmp_path, monkeypatch, capsys):
    first_views = []
    real = recipe.extract

    def record(*args, **kwargs):
        first_views.append(kwargs.get("first_view"))
        return real(*args, **kwargs)

    monkeypatch.setattr(recipe, "extract", record)
    out = tmp_path / "run"
    assert main(["fit", str(color_folder), "--weights", str(weights), "--out", str(out), *FAST]) == 0
    captured = capsys.readouterr()
    err = captured.err
    report = json.loads((out / "report.json").read_text())
    ft = report["finetune"]
    # 16 per class: small -> freeze, on cached features
    assert ft["advice"]["strategy"] == ft["strategy"] == "freeze"
    assert ft["reason"] == "; ".join(ft["advice"]["reasons"]) and ft["lr"] == ft["advice"]["lr"] == 1e-2
    assert ft["trainable_groups"] == ["head"] and ft["trainable_parameters"] < ft["total_parameters"]
    assert "advice: freeze" in err and "cached frozen features of 48 train images" in err
    # the advisor's pass is the cache's clean view: train extracted once more only for val
    assert first_views[0] is not None and first_views[0].shape[0] == 48 and first_views[1] is None
    saved = yaml.safe_load((out / "config.yaml").read_text())["resolved"]["finetune"]
    assert saved["strategy"] == "freeze" and saved["advice"] == ft["advice"]
    assert report["accuracy"] >= 0.9
    # where the time went, in report.json and in the one line printed at the end
    t = report["timings"]
    phases = ("setup", "scan", "advisor", "features", "training", "validation", "final_evaluation", "report")
    assert all(t[k] >= 0 for k in phases) and t["scan"] > 0 and t["advisor"] > 0 and t["features"] > 0
    assert sum(t[k] for k in phases) <= t["total"] + 0.5 and t["train_images_per_second"] > 0
    assert f"time {t['total']:.1f} s: setup" in captured.out and "training" in captured.out
    # a frozen backbone reads features, not images: --decode-cache auto leaves decoding alone
    assert report["decode_cache"] == {"asked": "off", "short_side": None, "kept": None}
    assert report["data_config"]["decode_short_side"] is None


def test_a_partial_fine_tune_decodes_once_and_evaluate_sees_the_same_pixels(color_folder, weights, tmp_path, capsys):
    out = tmp_path / "run"
    args = ["--backbone", "test_resnet", "--image-size", "32", "--workers", "2", "--batch-size", "16",
            "--epochs", "3", "--patience", "0", "--finetune", "partial"]
    assert main(["fit", str(color_folder), "--weights", str(weights), "--out", str(out), *args]) == 0
    printed = capsys.readouterr().out
    report = json.loads((out / "report.json").read_text())
    # 40 px pictures kept at a shorter side of 37 (1.15 x 32), in memory, every train and val image
    assert report["decode_cache"] == {"asked": "auto", "short_side": 37, "kept": "memory", "train_pictures": 48,
                                      "train_megabytes": 0.2, "val_pictures": 12, "val_megabytes": 0.0}
    assert f"time {report['timings']['total']:.1f} s: setup" in printed
    ckpt = torch.load(out / "checkpoints" / "best.ckpt", weights_only=False)
    assert ckpt["transferkit"]["data_config"]["decode_short_side"] == 37
    assert main(["evaluate", str(out), "--split", "val"]) == 0
    evaluation = json.loads((out / "evaluation.json").read_text())
    plain = next(r for r in evaluation["results"] if r["tta"] == "plain" and r["ensemble"] == "none")
    assert plain["accuracy"] == report["accuracy"] and plain["nll"] == pytest.approx(report["metrics"]["nll"], abs=1e-5)
    # predict, from the run and from a torchscript export, decodes the same way: the same probabilities
    val = {r["path"]: float(r["probability"]) for r in csv.DictReader((out / "predictions-val.csv").open())}
    assert main(["export", str(out), "--format", "torchscript", "--out", str(tmp_path / "ts")]) == 0
    assert json.loads((tmp_path / "ts" / "transferkit-export.json").read_text())["preprocess"]["decode_short_side"] == 37
    for source in (out, tmp_path / "ts"):
        assert main(["predict", str(source), *val, "--out", str(tmp_path / "p.csv")]) == 0
        got = {r["path"]: float(r["probability"]) for r in csv.DictReader((tmp_path / "p.csv").open())}
        assert got == pytest.approx(val, abs=2e-6)


def test_a_plan_saved_for_other_groups_is_refused_by_name():
    from transferkit.backbones.groups import layer_groups
    from transferkit.backbones.strategies import Plan, make_plan
    from transferkit.errors import ConfigError

    groups = layer_groups(timm.create_model("test_resnet", num_classes=3))
    plan = make_plan("partial", groups, 2, lr=3e-3)
    assert Plan.from_dict(plan.to_dict(), groups) == plan
    other = layer_groups(timm.create_model("test_efficientnet", num_classes=3))
    with pytest.raises(ConfigError, match="that this backbone does not have"):
        Plan.from_dict(plan.to_dict(), other)


def test_a_head_is_solved_only_when_it_is_a_linear_layer():
    import torch

    from transferkit.errors import ConfigError
    from transferkit.pipelines.settings import FitConfig
    from transferkit.pipelines.train.recipe import solvable

    linear = timm.create_model("test_resnet", num_classes=3)
    assert solvable(FitConfig.build({"data": "d"}), linear)
    linear.reset_classifier(0)
    linear.fc = torch.nn.Sequential(torch.nn.Linear(8, 3))
    linear.get_classifier = lambda: linear.fc
    assert not solvable(FitConfig.build({"data": "d"}), linear)  # default: train it instead
    with pytest.raises(ConfigError, match="solves a linear head; test_resnet's classifier is a Sequential"):
        solvable(FitConfig.build({"data": "d", "backbone": "test_resnet", "head_solver": "lbfgs",
                                  "finetune": "freeze"}), linear)


@pytest.mark.parametrize("optimizer, schedule", [("sgd", "cosine"), ("momentum", "step"), ("nesterov", "linear"),
                                                 ("adagrad", "inverse-sqrt"), ("rmsprop", "constant"),
                                                 ("adam", "cosine"), ("adamw", "linear")])
def test_every_optimizer_and_schedule_trains_test_resnet(optimizer, schedule, weights, tmp_path):
    import csv

    import transferkit
    from conftest import make_color_folder
    from safetensors.torch import load_file

    data = make_color_folder(tmp_path / "data", per_class=12, size=32)
    run = transferkit.fit(data, out=tmp_path / "run", backbone="test_resnet", weights=str(weights), finetune="full",
                          optimizer=optimizer, schedule=schedule, epochs=3, image_size=32, workers=0, patience=0,
                          batch_size=8)
    rows = list(csv.DictReader((run.path / "metrics.csv").open()))
    assert len(rows) == 3 and all(float(r["train_loss"]) == float(r["train_loss"]) for r in rows)
    before = load_file(str(weights))["conv1.0.weight"]
    assert not torch.equal(run.model.conv1[0].weight, before)  # the stem moved: the optimizer stepped
    assert float(rows[-1]["train_loss"]) < float(rows[0]["train_loss"])  # it learns
    lrs = [float(r["lr"]) for r in rows]
    if schedule == "constant":
        assert lrs[1] == lrs[2]
    else:
        assert lrs[2] < lrs[1]


def test_balanced_class_weights_raise_the_minority_recall_at_20_to_1(weights, tmp_path):
    import numpy as np

    import transferkit
    from conftest import color_image

    rng = np.random.default_rng(0)
    colours = {"major": (190, 60, 50), "minor": (170, 80, 70)}  # close: the head must weigh its evidence
    for split, counts in (("train", {"major": 60, "minor": 3}), ("val", {"major": 20, "minor": 20})):
        for c, n in counts.items():
            (tmp_path / "data" / split / c).mkdir(parents=True)
            for i in range(n):
                color_image(colours[c], 32, rng).save(tmp_path / "data" / split / c / f"{i}.png")
    recall = {}
    for cw in ("none", "balanced"):
        run = transferkit.fit(tmp_path / "data", out=tmp_path / cw, backbone="test_resnet", weights=str(weights),
                              finetune="freeze", image_size=32, workers=0, class_weights=cw)
        recall[cw] = run.report["metrics"]["per_class"]["minor"]["recall"]
        assert run.report["classes_balance"]["train_counts"] == {"major": 60, "minor": 3}
    assert run.report["classes_balance"]["class_weights"] == pytest.approx([63 / 120, 63 / 6])
    assert recall["balanced"] > recall["none"] + 0.2
