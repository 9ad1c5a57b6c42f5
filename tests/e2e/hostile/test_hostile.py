"""The hostile suite: what a careful but hostile user does to the CLI, and the exact outcome of each.

Every case ends in exit 0 with the right files, or exit 2 (130 for an interrupt) with one line
that names the problem, and never a traceback. Most cases call `main([...])` in this process; the
ones only a real process can show (two fits racing for one --out, an interrupt) run the command.
The other modules of this folder hold the older hostile cases: bad images, bad input, and
checkpoints that would run code.
"""
from __future__ import annotations

import errno
import io
import json
import os
import signal
import struct
import subprocess
import sys
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from _cli import FAST, cli, error_line, resnet_plugin, rows
from transferkit.cli.main import main
from transferkit.pipelines.data.datasets import ImageDataset
from transferkit.pipelines.rundir import RunDir
from transferkit.pipelines.train.module import ImageClassifier


@pytest.fixture(scope="module")
def good(tmp_path_factory) -> Path:
    from conftest import make_color_folder

    return make_color_folder(tmp_path_factory.mktemp("hostile") / "good", per_class=8, size=32)


def _presplit(root: Path) -> Path:
    from conftest import make_color_folder

    make_color_folder(root / "train", classes=("red", "blue"), per_class=8, size=32, seed=1)
    make_color_folder(root / "val", classes=("red", "blue"), per_class=4, size=32, seed=2)
    return root


def _fails(argv: list[str], capsys) -> str:
    assert main(argv) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    return error_line(captured.err)


# ----------------------------------------------------------------------------- flags

# argv after `transferkit`; {data} and {out} are filled in; the exact line printed.
FLAGS = {
    "no data": (["fit"], "fit needs DATA, the image folder (or --config FILE of a run, or --resume RUN_DIR)"),
    "epochs not a number": (["fit", "{data}", "--epochs", "ten"],
                            "argument --epochs: invalid int value: 'ten' (see `transferkit fit --help`)"),
    "negative learning rate": (["fit", "{data}", "--lr", "-1"],
                               "--lr: -1.0 is out of range; expected a number > 0 or find (or null for the default)"),
    "learning rate nan": (["fit", "{data}", "--lr", "nan"],
                          "--lr: nan is not a finite number; expected a number > 0 or find (or null for the default)"),
    "unknown strategy": (["fit", "{data}", "--finetune", "sometimes"],
                         "argument --finetune: invalid choice: 'sometimes' (choose from 'auto', 'freeze', 'partial',"
                         " 'full', 'lp-ft', 'gradual') (see `transferkit fit --help`)"),
    "val fraction above one": (["fit", "{data}", "--val-fraction", "1.5"],
                               "--val-fraction: 1.5 is out of range; expected a number in (0, 1)"),
    "negative workers": (["fit", "{data}", "--workers", "-1"],
                         "--workers: -1 is out of range; expected an integer >= 0 (or null for the default)"),
    "label smoothing of one": (["fit", "{data}", "--label-smoothing", "1.0"],
                               "--label-smoothing: 1.0 is out of range; expected a number in [0, 1)"),
    "negative mixup": (["fit", "{data}", "--mixup", "-1"], "--mixup: -1.0 is out of range; expected a number >= 0"),
    "unknown flag": (["fit", "{data}", "--bogus-flag"],
                     "unrecognized arguments: --bogus-flag (see `transferkit --help`)"),
    "unknown augmentation setting": (["fit", "{data}", "--aug", "erasing.q=0.5"],
                                     "unknown setting erasing.q; valid for erasing: p, area, aspect, fill"),
    "unknown augmentation": (["fit", "{data}", "--aug", "nosuch.p=0.5"],
                             "unknown augmentation 'nosuch'; valid ones: crop, hflip, vflip, affine, color, lighting,"
                             " noise, cutout, erasing"),
    "malformed augmentation": (["fit", "{data}", "--aug", "erasing"],
                               "augmentation override 'erasing' is malformed: write op.setting=value (e.g."
                               " erasing.p=0.5) or op=off / op=on"),
    "snapshots with lp-ft": (["fit", "{data}", "--snapshots", "2", "--finetune", "lp-ft"],
                             "--snapshots and --finetune lp-ft cannot be combined yet; the probe phase and the cycles"
                             " would share one schedule: pick one"),
    "an accelerator this machine lacks": (["fit", "{data}", "--accelerator", "tpu"],
                                          "--accelerator tpu --devices auto --precision 32-true cannot run here:"
                                          " Requirement 'torch_xla>=1.13' not met. HINT: Try running `pip install -U"
                                          " 'torch_xla>=1.13'`"),
    "data is a file": (["fit", "{data}/red/red_000.png"],
                       "{data}/red/red_000.png is a file, not a folder; pass a folder with one sub-folder per class"),
    "out is a file": (["fit", "{data}", "--out", "{data}/red/red_000.png"],
                      "--out {data}/red/red_000.png is a file; pass a folder for the run"),
    "weights that do not exist": (["fit", "{data}", "--weights", "{data}/none.safetensors"],
                                  "weights file {data}/none.safetensors does not exist; pass an existing .safetensors"
                                  " or .pth file"),
    "unknown command": (["bogus"], None),
}


