"""Find the images of a folder: walk it, check each file, name its classes, split it.

Two layouts are understood:

- ``DATA/<class>/*.jpg``: one folder per class; a stratified validation split is drawn;
- ``DATA/train/<class>/...`` + ``DATA/val/<class>/...`` (+ optional ``DATA/test/<class>/...``).
"""
from __future__ import annotations

import logging
import multiprocessing as mp
import os
import sys
from collections import Counter
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from pathlib import Path

from transferkit.errors import DataError
from transferkit.pipelines.data.datasets import Sample
from transferkit.pipelines.data.failures import Skipped
from transferkit.pipelines.data.images import is_image_file, probe_image

log = logging.getLogger(__name__)

SPLIT_NAMES = ("train", "val", "test")


@dataclass
class ScanResult:
    """What a folder holds: class names, usable samples per split, and files left out."""

    root: Path
    classes: list[str]
    splits: dict[str, list[Sample]]
    skipped: list[Skipped] = field(default_factory=list)
    presplit: bool = False

    def counts(self, split: str) -> dict[str, int]:
        c = Counter(s.label for s in self.splits.get(split, []))
        return {name: c.get(i, 0) for i, name in enumerate(self.classes)}


def _class_dirs(folder: Path) -> list[Path]:
    try:
        return sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))
    except PermissionError:
        raise DataError(f"cannot read {folder}: permission denied; give yourself read access"
                        f" (chmod u+rx {folder}) or pass another folder") from None


@dataclass
class Walk:
    """The files under a folder (path as reached, and its real path with links resolved), and
    the sub-folders that could not be read."""

    files: list[tuple[str, str]]
    unreadable: list[str]


def walk(folder: str | Path) -> Walk:
    """Every file under `folder`, sorted, with its real path; hidden names are left out.

    Linked folders and files are followed, each real folder once, so a link back up the tree is
    walked once instead of at every level. Real paths are tracked from the walk itself (only a
    link costs a ``realpath``), so that a file reached twice can be told apart from two files.
    Strings, not Paths: Path objects cost a second per 100,000 files.
    """
    files: list[tuple[str, str]] = []
    unreadable: list[str] = []
    seen: set[str] = set()

    def visit(path: str, real: str) -> None:
        if real in seen:
            return
        seen.add(real)
        try:
            with os.scandir(path) as it:
                entries = sorted((e for e in it if not e.name.startswith(".")), key=lambda e: e.name)
        except PermissionError:
            unreadable.append(path)
            return
        except OSError:
            return  # vanished while walking
        subdirs = []
        for e in entries:
            link = e.is_symlink()
            target = os.path.realpath(e.path) if link else os.path.join(real, e.name)
            try:
                is_dir = e.is_dir()  # follows a link
            except OSError:
                is_dir = False
            if is_dir:
                subdirs.append((e.path, target))
            else:
                files.append((e.path, target))
        for sub, sub_real in subdirs:
            visit(sub, sub_real)

    visit(str(folder), os.path.realpath(folder))
    return Walk(files, unreadable)


def walk_files(folder: str | Path) -> list[str]:
    """Every file under `folder`, sorted, as strings (see ``walk``)."""
    return [p for p, _ in walk(folder).files]


# Below this many files a process pool costs more to start than it saves.
_POOL_MIN_FILES = 2000


