"""Checkpoints, weights files and configs from elsewhere are read as data, never run as code.

Each test plants a pickle that would create a marker file when unpickled (the way a hostile
checkpoint runs a command), checks that an unsafe load really would run it, and then that
transferkit refuses the file with one line and exit code 2 and the marker never appears.
"""
from __future__ import annotations

import os
import pathlib
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from _cli import FAST
from _cli import error_line as _one_error_line
from transferkit.cli.main import main



class _RunsCommand:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


class _TouchesFile:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return pathlib.Path.touch, (pathlib.Path(self.marker),)


PAYLOADS = {"os.system": _RunsCommand, "Path.touch": _TouchesFile}


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    from conftest import make_color_folder

    root = tmp_path_factory.mktemp("untrusted")
    data = make_color_folder(root / "data", per_class=8, size=32)
    out = root / "run"
    assert main(["fit", str(data), "--out", str(out), *FAST]) == 0
    return data, out


def _poison(path: Path, payload, marker: Path) -> None:
    """Rewrite a checkpoint (or weights file) with a hostile object inside, its tensors intact."""
    body = torch.load(path, weights_only=True)
    body["hyper_parameters"] = {"note": payload(marker)}
    torch.save(body, path)


def _assert_really_hostile(path: Path, marker: Path, tmp_path: Path) -> None:
    """An unsafe load of the same bytes does create the marker: the test would catch a regression."""
    probe = tmp_path / "probe.pt"
    probe.write_bytes(path.read_bytes())
    torch.load(probe, weights_only=False)
    assert marker.exists()
    marker.unlink()


def _copy_run(out: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "run"
    shutil.copytree(out, copy)
    return copy


@pytest.mark.parametrize("payload", list(PAYLOADS))
def test_evaluate_refuses_a_hostile_best_checkpoint(trained, tmp_path, payload):
    _, out = trained
    run = _copy_run(out, tmp_path)
    marker = tmp_path / "pwned"
    _poison(run / "checkpoints" / "best.ckpt", PAYLOADS[payload], marker)
    _assert_really_hostile(run / "checkpoints" / "best.ckpt", marker, tmp_path)
    proc = subprocess.run([sys.executable, "-m", "transferkit.cli.main", "evaluate", str(run)],
                          capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 2
    line = _one_error_line(proc.stderr)
    assert f"refusing to load {run / 'checkpoints' / 'best.ckpt'}" in line
    assert "only use checkpoints written by transferkit from sources you trust" in line
    assert "weights_only` set to `False`" not in line  # never pass on torch's advice to load unsafely
    assert not marker.exists()
    assert not (run / "evaluation.json").exists()


def test_predict_refuses_a_hostile_checkpoint(trained, tmp_path, capsys):
    data, out = trained
    run = _copy_run(out, tmp_path)
    marker = tmp_path / "pwned"
    _poison(run / "checkpoints" / "best.ckpt", _RunsCommand, marker)
    assert main(["predict", str(run), str(data / "red"), "--out", str(tmp_path / "p.csv")]) == 2
    line = _one_error_line(capsys.readouterr().err)
    assert f"refusing to load {run / 'checkpoints' / 'best.ckpt'}: unpickling it would call posix.system" in line
    assert not marker.exists()
    assert not (tmp_path / "p.csv").exists()


def test_fit_refuses_a_hostile_weights_file(trained, tmp_path, capsys):
    data, out = trained
    marker = tmp_path / "pwned"
    weights = tmp_path / "evil.pth"
    state = torch.load(out / "checkpoints" / "best.ckpt", weights_only=True)["state_dict"]
    torch.save({"state_dict": {k[len("model."):]: v for k, v in state.items()}, "extra": _TouchesFile(marker)},
               weights)
    _assert_really_hostile(weights, marker, tmp_path)
    run = tmp_path / "run"
    assert main(["fit", str(data), "--out", str(run), "--backbone", "test_resnet", "--weights", str(weights),
                 "--image-size", "32", "--workers", "0", "--epochs", "1"]) == 2
    line = _one_error_line(capsys.readouterr().err)
    assert f"weights file {weights} cannot be read safely: unpickling it would call getattr" in line
    assert "pass a .safetensors file or a .pth holding only tensors" in line
    assert not marker.exists()
    assert not run.exists()


def test_resume_refuses_a_hostile_last_checkpoint(trained, tmp_path, capsys):
    _, out = trained
    run = _copy_run(out, tmp_path)
    marker = tmp_path / "pwned"
    _poison(run / "checkpoints" / "last.ckpt", _RunsCommand, marker)
    before = (run / "checkpoints" / "last.ckpt").read_bytes()
    assert main(["fit", "--resume", str(run)]) == 2
    line = _one_error_line(capsys.readouterr().err)
    assert f"refusing to load {run / 'checkpoints' / 'last.ckpt'}" in line
    assert not marker.exists()
    assert (run / "checkpoints" / "last.ckpt").read_bytes() == before


HOSTILE_YAML = "!!python/object/apply:os.system [\"touch {marker}\"]"


def test_a_config_that_would_build_python_objects_is_refused(trained, tmp_path, capsys):
    import yaml

    _, out = trained
    run = _copy_run(out, tmp_path)
    marker = tmp_path / "pwned"
    text = (run / "config.yaml").read_text()
    assert "\nfit:\n" in text
    hostile = text.replace("\nfit:\n", f"\nhook: {HOSTILE_YAML.format(marker=marker)}\nfit:\n", 1)
    (run / "config.yaml").write_text(hostile)
    yaml.unsafe_load(hostile)  # the unsafe loader would run it
    assert marker.exists()
    marker.unlink()

    assert main(["evaluate", str(run)]) == 2
    line = _one_error_line(capsys.readouterr().err)
    assert f"{run / 'config.yaml'} is not plain YAML settings" in line and "python/object" in line
    assert main(["fit", "--config", str(run / "config.yaml"), "--out", str(tmp_path / "new")]) == 2
    line = _one_error_line(capsys.readouterr().err)
    assert "python/object" in line
    assert not marker.exists()
    assert not (tmp_path / "new").exists()
