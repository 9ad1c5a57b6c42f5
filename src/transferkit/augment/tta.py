"""Test-time augmentation: which views of an image the model sees, and how their predictions merge.

The eval pipeline hands TTA images that are resized but not yet center-cropped:
``tta_prepare`` resizes the shorter side to ``floor(size / crop_pct)`` exactly as
``augment.image.eval_transform`` does and keeps a centered region about that side (the
"prepared region"), so a batch stacks.
Every view is then cut from that region and comes out at the model's input size, so all views of
a batch go through the model in ONE forward pass:

- ``plain``: the center crop of ``size``; identical to ``eval_transform``.
- ``hflip``: every other view plus its mirror (alone: ``plain`` and its mirror).
- ``five-crop``: the four corners and the center, each ``size``.
- ``ten-crop``: ``five-crop`` plus the mirror of each crop (same as ``five-crop+hflip``).
- ``multiscale:s1,s2,...`` (default 0.9,1.0,1.1): for each scale ``s`` the centered crop of side
  ``round(size / s)``, resized to ``size``; ``s > 1`` zooms in, ``s < 1`` zooms out and ``1.0`` is
  the plain view. A crop larger than the prepared region (``s < crop_pct``) is filled with zeros at
  its border, i.e. the mean colour after normalisation.

Terms join with ``+``: geometric terms contribute the union of their crops (a crop named twice
counts once), ``hflip`` mirrors them all. Views are ordered: unmirrored crops in the order named
(five-crop: top-left, top-right, bottom-left, bottom-right, center), then their mirrors.

Predictions merge after softmax, over views (and over models, for ensembles): the mean of
probabilities, their geometric mean (mean of log-probabilities, renormalised) or their maximum
(renormalised).
"""
from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass

import albumentations as A
import numpy as np
import torch
from torch import Tensor, nn
from torchvision.transforms import InterpolationMode
from torchvision.transforms import functional as F

from transferkit.augment.image import CV2_INTERPOLATIONS, eval_transform
from transferkit.errors import ConfigError

log = logging.getLogger(__name__)

MERGE_MODES = ("mean", "geometric", "max")
POSITIONS = ("top-left", "top-right", "bottom-left", "bottom-right", "center")
DEFAULT_SCALES = (0.9, 1.0, 1.1)
_VALID_SPEC = (
    "valid views: plain, hflip, five-crop, ten-crop, multiscale[:s1,s2,...], "
    "joined with '+', e.g. 'hflip+multiscale:0.9,1.0,1.1'"
)
_INTERPOLATIONS = {
    "nearest": InterpolationMode.NEAREST,
    "bilinear": InterpolationMode.BILINEAR,
    "bicubic": InterpolationMode.BICUBIC,
    "lanczos": InterpolationMode.LANCZOS,
    "box": InterpolationMode.BOX,
    "hamming": InterpolationMode.HAMMING,
}

Size = int | tuple[int, int]


# ----------------------------------------------------------------------------- views and specs


@dataclass(frozen=True)
class View:
    """One test-time view: a crop at ``position`` of the input size divided by ``scale``, resized
    back to the input size, then mirrored left-right when ``flip``."""

    position: str = "center"
    scale: float = 1.0
    flip: bool = False

    def __post_init__(self):
        if self.position not in POSITIONS:
            raise ConfigError(f"unknown view position {self.position!r}; use one of {', '.join(POSITIONS)}")
        if not (math.isfinite(self.scale) and self.scale > 0):
            raise ConfigError(f"bad view scale {self.scale!r}; give a positive number")

    def __str__(self) -> str:
        text = self.position if self.scale == 1.0 else f"{self.position}@{self.scale:g}"
        return text + "+hflip" if self.flip else text


