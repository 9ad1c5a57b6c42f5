"""`fit --calibrate temperature`, `evaluate --calibrate --select` and `predict` working together."""
from __future__ import annotations

import json

import numpy as np
import pytest
import timm
import torch

import transferkit
from transferkit.cli.main import main
from transferkit.pipelines.rundir import CHECKPOINT_META


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    from conftest import make_color_folder

    root = tmp_path_factory.mktemp("calibration")
    # hard on purpose (noisy colours, few images), so that the probabilities are not all 0 or 1
    data = make_color_folder(root / "data", per_class=16, size=32, seed=3)
    out = root / "run"
    assert main(["fit", str(data), "--backbone", "test_resnet", "--no-pretrained", "--image-size", "32",
                 "--workers", "0", "--epochs", "3", "--patience", "0", "--finetune", "full",
                 "--calibrate", "temperature", "--out", str(out)]) == 0
    return data, out


def test_fit_stores_the_temperature_and_reports_nll_and_ece_before_and_after(run):
    _, out = run
    report = json.loads((out / "report.json").read_text())
    c = report["calibration"]
    t = torch.load(out / "checkpoints" / "best.ckpt", weights_only=True)[CHECKPOINT_META]["temperature"]
    assert c["method"] == "temperature" and c["temperature"] == pytest.approx(t) and t > 0
    assert c["after"]["nll"] <= c["before"]["nll"] + 1e-9  # fitted on this split: never worse there
    assert c["images"] == report["metrics"]["count"]


def test_evaluate_and_the_python_api_apply_the_stored_temperature(run):
    _, out = run
    report = json.loads((out / "report.json").read_text())
    assert main(["evaluate", str(out)]) == 0
    (plain,) = json.loads((out / "evaluation.json").read_text())["results"]
    assert plain["nll"] == pytest.approx(report["calibration"]["after"]["nll"], abs=1e-4)
    assert plain["accuracy"] == pytest.approx(report["accuracy"])  # a temperature never moves the argmax
    ckpt = torch.load(out / "checkpoints" / "best.ckpt", weights_only=True)
    raw = timm.create_model("test_resnet", num_classes=3)
    raw.load_state_dict({k[len("model."):]: v for k, v in ckpt["state_dict"].items()})
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        expected = raw.eval()(x) / ckpt[CHECKPOINT_META]["temperature"]
        assert torch.allclose(transferkit.Run(out).model(x), expected, atol=1e-5)
        assert torch.allclose(transferkit.load(out / "checkpoints" / "best.ckpt").model(x), expected, atol=1e-5)


def test_evaluate_select_becomes_predict_s_default(run, tmp_path):
    data, out = run
    assert main(["evaluate", str(out), "--calibrate", "--select", "--tta", "plain,hflip"]) == 0
    body = json.loads((out / "evaluation.json").read_text())
    selected = json.loads((out / "selected.json").read_text())
    best = min(body["results"], key=lambda r: (r["nll"], -r["accuracy"]))
    assert (selected["tta"], selected["ensemble"]) == (best["tta"], "none")
    images = [str(p) for p in sorted((data / "red").glob("*.png"))[:3]]
    chosen = transferkit.Run(out).predict(images)
    explicit = transferkit.Run(out).predict(images, tta=selected["tta"], ensemble="none")
    assert np.allclose([r["probabilities"] for r in chosen], [r["probabilities"] for r in explicit])
    assert main(["evaluate", str(out), "--select", "--split", "test"]) == 2
