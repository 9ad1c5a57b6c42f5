"""A PNG grid that shows what the augmentation does to a few images, before training on them.

One row per source image: the image itself (fitted into the cell), then ``draws`` outputs of the
train stack, un-normalized for display. With ``mixup`` or ``cutmix`` set, extra rows show the
first draws mixed in pairs, each captioned with its label weights ("0.63 ants / 0.37 bees"); the
label is the image's folder under a given folder, else its file name.
"""
from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from PIL import Image, ImageDraw, ImageFont

from transferkit.augment.batch import BatchMixer
from transferkit.augment.image import (
    IMAGENET_DEFAULT_MEAN,
    IMAGENET_DEFAULT_STD,
    train_transform,
)
from transferkit.errors import ConfigError, DataError
from transferkit.pipelines.data.folders import collect_images
from transferkit.pipelines.data.images import load_rgb

log = logging.getLogger(__name__)

PAD = 4
CAPTION = 16
BACKGROUND = (255, 255, 255)


def _find_images(paths: Sequence[Path]) -> list[tuple[Path, str]]:
    """(file, label) for every image file given or found under a given folder."""
    found: list[tuple[Path, str]] = []
    for path in map(Path, paths):
        if not path.exists():
            raise DataError(f"preview input {path} does not exist: give image files or folders of images")
        files, _ = collect_images([path]) if path.is_dir() else ([path], [])
        for file in files:
            found.append((file, file.parent.name if path.is_dir() and file.parent != path else file.stem))
    return found


def _spread(items: list, count: int) -> list:
    """At most `count` items, evenly spaced, so every class of a sorted folder shows up."""
    if len(items) <= count:
        return items
    return [items[round(i * (len(items) - 1) / (count - 1))] for i in range(count)] if count > 1 else items[:1]


def _load(found: list[tuple[Path, str]], limit: int) -> list[tuple[str, Image.Image]]:
    loaded = []
    for path, label in _spread(found, limit):
        try:
            loaded.append((label, load_rgb(path)))
        except (OSError, ValueError, SyntaxError) as exc:  # what PIL raises on a broken file
            log.warning("preview: skipping %s, which cannot be read (%s)", path, exc)
    return loaded


