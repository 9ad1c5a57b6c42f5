"""`fit --finetune freeze` solves its head: one epoch, the same bits twice, a plain timm model after."""
from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import timm
import torch

import transferkit
from transferkit.augment.image import eval_transform
from transferkit.cli.main import main
from transferkit.pipelines.data.images import load_rgb


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    from conftest import make_color_folder

    return make_color_folder(tmp_path_factory.mktemp("solved") / "data", per_class=12, size=32)


def _fit(data, out, weights, *extra):
    args = ["fit", str(data), "--backbone", "test_resnet", "--weights", str(weights), "--image-size", "32",
            "--workers", "0", "--finetune", "freeze", "--out", str(out), *extra]
    assert main(args) == 0
    return json.loads((out / "report.json").read_text())


def test_the_solved_head_is_the_same_twice_and_reported(data, tmp_path, weights):
    a = _fit(data, tmp_path / "a", weights, "--cache-views", "3")
    _fit(data, tmp_path / "b", weights, "--cache-views", "3")
    sa, sb = (torch.load(tmp_path / r / "checkpoints" / "best.ckpt", weights_only=True)["state_dict"]
              for r in ("a", "b"))
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    solved = a["head_solver"]
    assert solved["solver"] == "lbfgs" and solved["l2"] > 0 and solved["folds"] == 5
    assert len(solved["fold_accuracy"]) == 5 and solved["iterations"] > 0
    assert a["epochs_trained"] == 1 and a["accuracy"] >= 0.9
    with (tmp_path / "a" / "metrics.csv").open() as f:
        [row] = list(csv.DictReader(f))
    assert float(row["train_acc"]) >= 0.9  # the solved head's own training accuracy is recorded


def test_the_backbone_is_untouched_and_plain_timm_gives_the_same_predictions(data, tmp_path, weights):
    from safetensors.torch import load_file

    _fit(data, tmp_path / "run", weights)
    state = torch.load(tmp_path / "run" / "checkpoints" / "best.ckpt", weights_only=True)["state_dict"]
    state = {k[len("model."):]: v for k, v in state.items()}
    pretrained = load_file(weights)
    assert all(torch.equal(state[k], v) for k, v in pretrained.items() if not k.startswith("fc."))
    model = timm.create_model("test_resnet", num_classes=3)
    model.load_state_dict(state)
    run = transferkit.Run(tmp_path / "run")
    images = sorted((data / "red").glob("*.png"))[:4]
    ours = np.array([r["probabilities"] for r in run.predict([str(p) for p in images])], dtype=np.float32)
    dc = run.report["data_config"]
    tf = eval_transform(tuple(dc["input_size"][1:]), dc["mean"], dc["std"], dc["crop_pct"], dc["interpolation"])
    x = torch.stack([tf(load_rgb(p)) for p in images])
    with torch.no_grad():
        theirs = torch.softmax(model.eval()(x), 1).numpy()
    assert np.abs(ours - theirs).max() < 1e-5


def test_sgd_still_trains_the_head_for_its_epochs(data, tmp_path, weights):
    report = _fit(data, tmp_path / "run", weights, "--head-solver", "sgd", "--epochs", "3", "--patience", "0")
    assert report["head_solver"] is None and report["epochs_trained"] == 3
