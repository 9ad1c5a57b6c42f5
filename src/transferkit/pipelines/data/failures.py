"""Files that could not be used, by the stage that met them.

The scan decodes every image once, but a file can still break later: it changes on disk, or a
decoder accepts its header and fails on its pixels. Each stage that reads images (the advisor,
the feature cache, training, validation, the final evaluation, ``evaluate``) reports such a file
to a ``FailureLog`` and goes on without it; ``skipped.csv`` lists them all with their stage.

DataLoader workers and DDP ranks are separate processes, so the log is a folder with one small
file per process (JSON lines, appended), read back by the process that writes the report.
With ``strict`` the first failure is an error instead.
"""
from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import NamedTuple

from transferkit.errors import DataError

log = logging.getLogger(__name__)


class Skipped(NamedTuple):
    """One file left out: where it is, the stage that met it, and why."""

    path: str
    stage: str
    reason: str


class FailureLog:
    """Where images that break after the scan are reported (see the module docstring).

    `folder` None: failures are logged as warnings only (library use outside a run).
    """

    def __init__(self, folder: str | Path | None = None, *, strict: bool = False):
        self.folder = Path(folder) if folder is not None else None
        self.strict = strict
        self._warned: set[str] = set()

    def record(self, path: str, stage: str, reason: str) -> None:
        if self.strict:
            raise DataError(f"{path} could not be read at {stage} ({reason}); --strict stops at the first"
                            " unreadable file: fix or remove it, or run without --strict to leave it out")
        if path not in self._warned:
            self._warned.add(path)
            log.warning("could not read %s at %s (%s); leaving it out", path, stage, reason)
        if self.folder is None:
            return
        self.folder.mkdir(parents=True, exist_ok=True)
        # One short line in append mode: whole even with several writers to the same file.
        with open(self.folder / f"{os.getpid()}.jsonl", "a", encoding="utf-8") as f:
            f.write(json.dumps([path, stage, reason]) + "\n")

    def entries(self, stage: str | None = None) -> list[Skipped]:
        """Every file reported so far (of `stage`, when given), each path once, in path order."""
        if self.folder is None or not self.folder.is_dir():
            return []
        found: dict[str, Skipped] = {}
        for part in sorted(self.folder.glob("*.jsonl")):
            for line in part.read_text(encoding="utf-8").splitlines():
                try:
                    entry = Skipped(*json.loads(line))
                except (ValueError, TypeError):
                    continue  # a line cut short by a kill
                if stage is None or entry.stage == stage:
                    found.setdefault(entry.path, entry)
        return sorted(found.values())

    def __getstate__(self):  # a worker starts with its own record of what it has warned about
        return {"folder": self.folder, "strict": self.strict, "_warned": set()}


def merge(*groups: list[Skipped]) -> list[Skipped]:
    """Several lists of left-out files as one, each path once (the first stage that met it)."""
    found: dict[str, Skipped] = {}
    for group in groups:
        for entry in group:
            found.setdefault(entry.path, entry)
    return sorted(found.values())
