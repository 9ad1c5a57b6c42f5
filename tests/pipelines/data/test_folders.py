"""Scanning folders, splitting them, and reading images of every common kind as RGB."""
from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from transferkit.errors import DataError
from transferkit.pipelines.data.folders import scan_folder, stratified_split
from transferkit.pipelines.data.images import load_rgb, probe_image


def _save(path, im, **kw):
    path.parent.mkdir(parents=True, exist_ok=True)
    im.save(path, **kw)
    return path


def test_class_folder_layout_and_a_deterministic_stratified_split(tmp_path):
    from conftest import make_color_folder

    data = make_color_folder(tmp_path / "d", per_class=10)
    scan = scan_folder(data)
    assert scan.classes == ["blue", "green", "red"] and not scan.presplit
    train, val = stratified_split(scan.splits["train"], 0.2, seed=1)
    assert len(val) == 6 and len(train) == 24
    assert sorted(s.label for s in val) == [0, 0, 1, 1, 2, 2]
    assert stratified_split(scan.splits["train"], 0.2, seed=1) == (train, val)
    assert stratified_split(scan.splits["train"], 0.2, seed=2)[1] != val


def test_train_val_test_layout(tmp_path):
    from conftest import make_color_folder

    for split in ("train", "val", "test"):
        make_color_folder(tmp_path / split, classes=("red", "blue"), per_class=3)
    scan = scan_folder(tmp_path)
    assert scan.presplit and scan.classes == ["blue", "red"]
    assert {k: len(v) for k, v in scan.splits.items()} == {"train": 6, "val": 6, "test": 6}


def test_train_and_val_with_different_classes_is_an_error(tmp_path):
    from conftest import make_color_folder

    make_color_folder(tmp_path / "train", classes=("red", "blue"), per_class=2)
    make_color_folder(tmp_path / "val", classes=("red", "green"), per_class=2)
    with pytest.raises(DataError, match=r"different classes .*missing: blue; extra: green"):
        scan_folder(tmp_path)


def _modes(tmp_path):
    rng = np.random.default_rng(0)
    rgb = Image.fromarray(rng.integers(0, 255, (20, 30, 3), dtype=np.uint8))
    files = {
        "L.png": rgb.convert("L"),
        "LA.png": rgb.convert("LA"),
        "P.png": rgb.convert("P"),
        "RGBA.png": rgb.convert("RGBA"),
        "CMYK.jpg": rgb.convert("CMYK"),
        "I16.png": Image.fromarray((rng.integers(0, 65535, (20, 30))).astype(np.uint16)),
        "plain.bmp": rgb, "plain.webp": rgb, "plain.tiff": rgb, "plain.gif": rgb.convert("P"),
    }
    return {name: _save(tmp_path / name, im) for name, im in files.items()}


def test_every_common_mode_reads_as_rgb(tmp_path):
    for name, path in _modes(tmp_path).items():
        assert probe_image(path) is None, name
        im = load_rgb(path)
        assert im.mode == "RGB" and im.size == (30, 20), name


def test_sixteen_bit_is_scaled_not_clipped(tmp_path):
    arr = np.full((8, 8), 65535, np.uint16)
    arr[:4] = 32768
    im = load_rgb(_save(tmp_path / "x.png", Image.fromarray(arr)))
    a = np.asarray(im)
    assert a[0, 0, 0] == 128 and a[7, 0, 0] == 255


def test_exif_orientation_is_applied(tmp_path):
    im = Image.new("RGB", (40, 20), (255, 0, 0))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    path = _save(tmp_path / "rot.jpg", im, exif=exif)
    assert load_rgb(path).size == (20, 40)


def test_transparent_pixels_become_white(tmp_path):
    im = Image.new("RGBA", (4, 4), (0, 0, 0, 0))
    assert load_rgb(_save(tmp_path / "t.png", im)).getpixel((0, 0)) == (255, 255, 255)


@pytest.mark.parametrize("content, reason", [
    (b"", "empty file"),
    (b"this is not an image", "not a readable image"),
])
def test_unreadable_files_get_a_reason(tmp_path, content, reason):
    path = tmp_path / "bad.jpg"
    path.write_bytes(content)
    assert reason in probe_image(path)


def test_truncated_jpeg_is_caught_at_scan(tmp_path):
    rng = np.random.default_rng(0)
    path = _save(tmp_path / "t.jpg", Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    assert "cannot decode" in probe_image(path)


def test_walk_gives_real_paths_and_visits_a_linked_folder_once(tmp_path):
    from transferkit.pipelines.data.folders import walk

    (tmp_path / "a" / "sub").mkdir(parents=True)
    (tmp_path / "a" / "x.png").write_bytes(b"")
    (tmp_path / "a" / "sub" / "y.png").write_bytes(b"")
    (tmp_path / "a" / "sub" / "up").symlink_to(tmp_path / "a", target_is_directory=True)  # a loop
    (tmp_path / "a" / "z.png").symlink_to(tmp_path / "a" / "x.png")
    (tmp_path / "a" / ".hidden.png").write_bytes(b"")
    found = walk(tmp_path / "a")
    real = str(tmp_path.resolve() / "a")
    assert found.files == [(f"{tmp_path}/a/x.png", f"{real}/x.png"), (f"{tmp_path}/a/z.png", f"{real}/x.png"),
                           (f"{tmp_path}/a/sub/y.png", f"{real}/sub/y.png")]
    assert found.unreadable == []
