"""Per-image train and eval stacks: presets of named operations, albumentations underneath.

(lines: one table of ops with their checks, the presets and the transform that runs them belong
together; split, each would need the others.)

Every stack takes a numpy HxWx3 uint8 RGB array (HxW and HxWx1 grayscale are replicated) or a
PIL image (converted to RGB; transparency composited on white) and returns a contiguous,
normalized 3xHxW float32 tensor. albumentations never shows through this API, so the backend
can change here alone.

Operations, in the order they run (geometry first, so everything after the crop works at output
resolution and costly pixel operations touch ``size x size`` pixels only):

- ``crop``: random resized crop, area fraction ``scale`` and aspect ``ratio`` (w/h, log-uniform)
  ranges; switched off: resize to cover ``size`` and center crop. Downscaling antialiases
  through a Gaussian pyramid (the eval stack, where cost matters less, uses area interpolation).
- ``hflip`` / ``vflip``: horizontal / vertical flip.
- ``affine``: rotation (``rotate``, degrees) and zoom (``scale``) ranges; ``border`` reflect or
  constant (black).
- ``color``: colour jitter; ``brightness``, ``contrast``, ``saturation`` multiply by a factor in
  [1 - x, 1 + x], ``hue`` shifts by up to x of a turn.
- ``lighting``: AlexNet PCA lighting, one RGB shift per image along ImageNet's principal colour
  axes, weights ~ N(0, ``alpha``) times the eigenvalues. A shift of the whole image, it is applied
  with the normalization, last (in float, unclipped, as AlexNet did), so it also shifts a
  cutout or erasing fill; albumentations' FancyPCA was considered: it recomputes the PCA of
  every image instead of using ImageNet's.
- ``noise``: additive Gaussian noise, ``std`` range as a fraction of 255, ``per_channel``.
- ``cutout``: ``holes`` (count range) of side ``size`` (fraction of the image side), ``fill`` a
  0-255 value or ``mean`` (the normalization mean, i.e. zero after normalizing).
- ``erasing``: Random Erasing (Zhong et al.), one rectangle of ``area`` fraction and ``aspect``
  (w/h) ranges; ``fill`` a 0-255 value, ``mean``, ``channel`` (one random colour) or ``pixel``
  (random per pixel).

The presets (p: probability; ranges lo-hi; off: not in the stack):

=========  ====================  ==============================  ===================================
op         light                 default                         heavy
=========  ====================  ==============================  ===================================
crop       scale 0.35-1,         scale 0.2-1, ratio 3/4-4/3      scale 0.08-1, ratio 3/4-4/3
           ratio 3/4-4/3
hflip      p 0.5                 p 0.5                           p 0.5
vflip      off                   off                             off
affine     off                   off                             p 0.5, rotate -20-20, scale
                                                                 0.85-1.15, reflect
color      off                   p 0.8, brightness / contrast /  p 0.8, brightness / contrast /
                                 saturation 0.3, hue 0.05        saturation 0.4, hue 0.1
lighting   off                   p 1, alpha 0.1                  p 1, alpha 0.1
noise      off                   off                             p 0.25, std 0.02-0.08, per channel
cutout     off                   off                             p 0.25, 1-3 holes, side 0.1-0.2,
                                                                 fill mean
erasing    off                   off                             p 0.25, area 0.02-1/3, aspect
                                                                 0.3-3.3, fill pixel
=========  ====================  ==============================  ===================================

Every op has a probability ``p`` except ``crop``. Overrides switch an op off (``None``/``False``),
on with its default settings (``True``) or change some of its parameters (a dict).

Randomness: each call of a train stack draws two 64-bit numbers from torch's global generator and
seeds the backend's generators with them (so, like torchvision's transforms, it advances torch's
generator). Inside a DataLoader worker torch is seeded with
``base_seed + worker_id`` (base_seed drawn anew each epoch), so workers and epochs differ with no
worker_init_fn, and ``torch.manual_seed`` reproduces everything, with or without workers. The
alternative, keeping albumentations' own generator, repeats the same draws in every worker
because each worker receives a copy of it.
"""
from __future__ import annotations

import copy
import math
import random
from collections.abc import Mapping, Sequence
from typing import Any

