"""The callbacks every fit runs: the run's files, seeding, and one decision for every process.

- ``AtomicCheckpointIO``: Lightning's checkpoint IO through ``rundir.atomic_write`` and ``safe_load``;
- ``MetricsCSV``: one row per epoch in ``metrics.csv``;
- ``EpochSeed``: the global RNGs seeded from (seed, epoch) at every epoch start;
- ``RankZeroDecides``: rank 0's strategy and run directory, broadcast to every process.
"""
from __future__ import annotations

import csv
import os
import time
from pathlib import Path
from typing import Any, Callable

import pytorch_lightning as pl
import torch
from lightning_fabric.plugins.io.torch_io import TorchCheckpointIO

from transferkit.pipelines.data.datasets import epoch_seed
from transferkit.pipelines.rundir import atomic_torch_save, safe_load


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning checkpoint IO that renames complete files into place and loads only weights."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options=None) -> None:
        atomic_torch_save(checkpoint, Path(path))

    def load_checkpoint(self, path, map_location=None, weights_only=None) -> dict[str, Any]:
        return safe_load(path, map_location or "cpu")

    def remove_checkpoint(self, path) -> None:
        Path(path).unlink(missing_ok=True)


class MetricsCSV(pl.Callback):
    """One row per epoch in metrics.csv (rank 0 writes); a resumed run never repeats an epoch.

    The row is written when validation ends, before the epoch's checkpoint (Lightning runs
    checkpoint callbacks last), so a checkpoint never holds an epoch that metrics.csv lacks.
    """

    # val_count: how many val images the metrics cover, each once (fewer than the split when a
    # file broke during training and was dropped).
    COLUMNS = ("epoch", "train_loss", "train_acc", "val_loss", "val_acc", "val_loss_ema", "val_acc_ema",
               "val_count", "lr", "seconds")

    def __init__(self, path: Path):
        self.path = Path(path)
        self._reset()

    def _reset(self) -> None:
        self._t0 = time.monotonic()
        self._sums: torch.Tensor | None = None  # loss * n, correct, n; on the batches' device

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # current_epoch is restored by now: drop rows of epochs the checkpoint does not hold.
        if trainer.is_global_zero and self.path.exists():
            with self.path.open(newline="") as f:
                rows = [r for r in csv.DictReader(f) if int(r["epoch"]) <= trainer.current_epoch]
            self._write(rows, mode="w")

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        self._reset()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if isinstance(outputs, dict) and "count" in outputs:
            # summed where the batch is: reading a GPU value every step would wait for the GPU
            loss = outputs["loss"].detach().double()
            step = torch.stack([loss * outputs["count"], outputs["correct"].double(), torch.ones_like(loss)
                                * outputs["count"]])
            self._sums = step if self._sums is None else self._sums + step

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        sums = (self._sums if self._sums is not None else torch.zeros(3)).to(pl_module.device, torch.float32)
        if trainer.world_size > 1:
            sums = trainer.strategy.reduce(sums, reduce_op="sum")
        if not trainer.is_global_zero:
            return
        loss_sum, correct, n = (float(v) for v in sums)
        m = trainer.callback_metrics
        val = lambda k: f"{float(m[k]):.6g}" if k in m else ""  # noqa: E731
        lr = trainer.optimizers[0].param_groups[0]["lr"] if trainer.optimizers else None
        row = {"epoch": trainer.current_epoch + 1,
               "train_loss": f"{loss_sum / n:.6g}" if n else "", "train_acc": f"{correct / n:.6g}" if n else "",
               "val_loss": val("val_loss"), "val_acc": val("val_acc"),
               "val_loss_ema": val("val_loss_ema"), "val_acc_ema": val("val_acc_ema"),
               "val_count": f"{int(m['val_count'])}" if "val_count" in m else "",
               "lr": f"{lr:.6g}" if lr is not None else "", "seconds": f"{time.monotonic() - self._t0:.2f}"}
        self._write([row], mode="a")

    def _write(self, rows: list[dict], mode: str) -> None:
        new = mode == "w" or not self.path.exists()
        with self.path.open(mode, newline="", encoding="utf-8") as f:
            w = csv.DictWriter(f, fieldnames=self.COLUMNS)
            if new:
                w.writeheader()
            w.writerows(rows)
            f.flush()
            os.fsync(f.fileno())


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


class RankZeroDecides(pl.Callback):
    """Every process trains what rank 0 decided, in rank 0's run directory.

    Rank 0 measures (the advisor) and names the run directory before the Trainer starts; the
    other processes have only provisional values. In ``setup``, after the process group is up and
    before the model is wrapped for DDP and its optimizer built, rank 0's values are broadcast
    (Lightning's ``strategy.broadcast``) and handed to ``apply``. It must be the first callback,
    so that the others set up on the decided model.
    """

    def __init__(self, decision: Any, apply: Callable[[Any], None]):
        self.decision = decision
        self.apply = apply

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if trainer.world_size > 1:
            self.decision = trainer.strategy.broadcast(self.decision, src=0)
        self.apply(self.decision)
