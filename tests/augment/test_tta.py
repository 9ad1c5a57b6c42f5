"""Test-time augmentation: views, their positions, one forward pass, merges, ensembles."""
from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from PIL import Image
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from torch import nn

from transferkit.augment.tta import (
    TTA,
    View,
    merge_probs,
    parse_views,
    predict_proba_ensemble,
    prepared_size,
    tta_prepare,
)
from transferkit.augment.image import eval_transform
from transferkit.errors import ConfigError


def _coords(batch: int, height: int, width: int) -> torch.Tensor:
    """A batch whose channel 0 holds the row, channel 1 the column, channel 2 the sample index."""
    rows = torch.arange(height, dtype=torch.float32)[:, None].expand(height, width)
    cols = torch.arange(width, dtype=torch.float32)[None, :].expand(height, width)
    return torch.stack(
        [torch.stack([rows, cols, torch.full((height, width), float(b))]) for b in range(batch)]
    )


def _small_net(seed: int, classes: int = 5) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(3, 6, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(6, classes)
    ).eval()


class Counting(nn.Module):
    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        self.batch_sizes: list[int] = []

    def forward(self, x):
        self.batch_sizes.append(x.shape[0])
        return self.model(x)


# ----------------------------------------------------------------------------- specs


def test_parse_views_counts_and_order():
    assert parse_views("plain") == (View(),)
    assert parse_views("hflip") == (View(), View(flip=True))
    assert [v.position for v in parse_views("five-crop")] == [
        "top-left", "top-right", "bottom-left", "bottom-right", "center"
    ]
    ten = parse_views("ten-crop")
    assert len(ten) == 10 and [v.flip for v in ten] == [False] * 5 + [True] * 5
    assert parse_views("five-crop+hflip") == ten
    assert parse_views(" Ten_Crop ") == ten
    combo = parse_views("hflip+multiscale:0.9,1.0,1.1")
    assert [(v.scale, v.flip) for v in combo] == [
        (0.9, False), (1.0, False), (1.1, False), (0.9, True), (1.0, True), (1.1, True)
    ]
    assert [v.scale for v in parse_views("multiscale")] == [0.9, 1.0, 1.1]
    # the center crop named twice counts once, so it does not weigh double in the merge
    assert len(parse_views("plain+five-crop")) == 5
    assert len(parse_views("five-crop+multiscale:1.0,1.2")) == 6


@pytest.mark.parametrize(
    "spec, message",
    [
        ("ten-crops", "unknown TTA view 'ten-crops' in 'ten-crops'; valid views: plain, hflip, five-crop, "
                      "ten-crop, multiscale[:s1,s2,...]"),
        ("hflip+rotate", "unknown TTA view 'rotate' in 'hflip+rotate'"),
        ("", "empty TTA view spec ''"),
        ("multiscale:0.9,big", "bad multiscale scale 'big' in 'multiscale:0.9,big'"),
        ("multiscale:0,1", "bad multiscale scale '0'"),
        ("hflip:2", "TTA view 'hflip' takes no ':' argument"),
    ],
)
def test_bad_specs_raise_config_error(spec, message):
    with pytest.raises(ConfigError) as info:
        parse_views(spec)
    assert str(info.value).startswith(message)
    assert "\n" not in str(info.value)


def test_bad_merge_and_size_raise_config_error():
    with pytest.raises(ConfigError, match="unknown TTA merge 'median'; use one of mean, geometric, max"):
        TTA("plain", 32, merge="median")
    with pytest.raises(ConfigError, match="unknown TTA merge 'vote'"):
        merge_probs(torch.ones(1, 1, 2) / 2, "vote")
    with pytest.raises(ConfigError, match=r"TTA input \(20, 20\) is smaller than the model input \(32, 32\)"):
        TTA("plain", 32).views(torch.zeros(1, 3, 20, 20))
    with pytest.raises(ConfigError, match=r"crop_pct=1.5 is invalid"):
        tta_prepare(32, IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, crop_pct=1.5)


# ----------------------------------------------------------------------------- views


def test_ten_crops_positions_and_sizes():
    # region 40 x 44, crops 32 x 32: corners at rows {0, 8}, columns {0, 12}; center at (4, 6)
    x = _coords(2, 40, 44)
    tta = TTA("ten-crop", size=32)
    views = tta.views(x)
    assert views.shape == (20, 3, 32, 32)
    origins = [(0, 0), (0, 12), (8, 0), (8, 12), (4, 6)]
    for v, view in enumerate(tta.view_list):
        top, left = origins[v % 5]
        for b in range(2):
            crop = views[v * 2 + b]  # view-major layout
            assert crop[2].unique().tolist() == [float(b)]
            first, last = (left + 31, left) if view.flip else (left, left + 31)
            assert crop[:2, 0, 0].tolist() == [top, first], (view, b)
            assert crop[:2, -1, -1].tolist() == [top + 31, last], (view, b)