def _probe_all(paths: Sequence[str], workers: int, progress: bool) -> list[str | None]:
    """Probe every file; processes for large folders, since decoding small files holds the GIL.

    Threads were tried first: on small files most of the time is spent in Python between
    decoder calls, so threads ran slower than one loop. If a worker process dies (killed for
    memory, say), the files not yet checked are checked here.
    """
    from tqdm.auto import tqdm

    names = list(paths)
    bar = tqdm(total=len(names), desc="scanning images", unit="img", leave=False,
               disable=not progress or len(names) < _POOL_MIN_FILES)
    results: list[str | None] = []
    with bar:
        if workers > 1 and len(names) >= _POOL_MIN_FILES:
            chunk = max(16, min(512, len(names) // (workers * 16)))
            # fork: the probe needs nothing the children would have to import again.
            ctx = mp.get_context("fork") if sys.platform.startswith("linux") else None
            try:
                with ProcessPoolExecutor(workers, mp_context=ctx) as pool:
                    for r in pool.map(probe_image, names, chunksize=chunk):
                        results.append(r)
                        bar.update()
            except BrokenProcessPool:
                log.warning("an image-checking process died after %d files; checking the rest in this"
                            " process", len(results))
        for name in names[len(results):]:
            results.append(probe_image(name))
            bar.update()
    return results


def _scan_split(folder: Path, classes: list[str] | None, workers: int, progress: bool):
    class_dirs = _class_dirs(folder)
    names = [d.name for d in class_dirs]
    if classes is not None and names != classes:
        missing = sorted(set(classes) - set(names))
        extra = sorted(set(names) - set(classes))
        raise DataError(
            f"{folder} has different classes than the training folder"
            f" (missing: {', '.join(missing) or 'none'}; extra: {', '.join(extra) or 'none'});"
            " give every split the same class sub-folders"
        )
    candidates: list[tuple[str, int]] = []
    skipped: list[Skipped] = []
    owner: dict[str, tuple[str, int]] = {}  # real path -> (the path it was first reached as, its label)
    for label, d in enumerate(class_dirs):
        found = walk(d)
        skipped += [Skipped(u, "scan", "permission denied (a folder)") for u in found.unreadable]
        for p, real in found.files:
            name = os.path.basename(p)
            if not is_image_file(name):
                skipped.append(Skipped(p, "scan", f"not an image extension ({os.path.splitext(name)[1] or 'none'})"))
                continue
            first = owner.setdefault(real, (p, label))
            if first == (p, label):
                candidates.append((p, label))
            elif first[1] == label:
                skipped.append(Skipped(p, "scan", f"the same file as {first[0]}"))
            else:
                raise DataError(f"{real} is in two classes, as {first[0]} ({names[first[1]]}) and as {p}"
                                f" ({names[label]}); a file under two classes trains with both labels:"
                                " remove one of the links")
    reasons = _probe_all([p for p, _ in candidates], workers, progress)
    samples = []
    for (p, label), reason in zip(candidates, reasons):
        if reason is None:
            samples.append(Sample(p, label))
        else:
            skipped.append(Skipped(p, "scan", reason))
    return names, samples, sorted(skipped)


def scan_folder(root: str | Path, *, workers: int | None = None, progress: bool = True,
                strict: bool = False, quiet: bool = False) -> ScanResult:
    """Find classes and usable images under `root`; raise DataError when it cannot be trained on.

    Sample paths are absolute, so that a run's saved splits work from any working directory.
    """
    root = Path(root).expanduser().absolute()
    if not root.exists():
        raise DataError(f"data folder {root} does not exist; pass a folder with one sub-folder per class")
    if not root.is_dir():
        raise DataError(f"{root} is a file, not a folder; pass a folder with one sub-folder per class")
    workers = workers or min(8, os.cpu_count() or 1)
    presplit = (root / "train").is_dir() and (root / "val").is_dir()
    splits: dict[str, list[Sample]] = {}
    skipped: list[Skipped] = []
    if presplit:
        classes, splits["train"], sk = _scan_split(root / "train", None, workers, progress)
        skipped += sk
        for name in ("val", "test"):
            if (root / name).is_dir():
                _, splits[name], sk = _scan_split(root / name, classes, workers, progress)
                skipped += sk
    else:
        if (root / "train").is_dir():
            raise DataError(f"{root} has train/ but no val/; add {root / 'val'} or pass {root / 'train'}"
                            " itself to split it automatically")
        classes, splits["train"], skipped = _scan_split(root, None, workers, progress)
    if not classes:
        raise DataError(f"{root} has no class sub-folders; put the images of each class in a folder"
                        " named after the class (DATA/<class>/*.jpg)")
    if len(classes) < 2:
        raise DataError(f"{root} has only one class ({classes[0]}); a classifier needs at least two"
                        " class sub-folders")
    result = ScanResult(root, classes, splits, skipped, presplit)
    counts = result.counts("train")
    empty = [c for c, n in counts.items() if n == 0]
    if empty:
        folder = (root / "train" if presplit else root) / empty[0]
        if any(s.path == str(folder) for s in skipped):
            raise DataError(f"cannot read class folder {folder}: permission denied; give yourself read"
                            f" access (chmod u+rx {folder}) or remove the folder")
        left = [s for s in skipped if s.path.startswith(str(folder) + os.sep)]
        why = f" ({len(left)} file(s) left out, e.g. {left[0].path}: {left[0].reason})" if left else ""
        raise DataError(f"class {empty[0]!r} has no usable images in {folder}{why}; add images or"
                        " remove the folder")
    if presplit and not splits["val"]:
        raise DataError(f"{root / 'val'} has no usable images; add validation images or drop val/")
    if skipped:
        first = "; ".join(f"{s.path} ({s.reason})" for s in skipped[:3])
        if strict:
            raise DataError(f"{len(skipped)} unusable file(s) in {root}, e.g. {first};"
                            " fix or remove them, or run without --strict to leave them out")
        log.log(logging.DEBUG if quiet else logging.WARNING, "left out %d unusable file(s), e.g. %s",
                len(skipped), first)
    return result


def stratified_split(samples: list[Sample], val_fraction: float, seed: int) -> tuple[list[Sample], list[Sample]]:
    """Split with scikit-learn so that every class keeps its share in both parts."""
    from sklearn.model_selection import train_test_split

    if not 0.0 < val_fraction < 1.0:
        raise DataError(f"--val-fraction {val_fraction} must be between 0 and 1 (e.g. 0.2)")
    labels = [s.label for s in samples]
    counts = Counter(labels)
    n_val = max(round(val_fraction * len(samples)), len(counts))
    if min(counts.values()) < 2 or n_val >= len(samples) - len(counts) + 1:
        raise DataError(
            f"too few images to hold out a stratified validation split ({min(counts.values())} in the"
            " smallest class); add images, or give a val/ folder next to train/"
        )
    train, val = train_test_split(samples, test_size=n_val, stratify=labels, random_state=seed)
    key = lambda s: (s.label, s.path)  # noqa: E731 - stable order for the saved CSVs
    return sorted(train, key=key), sorted(val, key=key)


# File names that are not valid UTF-8 reach Python as surrogate escapes; they must round-trip


def collect_images(paths: Sequence[str | Path]) -> tuple[list[Path], list[tuple[str, str]]]:
    """Image files named or found (recursively) under `paths`, in order, and the files that are
    not images, with the reason. Files are not decoded here: a broken one is reported where it is
    read."""
    found: list[Path] = []
    skipped: list[tuple[str, str]] = []
    for p in map(Path, paths):
        if p.is_dir():
            files = walk_files(p)
        elif p.is_file():
            files = [str(p)]
        else:
            raise DataError(f"{p} does not exist; pass image files or folders of images")
        for f in files:
            name = os.path.basename(f)
            if is_image_file(name):
                found.append(Path(f))
            elif not name.startswith("."):
                skipped.append((f, f"not an image extension ({os.path.splitext(name)[1] or 'none'})"))
    if not found:
        raise DataError(f"no image files in {', '.join(map(str, paths))}; pass image files or folders of images")
    return found, skipped
