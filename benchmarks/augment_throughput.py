"""Throughput of the per-image train stacks against the same operations in torchvision.transforms.v2.

Run from the repository root:  .venv/bin/python benchmarks/augment_throughput.py [--rounds 3]

It reads the JPEGs of ../shared/data/hymenoptera and, for the ``default`` and ``heavy`` presets,
measures images per second in one process and one thread, for transferkit, the same operations
in torchvision.transforms.v2 (the baseline) and in bare albumentations (what transferkit's
wrapper costs):

- with decoding: each library reads and decodes the file itself (OpenCV for transferkit, whose
  stacks take numpy arrays; torchvision.io for torchvision, whose v2 transforms prefer tensors);
- without decoding: images decoded once up front in each library's preferred form, only the
  transform is timed;
- through a DataLoader (batch 32) with 0, 1 and 2 workers, decoding included (wall time, so
  these rows also reflect whatever else runs on the machine).

The stacks are timed in alternation, ``--rounds`` times, and the median of each is kept, so
the ratio is measured under the same machine load. One table is printed.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import albumentations as A
import cv2
import numpy as np
import torch
import torchvision.transforms.v2 as v2
from albumentations.pytorch import ToTensorV2
from torchvision.io import ImageReadMode, decode_image, read_file

from transferkit.augment.image import PRESETS, IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, train_transform

DATA = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "hymenoptera"
SIZE = 224

_EIGVAL = torch.tensor([0.2175, 0.0188, 0.0045])
_EIGVEC = torch.tensor([[-0.5675, 0.7192, 0.4009], [-0.5808, -0.0045, -0.8140], [-0.5836, -0.6948, 0.4203]])


class TvLighting(torch.nn.Module):
    """AlexNet PCA lighting on a float tensor in [0, 1]; torchvision has none."""

    def __init__(self, alpha: float):
        super().__init__()
        self.alpha = alpha

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        offset = _EIGVEC @ (torch.randn(3) * self.alpha * _EIGVAL)
        return (x + offset.view(3, 1, 1)).clamp_(0.0, 1.0)


# The default preset's hue jitter, read from the preset so the baselines do the same work.
DEFAULT_HUE = PRESETS["default"]["color"]["hue"]


def torchvision_stack(preset: str) -> v2.Compose:
    """The same operations as transferkit's preset, in the same order."""
    to_float = [v2.ToDtype(torch.float32, scale=True)]
    normalize = [v2.Normalize(IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD)]
    if preset == "default":
        return v2.Compose([
            v2.RandomResizedCrop(SIZE, scale=(0.2, 1.0), antialias=True),
            v2.RandomHorizontalFlip(0.5),
            v2.RandomApply([v2.ColorJitter(0.3, 0.3, 0.3, DEFAULT_HUE)], p=0.8),
            *to_float, TvLighting(0.1), *normalize,
        ])
    if preset == "heavy":
        return v2.Compose([
            v2.RandomResizedCrop(SIZE, scale=(0.08, 1.0), antialias=True),
            v2.RandomHorizontalFlip(0.5),
            v2.RandomApply([v2.RandomAffine(degrees=20, scale=(0.85, 1.15),
                                            interpolation=v2.InterpolationMode.BILINEAR)], p=0.5),
            v2.RandomApply([v2.ColorJitter(0.4, 0.4, 0.4, 0.1)], p=0.8),
            *to_float, TvLighting(0.1),
            v2.RandomApply([v2.GaussianNoise(sigma=0.05)], p=0.25),
            # cutout as a square-ish erasing of 1-4% of the area, filled with the mean
            v2.RandomErasing(p=0.25, scale=(0.01, 0.04), ratio=(0.5, 2.0), value=IMAGENET_DEFAULT_MEAN),
            v2.RandomErasing(p=0.25, scale=(0.02, 1 / 3), ratio=(0.3, 3.3), value="random"),
            *normalize,
        ])
    raise ValueError(preset)


def bare_albumentations_stack(preset: str) -> Callable[[np.ndarray], torch.Tensor]:
    """The same operations straight in albumentations, to show what transferkit's wrapper costs.
    Two differences favour it: its crop does not antialias, and it has no lighting (its FancyPCA,
    a per-image PCA, alone costs more than the whole stack)."""
    crop = {"default": (0.2, 1.0), "heavy": (0.08, 1.0)}[preset]
    steps = [A.RandomResizedCrop(size=(SIZE, SIZE), scale=crop), A.HorizontalFlip(p=0.5)]
    if preset == "default":
        steps += [A.ColorJitter(0.3, 0.3, 0.3, DEFAULT_HUE, p=0.8)]
    else:
        fill = tuple(round(255 * m) for m in IMAGENET_DEFAULT_MEAN)
        steps += [A.Affine(rotate=(-20, 20), scale=(0.85, 1.15), border_mode=cv2.BORDER_REFLECT_101, p=0.5),
                  A.ColorJitter(0.4, 0.4, 0.4, 0.1, p=0.8),
                  A.GaussNoise(std_range=(0.02, 0.08), p=0.25),
                  A.CoarseDropout(num_holes_range=(1, 3), hole_height_range=(0.1, 0.2),
                                  hole_width_range=(0.1, 0.2), fill=fill, p=0.25),
                  A.Erasing(scale=(0.02, 1 / 3), ratio=(0.3, 3.3), fill="random", p=0.25)]
    compose = A.Compose([*steps, A.Normalize(IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD), ToTensorV2()])
    return lambda image: compose(image=image)["image"]