def parse_views(spec: str) -> tuple[View, ...]:
    """Parse a view spec such as ``"ten-crop"`` or ``"hflip+multiscale:0.9,1.0,1.1"``.

    Raises ConfigError for an empty spec, an unknown name or a bad scale.
    """
    if not isinstance(spec, str) or not spec.strip():
        raise ConfigError(f"empty TTA view spec {spec!r}; {_VALID_SPEC}")
    crops: list[View] = []
    flip = False
    for raw in spec.split("+"):
        term = raw.strip().lower().replace("_", "-")
        name, _, arg = term.partition(":")
        name = name.strip()
        if name != "multiscale" and arg:
            raise ConfigError(f"TTA view {name!r} takes no ':' argument (in {spec!r}); {_VALID_SPEC}")
        if name == "plain":
            crops.append(View())
        elif name == "hflip":
            flip = True
        elif name in ("five-crop", "ten-crop"):
            crops.extend(View(p) for p in POSITIONS)
            flip = flip or name == "ten-crop"
        elif name == "multiscale":
            crops.extend(View("center", s) for s in _parse_scales(arg, spec))
        else:
            raise ConfigError(f"unknown TTA view {raw.strip()!r} in {spec!r}; {_VALID_SPEC}")
    if not crops:
        crops.append(View())
    crops = list(dict.fromkeys(crops))  # a crop named twice would weigh double in the merge
    if flip:
        crops += [View(v.position, v.scale, True) for v in crops]
    return tuple(crops)


def _parse_scales(arg: str, spec: str) -> tuple[float, ...]:
    if not arg.strip():
        return DEFAULT_SCALES
    scales = []
    for text in arg.split(","):
        try:
            scale = float(text)
        except ValueError:
            scale = float("nan")
        if not math.isfinite(scale) or scale <= 0:
            raise ConfigError(
                f"bad multiscale scale {text.strip()!r} in {spec!r}; "
                "give positive numbers, e.g. 'multiscale:0.9,1.0,1.1'"
            )
        scales.append(scale)
    return tuple(scales)


def _pair(size: Size) -> tuple[int, int]:
    pair = (size, size) if isinstance(size, int) else tuple(size)
    if len(pair) != 2 or not all(isinstance(s, int) and s > 0 for s in pair):
        raise ConfigError(f"bad TTA input size {size!r}; give a positive int or (height, width)")
    return pair  # type: ignore[return-value]


def _interpolation(name: str) -> InterpolationMode:
    try:
        return _INTERPOLATIONS[name]
    except KeyError:
        raise ConfigError(
            f"unknown interpolation {name!r}; use one of {', '.join(_INTERPOLATIONS)}"
        ) from None


def _check_merge(mode: str) -> str:
    if mode not in MERGE_MODES:
        raise ConfigError(f"unknown TTA merge {mode!r}; use one of {', '.join(MERGE_MODES)}")
    return mode


# ----------------------------------------------------------------------------- preparing images


def prepared_size(size: Size, crop_pct: float = 0.875) -> tuple[int, int]:
    """(height, width) of the region ``tta_prepare`` keeps: ``floor(side / crop_pct)`` as timm."""
    h, w = _pair(size)
    if not 0 < crop_pct <= 1:
        raise ConfigError(f"bad crop_pct {crop_pct!r}; give a number in (0, 1], e.g. 0.875")
    return math.floor(h / crop_pct), math.floor(w / crop_pct)