@pytest.mark.parametrize("case", list(FLAGS))
def test_a_bad_flag_is_one_exact_line_and_nothing_is_written(case, good, tmp_path, capsys):
    argv, expected = FLAGS[case]
    fill = lambda a: a.replace("{data}", str(good)).replace("{out}", str(tmp_path / "run"))  # noqa: E731
    args = [fill(a) for a in argv]
    if args[0] == "fit" and "--out" not in args:
        args += ["--out", str(tmp_path / "run")]
    try:
        rc = main(args)
    except SystemExit as exc:  # argparse's own exit, as the console script would see it
        rc = exc.code
    assert rc == 2
    line = error_line(capsys.readouterr().err)
    if expected is not None:
        assert line == "transferkit: error: " + fill(expected)
    else:
        assert line.startswith("transferkit: error: argument command: invalid choice: 'bogus'")
    assert not (tmp_path / "run").exists()


# ----------------------------------------------------------------------------- config files

CONFIGS = {
    "epochs a word": ('fit:\n  data: {data}\n  epochs: "ten"\n',
                      'config {cfg} fit.epochs: "ten" is a string; expected an integer >= 1'),
    "image size quoted": ('fit:\n  data: {data}\n  image_size: "32"\n',
                          'config {cfg} fit.image_size: "32" is a string; expected an integer in [16, 2048] (or null'
                          ' for the default)'),
    "batch size a fraction": ("fit:\n  data: {data}\n  batch_size: 4.5\n",
                              "config {cfg} fit.batch_size: 4.5 is a number; expected an integer >= 1"),
    "fit is a number": ("fit: 5\n", "config file {cfg}: `fit:` holds an integer, not a mapping of settings; pass the"
                                    " config.yaml of a run"),
    "pretrained quoted false": ('fit:\n  data: {data}\n  pretrained: "false"\n',
                                'config {cfg} fit.pretrained: "false" is a string; expected true or false'),
    "aug a string": ('fit:\n  data: {data}\n  aug: "erasing.p=0.5"\n',
                     'config {cfg} fit.aug: "erasing.p=0.5" is a string; expected a list of strings'),
    "a list": ("- a\n- b\n", "config file {cfg} is not a mapping of settings (it holds a list); pass the config.yaml"
                            " of a run"),
    "empty": ("", "config file {cfg} is empty; pass the config.yaml of a run"),
    "unknown section": ("train: {}\n", "unknown setting(s): config {cfg} fit.train; remove them or check their"
                                       " spelling against `transferkit fit --help`"),
    "epochs null": ("fit:\n  data: {data}\n  epochs: null\n",
                    "config {cfg} fit.epochs: null is not allowed; expected an integer >= 1"),
    "epochs a boolean": ("fit:\n  data: {data}\n  epochs: true\n",
                         "config {cfg} fit.epochs: True is a boolean; expected an integer >= 1"),
    "lr a mapping": ("fit:\n  data: {data}\n  lr: {{value: 1}}\n",
                     "config {cfg} fit.lr: {{'value': 1}} is a mapping; expected a number > 0 or find (or null for"
                     " the default)"),
    "lr infinite": ("fit:\n  data: {data}\n  lr: .inf\n",
                    "config {cfg} fit.lr: inf is not a finite number; expected a number > 0 or find (or null for the"
                    " default)"),
    "a key given twice": ("fit:\n  data: {data}\n  epochs: 2\n  epochs: 3\n",
                          "config file {cfg} gives 'epochs' (line 4) twice; keep one of them"),
    "not UTF-8": (b"\xff\xfe\x00garbage\x80", "config file {cfg} cannot be read ('utf-8' codec can't decode byte 0xff"
                                              " in position 0: invalid start byte)"),
}