import albumentations as A
import cv2
import numpy as np
import torch
from PIL import Image
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

from transferkit.errors import ConfigError, DataError

__all__ = [
    "IMAGENET_DEFAULT_MEAN", "IMAGENET_DEFAULT_STD", "OPS", "PRESETS", "ImageTransform",
    "describe_train", "eval_transform", "parse_overrides", "train_transform",
]

_INTERPOLATIONS = {"nearest": cv2.INTER_NEAREST, "bilinear": cv2.INTER_LINEAR,
                   "bicubic": cv2.INTER_CUBIC, "lanczos": cv2.INTER_LANCZOS4}
CV2_INTERPOLATIONS = _INTERPOLATIONS  # for other modules that resize with OpenCV the same way
_BORDERS = {"reflect": cv2.BORDER_REFLECT_101, "constant": cv2.BORDER_CONSTANT}

# Defaults of each op, used when an override switches on an op its preset leaves off.
OPS: dict[str, dict[str, Any]] = {
    "crop": {"scale": (0.08, 1.0), "ratio": (3 / 4, 4 / 3)},
    "hflip": {"p": 0.5},
    "vflip": {"p": 0.5},
    "affine": {"p": 0.5, "rotate": (-15.0, 15.0), "scale": (0.9, 1.1), "border": "reflect"},
    "color": {"p": 0.8, "brightness": 0.4, "contrast": 0.4, "saturation": 0.4, "hue": 0.1},
    "lighting": {"p": 1.0, "alpha": 0.1},
    "noise": {"p": 0.5, "std": (0.02, 0.1), "per_channel": True},
    "cutout": {"p": 0.5, "holes": (1, 1), "size": (0.1, 0.25), "fill": "mean"},
    "erasing": {"p": 0.25, "area": (0.02, 1 / 3), "aspect": (0.3, 3.3), "fill": "pixel"},
}

PRESETS: dict[str, dict[str, dict[str, Any] | None]] = {
    "light": {"crop": {"scale": (0.35, 1.0), "ratio": (3 / 4, 4 / 3)}, "hflip": {"p": 0.5}},
    "default": {
        "crop": {"scale": (0.2, 1.0), "ratio": (3 / 4, 4 / 3)},
        "hflip": {"p": 0.5},
        # a light hue shift: photos tolerate it, and albumentations makes it cheap
        "color": {"p": 0.8, "brightness": 0.3, "contrast": 0.3, "saturation": 0.3, "hue": 0.05},
        "lighting": {"p": 1.0, "alpha": 0.1},
    },
    "heavy": {
        "crop": {"scale": (0.08, 1.0), "ratio": (3 / 4, 4 / 3)},
        "hflip": {"p": 0.5},
        "affine": {"p": 0.5, "rotate": (-20.0, 20.0), "scale": (0.85, 1.15), "border": "reflect"},
        "color": {"p": 0.8, "brightness": 0.4, "contrast": 0.4, "saturation": 0.4, "hue": 0.1},
        "lighting": {"p": 1.0, "alpha": 0.1},
        "noise": {"p": 0.25, "std": (0.02, 0.08), "per_channel": True},
        "cutout": {"p": 0.25, "holes": (1, 3), "size": (0.1, 0.2), "fill": "mean"},
        "erasing": {"p": 0.25, "area": (0.02, 1 / 3), "aspect": (0.3, 3.3), "fill": "pixel"},
    },
}

# ImageNet RGB covariance (pixels in [0, 1]), as published with AlexNet's lighting noise.
_EIGVAL = np.array([0.2175, 0.0188, 0.0045])
_EIGVEC = np.array([[-0.5675, 0.7192, 0.4009],
                    [-0.5808, -0.0045, -0.8140],
                    [-0.5836, -0.6948, 0.4203]])
_PCG_INC = np.random.PCG64(0).state["state"]["inc"]
_MASK64 = (1 << 64) - 1


# ---------------------------------------------------------------- validation of op settings

def _bad(key: str, value: Any, need: str) -> ConfigError:
    return ConfigError(f"augmentation setting {key}={value!r} is invalid: {need}")


