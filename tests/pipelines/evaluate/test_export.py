"""`transferkit export`: ONNX and TorchScript graphs (views and merge baked in) that give the run's
probabilities, a timm folder timm loads itself, and `predict` from an ONNX folder."""
from __future__ import annotations

import csv
import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

import transferkit
from transferkit.cli.main import main
from transferkit.errors import ConfigError, RunDirError
from transferkit.pipelines.evaluate.export import META, ExportedModel, export_run
from transferkit.pipelines.evaluate.predictor import Predictor
from transferkit.pipelines.rundir import RunDir

FAST = dict(image_size=40, workers=0, batch_size=16, patience=0, backbone="test_resnet")


@pytest.fixture(scope="module")
def run(tmp_path_factory, weights):
    from conftest import make_color_folder

    root = tmp_path_factory.mktemp("export")
    data = make_color_folder(root / "data", per_class=12)
    r = transferkit.fit(data, out=root / "run", weights=str(weights), finetune="partial", epochs=2, ema=True,
                        calibrate="temperature", **FAST)
    return r, data


def _batch(data, n: int, transform) -> torch.Tensor:
    files = sorted(data.rglob("*.png"))[:n]
    return torch.stack([transform(Image.open(f).convert("RGB")) for f in files])


@pytest.mark.parametrize("fmt", ["onnx", "torchscript"])
@pytest.mark.parametrize("tta, checkpoint", [("plain", "best"), ("ten-crop", "ema"), ("hflip+multiscale:0.9,1.1", "last")])
def test_a_graph_gives_the_runs_probabilities_for_batches_of_1_and_7(run, tmp_path, fmt, tta, checkpoint):
    r, data = run
    out = export_run(r.path, fmt, checkpoint=checkpoint, tta=tta, out=tmp_path / fmt)
    meta = json.loads((out / META).read_text())
    assert meta["classes"] == r.classes and meta["tta"] == tta and meta["format"] == fmt
    exported = ExportedModel(out)
    ensemble = "ema" if checkpoint == "ema" else "none"
    reference = Predictor.for_run(RunDir(r.path), tta, ensemble, checkpoint="best" if ensemble == "ema" else checkpoint,
                                  accelerator="cpu")
    for n in (1, 7):
        x = _batch(data, n, exported.transform)
        (want,) = reference.merged(x)
        (got,) = exported.merged(x)
        assert got.shape == (n, 3)
        np.testing.assert_allclose(got.numpy(), want.numpy(), atol=1e-4)


def test_onnxruntime_alone_runs_the_onnx_file(run, tmp_path):
    import onnxruntime as ort

    r, data = run
    out = export_run(r.path, "onnx", out=tmp_path / "onnx")
    meta = json.loads((out / META).read_text())
    session = ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
    x = _batch(data, 7, ExportedModel(out).transform)
    assert list(x.shape[1:]) == meta["input"]["shape"][1:]
    (probs,) = session.run(None, {"images": x.numpy()})
    np.testing.assert_allclose(probs.sum(1), 1.0, atol=1e-5)
    rows = r.predict(sorted(data.rglob("*.png"))[:7])
    np.testing.assert_allclose(probs, np.array([row["probabilities"] for row in rows]), atol=1e-4)


def test_a_timm_folder_loads_in_timm_with_identical_outputs(run, tmp_path):
    import timm

    r, _ = run
    out = export_run(r.path, "timm", out=tmp_path / "timm")
    config = json.loads((out / "config.json").read_text())
    assert config["label_names"] == r.classes and config["num_classes"] == 3
    assert (out / "model.safetensors").is_file()
    model = timm.create_model(f"local-dir:{out}", pretrained=True).eval()
    x = torch.randn(5, 3, 40, 40)
    with torch.no_grad():
        np.testing.assert_allclose(model(x).numpy(), r.model(x).numpy(), atol=1e-6)
    assert list(model.pretrained_cfg["mean"]) == list(r.report["data_config"]["mean"])


def test_predict_from_the_onnx_folder_writes_the_runs_csv(run, tmp_path):
    r, data = run
    export = tmp_path / "deploy"
    assert main(["export", str(r.path), "--format", "onnx", "--out", str(export)]) == 0
    (data / "broken.png").write_bytes(b"not a png")
    try:
        assert main(["predict", str(r.path), str(data), "--top-k", "2", "--out", str(tmp_path / "run.csv")]) == 0
        assert main(["predict", str(export), str(data), "--top-k", "2", "--out", str(tmp_path / "onnx.csv")]) == 0
    finally:
        (data / "broken.png").unlink()
    rows = [list(csv.DictReader((tmp_path / f"{name}.csv").open())) for name in ("run", "onnx")]
    assert len(rows[0]) == len(rows[1]) == 37
    for a, b in zip(*rows):
        assert (a["path"], a["label"], a["label_2"], a["error"]) == (b["path"], b["label"], b["label_2"], b["error"])
        if not a["error"]:
            assert abs(float(a["probability"]) - float(b["probability"])) < 1e-4
    assert any(row["error"] for row in rows[1])  # the broken file has its row


def test_predicting_from_an_export_stays_light(run, tmp_path):
    r, data = run
    out = export_run(r.path, "onnx", out=tmp_path / "light")
    code = (f"import sys\nfrom transferkit.cli.main import main\n"  # `transferkit predict EXPORT DATA`, as typed
            f"assert main(['predict', {str(out)!r}, {str(data)!r}, '--out', {str(tmp_path / 'p.csv')!r}]) == 0\n"
            "heavy = [m for m in ('pytorch_lightning', 'lightning', 'sklearn', 'matplotlib', 'nlpaug') if m in sys.modules]\n"
            "print('HEAVY', heavy)\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "HEAVY []" in done.stdout
    assert len((tmp_path / "p.csv").read_text().splitlines()) == 37


def test_export_refuses_what_it_cannot_do(run, tmp_path):
    r, _ = run
    with pytest.raises(ConfigError, match="--tta is baked into onnx and torchscript graphs"):
        export_run(r.path, "timm", tta="hflip", out=tmp_path / "t")
    with pytest.raises(ConfigError, match="holds several specs"):
        export_run(r.path, "onnx", tta="plain,hflip", out=tmp_path / "t")
    with pytest.raises(ConfigError, match="--format 'keras'"):
        export_run(r.path, "keras")
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    with pytest.raises(RunDirError, match="holds files that are not an export"):
        export_run(r.path, "onnx", out=foreign)
    assert (foreign / "notes.txt").read_text() == "keep me"
    out = export_run(r.path, "torchscript", out=tmp_path / "ts")
    with pytest.raises(ConfigError, match="is an export: its weights, views and merge are in the graph; drop --tta"):
        from transferkit.pipelines.evaluate.prediction import predict_paths

        predict_paths(out, [str(tmp_path)], tmp_path / "x.csv", tta="hflip")
    timm_out = export_run(r.path, "timm", out=tmp_path / "tf")
    with pytest.raises(ConfigError, match="is a timm export"):
        ExportedModel(timm_out)


def test_the_cli_prints_one_line_for_a_missing_checkpoint(run, tmp_path, capsys):
    r, _ = run
    assert main(["export", str(r.path), "--checkpoint", "swa", "--out", str(tmp_path / "s")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "has no SWA weights" in err[0]