@pytest.mark.parametrize("case", list(CONFIGS))
def test_a_bad_config_file_is_one_exact_line_and_nothing_is_written(case, good, tmp_path, capsys):
    body, expected = CONFIGS[case]
    cfg = tmp_path / "c.yaml"
    if isinstance(body, bytes):
        cfg.write_bytes(body)
    else:
        cfg.write_text(body.replace("{data}", str(good)).replace("{{", "{").replace("}}", "}"))
    line = _fails(["fit", "--config", str(cfg), "--out", str(tmp_path / "run")], capsys)
    assert line == "transferkit: error: " + expected.format(cfg=cfg, data=good)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("kind", ["missing", "folder"])
def test_a_config_path_that_is_not_a_file_says_what_it_is(kind, tmp_path, capsys):
    path = tmp_path / ("missing.yaml" if kind == "missing" else "configs")
    if kind == "folder":
        path.mkdir()
    line = _fails(["fit", "--config", str(path)], capsys)
    assert line == "transferkit: error: " + (
        f"config file {path} does not exist; pass the config.yaml of a run" if kind == "missing" else
        f"config file {path} is a folder; pass the config.yaml of a run (e.g. {path / 'config.yaml'})")


# ----------------------------------------------------------------------------- folders


def _deny(path: Path, monkeypatch) -> None:
    """Make the folder `path` unreadable. As root, chmod does not stop reads: listing it is refused."""
    if os.geteuid() != 0:
        os.chmod(path, 0)  # restored by the `restore_modes` fixture
        return
    real_scandir, real_iterdir = os.scandir, Path.iterdir

    def scandir(p="."):
        if os.fspath(p) == str(path):
            raise PermissionError(errno.EACCES, "Permission denied", os.fspath(p))
        return real_scandir(p)

    def iterdir(self):
        if str(self) == str(path):
            raise PermissionError(errno.EACCES, "Permission denied", str(self))
        return real_iterdir(self)

    monkeypatch.setattr(os, "scandir", scandir)
    monkeypatch.setattr(Path, "iterdir", iterdir)


@pytest.fixture
def restore_modes():
    denied: list[Path] = []
    yield denied
    for p in denied:
        os.chmod(p, 0o755)


def _copy(good: Path, dest: Path) -> Path:
    import shutil

    return Path(shutil.copytree(good, dest))


def test_a_link_to_the_data_root_inside_a_class_names_both_paths(good, tmp_path, capsys):
    data = _copy(good, tmp_path / "data")
    (data / "blue" / "all").symlink_to(data, target_is_directory=True)
    line = _fails(["fit", str(data), *FAST, "--out", str(tmp_path / "run")], capsys)
    real = os.path.realpath(data / "green" / "green_000.png")
    assert line == (f"transferkit: error: {real} is in two classes, as {data}/blue/all/green/green_000.png (blue) and"
                    f" as {data}/green/green_000.png (green); a file under two classes trains with both labels:"
                    " remove one of the links")
    assert not (tmp_path / "run").exists()


