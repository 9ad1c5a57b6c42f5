"""Decode once: the resize rule a run decodes its images with, and the cache of decoded pictures.

A training crop is resized to the input size, so a picture needs no more pixels than its largest
crop can use: ``DecodeRule`` decodes a file straight to a shorter side of ``short_side``
(``short_side_for``: 1.15x the input size, and at least what the eval transform resizes to),
through PIL's draft mode where a JPEG is more than twice that (the DCT does the first halvings
almost for free), then one antialiased resize. Random resized crops are then taken from that
picture: the same crops, each from fewer source pixels when it is small.

``DecodeCache`` keeps each picture, as uint8, after the first time a DataLoader worker decodes it:
later epochs crop and augment from memory. Pictures live in one flat buffer whose layout comes
from the files' headers (their sizes, rotated by their EXIF orientation), so that workers write
straight into it: an anonymous shared mapping (``memory``), which forked workers share, or a
memory-mapped file under the run (``disk``). Each picture has a state byte, set after its pixels
are written. A picture whose decoded shape is not what its header promised is never cached.
"""
from __future__ import annotations

import logging
import math
import mmap
import multiprocessing
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image

from transferkit.pipelines.data.images import DECODE_ERRORS, to_rgb

log = logging.getLogger(__name__)

HEADROOM = 1.15             # the stored shorter side over the input size
MEMORY_BUDGET = 4 << 30     # at most this much, and a quarter of the free memory, in RAM
_EMPTY, _FULL, _NEVER = 0, 1, 2
_TRANSPOSED = (5, 6, 7, 8)  # EXIF orientations that swap width and height


def short_side_for(input_hw: Sequence[int], crop_pct: float) -> int:
    """The shorter side pictures are stored at for an input of ``input_hw`` (height, width)."""
    side = max(int(input_hw[0]), int(input_hw[1]))
    return max(math.ceil(HEADROOM * side), math.floor(side / crop_pct))


@dataclass(frozen=True)
class DecodeRule:
    """Decode a file to RGB with its shorter side at most ``short_side`` (None: at full size)."""

    short_side: int | None = None

    def target(self, width: int, height: int) -> tuple[int, int]:
        """The decoded (width, height) of a file whose stored pixels are ``width`` x ``height``."""
        s, m = self.short_side, min(width, height)
        if s is None or m <= s:
            return width, height
        return max(1, round(width * s / m)), max(1, round(height * s / m))

    def load(self, path: str | Path) -> np.ndarray:
        """The picture as an HxWx3 uint8 array, upright by its EXIF orientation."""
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path) as im:
                size = self.target(*im.size)  # from the stored size: the same whatever draft gives
                if size != im.size and im.format == "JPEG" and min(im.size) >= 2 * self.short_side:
                    im.draft("RGB", size)
                im.load()
                stored = im.size
                rgb = to_rgb(im)
        if rgb.size != stored and rgb.size == stored[::-1]:  # turned upright by its EXIF orientation
            size = size[::-1]
        if rgb.size != size:
            rgb = rgb.resize(size, Image.BILINEAR)  # PIL's bilinear widens its support: antialiased
        return np.asarray(rgb)

    def resize(self, image: Image.Image | np.ndarray) -> Image.Image | np.ndarray:
        """An in-memory image brought to the rule's size, as ``load`` brings a file."""
        pil = image if isinstance(image, Image.Image) else Image.fromarray(image)
        size = self.target(*pil.size)
        if size == pil.size:
            return image
        out = pil.resize(size, Image.BILINEAR)
        return out if isinstance(image, Image.Image) else np.asarray(out)

    def shape(self, path: str | Path) -> tuple[int, int] | None:
        """The (height, width) ``load`` returns, read from the header alone; None if unreadable."""
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", Image.DecompressionBombWarning)
                with Image.open(path) as im:
                    w, h = self.target(*im.size)
                    turned = im.getexif().get(0x0112, 1) in _TRANSPOSED
        except (*DECODE_ERRORS, TypeError, KeyError, IndexError):
            return None
        return (w, h) if turned else (h, w)


