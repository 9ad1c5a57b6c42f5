"""The run directory: its files, atomic checkpoints, metrics.csv, and loading a trained model back.

    RUN/config.yaml          every resolved setting (``fit --config`` replays it)
    RUN/classes.json         class names in label order
    RUN/splits/{train,val}.csv, RUN/skipped.csv
    RUN/checkpoints/{best,last}.ckpt
    RUN/metrics.csv          one row per epoch
    RUN/report.json, RUN/evaluation.json, RUN/plots/*.png
"""
from __future__ import annotations

import csv
import json
import logging
import os
import signal
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
import yaml
from lightning_fabric.plugins.io.torch_io import TorchCheckpointIO

from transferkit.backbones.factory import refused_global
from transferkit.errors import CheckpointError, RunDirError

log = logging.getLogger(__name__)


class RunDir:
    def __init__(self, path: str | Path):
        self.path = Path(path)

    config = property(lambda self: self.path / "config.yaml")
    classes_json = property(lambda self: self.path / "classes.json")
    splits = property(lambda self: self.path / "splits")
    skipped = property(lambda self: self.path / "skipped.csv")
    checkpoints = property(lambda self: self.path / "checkpoints")
    metrics = property(lambda self: self.path / "metrics.csv")
    report = property(lambda self: self.path / "report.json")
    evaluation = property(lambda self: self.path / "evaluation.json")
    plots = property(lambda self: self.path / "plots")

    def checkpoint(self, name: str = "best") -> Path:
        return self.checkpoints / f"{name}.ckpt"

    def holds_run(self) -> bool:
        return self.config.exists() or self.checkpoints.exists()

    @classmethod
    def create(cls, path: str | Path, overwrite: bool = False) -> "RunDir":
        run = cls(path)
        if run.path.exists() and not run.path.is_dir():
            raise RunDirError(f"--out {run.path} is a file; pass a folder for the run")
        if run.holds_run():
            if not overwrite:
                raise RunDirError(f"{run.path} already holds a run; pass --overwrite to replace it, a new"
                                  " --out, or --resume to continue it")
            for f in (run.checkpoints.glob("*.ckpt") if run.checkpoints.exists() else []):
                f.unlink()
            # Everything a run writes, so nothing of the old run can pass for the new one
            # (a stale splits/test.csv would be evaluated as if it were the new data's).
            stale = [run.metrics, run.report, run.evaluation, run.skipped]
            stale += list(run.splits.glob("*.csv")) + list(run.plots.glob("*.png"))
            for f in stale:
                f.unlink(missing_ok=True)
        try:
            run.path.mkdir(parents=True, exist_ok=True)
            run.checkpoints.mkdir(exist_ok=True)
            run.plots.mkdir(exist_ok=True)
        except OSError as exc:
            raise RunDirError(f"cannot create the run directory {run.path} ({exc.strerror or exc});"
                              " pass an --out folder you can write to") from None
        return run

    @classmethod
    def open(cls, path: str | Path) -> "RunDir":
        run = cls(path)
        if not run.path.is_dir():
            raise RunDirError(f"run directory {run.path} does not exist; pass the --out folder of a"
                              " `transferkit fit` run")
        if not (run.config.exists() and run.classes_json.exists()):
            raise RunDirError(f"{run.path} is not a transferkit run (no config.yaml / classes.json);"
                              " pass the --out folder of a `transferkit fit` run")
        return run

    def classes(self) -> list[str]:
        try:
            classes = json.loads(self.classes_json.read_text())
        except (OSError, ValueError) as exc:
            raise RunDirError(f"{self.classes_json} cannot be read ({exc}); it must be the class list"
                              " written by `transferkit fit`") from None
        if not (isinstance(classes, list) and all(isinstance(c, str) for c in classes)):
            raise RunDirError(f"{self.classes_json} is not a list of class names; restore the file"
                              " written by `transferkit fit`")
        return classes

    def read_config(self) -> dict:
        """The saved config, read with ``yaml.safe_load``: a tag that would build Python objects is refused."""
        try:
            body = yaml.safe_load(self.config.read_text())
        except yaml.YAMLError as exc:
            first = " ".join(str(exc).split())[:200]
            raise RunDirError(f"{self.config} is not plain YAML settings ({first}); restore the config.yaml"
                              " written by `transferkit fit`") from None
        if not isinstance(body, dict) or not isinstance(body.get("fit"), dict):
            raise RunDirError(f"{self.config} has no `fit:` settings; restore the config.yaml written by"
                              " `transferkit fit`")
        return body

    def write_json(self, path: Path, data: Any) -> None:
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(data, indent=2, default=_jsonable))
        os.replace(tmp, path)


def _jsonable(o: Any):
    if isinstance(o, torch.Tensor):
        return o.tolist()
    if hasattr(o, "tolist"):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


@contextmanager
def signals_deferred():
    """Hold SIGINT/SIGTERM until the block ends, then deliver them to their usual handlers.

    A Ctrl-C inside torch.save would otherwise surface as a RuntimeError from the zip writer
    instead of the clean interrupt path. Handlers can only be swapped in the main thread.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    held: list[int] = []
    old = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    old = {s: h for s, h in old.items() if h is not None}
    for s in old:
        signal.signal(s, lambda signum, frame: held.append(signum))
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h)
        for s in held:
            signal.raise_signal(s)


def atomic_torch_save(obj: Any, path: Path) -> None:
    """Write to a temporary file beside `path`, flush it to disk, then rename over `path`.

    A process killed at any moment leaves either the old file or the new one, never half of one;
    an interrupt during the write waits until the file is whole.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with signals_deferred():
        try:
            with open(tmp, "wb") as f:
                torch.save(obj, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)
    try:
        dfd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
    except OSError:
        pass


def safe_load(path: str | Path, map_location: str | torch.device = "cpu") -> dict:
    """Load a checkpoint with ``weights_only=True``: tensors and plain data only, never code."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist; train with `transferkit fit` first")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:
        first = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
        if refused := refused_global(exc):
            raise CheckpointError(f"refusing to load {path}: unpickling it would call {refused}, which a"
                                  " transferkit checkpoint never holds; only use checkpoints written by"
                                  " transferkit from sources you trust") from None
        raise CheckpointError(f"checkpoint {path} cannot be read ({first}); it may be incomplete or"
                              " corrupt: use another checkpoint of the run") from None


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
        self._sums = torch.zeros(3, dtype=torch.float64)  # loss * n, correct, n

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
            n = float(outputs["count"])
            self._sums += torch.tensor([float(outputs["loss"]) * n, float(outputs["correct"]), n],
                                       dtype=torch.float64)

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        sums = self._sums.to(pl_module.device, torch.float32)
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
        with self.path.open(mode, newline="") as f:
            w = csv.DictWriter(f, fieldnames=self.COLUMNS)
            if new:
                w.writeheader()
            w.writerows(rows)
            f.flush()
            os.fsync(f.fileno())