def test_a_file_linked_twice_in_one_class_is_used_once_and_listed(good, tmp_path, capsys):
    data = _copy(good, tmp_path / "data")
    (data / "red" / "zz_again.png").symlink_to(data / "red" / "red_000.png")
    out = tmp_path / "run"
    assert main(["fit", str(data), *FAST, "--out", str(out)]) == 0
    assert rows(out / "skipped.csv") == [{"path": str(data / "red" / "zz_again.png"), "stage": "scan",
                                          "reason": f"the same file as {data / 'red' / 'red_000.png'}"}]
    used = [r["path"] for s in ("train", "val") for r in rows(out / "splits" / f"{s}.csv")]
    assert len(used) == len(set(used)) == 24


def test_a_link_loop_is_walked_once(good, tmp_path):
    data = _copy(good, tmp_path / "data")
    (data / "red" / "loop").symlink_to(data / "red", target_is_directory=True)
    out = tmp_path / "run"
    assert main(["fit", str(data), *FAST, "--out", str(out)]) == 0
    used = [r["path"] for s in ("train", "val") for r in rows(out / "splits" / f"{s}.csv")]
    assert len(used) == 24 and not any("/loop/" in p for p in used)
    assert rows(out / "skipped.csv") == []


def test_a_broken_link_is_listed_as_missing(good, tmp_path):
    data = _copy(good, tmp_path / "data")
    (data / "red" / "gone.png").symlink_to(tmp_path / "nowhere.png")
    out = tmp_path / "run"
    assert main(["fit", str(data), *FAST, "--out", str(out)]) == 0
    assert rows(out / "skipped.csv") == [{"path": str(data / "red" / "gone.png"), "stage": "scan",
                                          "reason": "missing (a broken link?)"}]


def test_an_unreadable_class_folder_says_permission_denied(good, tmp_path, capsys, monkeypatch, restore_modes):
    data = _copy(good, tmp_path / "data")
    _deny(data / "green", monkeypatch)
    restore_modes.append(data / "green")
    line = _fails(["fit", str(data), *FAST, "--out", str(tmp_path / "run")], capsys)
    assert line == (f"transferkit: error: cannot read class folder {data / 'green'}: permission denied; give yourself"
                    f" read access (chmod u+rx {data / 'green'}) or remove the folder")


def test_an_unreadable_data_folder_says_permission_denied(good, tmp_path, capsys, monkeypatch, restore_modes):
    data = _copy(good, tmp_path / "data")
    _deny(data, monkeypatch)
    restore_modes.append(data)
    line = _fails(["fit", str(data), *FAST, "--out", str(tmp_path / "run")], capsys)
    assert line == (f"transferkit: error: cannot read {data}: permission denied; give yourself read access"
                    f" (chmod u+rx {data}) or pass another folder")


def test_an_unreadable_sub_folder_is_listed_and_the_rest_trains(good, tmp_path, monkeypatch, restore_modes):
    data = _copy(good, tmp_path / "data")
    extra = data / "red" / "more"
    extra.mkdir()
    Image.new("RGB", (32, 32), (250, 0, 0)).save(extra / "red_extra.png")
    _deny(extra, monkeypatch)
    restore_modes.append(extra)
    out = tmp_path / "run"
    assert main(["fit", str(data), *FAST, "--out", str(out)]) == 0
    assert rows(out / "skipped.csv") == [{"path": str(extra), "stage": "scan",
                                          "reason": "permission denied (a folder)"}]


def test_a_class_of_hidden_files_only_has_no_usable_images(good, tmp_path, capsys):
    data = _copy(good, tmp_path / "data")
    (data / "grey").mkdir()
    Image.new("RGB", (32, 32)).save(data / "grey" / ".hidden.png")
    line = _fails(["fit", str(data), *FAST, "--out", str(tmp_path / "run")], capsys)
    assert line == (f"transferkit: error: class 'grey' has no usable images in {data / 'grey'}; add images or"
                    " remove the folder")