def _number(key: str, value: Any, lo: float, hi: float) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not lo <= value <= hi:
        raise _bad(key, value, f"give a number in [{lo:g}, {hi:g}]")
    return float(value)


def _range(key: str, value: Any, lo: float, hi: float, integer: bool = False) -> tuple:
    ok = (isinstance(value, (tuple, list)) and len(value) == 2
          and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value))
    if ok and integer:
        ok = all(float(v).is_integer() for v in value)
    if not ok or not lo <= value[0] <= value[1] <= hi:
        kind = "integers" if integer else "numbers"
        raise _bad(key, value, f"give two {kind} lo,hi with {lo:g} <= lo <= hi <= {hi:g}")
    return (int(value[0]), int(value[1])) if integer else (float(value[0]), float(value[1]))


def _fill(key: str, value: Any, words: tuple[str, ...]) -> float | str:
    if isinstance(value, str) and value in words:
        return value
    if isinstance(value, (int, float)) and not isinstance(value, bool) and 0 <= value <= 255:
        return float(value)
    raise _bad(key, value, f"give a pixel value 0-255 or one of {', '.join(words)}")


def _check_param(op: str, name: str, value: Any) -> Any:
    key = f"{op}.{name}"
    if name == "p":
        return _number(key, value, 0.0, 1.0)
    if op == "crop":
        return _range(key, value, 1e-6, 1.0) if name == "scale" else _range(key, value, 1e-3, 1e3)
    if op == "affine":
        if name == "border":
            if value not in _BORDERS:
                raise _bad(key, value, f"give one of {', '.join(_BORDERS)}")
            return value
        return _range(key, value, -180.0, 180.0) if name == "rotate" else _range(key, value, 0.05, 20.0)
    if op == "color":
        return _number(key, value, 0.0, 0.5) if name == "hue" else _number(key, value, 0.0, 1.0)
    if op == "lighting":
        return _number(key, value, 0.0, 10.0)
    if op == "noise":
        if name == "per_channel":
            if not isinstance(value, bool):
                raise _bad(key, value, "give true or false")
            return value
        return _range(key, value, 0.0, 1.0)
    if op == "cutout":
        if name == "fill":
            return _fill(key, value, ("mean",))
        return _range(key, value, 1, 1000, integer=True) if name == "holes" else _range(key, value, 0.0, 1.0)
    if op == "erasing":
        if name == "fill":
            return _fill(key, value, ("mean", "channel", "pixel"))
        return _range(key, value, 1e-6, 1.0) if name == "area" else _range(key, value, 1e-3, 1e3)
    raise AssertionError(f"no check for {key}")  # every name in OPS has a branch above


def _check_op_name(op: str) -> None:
    if op not in OPS:
        raise ConfigError(f"unknown augmentation {op!r}; valid ones: {', '.join(OPS)}")


def _check_param_name(op: str, name: str) -> None:
    if name not in OPS[op]:
        raise ConfigError(f"unknown setting {op}.{name}; valid for {op}: {', '.join(OPS[op])}")


def _resolve(preset: str, overrides: Mapping[str, Any]) -> dict[str, dict[str, Any] | None]:
    """The preset with overrides applied and every value checked: op -> settings or None."""
    if preset not in PRESETS:
        raise ConfigError(f"unknown augmentation preset {preset!r}; valid ones: {', '.join(PRESETS)}")
    ops = {op: copy.deepcopy(PRESETS[preset].get(op)) for op in OPS}
    for op, value in overrides.items():
        _check_op_name(op)
        if value is None or value is False:
            ops[op] = None
            continue
        base = ops[op] if ops[op] is not None else copy.deepcopy(OPS[op])
        if value is True:
            ops[op] = base
            continue
        if not isinstance(value, Mapping):
            raise ConfigError(f"augmentation {op}={value!r} is invalid: give a dict of settings, "
                              f"True, or None/False to switch it off")
        for name in value:
            _check_param_name(op, name)
        ops[op] = {**base, **value}
    return {op: None if s is None else {n: _check_param(op, n, v) for n, v in s.items()}
            for op, s in ops.items()}


