"""The augmentation preview grid: layout, inputs it accepts or skips, captions, reproducibility."""
from __future__ import annotations

import logging
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from transferkit.augment.batch import BatchMixer
from transferkit.errors import ConfigError, DataError
from transferkit.pipelines.preview import _mixed_cells, _spread, preview_grid

SHARED = Path(__file__).resolve().parents[2] / ".." / "shared"


def image_folder(root: Path, per_class: int = 2) -> Path:
    rng = np.random.default_rng(0)
    for label in ("ants", "bees"):
        (root / label).mkdir(parents=True)
        for i in range(per_class):
            pixels = rng.integers(0, 256, (30, 40, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(root / label / f"{i}.png")
    return root


def test_grid_has_one_row_per_image_plus_the_draws(tmp_path):
    data = image_folder(tmp_path / "data")
    out = preview_grid([data], tmp_path / "grid.png", preset="heavy", size=32, draws=2)
    with Image.open(out) as grid:
        assert grid.format == "PNG"
        # 3 columns of 32 px and 4 rows of 16 (caption) + 32 px, 4 px apart and around
        assert grid.size == (4 + 3 * (32 + 4), 4 + 4 * (16 + 32 + 4))


def test_mixing_adds_rows_of_mixed_pairs(tmp_path):
    data = image_folder(tmp_path / "data")
    files = sorted(data.rglob("*.png"))[:3]  # an odd count: one more draw makes the pairs even
    out = preview_grid(files, tmp_path / "grid.png", size=(24, 32), cutmix=1.0, draws=2)
    with Image.open(out) as grid:
        assert grid.size == (4 + 3 * (32 + 4), 4 + (3 + 2) * (16 + 24 + 4))  # 4 mixed cells: 2 more rows


def test_mixed_cells_are_captioned_with_their_label_weights():
    images = [("ants", Image.new("RGB", (8, 8))), ("bees", Image.new("RGB", (8, 8)))]
    rows = [[torch.zeros(3, 16, 16)], [torch.ones(3, 16, 16)]]
    mixer = BatchMixer(2, cutmix_alpha=1.0, mode="elem", generator=torch.Generator().manual_seed(0))
    captions = [text for _, text in _mixed_cells(mixer, images, rows)]
    assert len(captions) == 2
    for caption, (own, other) in zip(captions, [("ants", "bees"), ("bees", "ants")]):
        match = re.fullmatch(rf"(\d\.\d\d) {own} / (\d\.\d\d) {other}", caption)
        assert match, caption
        assert float(match[1]) + float(match[2]) == pytest.approx(1.0, abs=0.011)


def test_the_same_seed_draws_the_same_grid(tmp_path):
    data = image_folder(tmp_path / "data")
    grids = [np.asarray(Image.open(preview_grid([data], tmp_path / f"{i}.png", size=32, draws=2, seed=seed)))
             for i, seed in enumerate([7, 7, 8])]
    assert np.array_equal(grids[0], grids[1])
    assert not np.array_equal(grids[0], grids[2])


def test_unreadable_files_are_skipped_with_a_warning(tmp_path, caplog):
    data = image_folder(tmp_path / "data", per_class=1)
    broken = data / "ants" / "broken.jpg"
    broken.write_bytes(b"not a jpeg")
    with caplog.at_level(logging.WARNING, logger="transferkit.pipelines.preview"):
        out = preview_grid([data], tmp_path / "grid.png", size=32, draws=1)
    assert str(broken) in caplog.text
    with Image.open(out) as grid:
        assert grid.size[1] == 4 + 2 * (16 + 32 + 4)  # the two readable images


def test_no_usable_image_is_a_data_error(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "broken.png").write_bytes(b"nothing")
    with pytest.raises(DataError, match="no readable image among 1 file"):
        preview_grid([tmp_path / "empty"], tmp_path / "grid.png")
    with pytest.raises(DataError, match="missing does not exist"):
        preview_grid([tmp_path / "missing"], tmp_path / "grid.png")


def test_bad_settings_are_config_errors(tmp_path):
    data = image_folder(tmp_path / "data")
    with pytest.raises(ConfigError, match="draws=0 is invalid"):
        preview_grid([data], tmp_path / "grid.png", draws=0)
    with pytest.raises(ConfigError, match="cutmix_alpha=-1"):
        preview_grid([data], tmp_path / "grid.png", cutmix=-1)
    with pytest.raises(ConfigError, match="unknown setting erasing.prob"):
        preview_grid([data], tmp_path / "grid.png", overrides={"erasing": {"prob": 1}})


def test_many_images_are_thinned_evenly():
    assert _spread(list(range(10)), 3) == [0, 4, 9]
    assert _spread(list(range(2)), 5) == [0, 1]


@pytest.mark.real
def test_preview_of_real_photos(tmp_path):
    data = SHARED / "data" / "hymenoptera" / "val"
    if not data.is_dir():
        pytest.skip("../shared/data/hymenoptera is absent")
    out = preview_grid([data], tmp_path / "grid.png", preset="heavy", size=48, cutmix=1.0, draws=2, max_images=2)
    with Image.open(out) as grid:
        assert grid.size == (4 + 3 * (48 + 4), 4 + 3 * (16 + 48 + 4))