def _png_with_broken_pixels(path: Path, size: int = 600) -> None:
    """A PNG that passes every check short of decoding: valid header, valid chunk CRCs, and
    deflate data that no longer inflates (larger than the scan decodes in full)."""
    rng = np.random.default_rng(0)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(buf, "PNG")
    b = bytearray(buf.getvalue())
    pos = 8
    while b[pos + 4:pos + 8] != b"IDAT":
        pos += 12 + struct.unpack(">I", b[pos:pos + 4])[0]
    n = struct.unpack(">I", b[pos:pos + 4])[0]
    for k in range(n // 2, n // 2 + 64):
        b[pos + 8 + k] ^= 0xFF
    b[pos + 8 + n:pos + 12 + n] = struct.pack(">I", zlib.crc32(bytes(b[pos + 4:pos + 8 + n])) & 0xFFFFFFFF)
    path.write_bytes(bytes(b))


def test_a_png_whose_pixels_break_after_a_clean_scan_is_listed_and_every_output_is_written(tmp_path):
    data = _presplit(tmp_path / "data")
    victim = data / "train" / "red" / "red_big.png"
    _png_with_broken_pixels(victim)
    out = tmp_path / "run"
    assert main(["fit", str(data), *FAST, "--epochs", "2", "--out", str(out)]) == 0
    assert str(victim) in {r["path"] for r in rows(out / "splits" / "train.csv")}  # the scan passed it
    assert rows(out / "skipped.csv") == [{"path": str(victim), "stage": "training",
                                          "reason": "broken data stream when reading image file"}]
    report = json.loads((out / "report.json").read_text())
    assert report["images"]["skipped"] == 1 and report["epochs_trained"] == 2
    for name in ("plots/curves.png", "plots/confusion.png", "checkpoints/best.ckpt", "checkpoints/last.ckpt"):
        assert (out / name).is_file(), name


# ----------------------------------------------------------------------------- files that break at a stage

TRAIN_VICTIM, VAL_VICTIM = "train/red/red_001.png", "val/blue/blue_002.png"
STAGES = {  # stage: (the settings that reach it, the file that breaks there)
    "advisor": (["--finetune", "auto"], TRAIN_VICTIM),
    "feature cache": (["--finetune", "freeze"], TRAIN_VICTIM),
    "training": (["--finetune", "full"], TRAIN_VICTIM),
    "validation": (["--finetune", "full"], VAL_VICTIM),
    "final evaluation": (["--finetune", "full"], VAL_VICTIM),
}


def _break_at(monkeypatch, stage: str, victim: Path) -> None:
    """`victim` decodes everywhere except in the datasets of `stage`: a file that breaks there."""
    real = ImageDataset._load

    def load(self, i):
        if self.stage == stage and self.samples[i].path == str(victim):
            raise OSError("broken pixels")
        return real(self, i)

    monkeypatch.setattr(ImageDataset, "_load", load)
    if stage == "final evaluation":  # the report evaluates best.ckpt only where no validation output is kept
        monkeypatch.setattr(ImageClassifier, "_keep_val_outputs", lambda self, *a: None)


def _stage_argv(data: Path, out: Path, settings: list[str], weights: Path) -> list[str]:
    fast = [a for a in FAST if a != "--no-pretrained"]
    return ["fit", str(data), *fast, "--epochs", "2", "--weights", str(weights), *settings, "--out", str(out)]


@pytest.mark.parametrize("stage", list(STAGES))
def test_a_file_that_breaks_at_a_stage_is_listed_with_it_and_the_run_finishes(stage, tmp_path, weights, monkeypatch):
    settings, rel = STAGES[stage]
    data = _presplit(tmp_path / "data")
    victim, out = data / rel, tmp_path / "run"
    _break_at(monkeypatch, stage, victim)
    assert main(_stage_argv(data, out, settings, weights)) == 0
    assert rows(out / "skipped.csv") == [{"path": str(victim), "stage": stage, "reason": "broken pixels"}]
    report = json.loads((out / "report.json").read_text())
    assert report["images"]["skipped"] == 1
    # the advisor's failures leave the split; later ones stay in it (the file was trained on before)
    in_train = str(victim) in {r["path"] for r in rows(out / "splits" / "train.csv")}
    assert in_train == (rel == TRAIN_VICTIM and stage != "advisor")
    scored = report["metrics"]["count"]
    # a file validation could not read is left out of the report too: it is the best epoch's validation
    assert scored == (7 if stage in ("validation", "final evaluation") else 8)
    for name in ("plots/curves.png", "plots/confusion.png", "checkpoints/best.ckpt"):
        assert (out / name).is_file(), name


@pytest.mark.parametrize("stage", list(STAGES))
def test_strict_stops_at_the_first_file_that_breaks_with_one_line(stage, tmp_path, weights, monkeypatch, capsys):
    settings, rel = STAGES[stage]
    data = _presplit(tmp_path / "data")
    victim, out = data / rel, tmp_path / "run"
    _break_at(monkeypatch, stage, victim)
    line = _fails(_stage_argv(data, out, [*settings, "--strict"], weights), capsys)
    assert line == (f"transferkit: error: {victim} could not be read at {stage} (broken pixels); --strict stops at"
                    " the first unreadable file: fix or remove it, or run without --strict to leave it out")
    assert not (out / "report.json").exists()
    if stage != "final evaluation":  # stopped before the first checkpoint: the same command reuses the folder
        assert not RunDir(out).has_checkpoints()
        monkeypatch.undo()
        assert main(_stage_argv(data, out, [*settings, "--strict"], weights)) == 0
        assert rows(out / "skipped.csv") == []


def test_evaluate_leaves_out_a_file_that_breaks_and_lists_it(tmp_path, monkeypatch):
    data = _presplit(tmp_path / "data")
    out = tmp_path / "run"
    assert main(["fit", str(data), *FAST, "--out", str(out)]) == 0
    victim = data / VAL_VICTIM
    _break_at(monkeypatch, "evaluate val", victim)
    assert main(["evaluate", str(out)]) == 0
    body = json.loads((out / "evaluation.json").read_text())
    assert body["results"][0]["count"] == 7
    assert body["skipped"] == [{"path": str(victim), "stage": "evaluate val", "reason": "broken pixels"}]
    assert rows(out / "skipped.csv") == [{"path": str(victim), "stage": "evaluate val", "reason": "broken pixels"}]


def test_evaluate_when_no_image_can_be_read_says_so(tmp_path, monkeypatch, capsys):
    data = _presplit(tmp_path / "data")
    out = tmp_path / "run"
    assert main(["fit", str(data), *FAST, "--out", str(out)]) == 0
    capsys.readouterr()

    def load(self, i):
        raise OSError("broken pixels")

    monkeypatch.setattr(ImageDataset, "_load", load)
    line = _fails(["evaluate", str(out)], capsys)
    assert line == (f"transferkit: error: 8 images in a row failed to load, starting at {data / 'val/blue/blue_000.png'};"
                    " check the data folder")


# ----------------------------------------------------------------------------- checkpoints and resume


def _replace_fails_for(monkeypatch, name: str) -> None:
    """The disk fills up whenever `name` is written (its atomic rename never happens)."""
    real = os.replace

    def replace(src, dst, **kw):
        if Path(dst).name == name:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(src, dst, **kw)

    monkeypatch.setattr(os, "replace", replace)


def test_a_full_disk_is_one_line_and_resume_finds_the_checkpoint_that_is_whole(tmp_path, monkeypatch, capsys):
    data = _presplit(tmp_path / "data")
    out = tmp_path / "run"
    _replace_fails_for(monkeypatch, "last.ckpt")
    line = _fails(["fit", str(data), *FAST, "--epochs", "2", "--out", str(out)], capsys)
    assert line == (f"transferkit: error: cannot write {out / 'checkpoints' / 'last.ckpt'}: No space left on device;"
                    " free some space or pass a folder you can write to")
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["best.ckpt"]
    monkeypatch.undo()
    assert main(["fit", "--resume", str(out)]) == 0
    assert f"{out / 'checkpoints' / 'last.ckpt'} is missing or incomplete; resuming from" in capsys.readouterr().err
    assert [r["epoch"] for r in rows(out / "metrics.csv")] == ["1", "2"]
    assert json.loads((out / "report.json").read_text())["epochs_trained"] == 2


def test_resume_with_no_whole_checkpoint_says_so_and_never_suggests_overwrite(tmp_path, capsys):
    data = _presplit(tmp_path / "data")
    out = tmp_path / "run"
    assert main(["fit", str(data), *FAST, "--out", str(out)]) == 0
    for name in ("best", "last"):
        (out / "checkpoints" / f"{name}.ckpt").write_bytes(b"cut short")
    capsys.readouterr()
    line = _fails(["fit", "--resume", str(out)], capsys)
    assert line == (f"transferkit: error: no checkpoint in {out / 'checkpoints'} holds a whole training state (the"
                    " files there cannot be read, or hold weights only); evaluate them, or train again")


def test_evaluate_a_checkpoint_cut_short_names_it(tmp_path, capsys):
    data = _presplit(tmp_path / "data")
    out = tmp_path / "run"
    assert main(["fit", str(data), *FAST, "--out", str(out)]) == 0
    (out / "checkpoints" / "last.ckpt").write_bytes((out / "checkpoints" / "last.ckpt").read_bytes()[:500])
    capsys.readouterr()
    line = _fails(["evaluate", str(out), "--checkpoint", "last"], capsys)
    assert line.startswith(f"transferkit: error: checkpoint {out / 'checkpoints' / 'last.ckpt'} cannot be read (")
    assert line.endswith("); it may be incomplete or corrupt: use another checkpoint of the run")


def test_evaluate_a_checkpoint_the_run_does_not_have_lists_those_it_has(tmp_path, capsys):
    data = _presplit(tmp_path / "data")
    out = tmp_path / "run"
    assert main(["fit", str(data), *FAST, "--out", str(out)]) == 0
    capsys.readouterr()
    line = _fails(["evaluate", str(out), "--checkpoint", "ema"], capsys)
    assert line == (f"transferkit: error: {out} has no checkpoint 'ema' ({out / 'checkpoints' / 'ema.ckpt'} does not"
                    " exist); it has best, last: pass one of them with --checkpoint (a run trained with --ema keeps"
                    " its EMA weights inside each checkpoint: use --ensemble ema)")


def test_predict_out_naming_a_folder_is_refused_before_any_prediction(tmp_path, good, capsys):
    out = tmp_path / "run"
    assert main(["fit", str(good), *FAST, "--out", str(out)]) == 0
    capsys.readouterr()
    line = _fails(["predict", str(out), str(good / "red"), "--out", str(tmp_path)], capsys)
    assert line == f"transferkit: error: --out {tmp_path} is a folder; pass a file name such as" \
                   f" {tmp_path / 'predictions.csv'}"


# ----------------------------------------------------------------------------- runs held by a process


def test_a_run_held_by_another_process_is_refused_even_with_overwrite(good, tmp_path, capsys):
    out = tmp_path / "run"
    holder = RunDir(out).lock()
    try:
        for extra in ([], ["--overwrite"]):
            line = _fails(["fit", str(good), *FAST, "--out", str(out), *extra], capsys)
            assert line == (f"transferkit: error: {out} is in use by another transferkit process (pid {os.getpid()});"
                            " wait for it to finish, or pass another --out")
    finally:
        holder.release()
    assert sorted(p.name for p in out.iterdir()) == [".lock"]
    assert main(["fit", str(good), *FAST, "--out", str(out)]) == 0  # once let go, the folder is usable


def test_resume_of_a_run_held_by_another_process_is_refused(good, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["fit", str(good), *FAST, "--out", str(out)]) == 0
    before = (out / "checkpoints" / "last.ckpt").read_bytes()
    holder = RunDir(out).lock()
    try:
        capsys.readouterr()
        line = _fails(["fit", "--resume", str(out)], capsys)
        assert line.startswith(f"transferkit: error: {out} is in use by another transferkit process")
    finally:
        holder.release()
    assert (out / "checkpoints" / "last.ckpt").read_bytes() == before


# A backbone whose first training step waits until the test opens a gate: the run is certainly
# in progress (its directory written and held) while the test acts.
GATED_FORWARD = """
    if model.training and not os.path.exists(os.environ["GATE"]):
        open(os.environ["GATE"] + ".waiting", "w").close()
        while not os.path.exists(os.environ["GATE"]):
            time.sleep(0.05)
    return plain(x)
"""


def _gated(tmp_path: Path) -> tuple[list[str], dict]:
    plugin = resnet_plugin(tmp_path / "gated.py", "gated_resnet", GATED_FORWARD)
    env = {**os.environ, "GATE": str(tmp_path / "gate")}
    fast = list(FAST)
    fast[fast.index("test_resnet")] = "gated_resnet"
    return [*fast, "--backbone-plugin", str(plugin)], env


def _wait_for(path: Path, proc: subprocess.Popen, seconds: float = 240) -> None:
    end = time.monotonic() + seconds
    while not path.exists():
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < end, f"{path} never appeared"
        time.sleep(0.1)


def _popen(args: list[str], env: dict) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "transferkit.cli.main", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env)


