"""Mixup and CutMix on batches, with soft targets and a soft-target cross-entropy.

Each element ``i`` is mixed with its partner ``B - 1 - i`` (the batch reversed), so any batch
size works; in an odd batch the middle element is its own partner and stays as it was.
timm.data.Mixup was considered: it does the same but refuses odd batch sizes (a last partial
batch of a small dataset often is one).

- Mixup: ``x = lam * x_i + (1 - lam) * x_partner`` with ``lam ~ Beta(mixup_alpha, mixup_alpha)``.
- CutMix: a box of side ``sqrt(1 - lam)`` times the image's, centred uniformly and clipped to the
  image, is pasted from the partner; the label weight is then the pasted area fraction exactly.
- With both alphas set, CutMix is chosen with probability ``switch_prob``; mixing happens at all
  with probability ``prob``.
- ``mode``: ``batch`` draws one decision, lambda and box for the whole batch; ``pair`` one per
  pair ``(i, B - 1 - i)``; ``elem`` one per element.

Targets are ``w * smooth(y) + (1 - w) * smooth(y_partner)`` where ``smooth`` is the label-smoothed
one-hot vector (``1 - s + s / C`` on the class, ``s / C`` elsewhere), so they sum to 1.
Random draws come from ``generator`` (a CPU ``torch.Generator``) or torch's global generator, so
``torch.manual_seed`` reproduces them; the images may live on any device.
"""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from transferkit.errors import ConfigError

__all__ = ["MODES", "BatchMixer", "smooth_one_hot", "soft_target_cross_entropy"]

MODES = ("batch", "pair", "elem")
_NONE, _MIXUP, _CUTMIX = 0, 1, 2


def smooth_one_hot(y: Tensor, num_classes: int, smoothing: float = 0.0) -> Tensor:
    """Float32 one-hot targets with ``smoothing`` spread evenly over all classes."""
    off = smoothing / num_classes
    out = torch.full((y.shape[0], num_classes), off, dtype=torch.float32, device=y.device)
    return out.scatter_(1, y.view(-1, 1).long(), 1.0 - smoothing + off)


def soft_target_cross_entropy(logits: Tensor, soft_targets: Tensor) -> Tensor:
    """Mean over the batch of ``-sum(t * log_softmax(logits))``; computed in float32."""
    if logits.shape != soft_targets.shape:
        raise ValueError(f"logits {tuple(logits.shape)} and targets {tuple(soft_targets.shape)} differ in shape")
    return -(soft_targets * F.log_softmax(logits.float(), dim=-1)).sum(dim=-1).mean()