def describe_train(preset: str = "default", **overrides: Any) -> dict[str, Any]:
    """The resolved settings of a train stack as plain data (lists, not tuples).

    ``train_transform(size=..., **describe_train(...))`` rebuilds the same stack.
    """
    ops = _resolve(preset, overrides)
    plain = {op: None if s is None else {n: list(v) if isinstance(v, tuple) else v for n, v in s.items()}
             for op, s in ops.items()}
    return {"preset": preset, **plain}


def _parse_value(text: str) -> Any:
    low = text.strip().lower()
    if low in ("true", "yes", "on"):
        return True
    if low in ("false", "no", "off"):
        return False
    if "," in text:
        return tuple(_parse_value(part) for part in text.split(","))
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text.strip()


def parse_overrides(items: Sequence[str]) -> dict[str, Any]:
    """Turn ``["erasing.p=0.5", "crop.scale=0.3,1.0", "noise=off"]`` into override keywords."""
    result: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        parts = key.strip().split(".")
        if not sep or not raw.strip() or len(parts) > 2 or not all(parts):
            raise ConfigError(f"augmentation override {item!r} is malformed: write op.setting=value "
                              f"(e.g. erasing.p=0.5) or op=off / op=on")
        op = parts[0]
        _check_op_name(op)
        value = _parse_value(raw)
        if len(parts) == 1:
            if not isinstance(value, bool):
                raise ConfigError(f"augmentation override {item!r} is malformed: {op}= takes on or off")
            if op in result and isinstance(result[op], dict):
                raise ConfigError(f"augmentation override {item!r} contradicts the settings given for {op}")
            result[op] = True if value else None
            continue
        _check_param_name(op, parts[1])
        if op in result and not isinstance(result[op], dict):
            raise ConfigError(f"augmentation override {item!r} contradicts {op}=on/off given before")
        result.setdefault(op, {})[parts[1]] = value
    return result


# ------------------------------------------------------------------ building the backend stack

def _resize(img: np.ndarray, size: tuple[int, int], interpolation: int) -> np.ndarray:
    """Resize with antialiasing at the cost of a pyramid: halve (Gaussian pyrDown) while at
    least 2x too large, then interpolate. albumentations' INTER_AREA downscale was considered: it
    antialiases too but costs ~10x more on large crops."""
    h, w = size
    while img.shape[0] >= 2 * h and img.shape[1] >= 2 * w:
        img = cv2.pyrDown(img)
    if img.shape[:2] == (h, w):
        return img
    return cv2.resize(img, (w, h), interpolation=interpolation)


class _RandomResizedCrop(A.RandomResizedCrop):
    """albumentations' random resized crop, resized through :func:`_resize`."""

    def apply(self, img: np.ndarray, crop_coords: tuple[int, int, int, int], **params: Any) -> np.ndarray:
        x_min, y_min, x_max, y_max = crop_coords
        return _resize(img[y_min:y_max, x_min:x_max], self.size, self.interpolation)


def _compose(steps: list) -> A.Compose:
    # strict=True: a parameter name the backend does not know is an error, never a warning.
    return A.Compose(steps, strict=True)


def _fill_value(fill: float | str, mean: Sequence[float]) -> Any:
    if fill == "mean":
        return tuple(round(255 * m) for m in mean)
    return {"channel": "random_uniform", "pixel": "random"}.get(fill, fill)