def test_two_fits_into_one_out_at_once_one_refuses_cleanly(good, tmp_path):
    args, env = _gated(tmp_path)
    out = tmp_path / "run"
    argv = ["fit", str(good), *args, "--out", str(out), "--overwrite"]
    procs = [_popen(argv, env), _popen(argv, env)]
    try:
        end = time.monotonic() + 300
        while all(p.poll() is None for p in procs):
            assert time.monotonic() < end, "neither fit refused"
            time.sleep(0.1)
        loser = next(p for p in procs if p.poll() is not None)
        winner = next(p for p in procs if p is not loser)
        _, err = loser.communicate()
        assert loser.returncode == 2, err
        assert error_line(err) == (f"transferkit: error: {out} is in use by another transferkit process (pid"
                                   f" {winner.pid}); wait for it to finish, or pass another --out")
        (tmp_path / "gate").touch()
        _, err = winner.communicate(timeout=300)
        assert winner.returncode == 0, err
    finally:
        for p in procs:
            p.kill() if p.poll() is None else None
    import transferkit

    model = transferkit.load(out / "checkpoints" / "best.ckpt")
    assert model.classes == ["blue", "green", "red"]
    assert json.loads((out / "report.json").read_text())["epochs_trained"] == 1


def test_an_interrupt_before_the_first_checkpoint_leaves_a_folder_the_same_command_reuses(good, tmp_path):
    args, env = _gated(tmp_path)
    out = tmp_path / "run"
    argv = ["fit", str(good), *args, "--out", str(out)]
    proc = _popen(argv, env)
    try:
        _wait_for(tmp_path / "gate.waiting", proc)  # inside the first training step
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=120)
    finally:
        proc.kill() if proc.poll() is None else None
    assert proc.returncode == 130, err
    assert error_line(err) == ("transferkit: error: stopped by Ctrl-C before the first epoch finished; nothing to"
                               " resume: run the same `transferkit fit` command again, which reuses the folder")
    resumed = cli("fit", "--resume", str(out))
    assert resumed.returncode == 2
    assert error_line(resumed.stderr) == (
        f"transferkit: error: no epoch of {out} finished, so there is nothing to resume; run the same `transferkit"
        f" fit` command again (or `transferkit fit --config {out / 'config.yaml'}`): it reuses the folder")
    (tmp_path / "gate").touch()
    again = subprocess.run([sys.executable, "-m", "transferkit.cli.main", *argv], capture_output=True, text=True,
                           env=env, timeout=300, check=False)
    assert again.returncode == 0, again.stderr
    assert torch.load(out / "checkpoints" / "best.ckpt", weights_only=True)["epoch"] == 0


def test_evaluate_with_a_checkpoint_of_another_class_count_says_so(good, tmp_path, capsys):
    three, two = tmp_path / "three", tmp_path / "two"
    assert main(["fit", str(good), *FAST, "--out", str(three)]) == 0
    assert main(["fit", str(_presplit(tmp_path / "data")), *FAST, "--out", str(two)]) == 0
    (three / "checkpoints" / "best.ckpt").write_bytes((two / "checkpoints" / "best.ckpt").read_bytes())
    capsys.readouterr()
    line = _fails(["evaluate", str(three)], capsys)
    assert line.startswith(f"transferkit: error: {three / 'checkpoints' / 'best.ckpt'} does not fit this run's model"
                           " (size mismatch for ")
    assert line.endswith("); was it trained with other classes or another backbone?")
