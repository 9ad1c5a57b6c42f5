"""The split files of a run: ``splits/<split>.csv`` (path,label) and ``skipped.csv`` (path,stage,reason)."""
from __future__ import annotations

import csv
from collections.abc import Sequence
from pathlib import Path

from transferkit.errors import DataError
from transferkit.pipelines.data.datasets import Sample
from transferkit.pipelines.data.failures import Skipped
from transferkit.pipelines.rundir import atomic_write

# File names that are not valid UTF-8 reach Python as surrogate escapes; they must round-trip
# through the CSVs unchanged (a strict codec cannot write them at all).
CSV_TEXT = {"newline": "", "encoding": "utf-8", "errors": "surrogateescape"}


def write_split_csv(path: Path, samples: Sequence[Sample], classes: Sequence[str]) -> None:
    with atomic_write(path, "w", **CSV_TEXT) as f:
        w = csv.writer(f)
        w.writerow(["path", "label"])
        for s in samples:
            w.writerow([s.path, classes[s.label]])


def read_split_csv(path: Path, classes: Sequence[str]) -> list[Sample]:
    index = {c: i for i, c in enumerate(classes)}
    try:
        with path.open(**CSV_TEXT) as f:
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


def write_skipped_csv(path: Path, skipped: Sequence[Skipped]) -> None:
    with atomic_write(path, "w", **CSV_TEXT) as f:
        w = csv.writer(f)
        w.writerow(Skipped._fields)
        w.writerows(skipped)


def read_skipped_csv(path: Path) -> list[Skipped]:
    """The files a run left out; a file written before stages were recorded reads as the scan's."""
    if not path.exists():
        return []
    with path.open(**CSV_TEXT) as f:
        return [Skipped(r["path"], r.get("stage") or "scan", r["reason"]) for r in csv.DictReader(f)]