def decode_cv2(path: Path) -> np.ndarray:
    return cv2.cvtColor(cv2.imread(str(path), cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)


def decode_tv(path: Path) -> torch.Tensor:
    return decode_image(read_file(str(path)), mode=ImageReadMode.RGB)


class Files(torch.utils.data.Dataset):
    def __init__(self, paths: list[Path], decode: Callable, transform: Callable):
        self.paths, self.decode, self.transform = paths, decode, transform

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.transform(self.decode(self.paths[i]))


def rate(fn: Callable[[], int], clock: Callable[[], float]) -> float:
    start = clock()
    count = fn()
    return count / (clock() - start)


def over(items: list, transform: Callable) -> Callable[[], int]:
    def run() -> int:
        for item in items:
            transform(item)
        return len(items)
    return run


def through_loader(paths: list[Path], decode: Callable, transform: Callable, workers: int) -> Callable[[], int]:
    def run() -> int:
        loader = torch.utils.data.DataLoader(Files(paths, decode, transform), batch_size=32,
                                             num_workers=workers, shuffle=True)
        return sum(len(batch) for batch in loader)
    return run


def side_by_side(runs: list[Callable[[], int]], rounds: int,
                 clock: Callable[[], float] = time.process_time) -> list[float]:
    """Median images/second of each run, timed in alternation. In-process work is timed in CPU
    time of this process, so other load on a shared machine does not count against it (wall
    time for worker processes)."""
    for run in runs:  # warm caches and lazy initialisation
        run()
    rates: list[list[float]] = [[] for _ in runs]
    for _ in range(rounds):
        for run, measured in zip(runs, rates):
            measured.append(rate(run, clock))
    return [statistics.median(measured) for measured in rates]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    if not DATA.is_dir():
        print(f"benchmark data not found: {DATA.resolve()} (the hymenoptera folder of ../shared)", file=sys.stderr)
        return 2
    paths = sorted(p for p in DATA.rglob("*") if p.suffix.lower() in (".jpg", ".jpeg"))
    torch.set_num_threads(1)
    cv2.setNumThreads(1)

    arrays = [decode_cv2(p) for p in paths]
    tensors = [decode_tv(p) for p in paths]
    rows = []
    for preset in ("default", "heavy"):
        ours, theirs, bare = train_transform(preset, SIZE), torchvision_stack(preset), bare_albumentations_stack(preset)
        rows.append((preset, "transform only", *side_by_side(
            [over(arrays, ours), over(tensors, theirs), over(arrays, bare)], args.rounds)))
        rows.append((preset, "decode + transform", *side_by_side(
            [over(paths, lambda p: ours(decode_cv2(p))), over(paths, lambda p: theirs(decode_tv(p))),
             over(paths, lambda p: bare(decode_cv2(p)))], args.rounds)))
        for workers in (0, 1, 2):
            rows.append((preset, f"DataLoader, {workers} workers", *side_by_side(
                [through_loader(paths, decode_cv2, ours, workers), through_loader(paths, decode_tv, theirs, workers)],
                max(1, args.rounds - 1), clock=time.perf_counter), None))

    print(f"{len(paths)} JPEGs from {DATA.resolve()}, output {SIZE}x{SIZE}, images/second "
          f"(median of {args.rounds} alternating rounds; one thread, CPU time; DataLoader rows in wall time)")
    print(f"{'preset':<8} {'measure':<24} {'transferkit':>12} {'torchvision':>12} {'tk/tv':>7} "
          f"{'bare albu':>10} {'tk/bare':>8}")
    for preset, what, ours_rate, tv_rate, bare_rate in rows:
        bare_cols = f"{bare_rate:>10.0f} {ours_rate / bare_rate:>7.2f}x" if bare_rate else f"{'-':>10} {'-':>8}"
        print(f"{preset:<8} {what:<24} {ours_rate:>12.0f} {tv_rate:>12.0f} {ours_rate / tv_rate:>6.2f}x {bare_cols}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
