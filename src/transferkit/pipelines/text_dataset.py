"""Expand a CSV / TSV text dataset with augmented rows.

The output keeps every original row and adds ``n`` augmented rows after each, copying
all other columns (labels included) and adding two: ``aug_op`` (``original`` or the op that
made the row) and ``source_row`` (0-based index of the original data row).
"""
from __future__ import annotations

import csv
import io
import logging
import os
from collections import Counter
from pathlib import Path

from transferkit.augment.text import augment_texts_with_ops
from transferkit.errors import ConfigError, DataError

log = logging.getLogger(__name__)

DEFAULT_OPS = "swap,delete"
OP_COLUMN = "aug_op"
SOURCE_COLUMN = "source_row"
ORIGINAL = "original"


def _delimiter(path: Path, sample: str) -> str:
    suffix = path.suffix.lower()
    if suffix in (".tsv", ".tab"):
        return "\t"
    if suffix == ".csv":
        return ","
    try:
        return csv.Sniffer().sniff(sample, delimiters=",\t;|").delimiter
    except csv.Error:
        return ","


def read_table(path: str | Path) -> tuple[list[str], list[list[str]], str]:
    """Header, data rows and delimiter of a CSV or TSV file.

    The delimiter follows the extension (.tsv/.tab: tab, .csv: comma), else is sniffed.
    Tab-separated files are read without quote handling, as the TSV format defines them:
    texts such as ``"Hi" she said`` keep their quotes.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise DataError(f"text dataset {path} does not exist: pass a CSV or TSV file with a header row")
    try:
        content = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as exc:
        raise DataError(f"{path} is not UTF-8 text ({exc.reason} at byte {exc.start}): save it as UTF-8") from exc
    delimiter = _delimiter(path, content[:65536])
    quoting = csv.QUOTE_NONE if delimiter == "\t" else csv.QUOTE_MINIMAL
    # csv.reader over the whole text, not splitlines(): a quoted field may hold a newline, and
    # splitlines() would also break rows at U+2028 and other Unicode line separators.
    rows = [row for row in csv.reader(io.StringIO(content, newline=""), delimiter=delimiter, quoting=quoting)
            if row]
    if not rows:
        raise DataError(f"{path} is empty: it needs a header row and at least one data row")
    header, data = rows[0], rows[1:]
    for number, row in enumerate(data, start=2):
        if len(row) != len(header):
            raise DataError(
                f"{path} row {number} has {len(row)} fields but the header has {len(header)}: "
                f"check the delimiter ({delimiter!r}) and quoting"
            )
    return header, data, delimiter


def _column(header: list[str], name: str, path: Path, role: str) -> int:
    if name not in header:
        raise DataError(
            f"{role} column {name!r} is not in {path}: available columns are {', '.join(header)}"
        )
    return header.index(name)


def _write_table(path: Path, header: list[str], rows: list[list[str]]) -> None:
    tsv = path.suffix.lower() in (".tsv", ".tab")
    if tsv:  # TSV has no quoting, so a field must not hold tabs or line breaks
        rows = [[" ".join(field.split("\t")).replace("\r", " ").replace("\n", " ") for field in row]
                for row in rows]
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    with partial.open("w", encoding="utf-8", newline="") as handle:
        if tsv:
            writer = csv.writer(handle, delimiter="\t", quoting=csv.QUOTE_NONE, quotechar=None,
                                lineterminator="\n")
        else:
            writer = csv.writer(handle, lineterminator="\n")
        writer.writerow(header)
        writer.writerows(rows)
    os.replace(partial, path)  # a crash leaves the old file or the new one, never half of one


def augment_csv(in_path: str | Path, out_path: str | Path, column: str = "text",
                label_column: str | None = None, ops: str | list[str] = DEFAULT_OPS, n: int = 1,
                seed: int = 0, **op_options) -> dict:
    """Write ``out_path``: every row of ``in_path`` followed by ``n`` augmented copies.

    ``column`` holds the text; ``label_column`` (optional) is checked to exist and counted in
    the summary. ``ops``, ``n``, ``seed`` and ``op_options`` are those of
    :func:`transferkit.augment.text.augment_texts`. The output is CSV, or TSV when
    ``out_path`` ends in .tsv. Returns a summary: paths, row counts, rows per op, how many
    augmented rows came out identical to their original, and rows per label.
    """
    in_path, out_path = Path(in_path).expanduser(), Path(out_path).expanduser()
    if out_path.exists() and out_path.resolve() == in_path.resolve():
        raise ConfigError(f"output {out_path} is the input file: pass another output path")
    header, rows, _ = read_table(in_path)
    text_at = _column(header, column, in_path, "text")
    label_at = _column(header, label_column, in_path, "label") if label_column else None
    if clash := [c for c in (OP_COLUMN, SOURCE_COLUMN) if c in header]:
        raise DataError(
            f"{in_path} already has column(s) {', '.join(clash)}: it looks augmented already; "
            "augment the original dataset"
        )

    log.info("augmenting %d texts from %s with %s, n=%d", len(rows), in_path, ops, n)
    variants = augment_texts_with_ops([row[text_at] for row in rows], ops, n=n, seed=seed, **op_options)

    out_rows: list[list[str]] = []
    per_op: Counter[str] = Counter()
    unchanged = 0
    for index, (row, row_variants) in enumerate(zip(rows, variants)):
        out_rows.append([*row, ORIGINAL, str(index)])
        for op, text in row_variants:
            new = list(row)
            new[text_at] = text
            out_rows.append([*new, op, str(index)])
            per_op[op] += 1
            unchanged += text == row[text_at]
    _write_table(out_path, [*header, OP_COLUMN, SOURCE_COLUMN], out_rows)

    summary = {
        "input": str(in_path),
        "output": str(out_path),
        "rows_in": len(rows),
        "rows_out": len(out_rows),
        "augmented": sum(per_op.values()),
        "ops": dict(per_op),
        "unchanged": unchanged,
    }
    if label_at is not None:
        summary["labels"] = dict(Counter(row[label_at] for row in rows))
    if unchanged:
        log.info("%d of %d augmented rows equal their original (texts too short, or no synonyms)",
                 unchanged, summary["augmented"])
    log.info("wrote %d rows to %s", len(out_rows), out_path)
    return summary
