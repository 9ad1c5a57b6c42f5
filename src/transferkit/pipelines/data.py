"""Scan and validate an image folder, split it, and serve it as Datasets and a DataModule.

Two layouts are understood:

- ``DATA/<class>/*.jpg``: one folder per class; a stratified validation split is drawn;
- ``DATA/train/<class>/...`` + ``DATA/val/<class>/...`` (+ optional ``DATA/test/<class>/...``).
"""
from __future__ import annotations

import csv
import logging
import multiprocessing as mp
import os
import sys
from collections import Counter
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from pathlib import Path

import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from transferkit.errors import DataError
from transferkit.pipelines.images import DECODE_ERRORS, describe_error, is_image_file, load_rgb, probe_image

log = logging.getLogger(__name__)

SPLIT_NAMES = ("train", "val", "test")


@dataclass(frozen=True)
class Sample:
    path: str
    label: int


@dataclass
class ScanResult:
    """What a folder holds: class names, usable samples per split, and files left out."""

    root: Path
    classes: list[str]
    splits: dict[str, list[Sample]]
    skipped: list[tuple[str, str]] = field(default_factory=list)
    presplit: bool = False

    def counts(self, split: str) -> dict[str, int]:
        c = Counter(s.label for s in self.splits.get(split, []))
        return {name: c.get(i, 0) for i, name in enumerate(self.classes)}


def _class_dirs(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))


def _list_files(class_dir: Path) -> list[str]:
    """Every file under `class_dir`, sorted, as strings: Path objects cost a second per 100,000.

    Linked folders are followed, each real folder once: a link back up the tree would
    otherwise list its images again at every level until the path grows too long.
    """
    out: list[str] = []
    seen: set[tuple[int, int]] = set()
    for dirpath, dirnames, filenames in os.walk(class_dir, followlinks=True):
        st = os.stat(dirpath)
        if (st.st_dev, st.st_ino) in seen:
            dirnames[:] = []
            continue
        seen.add((st.st_dev, st.st_ino))
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        out.extend(os.path.join(dirpath, f) for f in sorted(filenames))
    return out


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
    skipped: list[tuple[str, str]] = []
    for label, d in enumerate(class_dirs):
        for p in _list_files(d):
            name = os.path.basename(p)
            if is_image_file(name):
                candidates.append((p, label))
            elif not name.startswith("."):
                skipped.append((p, f"not an image extension ({os.path.splitext(name)[1] or 'none'})"))
    reasons = _probe_all([p for p, _ in candidates], workers, progress)
    samples = []
    for (p, label), reason in zip(candidates, reasons):
        if reason is None:
            samples.append(Sample(p, label))
        else:
            skipped.append((p, reason))
    return names, samples, sorted(skipped)


def scan_folder(root: str | Path, *, workers: int | None = None, progress: bool = True,
                strict: bool = False) -> ScanResult:
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
    skipped: list[tuple[str, str]] = []
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
        left = [(p, r) for p, r in skipped if p.startswith(str(folder) + os.sep)]
        why = f" ({len(left)} file(s) left out, e.g. {left[0][0]}: {left[0][1]})" if left else ""
        raise DataError(f"class {empty[0]!r} has no usable images in {folder}{why}; add images or"
                        " remove the folder")
    if presplit and not splits["val"]:
        raise DataError(f"{root / 'val'} has no usable images; add validation images or drop val/")
    if skipped:
        first = "; ".join(f"{p} ({r})" for p, r in skipped[:3])
        if strict:
            raise DataError(f"{len(skipped)} unusable file(s) in {root}, e.g. {first};"
                            " fix or remove them, or run without --strict to leave them out")
        log.warning("left out %d unusable file(s), e.g. %s", len(skipped), first)
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
# through the CSVs unchanged (a strict codec cannot write them at all).
_CSV_TEXT = {"newline": "", "encoding": "utf-8", "errors": "surrogateescape"}