def _to_display(tensor: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> Image.Image:
    m = torch.tensor(mean).view(3, 1, 1)
    s = torch.tensor(std).view(3, 1, 1)
    rgb = (tensor * s + m).clamp_(0, 1).mul_(255).round_().to(torch.uint8)
    return Image.fromarray(rgb.permute(1, 2, 0).numpy())


def _fit(image: Image.Image, h: int, w: int) -> Image.Image:
    """The whole source image, scaled to fit a (h, w) cell and centered on the background."""
    factor = min(w / image.width, h / image.height)
    scaled = image.resize((max(1, round(image.width * factor)), max(1, round(image.height * factor))),
                          Image.Resampling.BILINEAR, reducing_gap=2.0)
    cell = Image.new("RGB", (w, h), BACKGROUND)
    cell.paste(scaled, ((w - scaled.width) // 2, (h - scaled.height) // 2))
    return cell


def _caption(draw: ImageDraw.ImageDraw, font: Any, text: str, x: int, y: int, width: int) -> None:
    while text and draw.textlength(text, font=font) > width:
        text = text[:-2] + "…" if len(text) > 1 else ""
    draw.text((x, y + 1), text, fill=(0, 0, 0), font=font)


def preview_grid(paths: Sequence[Path], out: Path, preset: str = "default", size: int | Sequence[int] = 224,
                 mixup: float = 0.0, cutmix: float = 0.0, draws: int = 6, seed: int = 0,
                 overrides: Mapping[str, Any] | None = None, max_images: int = 8) -> Path:
    """Write the grid as PNG to `out` and return `out`.

    The grid is ``PAD + cols * (w + PAD)`` wide and ``PAD + rows * (CAPTION + h + PAD)`` high, with
    ``cols = 1 + draws`` and ``rows`` = the images shown plus ``ceil(mixed / cols)`` mix rows.
    """
    if isinstance(draws, bool) or not isinstance(draws, int) or draws < 1:
        raise ConfigError(f"draws={draws!r} is invalid: give a positive number of augmented draws")
    if isinstance(max_images, bool) or not isinstance(max_images, int) or max_images < 1:
        raise ConfigError(f"max_images={max_images!r} is invalid: give a positive int")
    transform = train_transform(preset, size, **dict(overrides or {}))
    h, w = transform.description["size"]
    mixing = BatchMixer(2, mixup_alpha=mixup, cutmix_alpha=cutmix).enabled  # checks the alphas early

    found = _find_images(paths)
    images = _load(found, max_images)
    if not images:
        raise DataError(f"no readable image among {len(found)} file(s) in {', '.join(map(str, paths)) or '(nothing)'}:"
                        f" give image files or folders that hold some")

    with torch.random.fork_rng(devices=[]):  # reproducible from `seed`, global RNG untouched
        torch.manual_seed(seed)
        rows = [[transform(image) for _ in range(draws)] for _, image in images]

    cells: list[list[tuple[Image.Image, str]]] = []
    for (label, image), outputs in zip(images, rows):
        cells.append([(_fit(image, h, w), label)] +
                     [(_to_display(t, IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD), f"draw {i + 1}")
                      for i, t in enumerate(outputs)])
    mixed = 0
    if mixing:
        mixer = BatchMixer(_even(len(images)), mixup_alpha=mixup, cutmix_alpha=cutmix, mode="elem",
                           generator=torch.Generator().manual_seed(seed))
        mixed_cells = _mixed_cells(mixer, images, rows)
        mixed = len(mixed_cells)
        cells += [mixed_cells[k:k + 1 + draws] for k in range(0, mixed, 1 + draws)]

    grid = Image.new("RGB", grid_size(len(images), draws, (h, w), mixed), BACKGROUND)
    pen = ImageDraw.Draw(grid)
    try:
        font: Any = ImageFont.load_default(size=11)
    except ImportError:  # Pillow built without FreeType: its small bitmap font
        font = ImageFont.load_default()
    for r, row in enumerate(cells):
        for c, (picture, text) in enumerate(row):
            x, y = PAD + c * (w + PAD), PAD + r * (CAPTION + h + PAD)
            _caption(pen, font, text, x, y, w)
            grid.paste(picture, (x, y + CAPTION))
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    grid.save(out, format="PNG")
    log.info("wrote an augmentation preview of %d image(s) to %s", len(images), out)
    return out


def _even(count: int) -> int:
    return count + count % 2


def _mixed_cells(mixer: BatchMixer, images: list[tuple[str, Image.Image]],
                 rows: list[list[torch.Tensor]]) -> list[tuple[Image.Image, str]]:
    """The first draws mixed in pairs (i, B-1-i), each captioned with the weights of its sources."""
    batch = [outputs[0] for outputs in rows]
    names = [label for label, _ in images]
    if len(batch) < _even(len(batch)):  # no element may be its own partner: add another draw
        batch.append(rows[0][1 % len(rows[0])])
        names.append(names[0])
    # every element is its own class, so the targets give each source's weight even within a class
    mixed, targets = mixer(torch.stack(batch), torch.arange(len(batch)))
    cells = []
    for i in range(len(batch)):
        p = len(batch) - 1 - i
        text = f"{targets[i, i]:.2f} {names[i]} / {targets[i, p]:.2f} {names[p]}"
        cells.append((_to_display(mixed[i], IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD), text))
    return cells


def grid_size(images: int, draws: int, size: tuple[int, int], mixed: int = 0) -> tuple[int, int]:
    """(width, height) of the grid for `images` rows and `mixed` mixed cells."""
    cols = 1 + draws
    rows = images + math.ceil(mixed / cols)
    return PAD + cols * (size[1] + PAD), PAD + rows * (CAPTION + size[0] + PAD)