def _check_number(name: str, value: object, lo: float, hi: float, hi_open: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ConfigError(f"{name}={value!r} is invalid: give a number")
    if not lo <= value <= hi or (hi_open and value == hi):
        raise ConfigError(f"{name}={value!r} is invalid: give a number in [{lo:g}, {hi:g}{')' if hi_open else ']'}")
    return float(value)


class BatchMixer:
    """Callable ``(x, y) -> (mixed x, soft targets)`` for a batch ``x`` (B, C, H, W) and labels ``y`` (B,).

    ``enabled`` may be set to False (e.g. for the last epochs): the batch then passes unchanged
    with label-smoothed one-hot targets.
    """

    def __init__(self, num_classes: int, mixup_alpha: float = 0.0, cutmix_alpha: float = 0.0,
                 prob: float = 1.0, switch_prob: float = 0.5, mode: str = "batch",
                 label_smoothing: float = 0.0, generator: torch.Generator | None = None):
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
            raise ConfigError(f"num_classes={num_classes!r} is invalid: give a positive int")
        if mode not in MODES:
            raise ConfigError(f"mixing mode {mode!r} is unknown; valid ones: {', '.join(MODES)}")
        self.num_classes = num_classes
        self.mixup_alpha = _check_number("mixup_alpha", mixup_alpha, 0.0, math.inf)
        self.cutmix_alpha = _check_number("cutmix_alpha", cutmix_alpha, 0.0, math.inf)
        self.prob = _check_number("mixing prob", prob, 0.0, 1.0)
        self.switch_prob = _check_number("switch_prob", switch_prob, 0.0, 1.0)
        self.label_smoothing = _check_number("label_smoothing", label_smoothing, 0.0, 1.0, hi_open=True)
        self.mode = mode
        self.generator = generator
        self.enabled = self.mixup_alpha > 0 or self.cutmix_alpha > 0

    def __repr__(self) -> str:
        return (f"BatchMixer(num_classes={self.num_classes}, mixup_alpha={self.mixup_alpha}, "
                f"cutmix_alpha={self.cutmix_alpha}, prob={self.prob}, switch_prob={self.switch_prob}, "
                f"mode={self.mode!r}, label_smoothing={self.label_smoothing}, enabled={self.enabled})")

    def _draw(self, count: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        """Per draw: the kind (none / mixup / cutmix) and lambda."""
        kinds = np.where(rng.random(count) < self.prob, _MIXUP, _NONE)
        if self.mixup_alpha > 0 and self.cutmix_alpha > 0:
            kinds[(kinds == _MIXUP) & (rng.random(count) < self.switch_prob)] = _CUTMIX
        elif self.cutmix_alpha > 0:
            kinds[kinds == _MIXUP] = _CUTMIX
        lam = np.ones(count)
        if self.mixup_alpha > 0:
            lam = np.where(kinds == _MIXUP, rng.beta(self.mixup_alpha, self.mixup_alpha, count), lam)
        if self.cutmix_alpha > 0:
            lam = np.where(kinds == _CUTMIX, rng.beta(self.cutmix_alpha, self.cutmix_alpha, count), lam)
        return kinds, lam

    @staticmethod
    def _boxes(lam: np.ndarray, h: int, w: int, rng: np.random.Generator) -> np.ndarray:
        """Boxes (top, bottom, left, right) of side sqrt(1 - lam), centred uniformly, clipped."""
        cut = np.sqrt(1.0 - lam)
        cut_h, cut_w = (h * cut).astype(np.int64), (w * cut).astype(np.int64)
        cy, cx = rng.integers(0, h, len(lam)), rng.integers(0, w, len(lam))
        top, left = cy - cut_h // 2, cx - cut_w // 2
        return np.stack([np.clip(top, 0, h), np.clip(top + cut_h, 0, h),
                         np.clip(left, 0, w), np.clip(left + cut_w, 0, w)], axis=1)

    def __call__(self, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        if x.dim() != 4 or y.dim() != 1 or x.shape[0] != y.shape[0]:
            raise ValueError(f"expected images (B, C, H, W) and labels (B,), got {tuple(x.shape)} and {tuple(y.shape)}")
        targets = smooth_one_hot(y, self.num_classes, self.label_smoothing)
        b, h, w = x.shape[0], x.shape[2], x.shape[3]
        if not self.enabled or b < 2:
            return x, targets
        seed = int(torch.randint(0, 2 ** 63 - 1, (), generator=self.generator).item())
        rng = np.random.default_rng(seed)

        # one draw (kind, lambda, box) per batch / pair / element, then one row per element
        draws = {"batch": 1, "pair": b // 2, "elem": b}[self.mode]
        kinds, lam = self._draw(draws, rng)
        boxes = self._boxes(lam, h, w, rng)
        position = np.arange(b)
        index = {"batch": np.zeros(b, dtype=np.int64),
                 "pair": np.minimum(np.minimum(position, b - 1 - position), draws - 1),
                 "elem": position}[self.mode]
        kinds, lam, boxes = kinds[index], lam[index], boxes[index]
        if b % 2:
            kinds[b // 2] = _NONE  # the middle element is its own partner
        if not kinds.any():
            return x, targets

        # the weight of the partner: 1 - lam for mixup, the pasted area fraction for cutmix
        area = (boxes[:, 1] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 2])
        partner_w = np.where(kinds == _CUTMIX, area / (h * w), np.where(kinds == _MIXUP, 1.0 - lam, 0.0))
        own_w = 1.0 - partner_w
        device = x.device
        own = torch.from_numpy(own_w.astype(np.float32)).to(device)
        part = torch.from_numpy(partner_w.astype(np.float32)).to(device)
        x_partner = x.flip(0)
        targets = targets * own.view(-1, 1) + targets.flip(0) * part.view(-1, 1)

        mixed = x  # never modified in place: the caller's batch stays as it was
        mixup = kinds == _MIXUP
        if mixup.any():
            m_own = torch.from_numpy(np.where(mixup, own_w, 1.0).astype(np.float32)).to(device, x.dtype)
            m_part = torch.from_numpy(np.where(mixup, partner_w, 0.0).astype(np.float32)).to(device, x.dtype)
            mixed = x * m_own.view(-1, 1, 1, 1) + x_partner * m_part.view(-1, 1, 1, 1)
        cut = kinds == _CUTMIX
        if cut.any():
            bx = torch.from_numpy(np.where(cut[:, None], boxes, 0)).to(device)
            rows = torch.arange(h, device=device).view(1, h, 1)
            cols = torch.arange(w, device=device).view(1, 1, w)
            inside = ((rows >= bx[:, 0, None, None]) & (rows < bx[:, 1, None, None])
                      & (cols >= bx[:, 2, None, None]) & (cols < bx[:, 3, None, None]))
            mixed = torch.where(inside.unsqueeze(1), x_partner, mixed)
        return mixed, targets
