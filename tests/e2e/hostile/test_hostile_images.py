"""Broken and unusual image files: a run leaves the broken ones out, reports them, and trains.

Every bad kind a real folder collects (empty, truncated, text or another format behind an image
extension, unreadable) is reported in skipped.csv with its reason; every odd-but-valid kind
(grayscale, alpha, palette, CMYK, 16-bit, EXIF-rotated, tiny, huge, a name that is not UTF-8,
a folder linked back into itself) is trained on, each file once.
"""
from __future__ import annotations

import errno
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from _cli import error_line as _error_line
from _cli import rows as _rows
from transferkit.cli.main import main
from transferkit.pipelines.data.decoded import DecodeRule
from transferkit.pipelines.train.module import ImageClassifier

FAST = ["--backbone", "test_resnet", "--no-pretrained", "--image-size", "32", "--workers", "0",
        "--batch-size", "8", "--patience", "0"]


def _noise(rng, h, w, mode="RGB"):
    return Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).convert(mode)


def _encoded(im: Image.Image, fmt: str) -> bytes:
    from io import BytesIO

    buf = BytesIO()
    im.save(buf, fmt)
    return buf.getvalue()


def _build(root: Path) -> tuple[Path, dict[str, str], set[str], str]:
    """DATA with 8 good images per class plus every bad and odd kind.

    Returns (DATA, {bad path: expected reason}, {odd path}, the path made unreadable).
    """
    from conftest import make_color_folder

    data = make_color_folder(root / "data", per_class=8, size=32)
    rng = np.random.default_rng(1)
    jpeg = _encoded(_noise(rng, 48, 48), "JPEG")
    png = _encoded(_noise(rng, 48, 48), "PNG")
    bad_bytes = {
        "red/zero.jpg": (b"", "empty file (0 bytes)"),
        "red/truncated.jpg": (jpeg[: len(jpeg) // 2], "cannot decode"),
        "green/truncated.png": (png[: len(png) // 2], "cannot decode"),
        "green/notes.jpg": (b"shopping list: eggs, milk\n", "not a readable image"),
        "blue/vector.png": (b'<svg xmlns="http://www.w3.org/2000/svg" width="8" height="8"/>',
                            "not a readable image"),
        "blue/layers.png": (b"8BPS\x00\x07" + bytes(64), "not a readable image"),
        "red/readme.txt": (b"where these came from", "not an image extension (.txt)"),
        "green/locked.jpg": (jpeg, "permission denied"),
    }
    bad = {}
    for rel, (body, reason) in bad_bytes.items():
        (data / rel).write_bytes(body)
        bad[str(data / rel)] = reason

    exif = Image.Exif()
    exif[0x0112] = 6  # displayed rotated by 90 degrees
    big = Image.new("RGB", (6000, 4000), (200, 40, 40))
    big.paste((250, 90, 90), (1000, 1000, 3000, 2500))
    odd = {
        "red/gray.png": (_noise(rng, 32, 32, "L"), {}),
        "green/gray_alpha.png": (_noise(rng, 32, 32, "LA"), {}),
        "blue/palette.png": (_noise(rng, 32, 32, "P"), {}),
        "red/rgba.png": (_noise(rng, 32, 32, "RGBA"), {}),
        "green/cmyk.jpg": (_noise(rng, 32, 32, "CMYK"), {}),
        "blue/sixteen.png": (Image.fromarray(rng.integers(0, 65535, (32, 32)).astype(np.uint16)), {}),
        "red/rotated.jpg": (_noise(rng, 24, 40), {"exif": exif}),
        "green/tiny.png": (_noise(rng, 8, 8), {}),
        "blue/huge.jpg": (big, {"quality": 70}),
    }
    for rel, (im, kw) in odd.items():
        im.save(data / rel, **kw)
    assert Image.open(data / "green/cmyk.jpg").mode == "CMYK"
    assert Image.open(data / "blue/sixteen.png").mode.startswith("I")
    # a name that is not UTF-8 (as copied from an old Latin-1 disk), and a link back up the tree
    latin1 = os.fsdecode(os.fsencode(data / "red") + b"/caf\xe9.png")
    _noise(rng, 32, 32).save(latin1, format="PNG")
    os.symlink(".", data / "blue" / "again")  # relative, so that a copy of DATA loops on itself
    odd_paths = {str(data / rel) for rel in odd} | {latin1}
    return data, bad, odd_paths, str(data / "green/locked.jpg")


def _unreadable(path: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Make `path` unreadable. As root, chmod 000 does not stop reads: PIL's open refuses it instead."""
    if os.geteuid() != 0:
        os.chmod(path, 0)
        return
    real_open = Image.open

    def guarded_open(fp, *args, **kwargs):
        if isinstance(fp, (str, os.PathLike)) and os.fspath(fp) == path:
            raise PermissionError(errno.EACCES, "Permission denied", path)
        return real_open(fp, *args, **kwargs)

    monkeypatch.setattr(Image, "open", guarded_open)


@pytest.fixture(scope="module")
def bad_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("bad")
    data, bad, odd, locked = _build(root)
    out = root / "run"
    with pytest.MonkeyPatch.context() as mp:
        _unreadable(locked, mp)
        err_log = root / "stderr.txt"
        import sys

        real_stderr = sys.stderr
        with err_log.open("w") as f:
            sys.stderr = f
            try:
                rc = main(["fit", str(data), "--out", str(out), "--epochs", "1", *FAST])
            finally:
                sys.stderr = real_stderr
        if os.geteuid() != 0:
            os.chmod(locked, 0o644)
    assert rc == 0, err_log.read_text()
    return data, bad, odd, out, err_log.read_text()


def test_fit_leaves_out_exactly_the_bad_files_with_their_reasons(bad_run):
    _, bad, _, out, _ = bad_run
    skipped = {r["path"]: r["reason"] for r in _rows(out / "skipped.csv")}
    assert set(skipped) == set(bad)
    for path, reason in bad.items():
        assert reason in skipped[path], (path, skipped[path])
    report = json.loads((out / "report.json").read_text())
    assert report["images"]["skipped"] == len(bad) == 8


def test_the_splits_hold_exactly_the_good_and_odd_images(bad_run):
    data, _, odd, out, _ = bad_run
    in_splits = [r["path"] for split in ("train", "val") for r in _rows(out / "splits" / f"{split}.csv")]
    assert len(in_splits) == len(set(in_splits))
    good = {str(p) for c in ("red", "green", "blue") for p in (data / c).glob(f"{c}_*.png")}
    assert len(good) == 24
    assert set(in_splits) == good | odd
    labels = {r["path"]: r["label"] for split in ("train", "val") for r in _rows(out / "splits" / f"{split}.csv")}
    assert all(labels[p] == Path(p).parent.name for p in odd)


def test_one_warning_names_the_count_and_the_first_files(bad_run):
    _, bad, _, _, err = bad_run
    warnings = [ln for ln in err.splitlines() if "unusable file" in ln]
    assert len(warnings) == 1, err
    assert "left out 8 unusable file(s)" in warnings[0]
    named = [p for p in bad if p in warnings[0]]
    assert 1 <= len(named) <= 3
    assert "Traceback" not in err


def test_strict_stops_before_training_with_one_line(tmp_path, capsys, monkeypatch):
    data, bad, _, locked = _build(tmp_path)
    _unreadable(locked, monkeypatch)
    out = tmp_path / "run"
    rc = main(["fit", str(data), "--out", str(out), "--strict", "--epochs", "1", *FAST])
    if os.geteuid() != 0:
        os.chmod(locked, 0o644)
    assert rc == 2
    line = _error_line(capsys.readouterr().err)
    assert "8 unusable file(s)" in line and "--strict" in line
    assert any(p in line for p in bad)
    assert not out.exists()  # nothing written: it stopped before the run directory


def _presplit(root: Path) -> Path:
    from conftest import make_color_folder

    make_color_folder(root / "train", classes=("red", "blue"), per_class=10, size=32, seed=1)
    make_color_folder(root / "val", classes=("red", "blue"), per_class=4, size=32, seed=2)
    return root


def test_a_file_that_breaks_after_the_scan_is_replaced_and_reported(tmp_path, capsys, monkeypatch):
    """The scan passes it, then it is truncated on disk: training goes on without it."""
    import transferkit.pipelines.train.recipe as fit_module

    data = _presplit(tmp_path / "data")
    victim = data / "train" / "red" / "red_003.png"
    real_scan = fit_module.scan_folder

    def scan_then_truncate(*args, **kwargs):
        result = real_scan(*args, **kwargs)
        body = victim.read_bytes()
        victim.write_bytes(body[: len(body) // 3])
        return result

    monkeypatch.setattr(fit_module, "scan_folder", scan_then_truncate)
    out = tmp_path / "run"
    assert main(["fit", str(data), "--out", str(out), "--epochs", "2", *FAST]) == 0
    err = capsys.readouterr().err
    reports = [ln for ln in err.splitlines() if "could not read" in ln]
    assert len(reports) == 1, err  # once, not once per epoch
    assert str(victim) in reports[0] and "at training" in reports[0] and "leaving it out" in reports[0]
    assert str(victim) in {r["path"] for r in _rows(out / "splits" / "train.csv")}
    rows = _rows(out / "metrics.csv")
    assert [r["epoch"] for r in rows] == ["1", "2"]
    skipped = {r["path"]: (r["stage"], r["reason"]) for r in _rows(out / "skipped.csv")}
    assert skipped[str(victim)][0] == "training" and "truncated" in skipped[str(victim)][1]
    report = json.loads((out / "report.json").read_text())
    assert report["images"]["train"] == 20 and report["images"]["skipped"] == 1


def _break_load(monkeypatch, path: str) -> None:
    import transferkit.pipelines.data.datasets as data_module
    import transferkit.pipelines.evaluate.prediction as prediction_module

    real = data_module.load_rgb

    def load(p):
        if str(p) == path:
            raise OSError("image file is truncated (12 bytes not processed)")
        return real(p)

    monkeypatch.setattr(data_module, "load_rgb", load)
    monkeypatch.setattr(prediction_module, "load_rgb", load)
    real_rule = DecodeRule.load  # a run trained from its decode cache decodes through its rule

    def load_by_rule(self, p):
        if str(p) == path:
            raise OSError("image file is truncated (12 bytes not processed)")
        return real_rule(self, p)

    monkeypatch.setattr(DecodeRule, "load", load_by_rule)


@pytest.mark.parametrize("workers", ["0", "1"])
def test_evaluate_leaves_out_a_file_that_breaks_instead_of_scoring_a_stand_in(bad_run, capsys, monkeypatch,
                                                                            workers):
    _, _, _, out, _ = bad_run
    val = _rows(out / "splits" / "val.csv")
    victim = val[0]["path"]
    _break_load(monkeypatch, victim)
    assert main(["evaluate", str(out), "--workers", workers]) == 0
    err = capsys.readouterr().err  # (a worker process's own warning goes to the real stderr)
    assert f"left 1 unreadable image(s) out of the evaluation, e.g. {victim} (image file is truncated" in err
    body = json.loads((out / "evaluation.json").read_text())
    assert body["results"][0]["count"] == len(val) - 1
    assert body["skipped"] == [{"path": victim, "stage": "evaluate val",
                                "reason": "image file is truncated (12 bytes not processed)"}]
    skipped = {r["path"]: r["stage"] for r in _rows(out / "skipped.csv")}
    assert skipped[victim] == "evaluate val" and len(skipped) == 9  # the scan's 8, and this one


def test_predict_marks_an_unreadable_file_in_its_row_and_predicts_the_rest(bad_run, tmp_path, capsys,
                                                                          monkeypatch):
    data, _, _, out, _ = bad_run
    good, victim = str(data / "red" / "red_001.png"), str(data / "red" / "red_002.png")
    _break_load(monkeypatch, victim)
    csv_out = tmp_path / "pred.csv"
    assert main(["predict", str(out), good, victim, "--out", str(csv_out), "--workers", "0"]) == 0
    rows = {r["path"]: r for r in _rows(csv_out)}
    assert rows[good]["label"] in ("red", "green", "blue") and rows[good]["error"] == ""
    assert rows[victim]["label"] == "" and rows[victim]["probability"] == ""
    assert rows[victim]["error"] == "cannot read: image file is truncated (12 bytes not processed)"
    assert f"could not read {victim}" in capsys.readouterr().err


def test_evaluate_on_a_folder_skips_and_reports_bad_files(bad_run, tmp_path, capsys):
    """Given a folder, evaluation scans it like fit: bad files are left out and named."""
    data, _, _, out, _ = bad_run
    copy = tmp_path / "eval"
    shutil.copytree(data, copy, symlinks=True)
    (copy / "green" / "locked.jpg").unlink()  # its unreadability was simulated only during fit
    assert main(["evaluate", str(out), str(copy)]) == 0
    err = capsys.readouterr().err
    assert "left out 7 unusable file(s)" in err
    body = json.loads((out / "evaluation.json").read_text())
    assert body["results"][0]["count"] == 24 + 10  # the linked folder's images once, not again


def test_a_val_file_that_breaks_before_the_final_evaluation_is_listed_and_the_run_finishes(tmp_path, capsys,
                                                                                          monkeypatch):
    import transferkit.pipelines.train.recipe as recipe

    data = _presplit(tmp_path / "data")
    out = tmp_path / "run"
    real_report = recipe.write_report

    def break_then_report(run, *args, **kwargs):
        victim = _rows(out / "splits" / "val.csv")[1]["path"]
        _break_load(monkeypatch, victim)  # the header stays valid; the pixels no longer decode
        return real_report(run, *args, **kwargs)

    monkeypatch.setattr(recipe, "write_report", break_then_report)
    # the final evaluation reads the files only where neither validation outputs nor decoded pictures are kept
    monkeypatch.setattr(ImageClassifier, "_keep_val_outputs", lambda self, *a: None)
    assert main(["fit", str(data), "--out", str(out), "--epochs", "1", "--finetune", "full", "--decode-cache", "off",
                 *FAST]) == 0
    victim = _rows(out / "splits" / "val.csv")[1]["path"]
    skipped = {r["path"]: (r["stage"], r["reason"]) for r in _rows(out / "skipped.csv")}
    assert skipped[victim] == ("final evaluation", "image file is truncated (12 bytes not processed)")
    report = json.loads((out / "report.json").read_text())
    assert report["metrics"]["count"] == len(_rows(out / "splits" / "val.csv")) - 1
    assert report["images"]["skipped"] == len(skipped)
    assert (out / "plots" / "confusion.png").is_file()
    assert "1 file(s) could not be read after the scan and were left out" in capsys.readouterr().err