def test_multiscale_views_cover_the_documented_regions():
    x = _coords(1, 40, 40)
    tta = TTA("multiscale:0.5,1.0,2.0", size=32)
    zoom_out, plain, zoom_in = tta.views(x)
    assert torch.equal(plain, TTA("plain", 32).views(x)[0])
    # scale 2: the centered 16 x 16 crop (rows/columns 12..27) resized to 32
    assert zoom_in[0].min() > 11.5 and zoom_in[0].max() < 27.5
    assert zoom_in[0, 16, 16] == pytest.approx(20.0, abs=0.6)
    # scale 0.5: a 64 x 64 crop reaches 12 pixels beyond the region, filled with zeros
    assert torch.all(zoom_out[:, :5, :] == 0) and torch.all(zoom_out[:, :, :5] == 0)
    assert zoom_out[0].max() > 30


def test_symmetric_model_gives_same_probabilities_with_hflip():
    torch.manual_seed(0)
    model = _small_net(1)
    conv = model[0]
    with torch.no_grad():
        conv.weight.copy_((conv.weight + conv.weight.flip(-1)) / 2)
    x = torch.randn(4, 3, 40, 40)
    plain = TTA("plain", 32).predict_proba(model, x)
    flipped = TTA("hflip", 32).predict_proba(model, x)
    torch.testing.assert_close(flipped, plain, atol=1e-6, rtol=0)

    # the same check fails for a model that is not symmetric, so hflip does change the input
    asym = _small_net(2)
    assert not torch.allclose(
        TTA("hflip", 32).predict_proba(asym, x), TTA("plain", 32).predict_proba(asym, x), atol=1e-4
    )


# ----------------------------------------------------------------------------- preparing images


def _photo(height: int, width: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width]
    smooth = np.stack([yy * 3 % 256, xx * 5 % 256, (xx + yy) * 2 % 256], axis=-1)
    noise = rng.integers(0, 40, size=(height, width, 3))
    return Image.fromarray(np.clip(smooth + noise, 0, 255).astype(np.uint8))


@pytest.mark.parametrize(
    "image_hw, size, crop_pct, interpolation",
    [
        ((50, 70), 32, 0.875, "bilinear"),
        ((71, 45), 32, 0.875, "bicubic"),
        ((60, 79), 33, 0.9, "bilinear"),  # two rounded halvings would be a pixel off
        ((90, 61), 32, 0.95, "bicubic"),
        ((60, 80), (32, 40), 0.875, "bilinear"),
    ],
)
def test_plain_view_equals_the_eval_transform(image_hw, size, crop_pct, interpolation):
    image = _photo(*image_hw)
    reference = eval_transform(size, IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, crop_pct, interpolation)(image)
    prepare = tta_prepare(size, IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, crop_pct, interpolation)
    prepared = prepare(image)
    assert prepared.dtype == torch.float32 and prepared.is_contiguous()
    assert tuple(prepared.shape) == (3, *prepare.region)
    assert all(0 <= r - p <= 1 for r, p in zip(prepared_size(size, crop_pct), prepare.region))
    plain = TTA("plain", size).views(prepared[None])[0]
    torch.testing.assert_close(plain, reference, atol=0, rtol=0)


def test_prepare_accepts_arrays_and_pickles():
    image = _photo(48, 60)
    prepare = tta_prepare(32, IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD)
    from_pil = prepare(image)
    assert tuple(from_pil.shape) == (3, 36, 36)  # floor(32 / 0.875), as the eval transform
    torch.testing.assert_close(prepare(np.asarray(image)), from_pil, atol=0, rtol=0)
    torch.testing.assert_close(pickle.loads(pickle.dumps(prepare))(image), from_pil, atol=0, rtol=0)
    batch = torch.stack([prepare(_photo(40, 90)), prepare(_photo(77, 41))])
    assert batch.shape == (2, 3, 36, 36)


# ----------------------------------------------------------------------------- merging


def test_merge_modes_match_hand_computed_values():
    probs = torch.tensor([[[0.5, 0.3, 0.2]], [[0.1, 0.6, 0.3]]])
    torch.testing.assert_close(merge_probs(probs, "mean"), torch.tensor([[0.3, 0.45, 0.25]]))
    torch.testing.assert_close(
        merge_probs(probs, "geometric"), torch.tensor([[0.25045008, 0.47519561, 0.27435431]])
    )
    torch.testing.assert_close(merge_probs(probs, "max"), torch.tensor([[0.5, 0.6, 0.3]]) / 1.4)


