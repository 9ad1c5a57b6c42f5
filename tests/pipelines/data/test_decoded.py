"""The decode rule (pictures at the shorter side training needs) and the cache that keeps them."""
from __future__ import annotations

import multiprocessing
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from transferkit.augment.image import train_transform
from transferkit.pipelines.data import decoded
from transferkit.pipelines.data.datamodule import FitDataModule
from transferkit.pipelines.data.datasets import Sample
from transferkit.pipelines.data.decoded import DecodeCache, DecodeRule, short_side_for, where_to_keep
from transferkit.pipelines.data.images import load_rgb


def photo(path: Path, w: int, h: int, seed: int = 0, orientation: int | None = None) -> Path:
    yy, xx = np.mgrid[0:h, 0:w]
    rng = np.random.default_rng(seed)
    arr = np.stack([xx * 255 // max(1, w - 1), yy * 255 // max(1, h - 1), np.full_like(xx, 90)], -1)
    arr = np.clip(arr + rng.integers(-20, 20, arr.shape), 0, 255).astype(np.uint8)
    kw = {}
    if orientation is not None:
        exif = Image.Exif()
        exif[0x0112] = orientation
        kw["exif"] = exif
    Image.fromarray(arr).save(path, quality=92, **kw)
    return path


def test_the_stored_side_covers_the_largest_crop_and_the_eval_resize():
    assert short_side_for((224, 224), 0.875) == 258  # 1.15 x 224 = 257.6; the eval resize is 256
    assert short_side_for((224, 224), 0.5) == 448     # a small crop_pct resizes to more than 1.15x
    assert short_side_for((32, 48), 0.95) == 56


def test_a_large_photo_decodes_to_the_shorter_side_and_its_header_says_so(tmp_path):
    rule = DecodeRule(40)
    big = photo(tmp_path / "big.jpg", 400, 300)  # more than twice the side: draft mode
    mid = photo(tmp_path / "mid.jpg", 120, 60)   # resized only
    small = photo(tmp_path / "small.jpg", 30, 20)
    assert rule.load(big).shape == (40, 53, 3) and rule.shape(big) == (40, 53)
    assert rule.load(mid).shape == (40, 80, 3) and rule.shape(mid) == (40, 80)
    assert np.array_equal(rule.load(small), np.asarray(load_rgb(small)))  # already small: untouched
    # draft + resize against a full decode resized the same way: the same picture, within JPEG noise
    full = np.asarray(load_rgb(big).resize((53, 40), Image.BILINEAR)).astype(int)
    assert np.abs(rule.load(big).astype(int) - full).mean() < 4
    assert DecodeRule(None).load(big).shape == (300, 400, 3)


def test_exif_rotation_is_applied_before_the_shape_is_promised(tmp_path):
    turned = photo(tmp_path / "turned.jpg", 200, 100, orientation=6)  # stored landscape, shown portrait
    rule = DecodeRule(40)
    assert rule.shape(turned) == (80, 40)
    assert rule.load(turned).shape == (80, 40, 3)
    assert rule.shape(tmp_path / "missing.jpg") is None


def _read_all(cache: DecodeCache, paths: list[str]) -> None:
    for i, p in enumerate(paths):
        cache.get(i, p)


@pytest.mark.parametrize("where", ["memory", "disk"])
def test_pictures_a_forked_worker_decodes_are_served_from_the_cache_after_the_files_are_gone(tmp_path, where):
    paths = [str(photo(tmp_path / f"{i}.jpg", 90 + 10 * i, 70, seed=i)) for i in range(4)]
    rule = DecodeRule(32)
    expected = [rule.load(p) for p in paths]
    cache = DecodeCache(paths, rule, [rule.shape(p) for p in paths],
                        file=tmp_path / "cache" / "decoded.u8" if where == "disk" else None)
    worker = multiprocessing.get_context("fork").Process(target=_read_all, args=(cache, paths))
    worker.start()
    worker.join(30)
    assert worker.exitcode == 0 and cache.filled() == 4
    for p in paths:
        Path(p).unlink()
    for i, p in enumerate(paths):
        got = cache.get(i, p)
        assert np.array_equal(got, expected[i]) and not got.flags.writeable
    if where == "disk":  # a spawned worker gets the file, not a copy of the pictures
        again = pickle.loads(pickle.dumps(cache))
        assert again.filled() == 4 and np.array_equal(again.get(2, paths[2]), expected[2])


def test_a_picture_that_breaks_its_header_promise_is_decoded_each_time_not_cached(tmp_path):
    p = str(photo(tmp_path / "a.jpg", 100, 50))
    cache = DecodeCache([p], DecodeRule(20), [(21, 40)])
    assert cache.get(0, p).shape == (20, 40, 3)
    assert cache.get(0, p).shape == (20, 40, 3) and cache.filled() == 0


def test_an_unreadable_header_is_never_cached_and_fails_when_read(tmp_path):
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"not an image")
    cache = DecodeCache([str(bad)], DecodeRule(20), [None])
    with pytest.raises(Exception):
        cache.get(0, str(bad))
    assert cache.filled() == 0


def test_augmentation_works_on_the_read_only_cached_picture():
    picture = np.zeros((40, 60, 3), np.uint8)
    picture.flags.writeable = False
    out = train_transform("heavy", size=32)(picture)
    assert out.shape == (3, 32, 32)


def test_the_cache_stays_in_memory_when_it_fits_and_moves_to_disk_or_off_when_not(tmp_path, monkeypatch):
    assert where_to_keep("auto", 1000, tmp_path, workers=2) == "memory"
    assert where_to_keep("disk", 1000, tmp_path, workers=2) == "disk"
    monkeypatch.setattr(decoded, "memory_budget", lambda: 10)
    assert where_to_keep("memory", 1000, tmp_path, workers=2) == "disk"
    assert where_to_keep("auto", 1000, tmp_path, workers=2) == "disk"
    assert where_to_keep("auto", 1 << 62, tmp_path, workers=2) == "off"  # no disk has that


def test_the_second_epoch_reads_every_training_picture_from_the_cache(tmp_path):
    samples = [Sample(str(photo(tmp_path / f"{i}.jpg", 80, 64, seed=i)), i % 2) for i in range(8)]
    tf = train_transform("light", size=24)
    dm = FitDataModule(samples[:6], samples[6:], tf, tf, batch_size=3, num_workers=2, run_path=tmp_path,
                       few_cores=True)
    dm.set_decoding(DecodeRule(28), "auto")
    loader = dm.train_dataloader()
    assert loader.num_workers == 2  # the workers decode, into the shared cache
    first = torch.cat([i for _, _, i in loader])
    assert sorted(first.tolist()) == list(range(6))
    assert dm.decode_record()["kept"] == "memory" and dm.train_ds.cache.filled() == 6
    for s in samples[:6]:
        Path(s.path).unlink()  # what epoch 2 reads can only come from the cache
    loader = dm.train_dataloader()
    assert loader.num_workers == 0  # every picture cached, the CPU few-cored: loaded in-process
    second = torch.cat([i for _, _, i in loader])
    assert sorted(second.tolist()) == list(range(6))
    dm.few_cores = False
    assert dm.train_dataloader().num_workers == 2
    assert dm.train_ds.failures.entries() == []
    dm.set_decoding(DecodeRule(None), "auto")  # a full-size rule is never cached
    assert dm.decode_record()["kept"] is None and dm.train_ds.cache is None
