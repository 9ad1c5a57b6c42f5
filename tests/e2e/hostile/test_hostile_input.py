"""Every user mistake ends in one line that names the thing and the fix, exit code 2, no traceback.

Most cases call `main([...])` in this process (a subprocess costs seconds of imports each); a
few representative ones run the real command in a subprocess, where only the process can show
that no traceback or stray output escapes.
"""
from __future__ import annotations

from pathlib import Path

import pytest
import timm
import torch

from _cli import FAST, resnet_plugin
from _cli import cli as _cli
from _cli import error_line as _one_error_line
from transferkit.cli.main import main



def _snapshot(folder: Path) -> dict[str, tuple[int, bytes]]:
    return {str(p.relative_to(folder)): (p.stat().st_mtime_ns, p.read_bytes())
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict[str, Path]:
    from conftest import make_color_folder

    root = tmp_path_factory.mktemp("input")
    good = make_color_folder(root / "good", per_class=8, size=32)
    (root / "empty").mkdir()
    one = make_color_folder(root / "one", classes=("red",), per_class=4)
    no_images = make_color_folder(root / "no_images", classes=("red", "blue"), per_class=4)
    (no_images / "green").mkdir()
    (no_images / "green" / "labels.txt").write_text("green things")
    (no_images / "green" / "broken.jpg").write_bytes(b"\xff\xd8\xff")
    differ = root / "differ"
    make_color_folder(differ / "train", classes=("red", "blue"), per_class=4)
    make_color_folder(differ / "val", classes=("red", "green"), per_class=2)
    torch.save(timm.create_model("test_efficientnet").state_dict(), root / "efficientnet.pth")
    (root / "typo.yaml").write_text(f"fit:\n  data: {good}\n  epochz: 3\n")
    (root / "broken.yaml").write_text("fit: {data: x, epochs: [1\n")
    return {"root": root, "good": good, "empty": root / "empty", "one": one, "no_images": no_images,
            "differ": differ}


@pytest.fixture(scope="module")
def finished_run(folders) -> Path:
    out = folders["root"] / "finished"
    assert main(["fit", str(folders["good"]), "--out", str(out), *FAST]) == 0
    return out


CASES = {
    "missing folder": (lambda f: ["fit", str(f["root"] / "nope"), *FAST],
                       ["nope does not exist", "pass a folder with one sub-folder per class"]),
    "empty folder": (lambda f: ["fit", str(f["empty"]), *FAST],
                     ["has no class sub-folders", "DATA/<class>/*.jpg"]),
    "one class": (lambda f: ["fit", str(f["one"]), *FAST],
                  ["has only one class (red)", "at least two class sub-folders"]),
    "a class without usable images": (lambda f: ["fit", str(f["no_images"]), *FAST],
                                      ["class 'green' has no usable images", "2 file(s) left out",
                                       "add images or remove the folder"]),
    "train and val classes differ": (lambda f: ["fit", str(f["differ"]), *FAST],
                                     ["different classes than the training folder",
                                      "missing: blue; extra: green", "same class sub-folders"]),
    "unknown backbone": (lambda f: ["fit", str(f["good"]), *FAST, "--backbone", "resnet5O"],
                         ["unknown backbone 'resnet5O'", "did you mean", "resnet50"]),
    "weights of another architecture": (
        lambda f: ["fit", str(f["good"]), "--backbone", "test_resnet", "--weights",
                   str(f["root"] / "efficientnet.pth"), "--workers", "0", "--epochs", "1"],
        ["efficientnet.pth does not fit backbone test_resnet", "shape mismatch: bn1.weight (24,) vs (32,)",
         "missing, e.g. conv1.0.weight", "pass weights saved from the same architecture"]),
    "image size far too small": (lambda f: ["fit", str(f["good"]), *FAST, "--image-size", "4"],
                                 ["--image-size: 4 is out of range", "expected an integer in [16, 2048]"]),
    "batch size zero": (lambda f: ["fit", str(f["good"]), *FAST, "--batch-size", "0"],
                        ["--batch-size: 0 is out of range", "expected an integer >= 1"]),
    "image size below the network's downsampling": (
        lambda f: ["fit", str(f["good"]), *FAST, "--backbone", "test_convnext", "--image-size", "16",
                   "--out", str(f["root"] / "convnext")],
        ["--image-size 16 does not work with backbone test_convnext", "pretrained size 160", "try 32"]),
    "patch size does not divide the image size": (
        lambda f: ["fit", str(f["good"]), *FAST, "--backbone", "test_vit", "--image-size", "24",
                   "--out", str(f["root"] / "vit")],
        ["--image-size 24 does not work with backbone test_vit", "divisible by patch size"]),
    "evaluate a folder that is not a run": (lambda f: ["evaluate", str(f["good"])],
                                            ["is not a transferkit run", "pass the --out folder"]),
    "predict with a folder that is not a run": (
        lambda f: ["predict", str(f["good"]), str(f["good"] / "red")],
        ["is not a transferkit run", "pass the --out folder"]),
    "resume a folder that is not a run": (lambda f: ["fit", "--resume", str(f["good"])],
                                          ["is not a transferkit run"]),
    "config with an unknown setting": (lambda f: ["fit", "--config", str(f["root"] / "typo.yaml")],
                                       ["unknown setting(s): config", "typo.yaml fit.epochz", "check their spelling"]),
    "config that is not YAML": (lambda f: ["fit", "--config", str(f["root"] / "broken.yaml")],
                                ["broken.yaml is not valid YAML"]),
}


@pytest.mark.parametrize("case", list(CASES))
def test_mistake_gives_one_line_and_exit_2(case, folders, capsys):
    argv, phrases = CASES[case]
    assert main(argv(folders)) == 2
    line = _one_error_line(capsys.readouterr().err)
    for phrase in phrases:
        assert phrase in line, (phrase, line)
    assert not (folders["root"] / "convnext").exists() and not (folders["root"] / "vit").exists()


def test_a_missing_folder_in_a_real_process(folders):
    proc = _cli("fit", str(folders["root"] / "nope"), *FAST)
    assert proc.returncode == 2
    line = _one_error_line(proc.stderr)
    assert "does not exist; pass a folder with one sub-folder per class" in line
    assert proc.stdout == ""


def test_a_run_directory_that_holds_a_run_is_left_untouched(finished_run, folders, capsys):
    before = _snapshot(finished_run)
    assert main(["fit", str(folders["good"]), "--out", str(finished_run), *FAST]) == 2
    line = _one_error_line(capsys.readouterr().err)
    assert "already holds a run" in line and "--overwrite" in line and "new --out" in line
    assert _snapshot(finished_run) == before
    # and a different setting that fails later (a bad backbone) changes nothing either
    assert main(["fit", str(folders["good"]), "--out", str(finished_run), *FAST, "--overwrite",
                 "--backbone", "resnet5O"]) == 2
    assert _snapshot(finished_run) == before


def test_a_run_directory_in_a_real_process(finished_run, folders):
    before = _snapshot(finished_run)
    proc = _cli("fit", str(folders["good"]), "--out", str(finished_run), *FAST)
    assert proc.returncode == 2
    assert "already holds a run; pass --overwrite" in _one_error_line(proc.stderr)
    assert _snapshot(finished_run) == before


# test_resnet whose training forward returns NaN from its 5th call on (epoch 2, step 2).
NAN_FORWARD = """
    out = plain(x)
    if model.training:
        calls[0] += 1
        if calls[0] > 4:
            out = out * float("nan")
    return out
"""


def test_a_loss_that_becomes_nan_stops_with_epoch_step_and_hint(folders, tmp_path, capsys):
    plugin = resnet_plugin(tmp_path / "nan_models.py", "nan_after_resnet", NAN_FORWARD)
    out = tmp_path / "run"
    # 24 images: 19 train in 3 steps of 8, so the 5th training step is epoch 2, step 2
    proc = _cli("fit", str(folders["good"]), "--out", str(out), *FAST, "--epochs", "3",
                "--backbone", "nan_after_resnet", "--backbone-plugin", str(plugin))
    assert proc.returncode == 2, proc.stderr
    line = _one_error_line(proc.stderr)
    assert "the training loss became nan at epoch 2, step 2" in line
    assert "lower --lr" in line
    assert f"{out / 'checkpoints' / 'last.ckpt'} keeps the weights after epoch 1" in line
    assert "not finite" not in line
    last = torch.load(out / "checkpoints" / "last.ckpt", weights_only=True)
    assert last["epoch"] == 0
    assert all(torch.isfinite(v).all() for v in last["state_dict"].values() if v.is_floating_point())
    assert not (out / "report.json").exists()
    # the kept checkpoint is usable as it is
    assert main(["evaluate", str(out), "--checkpoint", "last"]) == 0


def test_a_learning_rate_that_explodes_at_once_says_no_checkpoint_was_written(folders, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["fit", str(folders["good"]), "--out", str(out), *FAST, "--lr", "1e30"]) == 2
    line = _one_error_line(capsys.readouterr().err)
    assert "the training loss became" in line and "at epoch 1, step 2" in line
    assert "lower --lr (now 1e+30)" in line
    assert "no epoch had finished, so no checkpoint was written" in line
    assert not list((out / "checkpoints").glob("*.ckpt"))


@pytest.mark.parametrize("name", ["test_maxvit", "test_vit_relpos"])
def test_a_fixed_size_backbone_is_built_for_the_size_asked(name):
    """Attention windows and position tables are built for --image-size, not refused or crashed on."""
    from transferkit.backbones import factory

    model, dc = factory.create(name, 3, pretrained=False, image_size=64)
    assert dc.input_size == (3, 64, 64)
    with torch.no_grad():
        assert model.eval()(torch.zeros(2, 3, 64, 64)).shape == (2, 3)


def test_files_of_the_user_s_are_never_written_into(folders, tmp_path, capsys):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "metrics.csv").write_text("my,own\n1,2\n")
    (mine / "report.json").write_text("{}")
    for extra in ([], ["--overwrite"]):
        assert main(["fit", str(folders["good"]), "--out", str(mine), *FAST, *extra]) == 2
        line = capsys.readouterr().err.strip()
        assert line == f"transferkit: error: --out {mine} holds files but no transferkit run; pass an empty or new" \
                       " folder for the run"
    assert (mine / "metrics.csv").read_text() == "my,own\n1,2\n" and sorted(p.name for p in mine.iterdir()) == [
        "metrics.csv", "report.json"]


def test_weights_that_are_a_folder_or_not_weights_say_what_they_are(folders, tmp_path, capsys):
    fast = [a for a in FAST if a != "--no-pretrained"]
    folder = tmp_path / "wdir"
    folder.mkdir()
    (folder / "model.safetensors").write_bytes(b"")
    assert main(["fit", str(folders["good"]), "--weights", str(folder), *fast, "--out", str(tmp_path / "a")]) == 2
    line = capsys.readouterr().err.strip()
    assert f"--weights {folder} is a folder; pass the file inside it, e.g. --weights {folder / 'model.safetensors'}" \
        in line and f"local-dir:{folder}" in line
    text = tmp_path / "notes.pth"
    text.write_text("these are my notes, not weights\n")
    assert main(["fit", str(folders["good"]), "--weights", str(text), *fast, "--out", str(tmp_path / "b")]) == 2
    line = capsys.readouterr().err.strip()
    assert f"weights file {text} is not a weights file" in line and "unsafe" not in line and "\n" not in line