class DecodeCache:
    """The decoded pictures of ``paths`` under ``rule``, filled on first read (see the module)."""

    def __init__(self, paths: Sequence[str], rule: DecodeRule, shapes: Sequence[tuple[int, int] | None],
                 file: Path | None = None):
        self.rule, self.file = rule, file
        self.n = len(paths)
        self.shapes = list(shapes)
        sizes = np.array([h * w * 3 if s else 0 for s in self.shapes for h, w in [s or (0, 0)]], dtype=np.int64)
        self.offsets = self.n + np.concatenate([[0], np.cumsum(sizes)[:-1]]) if self.n else np.zeros(0, np.int64)
        self.nbytes = int(self.n + sizes.sum())
        self._buf: mmap.mmap | None = None
        self._open(create=True)
        state = np.frombuffer(self._buf, np.uint8, self.n)
        state[[i for i, s in enumerate(self.shapes) if s is None]] = _NEVER

    @classmethod
    def measure(cls, paths: Sequence[str], rule: DecodeRule, progress: bool = False) -> list[tuple[int, int] | None]:
        from tqdm.auto import tqdm

        return [rule.shape(p) for p in tqdm(paths, desc="decode cache: reading headers", leave=False,
                                            disable=not progress or len(paths) < 2000)]

    def _open(self, create: bool = False) -> None:
        size = max(1, self.nbytes)
        if self.file is None:
            self._buf = mmap.mmap(-1, size)  # MAP_SHARED | MAP_ANONYMOUS: forked workers write to it
            return
        self.file.parent.mkdir(parents=True, exist_ok=True)
        with open(self.file, "w+b" if create else "r+b") as f:
            if create:
                f.truncate(size)
            self._buf = mmap.mmap(f.fileno(), size)

    def __getstate__(self) -> dict:
        # Spawned workers (not forked) reopen a file; an anonymous mapping cannot travel, so they decode.
        state = dict(self.__dict__)
        state["_buf"] = None
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        if self.file is not None:
            self._open()

    def get(self, i: int, path: str | Path) -> np.ndarray:
        """Picture ``i`` (read-only), decoding ``path`` and storing it on first use."""
        buf = self._buf
        if buf is None:
            return self.rule.load(path)
        if buf[i] == _FULL:
            h, w = self.shapes[i]
            out = np.frombuffer(buf, np.uint8, h * w * 3, int(self.offsets[i])).reshape(h, w, 3)
            out.flags.writeable = False
            return out
        picture = self.rule.load(path)
        if buf[i] == _EMPTY:
            if picture.shape[:2] == self.shapes[i]:
                start = int(self.offsets[i])
                buf[start:start + picture.nbytes] = np.ascontiguousarray(picture).tobytes()
                buf[i] = _FULL  # after the pixels: a reader never sees a half-written picture
            else:
                log.debug("%s decodes to %s, not the %s its header gives: not cached", path, picture.shape[:2],
                          self.shapes[i])
                buf[i] = _NEVER
        return picture

    def filled(self) -> int:
        return int(np.count_nonzero(np.frombuffer(self._buf, np.uint8, self.n) == _FULL)) if self._buf else 0


def memory_budget() -> int:
    """Bytes a cache may take in RAM: a quarter of what is free now, at most ``MEMORY_BUDGET``."""
    try:
        free = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return MEMORY_BUDGET // 4
    return min(MEMORY_BUDGET, free // 4)


def where_to_keep(mode: str, nbytes: int, folder: Path, workers: int) -> str:
    """``memory``, ``disk`` or ``off`` for a cache of ``nbytes`` asked for as ``mode``
    (``auto``, ``memory`` or ``disk``)."""
    forked = workers == 0 or multiprocessing.get_start_method(allow_none=True) in (None, "fork")
    fits = nbytes <= memory_budget()
    if mode == "memory" and not fits:
        log.warning("the decode cache needs %.0f MB, over the memory budget of %.0f MB: keeping it on disk in %s",
                    nbytes / 1e6, memory_budget() / 1e6, folder)
    if mode in ("auto", "memory") and fits and forked:
        return "memory"
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fs = os.statvfs(folder)
        free = fs.f_bavail * fs.f_frsize
    except OSError:
        free = 0
    if free >= nbytes + (1 << 30):
        return "disk"
    log.warning("the decode cache needs %.0f MB and %s has %.0f MB free: images are decoded every epoch",
                nbytes / 1e6, folder, free / 1e6)
    return "off"