def write_split_csv(path: Path, samples: Sequence[Sample], classes: Sequence[str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    with tmp.open("w", **_CSV_TEXT) as f:
        w = csv.writer(f)
        w.writerow(["path", "label"])
        for s in samples:
            w.writerow([s.path, classes[s.label]])
    os.replace(tmp, path)


def read_split_csv(path: Path, classes: Sequence[str]) -> list[Sample]:
    index = {c: i for i, c in enumerate(classes)}
    try:
        with path.open(**_CSV_TEXT) as f:
            reader = csv.DictReader(f)
            rows = list(reader)
    except (OSError, csv.Error) as exc:
        raise DataError(f"split file {path} cannot be read ({exc}); restore it, or train again") from None
    if not {"path", "label"} <= set(reader.fieldnames or ()):
        raise DataError(f"split file {path} has no path,label header; restore the file written by"
                        " `transferkit fit`")
    unknown = sorted({r["label"] for r in rows} - set(index))
    if unknown:
        raise DataError(f"{path} names classes the run does not know: {', '.join(unknown[:5])}")
    return [Sample(r["path"], index[r["label"]]) for r in rows]


def write_skipped_csv(path: Path, skipped: Sequence[tuple[str, str]]) -> None:
    tmp = path.with_suffix(".tmp")
    with tmp.open("w", **_CSV_TEXT) as f:
        w = csv.writer(f)
        w.writerow(["path", "reason"])
        w.writerows(skipped)
    os.replace(tmp, path)


def read_skipped_csv(path: Path) -> list[tuple[str, str]]:
    if not path.exists():
        return []
    with path.open(**_CSV_TEXT) as f:
        return [(r["path"], r["reason"]) for r in csv.DictReader(f)]


class ImageDataset(Dataset):
    """(image tensor, label, index) triples.

    A file can pass the scan and still break later (changed on disk, a decoder edge case).
    With ``replace_failed`` (training) the epoch goes on with the next sample in its place and
    the path is logged once. Without it (evaluation, prediction: the default) the failure is a
    DataError naming the file, because a stand-in image would silently change the metrics or
    the prediction written for that path.
    """

    def __init__(self, samples: Sequence[Sample], transform: Callable | None = None, *,
                 replace_failed: bool = False):
        self.samples = list(samples)
        self.transform = transform
        self.replace_failed = replace_failed
        self.failed: set[str] = set()

    def __len__(self) -> int:
        return len(self.samples)

    def _load(self, i: int):
        s = self.samples[i]
        img = load_rgb(s.path)
        return (self.transform(img) if self.transform else img), s.label

    def __getitem__(self, index: int):
        if not self.replace_failed:
            try:
                x, y = self._load(index)
            except DECODE_ERRORS as exc:
                raise DataError(f"{self.samples[index].path} could not be read ({describe_error(exc)});"
                                " restore the file, or pass images without it") from None
            return x, y, index
        n = len(self.samples)
        for attempt in range(min(n, 20)):
            i = (index + attempt) % n
            try:
                x, y = self._load(i)
                return x, y, i
            except DECODE_ERRORS as exc:
                path = self.samples[i].path
                if path not in self.failed:
                    self.failed.add(path)
                    log.warning("could not read %s during training (%s); using another image in its place",
                                path, describe_error(exc))
        raise DataError(f"{min(n, 20)} images in a row failed to load, starting at {self.samples[index].path};"
                        " check the data folder")


def epoch_seed(seed: int, epoch: int) -> int:
    return (seed * 1_000_003 + epoch * 7919) % (2**63 - 1)


class EpochSampler(Sampler[int]):
    """A shuffle that is a function of (seed, epoch) alone, so a resumed run sees the same order.

    It also reseeds the DataLoader's generator, from which each epoch's worker seeds are drawn,
    so worker-side augmentation is reproducible per epoch too. torch's RandomSampler draws from
    the global generator instead, whose state a resumed process does not have.
    """

    def __init__(self, n: int, seed: int, generator: torch.Generator, epoch: int = 0):
        self.n, self.seed, self.generator = n, seed, generator
        self.set_epoch(epoch)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        self.generator.manual_seed(epoch_seed(self.seed, epoch))

    def __len__(self) -> int:
        return self.n

    def __iter__(self):
        g = torch.Generator().manual_seed(epoch_seed(self.seed, self.epoch) + 1)
        return iter(torch.randperm(self.n, generator=g).tolist())


class EpochSeed(pl.Callback):
    """Seed torch, numpy and random at every epoch start from (seed, epoch).

    Dropout, batch mixing and in-process augmentation then depend on the epoch, not on the
    history of the process, which is what makes an interrupted and resumed run end where an
    uninterrupted one does.
    """

    def __init__(self, seed: int):
        self.seed = seed

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        pl.seed_everything(epoch_seed(self.seed, trainer.current_epoch) % (2**32), workers=True, verbose=False)


class ImageDataModule(pl.LightningDataModule):
    def __init__(self, train: Sequence[Sample], val: Sequence[Sample], train_transform: Callable,
                 eval_transform: Callable, batch_size: int = 32, num_workers: int = 0, seed: int = 0):
        super().__init__()
        self.train_ds = ImageDataset(train, train_transform, replace_failed=True)
        # A replaced validation image returns its stand-in's index, and the classifier counts
        # each index once: the broken file drops out of val metrics instead of ending the run.
        self.val_ds = ImageDataset(val, eval_transform, replace_failed=True)
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.seed = seed

    def _loader(self, ds: Dataset, shuffle: bool = False, drop_last: bool = False, sampler=None,
                generator=None) -> DataLoader:
        # Workers are not persistent: each epoch's workers take fresh seeds drawn from `generator`.
        return DataLoader(
            ds, batch_size=self.batch_size, shuffle=shuffle, sampler=sampler, generator=generator,
            num_workers=self.num_workers, pin_memory=torch.cuda.is_available(), drop_last=drop_last,
        )

    def train_dataloader(self) -> DataLoader:
        # A last batch of one breaks BatchNorm in training mode; drop it only when it would be tiny.
        drop = len(self.train_ds) % self.batch_size == 1 and len(self.train_ds) > self.batch_size
        trainer = getattr(self, "trainer", None)
        if trainer is not None and trainer.world_size > 1:
            # Lightning swaps in a DistributedSampler, itself a function of (seed, epoch).
            return self._loader(self.train_ds, shuffle=True, drop_last=drop)
        epoch = trainer.current_epoch if trainer is not None else 0
        g = torch.Generator()
        return self._loader(self.train_ds, sampler=EpochSampler(len(self.train_ds), self.seed, g, epoch),
                            generator=g, drop_last=drop)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val_ds, shuffle=False)