def _train_steps(ops: dict, size: tuple[int, int], mean: Sequence[float], interp: int) -> list:
    h, w = size
    steps: list = []
    if ops["crop"] is None:
        steps += [A.SmallestMaxSize(max_size_hw=(h, w), interpolation=interp, area_for_downscale="image"),
                  A.CenterCrop(h, w, pad_if_needed=True)]
    else:
        steps.append(_RandomResizedCrop(size=(h, w), scale=ops["crop"]["scale"], ratio=ops["crop"]["ratio"],
                                        interpolation=interp))
    makers = {
        "hflip": lambda s: A.HorizontalFlip(p=s["p"]),
        "vflip": lambda s: A.VerticalFlip(p=s["p"]),
        "affine": lambda s: A.Affine(rotate=s["rotate"], scale=s["scale"], interpolation=interp,
                                     border_mode=_BORDERS[s["border"]], p=s["p"]),
        "color": lambda s: A.ColorJitter(brightness=s["brightness"], contrast=s["contrast"],
                                         saturation=s["saturation"], hue=s["hue"], p=s["p"]),
        "noise": lambda s: A.GaussNoise(std_range=s["std"], per_channel=s["per_channel"], p=s["p"]),
        "cutout": lambda s: A.CoarseDropout(num_holes_range=s["holes"], hole_height_range=s["size"],
                                            hole_width_range=s["size"], fill=_fill_value(s["fill"], mean),
                                            p=s["p"]),
        "erasing": lambda s: A.Erasing(scale=s["area"], ratio=s["aspect"], fill=_fill_value(s["fill"], mean),
                                       p=s["p"]),
    }
    for op, make in makers.items():  # lighting is not here: it is part of the normalization
        settings = ops[op]
        if settings is None or settings["p"] == 0:
            continue
        try:
            steps.append(make(settings))
        except ValueError as exc:  # the backend's own checks, for combinations ours let through
            raise ConfigError(f"augmentation {op} cannot use {settings}: {str(exc).splitlines()[0]}") from exc
    return steps


# --------------------------------------------------------------------------- the callable

def _as_rgb_array(image: Any) -> np.ndarray:
    if isinstance(image, Image.Image):
        if image.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N", "F"):
            raise DataError(f"image mode {image.mode!r} (16-bit or float) is not supported: "
                            f"convert it to 8-bit RGB first")
        if image.mode != "RGB":
            if image.mode in ("RGBA", "LA", "PA", "La", "RGBa") or "transparency" in image.info:
                white = Image.new("RGBA", image.size, (255, 255, 255, 255))
                image = Image.alpha_composite(white, image.convert("RGBA"))
            image = image.convert("RGB")
        array = np.asarray(image)
    elif isinstance(image, np.ndarray):
        array = image
        if array.dtype != np.uint8:
            raise DataError(f"image array has dtype {array.dtype}: give uint8 values 0-255 "
                            f"(e.g. (x * 255).round().astype(np.uint8))")
        if array.ndim == 3 and array.shape[2] == 1:
            array = array[:, :, 0]
        if array.ndim == 2:
            array = cv2.cvtColor(array, cv2.COLOR_GRAY2RGB)
        if array.ndim != 3 or array.shape[2] != 3:
            raise DataError(f"image array has shape {array.shape}: give HxWx3 RGB (or HxW grayscale); "
                            f"drop or composite an alpha channel first")
    else:
        raise TypeError(f"expected a numpy array or a PIL image, got {type(image).__name__}")
    if array.shape[0] == 0 or array.shape[1] == 0:
        raise DataError(f"image has no pixels (shape {array.shape})")
    return array


class ImageTransform:
    """A picklable image -> normalized CHW float32 tensor callable; build it with
    :func:`train_transform` or :func:`eval_transform`."""

    def __init__(self, steps: list, mean: Sequence[float], std: Sequence[float], random_draws: bool,
                 description: dict[str, Any], lighting: dict[str, Any] | None = None):
        self._compose = _compose(steps)
        self._random_draws = random_draws
        # One pair of generators shared by every step: seeding each step alike would correlate
        # them (both flips would fire together).
        self._py_rng = random.Random(0)
        self._np_rng = np.random.Generator(np.random.PCG64(0))
        self._compose.set_random_state(self._np_rng, self._py_rng)
        self._mean255 = [255.0 * m for m in mean]
        self._shift = torch.tensor(self._mean255, dtype=torch.float32).view(3, 1, 1)
        self._scale = torch.tensor([1.0 / (255.0 * s) for s in std], dtype=torch.float32).view(3, 1, 1)
        self._lighting = lighting if lighting and lighting["p"] > 0 and lighting["alpha"] > 0 else None
        self.description = description

    def _reseed(self) -> None:
        a, b = torch.randint(-(2 ** 63), 2 ** 63 - 1, (2,), dtype=torch.int64).tolist()
        self._py_rng.seed(a)
        self._np_rng.bit_generator.state = {
            "bit_generator": "PCG64", "has_uint32": 0, "uinteger": 0,
            "state": {"state": ((a & _MASK64) << 64) | (b & _MASK64), "inc": _PCG_INC}}

    def _lighting_shift(self) -> torch.Tensor:
        # PCA lighting is a per-image RGB offset, so it folds into the mean subtracted next:
        # free in float, where a saturating uint8 add per pixel is not.
        if self._lighting is None or self._py_rng.random() >= self._lighting["p"]:
            return self._shift
        weights = self._np_rng.normal(0.0, self._lighting["alpha"], 3) * _EIGVAL
        offset = 255.0 * (_EIGVEC @ weights)
        return torch.tensor([m - o for m, o in zip(self._mean255, offset.tolist())]).view(3, 1, 1)

    def __call__(self, image: Any) -> torch.Tensor:
        array = _as_rgb_array(image)
        if self._random_draws:
            self._reseed()
        out = self._compose(image=array)["image"]
        # planes first, then one contiguous uint8 -> float pass: cheaper than a strided permute
        planes = np.stack(cv2.split(out))
        tensor = torch.from_numpy(planes).to(torch.float32)
        return tensor.sub_(self._lighting_shift()).mul_(self._scale)

    def __repr__(self) -> str:
        return f"ImageTransform({self.description})"