def test_geometric_merge_survives_a_zero_probability():
    probs = torch.tensor([[[1.0, 0.0]], [[0.5, 0.5]]])
    merged = merge_probs(probs, "geometric")
    assert torch.isfinite(merged).all()
    torch.testing.assert_close(merged, torch.tensor([[1.0, 0.0]]))


# ----------------------------------------------------------------------------- forward passes


def test_ten_crop_is_one_forward_pass():
    model = Counting(timm.create_model("test_resnet", pretrained=False, num_classes=3).eval())
    x = torch.randn(3, 3, 40, 40)
    probs = TTA("ten-crop", 32).predict_proba(model, x)
    assert model.batch_sizes == [30]
    assert probs.shape == (3, 3)
    torch.testing.assert_close(probs.sum(-1), torch.ones(3))

    model.batch_sizes.clear()
    chunked = TTA("ten-crop", 32, max_batch=12).predict_proba(model, x)
    assert model.batch_sizes == [12, 12, 6]
    torch.testing.assert_close(chunked, probs, atol=1e-6, rtol=0)


@pytest.mark.parametrize("merge", ["mean", "geometric", "max"])
def test_snapshots_times_ten_crop_merge_over_all_twenty_views(merge):
    models = [Counting(_small_net(3)), Counting(_small_net(4))]
    x = torch.randn(2, 3, 40, 40)
    tta = TTA("ten-crop", 32, merge=merge)
    got = predict_proba_ensemble(models, x, tta)
    assert [m.batch_sizes for m in models] == [[20], [20]]

    views = tta.views(x)
    each = [
        torch.softmax(m.model(views[v * 2:(v + 1) * 2]), -1) for m in models for v in range(10)
    ]
    expected = merge_probs(torch.stack(each), merge)
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=0)
    if merge == "max":  # a merge of per-model merges would differ: the rule spans all 20 views
        nested = merge_probs(torch.stack([tta.predict_proba(m, x) for m in models]), "max")
        assert not torch.allclose(got, nested, atol=1e-5)


@pytest.mark.parametrize("merge", ["mean", "geometric", "max"])
def test_ensemble_of_identical_models_equals_the_single_model(merge):
    model = _small_net(5)
    x = torch.randn(3, 3, 40, 40)
    tta = TTA("hflip+multiscale:0.9,1.0,1.1", 32, merge=merge)
    single = tta.predict_proba(model, x)
    torch.testing.assert_close(predict_proba_ensemble([model, model, model], x, tta), single)
    # without TTA the input is used as it is, one view per model
    plain = torch.softmax(model(x), -1)
    torch.testing.assert_close(predict_proba_ensemble([model, model], x), plain.detach())


SHARED = Path(__file__).resolve().parents[2] / ".." / "shared"


@pytest.mark.real
def test_plain_view_equals_timm_eval_transform_on_real_photos():
    root = SHARED / "data" / "hymenoptera"
    if not root.is_dir():
        pytest.skip("../shared/data/hymenoptera is absent")
    # every 20th photo, plus the odd ones out (a .jpeg, a palette-mode .gif)
    files = sorted(root.glob("*/*/*.jpg"))[::20] + sorted(root.glob("*/*/*.jpeg")) + sorted(
        root.glob("*/*/*.gif")
    )
    assert len(files) >= 10
    reference = eval_transform(224, IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, 0.875, "bilinear")
    prepare = tta_prepare(224, IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD)
    for file in files:
        with Image.open(file) as image:
            image = image.convert("RGB")
            plain = TTA("plain", 224).views(prepare(image)[None])[0]
            torch.testing.assert_close(plain, reference(image), atol=1e-5, rtol=0, msg=str(file))


@pytest.mark.parametrize("size,crop_pct,interpolation", [(32, 0.875, "bilinear"), (50, 0.875, "bicubic"),
                                                          (41, 0.9, "bilinear")])
def test_the_plain_view_is_fit_eval_transform_to_the_bit(size, crop_pct, interpolation):
    from PIL import Image

    from transferkit.augment.image import eval_transform
    from transferkit.augment.tta import TTA
    from transferkit.backbones.factory import DataConfig
    from transferkit.augment.tta import tta_prepare

    dc = DataConfig((3, size, size), (0.485, 0.456, 0.406), (0.229, 0.224, 0.225), interpolation, crop_pct)
    region = tta_prepare(size, dc.mean, dc.std, crop_pct, interpolation)
    fit_eval = eval_transform(size, dc.mean, dc.std, crop_pct, interpolation)
    rng = np.random.default_rng(0)
    for h, w in [(97, 61), (60, 203), (size, size), (301, 300)]:
        image = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
        x = region(image)
        assert x.shape[-2:] == region.region and min(region.region) >= size
        assert torch.equal(TTA("plain", size=size).views(x[None])[0], fit_eval(image)), (h, w)
