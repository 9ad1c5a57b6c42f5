"""Where a fit's time goes: seconds per phase, kept in report.json's ``timings`` and printed in one line.

The phases are the recipe's: ``setup`` (imports, from the process's start under the CLI, then the
checks, the backbone and its weights), ``scan``, ``advisor``, ``features`` (frozen features, computed
once), ``training`` and ``validation`` (inside ``trainer.fit``, told apart by ``EpochClock``),
``final_evaluation`` and ``report`` (report.json, per-image rows, plots, report.html).
``train_images_per_second`` counts the images of training batches over the time inside training
epochs (from an epoch's start to its last batch), the number to compare with a hand-written loop;
``train_epochs`` has each epoch's seconds and images (the first epoch fills the decode cache).
"""
from __future__ import annotations

import os
import time
from contextlib import contextmanager
from typing import Iterator

import pytorch_lightning as pl

PHASES = ("setup", "scan", "advisor", "features", "training", "validation", "final_evaluation", "report")


def process_started() -> float | None:
    """When this process started (``time.time()`` seconds), from /proc; None where there is none."""
    try:
        with open("/proc/self/stat", encoding="ascii") as f:
            ticks = int(f.read().rsplit(")", 1)[1].split()[19])  # field 22, after the command name
        with open("/proc/uptime", encoding="ascii") as f:
            uptime = float(f.read().split()[0])
        return time.time() - uptime + ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return None


class Timings:
    """Seconds per phase of one fit, from ``started`` (``time.time()``; None: now)."""

    def __init__(self, started: float | None = None):
        self.started = time.time() if started is None else started
        self.seconds: dict[str, float] = dict.fromkeys(PHASES, 0.0)
        self.epochs: list[tuple[float, int]] = []  # (seconds inside, images) of each training epoch

    def add(self, phase: str, seconds: float) -> None:
        self.seconds[phase] += seconds

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        t = time.perf_counter()
        try:
            yield
        finally:
            self.add(name, time.perf_counter() - t)

    def mark_setup_done(self) -> None:
        """Setup is everything from the start until now that no phase has claimed."""
        claimed = sum(v for k, v in self.seconds.items() if k != "setup")
        self.seconds["setup"] = max(0.0, time.time() - self.started - claimed)

    def to_dict(self) -> dict:
        out = {k: round(v, 2) for k, v in self.seconds.items()}
        out["total"] = round(time.time() - self.started, 2)
        seconds, images = sum(s for s, _ in self.epochs), sum(n for _, n in self.epochs)
        out["train_images_per_second"] = round(images / seconds, 1) if seconds > 0 else None
        out["train_epochs"] = [{"seconds": round(s, 2), "images": n} for s, n in self.epochs]
        return out


def describe(timings: dict) -> str:
    """One line: ``total 41.2 s: setup 3.1, scan 0.4, ... (train 212 images/s)``."""
    parts = [f"{k.replace('_', ' ')} {timings[k]:.1f}" for k in PHASES if timings.get(k)]
    rate = timings.get("train_images_per_second")
    return (f"time {timings['total']:.1f} s: " + ", ".join(parts)
            + (f" (training {rate:.0f} images/s)" if rate else ""))


class EpochClock(pl.Callback):
    """Splits the time inside ``trainer.fit`` into training and validation for `timings`."""

    def __init__(self, timings: Timings):
        self.timings = timings
        self._epoch = self._last = self._val = 0.0
        self._images = 0

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._epoch = self._last = time.perf_counter()
        self._images = 0

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        self._last = time.perf_counter()
        x = batch[0] if isinstance(batch, (tuple, list)) else batch
        self._images += int(len(x))

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.timings.epochs.append((self._last - self._epoch, self._images))

    def on_validation_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._val = time.perf_counter()

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.timings.add("validation", time.perf_counter() - self._val)