def _check_common(size: Any, mean: Sequence[float], std: Sequence[float], interpolation: str) -> tuple[int, int]:
    hw = (size, size) if isinstance(size, int) else size
    if (not isinstance(hw, (tuple, list)) or len(hw) != 2
            or not all(isinstance(s, int) and not isinstance(s, bool) and s > 0 for s in hw)):
        raise ConfigError(f"image size {size!r} is invalid: give a positive int or (height, width)")
    if len(mean) != 3 or len(std) != 3 or any(s <= 0 for s in std):
        raise ConfigError(f"mean {tuple(mean)} / std {tuple(std)} are invalid: give 3 values each, std > 0")
    if interpolation not in _INTERPOLATIONS:
        raise ConfigError(f"interpolation {interpolation!r} is unknown; valid ones: {', '.join(_INTERPOLATIONS)}")
    return int(hw[0]), int(hw[1])


def train_transform(preset: str = "default", size: int | Sequence[int] = 224,
                    mean: Sequence[float] = IMAGENET_DEFAULT_MEAN, std: Sequence[float] = IMAGENET_DEFAULT_STD,
                    interpolation: str = "bilinear", **overrides: Any) -> ImageTransform:
    """The random train stack of ``preset`` with per-op ``overrides`` (see the module docstring)."""
    hw = _check_common(size, mean, std, interpolation)
    ops = _resolve(preset, overrides)
    steps = _train_steps(ops, hw, mean, _INTERPOLATIONS[interpolation])
    description = {"kind": "train", "size": list(hw), "interpolation": interpolation,
                   **describe_train(preset, **overrides)}
    return ImageTransform(steps, mean, std, random_draws=True, description=description, lighting=ops["lighting"])


def eval_transform(size: int | Sequence[int] = 224, mean: Sequence[float] = IMAGENET_DEFAULT_MEAN,
                   std: Sequence[float] = IMAGENET_DEFAULT_STD, crop_pct: float = 0.875,
                   interpolation: str = "bilinear") -> ImageTransform:
    """Deterministic eval stack, timm's convention: resize so the image covers
    ``floor(size / crop_pct)``, shorter side first, then center crop ``size``."""
    h, w = _check_common(size, mean, std, interpolation)
    if isinstance(crop_pct, bool) or not isinstance(crop_pct, (int, float)) or not 0 < crop_pct <= 1:
        raise ConfigError(f"crop_pct={crop_pct!r} is invalid: give a number in (0, 1]")
    scale_hw = (math.floor(h / crop_pct), math.floor(w / crop_pct))
    interp = _INTERPOLATIONS[interpolation]
    steps = [A.SmallestMaxSize(max_size_hw=scale_hw, interpolation=interp, area_for_downscale="image"),
             A.CenterCrop(h, w, pad_if_needed=True)]
    description = {"kind": "eval", "size": [h, w], "crop_pct": float(crop_pct), "interpolation": interpolation}
    return ImageTransform(steps, mean, std, random_draws=False, description=description)
