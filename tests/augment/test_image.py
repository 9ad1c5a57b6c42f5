"""The per-image stacks: output contract, each op's statistics, overrides, and randomness."""
from __future__ import annotations

import math
import pickle

import albumentations as A
import numpy as np
import pytest
import torch
from PIL import Image
from scipy import ndimage

from transferkit.augment.image import (IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, _compose, describe_train,
                                       eval_transform, parse_overrides, train_transform)
from transferkit.errors import ConfigError, DataError

MEAN = np.array(IMAGENET_DEFAULT_MEAN)
STD = np.array(IMAGENET_DEFAULT_STD)
ONLY = {"crop": None, "hflip": None}  # on top of "light": a deterministic resize + center crop


def pixels(tensor: torch.Tensor) -> np.ndarray:
    """Back to HxWx3 0-255 floats."""
    return (tensor.permute(1, 2, 0).numpy() * STD + MEAN) * 255


def random_image(h: int = 48, w: int = 64, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


# ------------------------------------------------------------------------- output contract

@pytest.mark.parametrize("size, hw", [(32, (32, 32)), ((24, 40), (24, 40))])
@pytest.mark.parametrize("kind", ["train", "eval"])
@pytest.mark.parametrize("as_pil", [False, True])
def test_outputs_are_contiguous_float32_chw_of_the_requested_size(size, hw, kind, as_pil):
    image = random_image()
    transform = train_transform("heavy", size) if kind == "train" else eval_transform(size)
    out = transform(Image.fromarray(image) if as_pil else image)
    assert out.shape == (3, *hw)
    assert out.dtype == torch.float32
    assert out.is_contiguous()


def test_eval_is_deterministic_and_ignores_the_global_seed():
    transform, image = eval_transform(32), random_image()
    torch.manual_seed(1)
    first = transform(image)
    torch.manual_seed(2)
    assert torch.equal(first, transform(image))


def test_eval_resizes_by_crop_pct_then_center_crops_and_normalizes():
    image = random_image(64, 96)
    # floor(32 / 0.5) = 64 = the shorter side: no resize, then the center 32x32
    out = eval_transform(32, crop_pct=0.5)(image)
    expected = (image[16:48, 32:64] / 255.0 - MEAN) / STD
    np.testing.assert_allclose(out.permute(1, 2, 0).numpy(), expected, atol=1e-5)
    # a non-square target covers (floor(24/0.75), floor(48/0.75)) = (32, 64) -> 64x64, crop 24x48
    assert eval_transform((24, 48), crop_pct=0.75)(random_image(64, 64)).shape == (3, 24, 48)


def test_grayscale_palette_and_rgba_pil_images_are_converted_to_rgb():
    transform = eval_transform(16, crop_pct=1.0)
    gray = transform(Image.new("L", (16, 16), 100))
    np.testing.assert_allclose(pixels(gray), 100, atol=1e-3)
    np.testing.assert_allclose(pixels(transform(np.full((16, 16), 100, np.uint8))), 100, atol=1e-3)
    palette = Image.new("P", (16, 16), 0)
    palette.putpalette([10, 20, 30] * 256)
    np.testing.assert_allclose(pixels(transform(palette))[0, 0], [10, 20, 30], atol=1e-3)
    transparent = Image.new("RGBA", (16, 16), (0, 0, 0, 0))  # composited on white
    np.testing.assert_allclose(pixels(transform(transparent)), 255, atol=1e-3)


@pytest.mark.parametrize("bad, message", [
    (Image.new("I;16", (8, 8)), "image mode 'I;16'"),
    (np.zeros((8, 8, 3), np.float32), "dtype float32: give uint8"),
    (np.zeros((8, 8, 4), np.uint8), r"shape \(8, 8, 4\): give HxWx3"),
    (np.zeros((0, 8, 3), np.uint8), "no pixels"),
])
def test_unusable_images_are_rejected_with_the_reason(bad, message):
    with pytest.raises(DataError, match=message):
        eval_transform(8)(bad)


@pytest.mark.parametrize("kwargs, message", [
    ({"size": 0}, "image size 0 is invalid"),
    ({"size": (32,)}, r"image size \(32,\) is invalid"),
    ({"crop_pct": 1.5}, "crop_pct=1.5 is invalid"),
    ({"interpolation": "cubic"}, "interpolation 'cubic' is unknown; valid ones: nearest, bilinear"),
])
def test_bad_eval_settings_raise_config_error(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        eval_transform(**kwargs)


# ----------------------------------------------------------------------- op statistics

def test_flips_happen_at_their_rate_and_independently():
    image = np.zeros((16, 16, 3), np.uint8)
    image[:, 8:, 1] = 255  # green right half: moves left when flipped horizontally
    image[8:, :, 0] = 255  # red bottom half: moves up when flipped vertically
    transform = train_transform("light", 16, crop=None, hflip={"p": 0.3}, vflip={"p": 0.6})
    torch.manual_seed(0)
    draws = [pixels(transform(image)) for _ in range(2000)]
    h = np.array([d[:, 0, 1].mean() > 127 for d in draws])
    v = np.array([d[0, :, 0].mean() > 127 for d in draws])
    # 4 standard deviations of a binomial proportion over 2000 draws
    assert abs(h.mean() - 0.3) < 4 * math.sqrt(0.3 * 0.7 / 2000)
    assert abs(v.mean() - 0.6) < 4 * math.sqrt(0.6 * 0.4 / 2000)
    assert abs((h & v).mean() - 0.18) < 4 * math.sqrt(0.18 * 0.82 / 2000)


def regions(draw: np.ndarray, fill: float) -> tuple[np.ndarray, int]:
    return ndimage.label(np.all(np.abs(draw - fill) < 1, axis=2))


def test_erasing_areas_and_aspect_ratios_stay_in_their_ranges():
    image = np.full((64, 64, 3), 90, np.uint8)
    transform = train_transform("light", 64, **ONLY, erasing={"p": 0.5, "area": (0.05, 0.2),
                                                              "aspect": (0.5, 2.0), "fill": 250})
    torch.manual_seed(0)
    erased, areas, aspects = 0, [], []
    for _ in range(600):
        labels, count = regions(pixels(transform(image)), 250)
        assert count <= 1
        if count:
            erased += 1
            rows, cols = ndimage.find_objects(labels)[0]
            h, w = rows.stop - rows.start, cols.stop - cols.start
            assert (labels > 0).sum() == h * w  # one filled rectangle
            areas.append(h * w / 64 ** 2)
            aspects.append(w / h)
    assert abs(erased / 600 - 0.5) < 4 * math.sqrt(0.25 / 600)
    # sides are rounded to whole pixels: allow half a pixel on each side (about 7% at 14 px)
    assert 0.05 * 0.93 <= min(areas) and max(areas) <= 0.2 * 1.07
    assert 0.5 * 0.93 <= min(aspects) and max(aspects) <= 2.0 * 1.07
    assert max(areas) - min(areas) > 0.1  # spread over the range, not stuck at one size


@pytest.mark.parametrize("fill", ["channel", "pixel"])
def test_erasing_random_fills(fill):
    image = np.full((32, 32, 3), 90, np.uint8)
    transform = train_transform("light", 32, **ONLY, erasing={"p": 1.0, "area": (0.2, 0.3), "fill": fill})
    torch.manual_seed(0)
    draw = pixels(transform(image))
    erased = draw[np.any(np.abs(draw - 90) > 1, axis=2)]
    assert len(erased) >= 0.15 * 32 * 32
    spread = erased.std(axis=0)
    assert (spread < 0.01).all() if fill == "channel" else (spread > 40).all()


def test_cutout_hole_count_and_sizes_stay_in_their_ranges():
    image = np.full((64, 64, 3), 90, np.uint8)
    transform = train_transform("light", 64, **ONLY, cutout={"p": 1.0, "holes": (3, 3), "size": (0.1, 0.2),
                                                             "fill": 250})
    torch.manual_seed(0)
    counts = []
    for _ in range(300):
        labels, count = regions(pixels(transform(image)), 250)
        counts.append(count)
        for rows, cols in ndimage.find_objects(labels):
            if count == 3:  # separate holes: each one's sides are within 10-20% of 64 px
                assert 6 <= rows.stop - rows.start <= 13 and 6 <= cols.stop - cols.start <= 13
    assert max(counts) == 3 and np.mean(np.array(counts) == 3) > 0.6  # fewer only where holes overlap


def test_cutout_mean_fill_is_zero_after_normalization():
    transform = train_transform("light", 32, **ONLY, cutout={"p": 1.0, "holes": (1, 1), "size": (0.5, 0.5)})
    out = transform(np.full((32, 32, 3), 250, np.uint8))
    assert (out.abs() < 0.02).all(dim=0).sum() == 16 * 16


def test_lighting_shifts_colour_along_imagenet_principal_axes():
    transform = train_transform("light", 8, **ONLY, lighting={"p": 1.0, "alpha": 0.1})
    torch.manual_seed(0)
    shifts = np.array([pixels(transform(np.full((8, 8, 3), 128, np.uint8)))[0, 0] - 128 for _ in range(3000)])
    first_axis = np.array([-0.5675, -0.5808, -0.5836])  # eigenvalue 0.2175
    third_axis = np.array([0.4009, -0.8140, 0.4203])  # eigenvalue 0.0045
    assert (shifts @ first_axis).std() == pytest.approx(255 * 0.1 * 0.2175, rel=0.1)
    assert (shifts @ third_axis).std() < 0.2


def test_affine_rotation_is_applied():
    image = np.zeros((16, 16, 3), np.uint8)
    image[:, 8:] = 255
    transform = train_transform("light", 16, **ONLY, affine={"p": 1.0, "rotate": (90, 90), "scale": (1, 1)})
    draw = pixels(transform(image))[..., 0]
    assert abs(draw[:8].mean() - draw[8:].mean()) > 200  # the bright half is now on top or bottom
    assert abs(draw[:, :8].mean() - draw[:, 8:].mean()) < 20


def test_brightness_jitter_stays_in_its_factor_range():
    transform = train_transform("light", 8, **ONLY, color={"p": 1.0, "brightness": 0.5, "contrast": 0.0,
                                                           "saturation": 0.0, "hue": 0.0})
    torch.manual_seed(0)
    values = np.array([pixels(transform(np.full((8, 8, 3), 100, np.uint8))).mean() for _ in range(500)])
    assert values.min() >= 50 - 1 and values.max() <= 150 + 1
    assert values.min() < 60 and values.max() > 140


# ----------------------------------------------------------------------------- overrides

def test_parse_overrides_reads_cli_strings():
    assert parse_overrides(["erasing.p=0.5", "hflip.p=0", "crop.scale=0.3,1.0", "noise=off", "vflip=on",
                            "erasing.fill=pixel"]) == {
        "erasing": {"p": 0.5, "fill": "pixel"}, "hflip": {"p": 0}, "crop": {"scale": (0.3, 1.0)},
        "noise": None, "vflip": True}
    assert parse_overrides(["noise.per_channel=false"]) == {"noise": {"per_channel": False}}


@pytest.mark.parametrize("item, message", [
    ("erasing.p", "'erasing.p' is malformed: write op.setting=value"),
    ("erasing.p=", "is malformed"),
    ("=1", "is malformed"),
    ("erasing.p.x=1", "is malformed"),
    ("erasing=maybe", "erasing= takes on or off"),
    ("blur.p=1", "unknown augmentation 'blur'; valid ones: crop, hflip, vflip, affine, color, lighting, noise"),
    ("erasing.prob=1", "unknown setting erasing.prob; valid for erasing: p, area, aspect, fill"),
])
def test_parse_overrides_rejects_malformed_items(item, message):
    with pytest.raises(ConfigError, match=message):
        parse_overrides([item])


def test_parse_overrides_rejects_contradictions():
    with pytest.raises(ConfigError, match="contradicts"):
        parse_overrides(["noise=off", "noise.p=0.3"])


@pytest.mark.parametrize("overrides, message", [
    ({"blur": {"p": 1}}, "unknown augmentation 'blur'; valid ones: crop, hflip"),
    ({"erasing": {"prob": 0.5}}, "unknown setting erasing.prob; valid for erasing: p, area, aspect, fill"),
    ({"hflip": {"p": 1.5}}, r"hflip.p=1.5 is invalid: give a number in \[0, 1\]"),
    ({"erasing": {"area": (0.5, 0.1)}}, r"erasing.area=\(0.5, 0.1\) is invalid: give two numbers lo,hi"),
    ({"crop": {"scale": 0.5}}, "crop.scale=0.5 is invalid"),
    ({"cutout": {"holes": (1.5, 2)}}, "give two integers"),
    ({"erasing": {"fill": "noise"}}, "give a pixel value 0-255 or one of mean, channel, pixel"),
    ({"affine": {"border": "wrap"}}, "give one of reflect, constant"),
    ({"noise": 0.3}, "give a dict of settings"),
])
def test_bad_overrides_raise_config_error_naming_the_key(overrides, message):
    with pytest.raises(ConfigError, match=message):
        train_transform("default", 32, **overrides)


def test_unknown_preset_is_a_config_error():
    with pytest.raises(ConfigError, match="unknown augmentation preset 'wild'; valid ones: light, default, heavy"):
        train_transform("wild")


def test_describe_train_resolves_overrides_into_plain_data_that_rebuilds_the_stack():
    described = describe_train("heavy", noise=None, vflip=True, erasing={"p": 0.5})
    assert described["preset"] == "heavy"
    assert described["noise"] is None
    assert described["vflip"] == {"p": 0.5}
    assert described["erasing"] == {"p": 0.5, "area": [0.02, 1 / 3], "aspect": [0.3, 3.3], "fill": "pixel"}
    rebuilt = train_transform(size=32, **described)
    assert {k: v for k, v in rebuilt.description.items() if k in described} == described


def test_the_backend_rejects_1x_style_parameter_names():
    # albumentations 1.x's GaussNoise(var_limit=...): 2.x only warns unless the Compose is strict
    with pytest.warns(UserWarning), pytest.raises(ValueError, match="var_limit"):
        _compose([A.GaussNoise(var_limit=(10.0, 50.0), p=1.0)])


# ---------------------------------------------------------------------------- randomness

def test_a_fixed_torch_seed_reproduces_draws_in_the_main_process():
    transform, image = train_transform("heavy", 32), random_image()
    torch.manual_seed(3)
    first = [transform(image) for _ in range(4)]
    torch.manual_seed(3)
    again = [transform(image) for _ in range(4)]
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    assert not torch.equal(first[0], first[1])


def test_pickled_copies_draw_the_same_under_the_same_seed():
    transform, image = train_transform("heavy", 32), random_image()
    clone = pickle.loads(pickle.dumps(transform))
    torch.manual_seed(5)
    a = transform(image)
    torch.manual_seed(5)
    assert torch.equal(a, clone(image))


class SameImage(torch.utils.data.Dataset):
    def __init__(self, transform, n=8):
        self.transform, self.n, self.image = transform, n, random_image()

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        return self.transform(self.image)


def epochs(transform, seed, count=2):
    """Outputs of `count` epochs of a plain DataLoader with 2 workers and no worker_init_fn."""
    torch.manual_seed(seed)
    loader = torch.utils.data.DataLoader(SameImage(transform), batch_size=2, num_workers=2)
    return [torch.cat(list(loader)) for _ in range(count)]


def test_plain_dataloader_workers_and_epochs_draw_differently_and_a_seed_reproduces_them():
    transform = train_transform("default", 32)
    first = epochs(transform, seed=0)
    flat = [x for epoch in first for x in epoch]  # worker 0 made batches 0 and 2, worker 1 batches 1 and 3
    for i in range(len(flat)):
        for j in range(i):
            assert not torch.equal(flat[i], flat[j]), f"outputs {j} and {i} are identical"
    again = epochs(transform, seed=0)
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    other = epochs(transform, seed=1)
    assert not torch.equal(first[0], other[0])
