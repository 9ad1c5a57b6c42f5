"""The Python API as the README shows it: fit returns a Run; load needs the checkpoint file alone."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from PIL import Image

import transferkit
from transferkit.errors import ConfigError, RunDirError

FAST = dict(image_size=40, workers=0, batch_size=16, epochs=12, patience=0)


@pytest.fixture(scope="module")
def run(tmp_path_factory, weights):
    from conftest import make_color_folder

    root = tmp_path_factory.mktemp("api")
    data = make_color_folder(root / "data", per_class=20)
    return transferkit.fit(data, backbone="test_resnet", finetune="freeze", out=root / "run", weights=str(weights),
                           **FAST), data


def test_fit_returns_a_run_with_its_report_config_classes_and_model(run):
    r, _ = run
    assert isinstance(r, transferkit.Run)
    assert r.classes == ["blue", "green", "red"]
    assert r.config.backbone == "test_resnet" and r.config.epochs == 12
    assert r.report["finetune"]["strategy"] == "freeze" and r.report["accuracy"] >= 0.8
    assert r.advice is None  # freeze was asked for: nothing measured
    assert not r.model.training and next(r.model.parameters()).device.type == "cpu"
    assert transferkit.Run.load(r.path).report == r.report


def test_evaluate_and_predict_on_paths_pil_images_and_arrays(run):
    r, data = run
    rows = r.evaluate(tta="plain,hflip")
    assert [(x["tta"], x["ensemble"]) for x in rows] == [("plain", "none"), ("hflip", "none")]
    assert rows[0]["accuracy"] == pytest.approx(r.report["accuracy"])
    assert json.loads((r.path / "evaluation.json").read_text())["results"] == rows
    files = sorted((data / "red").glob("*.png"))[:3]
    by_path = r.predict(files, top_k=2)
    images = [Image.open(f).convert("RGB") for f in files]
    by_image = r.predict(images, top_k=2)
    by_array = r.predict([np.asarray(i) for i in images])
    for a, b, c in zip(by_path, by_image, by_array):
        assert a["path"].endswith(".png") and b["path"].startswith("<image")
        np.testing.assert_allclose(a["probabilities"], b["probabilities"], atol=1e-6)
        np.testing.assert_allclose(a["probabilities"], c["probabilities"], atol=1e-6)
        assert a["label"] == b["label"] and "label_2" in a and a["error"] == ""
    assert sum(row["label"] == "red" for row in by_path) >= 2
    assert len(r.predict(data / "green")) == 20  # a folder


def test_a_checkpoint_alone_predicts_what_its_run_predicts(run, tmp_path):
    r, data = run
    alone = tmp_path / "elsewhere" / "model.ckpt"
    alone.parent.mkdir()
    shutil.copy(r.path / "checkpoints" / "best.ckpt", alone)
    loaded = transferkit.load(alone)
    assert loaded.classes == r.classes
    assert tuple(loaded.data_config.input_size) == (3, 40, 40)
    files = sorted((data / "blue").glob("*.png"))[:4]
    for a, b in zip(loaded.predict(files), r.predict(files)):
        np.testing.assert_allclose(a["probabilities"], b["probabilities"], atol=1e-6)


def test_bad_settings_are_the_cli_s_one_line_errors(tmp_path, color_folder):
    with pytest.raises(ConfigError, match=r"^epochs=: \"ten\" is a string; expected an integer >= 1$"):
        transferkit.fit(color_folder, backbone="test_resnet", epochs="ten", out=tmp_path / "x")
    with pytest.raises(ConfigError, match="unknown setting"):
        transferkit.fit(color_folder, backbone="test_resnet", bach_size=4, out=tmp_path / "x")
    assert not (tmp_path / "x").exists()  # nothing written
    with pytest.raises(RunDirError, match="is not a transferkit run"):
        transferkit.Run.load(tmp_path)


def test_advise_and_resume_are_exported(run, weights):
    r, data = run
    advice = transferkit.advise(data, backbone="test_resnet", weights=str(weights), image_size=40, workers=0)
    assert advice.strategy in ("freeze", "partial", "full") and advice.reasons
    assert advice.measurements.num_images == len(r.report["classes"]) * 16  # the same 80% train split


def test_the_readme_python_example_runs_as_a_script(tmp_path, weights):
    """Only the calls the README shows, in a fresh interpreter."""
    from conftest import make_color_folder

    data = make_color_folder(tmp_path / "data", per_class=12)
    script = tmp_path / "example.py"
    script.write_text(textwrap.dedent(f"""
        import shutil, numpy as np
        from PIL import Image
        import transferkit

        run = transferkit.fit({str(data)!r}, backbone="test_resnet", finetune="auto", epochs=3,
                              out={str(tmp_path / 'run')!r}, weights={str(weights)!r}, image_size=40, workers=0)
        print(run.report["accuracy"], run.advice["strategy"] if run.advice else None)
        rows = run.evaluate(tta="plain,hflip")
        files = sorted(__import__("pathlib").Path({str(data)!r}).glob("red/*.png"))[:2]
        preds = run.predict([Image.open(f) for f in files] + files, top_k=2)
        shutil.copy(run.path / "checkpoints" / "best.ckpt", {str(tmp_path / 'alone.ckpt')!r})
        model = transferkit.load({str(tmp_path / 'alone.ckpt')!r})
        again = model.predict(files)
        assert np.allclose([p["probabilities"] for p in preds[2:]], [p["probabilities"] for p in again], atol=1e-6)
        print("ok", len(rows), len(preds))
    """))
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().endswith("ok 2 4")