class TTAPrepare:
    """Picklable per-image transform: PIL image or HWC uint8 RGB array -> normalized float32 CHW,
    the eval pixels of ``augment.image.eval_transform`` widened to the region TTA cuts its views from.

    Resizes exactly as ``eval_transform`` (albumentations ``SmallestMaxSize`` to
    ``floor(size / crop_pct)``, OpenCV) and keeps a centered region of that size (one pixel less
    where needed to stay centered), placed so that the ``plain`` view is the very crop
    ``eval_transform`` takes: plain evaluation reproduces fit's validation to the pixel.
    """

    def __init__(self, size: Size, mean, std, crop_pct: float = 0.875, interpolation: str = "bilinear"):
        h, w = _pair(size)
        self.description = eval_transform((h, w), mean, std, crop_pct, interpolation).description  # validates
        self.size = (h, w)
        rh, rw = prepared_size((h, w), crop_pct)
        # An even margin around the crop centres it exactly under both rounding rules.
        self.region = (rh - (rh - h) % 2, rw - (rw - w) % 2)
        self._resize = A.SmallestMaxSize(max_size_hw=(rh, rw), interpolation=CV2_INTERPOLATIONS[interpolation],
                                         area_for_downscale="image", p=1.0)
        # The same arithmetic as augment.image.ImageTransform, so plain pixels are bit-identical.
        self._shift = torch.tensor([255.0 * m for m in mean], dtype=torch.float32).view(3, 1, 1)
        self._scale = torch.tensor([1.0 / (255.0 * s) for s in std], dtype=torch.float32).view(3, 1, 1)

    def __call__(self, image) -> Tensor:
        if isinstance(image, np.ndarray):
            if image.dtype != np.uint8 or not (image.ndim == 2 or image.ndim == 3 and image.shape[2] == 3):
                raise ValueError(f"expected an HWC uint8 RGB array, got {image.dtype} {image.shape}")
            array = np.stack([image] * 3, -1) if image.ndim == 2 else image
        else:
            array = np.asarray(image.convert("RGB") if image.mode != "RGB" else image)
        out = self._resize(image=array)["image"]
        rh, rw = self.region
        (h, w), (H, W) = self.size, out.shape[:2]
        if H < rh or W < rw:  # a rounding short of the target: pad as eval's CenterCrop would
            ph, pw = max(0, rh - H), max(0, rw - W)
            out = np.pad(out, ((ph // 2, ph - ph // 2), (pw // 2, pw - pw // 2), (0, 0)))
            H, W = out.shape[:2]
        top = (H - h) // 2 - (rh - h) // 2
        left = (W - w) // 2 - (rw - w) // 2
        crop = np.ascontiguousarray(out[top:top + rh, left:left + rw].transpose(2, 0, 1))
        return torch.from_numpy(crop).to(torch.float32).sub_(self._shift).mul_(self._scale)

    def __repr__(self) -> str:
        return f"TTAPrepare(size={self.size}, region={self.region}, {self.description})"


def tta_prepare(
    size: Size, mean, std, crop_pct: float = 0.875, interpolation: str = "bilinear"
) -> TTAPrepare:
    """The eval-time image transform whose output ``TTA.views`` expects (see ``TTAPrepare``)."""
    return TTAPrepare(size, mean, std, crop_pct=crop_pct, interpolation=interpolation)


# ----------------------------------------------------------------------------- merging


def merge_probs(probs: Tensor, mode: str = "mean") -> Tensor:
    """Merge probability vectors ``probs`` of shape (V, B, K) into (B, K).

    ``mean``: arithmetic mean; ``geometric``: softmax of the mean log-probability (the normalised
    geometric mean); ``max``: per-class maximum, renormalised to sum to one.
    """
    _check_merge(mode)
    if probs.dim() != 3:
        raise ValueError(f"merge_probs expects (views, batch, classes), got shape {tuple(probs.shape)}")
    probs = probs.float()
    if mode == "mean":
        return probs.mean(0)
    if mode == "geometric":
        log_probs = probs.clamp_min(torch.finfo(probs.dtype).tiny).log()
        return torch.softmax(log_probs.mean(0), dim=-1)
    top = probs.amax(0)
    return top / top.sum(-1, keepdim=True)


# ----------------------------------------------------------------------------- the predictor


class TTA:
    """Test-time augmentation for a batch of prepared images (see ``tta_prepare``).

    ``views(x)`` is view-major: row ``v * B + b`` is view ``v`` (in ``self.view_list`` order) of
    sample ``b``. ``predict_proba`` runs every view in one forward pass (in chunks of at most
    ``max_batch`` rows when given) and merges the softmax outputs with ``merge``.
    """

    def __init__(
        self,
        views: str | Sequence[View] = "plain",
        size: Size = 224,
        merge: str = "mean",
        interpolation: str = "bilinear",
        max_batch: int | None = None,
    ):
        self.spec = views if isinstance(views, str) else "+".join(str(v) for v in views)
        self.view_list = parse_views(views) if isinstance(views, str) else tuple(views)
        if not self.view_list:
            raise ConfigError("no TTA views given; " + _VALID_SPEC)
        self.size = _pair(size)
        self.merge = _check_merge(merge)
        self.interpolation = interpolation
        self._mode = _interpolation(interpolation)
        if max_batch is not None and max_batch < 1:
            raise ConfigError(f"bad TTA max_batch {max_batch!r}; give a positive number or leave it unset")
        self.max_batch = max_batch

    @property
    def num_views(self) -> int:
        return len(self.view_list)

    def __repr__(self) -> str:
        return f"TTA(views={self.spec!r}, size={self.size}, merge={self.merge!r}, num_views={self.num_views})"

    def views(self, x: Tensor) -> Tensor:
        """All views of a batch ``x`` (B, C, H, W) as one tensor (V * B, C, h, w), view-major."""
        if x.dim() != 4:
            raise ValueError(f"TTA expects a batch (B, C, H, W), got shape {tuple(x.shape)}")
        h, w = self.size
        if x.shape[-2] < h or x.shape[-1] < w:
            raise ConfigError(
                f"TTA input {tuple(x.shape[-2:])} is smaller than the model input {self.size}; "
                "prepare images with tta_prepare(size, ...) using the same size"
            )
        crops: dict[tuple[str, float], Tensor] = {}
        out = []
        for view in self.view_list:
            key = (view.position, view.scale)
            if key not in crops:
                crops[key] = self._crop(x, view.position, view.scale)
            out.append(F.hflip(crops[key]) if view.flip else crops[key])
        return torch.cat(out, dim=0)

    def _crop(self, x: Tensor, position: str, scale: float) -> Tensor:
        # torchvision's five_crop/ten_crop return fixed tuples; cropping view by view with its
        # functional crop lets corners, scales and flips combine freely in one batch.
        h, w = self.size
        ch, cw = (h, w) if scale == 1.0 else (round(h / scale), round(w / scale))
        # Plain ints and slices (torchvision's own centring rule): a traced or exported graph keeps
        # its fixed spatial size and only the batch dimension stays dynamic.
        height, width = int(x.shape[-2]), int(x.shape[-1])
        if ch > height or cw > width:
            crop = F.center_crop(x, [ch, cw])  # pads with zeros beyond the prepared region
        else:
            if position == "center":
                top, left = int(round((height - ch) / 2.0)), int(round((width - cw) / 2.0))
            else:
                top = 0 if position.startswith("top") else height - ch
                left = 0 if position.endswith("left") else width - cw
            crop = x[..., top:top + ch, left:left + cw]
        if (ch, cw) != (h, w):
            crop = F.resize(crop, [h, w], interpolation=self._mode, antialias=True)
        return crop

    def view_probs(self, model: nn.Module, x: Tensor) -> Tensor:
        """Softmax outputs of ``model`` on every view of ``x``, shape (V, B, K)."""
        batch = self.views(x)
        logits = _forward(model, batch, self.max_batch)
        return torch.softmax(logits.float(), dim=-1).reshape(self.num_views, x.shape[0], -1)

    def predict_proba(self, model: nn.Module, x: Tensor) -> Tensor:
        """Merged class probabilities (B, K) of ``model`` over all views of ``x``."""
        return merge_probs(self.view_probs(model, x), self.merge)


def _forward(model: nn.Module, batch: Tensor, max_batch: int | None) -> Tensor:
    if model.training:
        log.warning("TTA predicts with a model in training mode; call model.eval() first")
    with torch.inference_mode():
        if max_batch is None or batch.shape[0] <= max_batch:
            return model(batch)
        return torch.cat([model(chunk) for chunk in batch.split(max_batch)], dim=0)


def predict_proba_ensemble(
    models: Sequence[nn.Module] | nn.Module,
    x: Tensor,
    tta: TTA | None = None,
    merge: str | None = None,
) -> Tensor:
    """Merged probabilities (B, K) of several models (snapshots, EMA) over all views of ``x``.

    Every model sees the same views; the M x V probability vectors of a sample merge with one
    rule (``merge``, else the TTA's, else mean). ``tta=None`` uses ``x`` as it is, one view.
    """
    if isinstance(models, nn.Module):
        models = [models]
    if not models:
        raise ValueError("predict_proba_ensemble needs at least one model")
    mode = _check_merge(merge or (tta.merge if tta is not None else "mean"))
    if tta is None:
        per_model = [torch.softmax(_forward(m, x, None).float(), dim=-1)[None] for m in models]
    else:
        batch = tta.views(x)  # computed once, shared by every model
        per_model = [
            torch.softmax(_forward(m, batch, tta.max_batch).float(), dim=-1).reshape(
                tta.num_views, x.shape[0], -1
            )
            for m in models
        ]
    return merge_probs(torch.cat(per_model, dim=0), mode)
