"""The run directory, and the one way files are written (atomically) and checkpoints read (safely).

    RUN/config.yaml          every resolved setting (``fit --config`` replays it)
    RUN/classes.json         class names in label order
    RUN/splits/{train,val}.csv, RUN/skipped.csv
    RUN/checkpoints/{best,last}.ckpt
    RUN/metrics.csv          one row per epoch
    RUN/report.json, RUN/evaluation.json, RUN/plots/*.png
    RUN/.lock                held by the process training the run
    RUN/.failures/           files that broke after the scan, until skipped.csv lists them
"""
from __future__ import annotations

import json
import logging
import os
import signal
import threading
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

import torch
import yaml

try:
    import fcntl
except ImportError:  # not on Windows: runs are not locked there
    fcntl = None

from transferkit.errors import CheckpointError, RunDirError, refused_global

log = logging.getLogger(__name__)

# The key under which every checkpoint describes its own model (see evaluate/loading.py).
CHECKPOINT_META = "transferkit"
LOCK_NAME = ".lock"


class RunDir:
    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._lock_fd: int | None = None

    config = property(lambda self: self.path / "config.yaml")
    classes_json = property(lambda self: self.path / "classes.json")
    splits = property(lambda self: self.path / "splits")
    skipped = property(lambda self: self.path / "skipped.csv")
    checkpoints = property(lambda self: self.path / "checkpoints")
    metrics = property(lambda self: self.path / "metrics.csv")
    report = property(lambda self: self.path / "report.json")
    evaluation = property(lambda self: self.path / "evaluation.json")
    selected = property(lambda self: self.path / "selected.json")  # evaluate --select: predict's default
    plots = property(lambda self: self.path / "plots")
    failures = property(lambda self: self.path / ".failures")  # see data/failures.py
    page = property(lambda self: self.path / "report.html")
    lr_find = property(lambda self: self.path / "lr_find.json")  # fit --lr find, transferkit lr-find

    def predictions(self, split: str, combination: str | None = None) -> Path:
        """``predictions-<split>.csv``: per-image rows (evaluate/per_image.py); ``combination``
        names one (TTA, ensemble) pair of ``evaluate --per-image all``."""
        return self.path / f"predictions-{split}{'-' + combination if combination else ''}.csv"

    def checkpoint(self, name: str = "best") -> Path:
        return self.checkpoints / f"{name}.ckpt"

    def holds_run(self) -> bool:
        return self.config.exists() or self.checkpoints.exists()

    def has_checkpoints(self) -> bool:
        return self.checkpoints.is_dir() and any(self.checkpoints.glob("*.ckpt"))

    def check_creatable(self, overwrite: bool = False) -> None:
        """Raise the one-line error ``create`` would raise, before any work is done.

        A run that stopped before its first checkpoint holds nothing worth keeping: the same
        command reuses its folder without --overwrite.
        """
        if self.path.exists() and not self.path.is_dir():
            raise RunDirError(f"--out {self.path} is a file; pass a folder for the run")
        if self.holds_run() and self.has_checkpoints() and not overwrite:
            raise RunDirError(f"{self.path} already holds a run; pass --overwrite to replace it, a new"
                              " --out, or --resume to continue it")
        ours = {LOCK_NAME, self.failures.name}
        if not self.holds_run() and self.path.is_dir() and any(p.name not in ours for p in self.path.iterdir()):
            # --overwrite replaces a run, never someone else's files
            raise RunDirError(f"--out {self.path} holds files but no transferkit run; pass an empty or new folder"
                              " for the run")

    def lock(self) -> "RunDir":
        """Hold the run for this process (an exclusive ``flock`` on ``RUN/.lock``, let go when the
        process ends however it ends), so that a second fit or resume into it refuses cleanly."""
        if self._lock_fd is not None or fcntl is None:
            return self
        try:
            self.path.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise RunDirError(f"cannot create the run directory {self.path} ({exc.strerror or exc});"
                              " pass an --out folder you can write to") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = os.read(fd, 32).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise RunDirError(f"{self.path} is in use by another transferkit process (pid {holder}); wait for"
                              " it to finish, or pass another --out") from None
        os.ftruncate(fd, 0)
        os.write(fd, str(os.getpid()).encode())
        self._lock_fd = fd
        return self

    def release(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)  # closing the descriptor lets go of the lock
            self._lock_fd = None

    def resumable(self) -> Path | None:
        """The newest checkpoint that holds a whole training state (weights, optimizer, loops), or
        None: ``last.ckpt`` normally, ``best.ckpt`` when the last write failed (a full disk)."""
        found = []
        for path in sorted(self.checkpoints.glob("*.ckpt")) if self.checkpoints.is_dir() else []:
            try:
                ckpt = safe_load(path, mmap=True)
            except CheckpointError as exc:
                if str(exc).startswith("refusing"):
                    raise  # a checkpoint that would run code is an alarm, not a candidate
                log.warning("%s; not resuming from it", exc)
                continue
            if isinstance(ckpt, dict) and {"loops", "optimizer_states", "state_dict"} <= set(ckpt):
                found.append((ckpt.get("global_step", 0), ckpt.get("epoch", 0), path.name == "last.ckpt", path))
        return max(found)[3] if found else None

    @classmethod
    def create(cls, path: str | Path, overwrite: bool = False) -> "RunDir":
        """The run folder, held by this process (``lock``), emptied of any earlier run."""
        return cls(path).make(overwrite)

    def make(self, overwrite: bool = False) -> "RunDir":
        """``create`` on this RunDir (so that whoever holds it can ``release`` it)."""
        run = self
        run.check_creatable(overwrite)
        run.lock()
        try:
            run.check_creatable(overwrite)  # again: another process may have written a run meanwhile
        except RunDirError:
            run.release()
            raise
        if run.holds_run():
            for f in (run.checkpoints.glob("*.ckpt") if run.checkpoints.exists() else []):
                f.unlink()
            # Everything a run writes, so nothing of the old run can pass for the new one
            # (a stale splits/test.csv would be evaluated as if it were the new data's).
            stale = [run.metrics, run.report, run.evaluation, run.skipped, run.selected]
            stale += list(run.splits.glob("*.csv")) + list(run.plots.glob("*.png"))
            stale += list(run.failures.glob("*.jsonl")) if run.failures.is_dir() else []
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
        write_json(path, data)

    def read_json(self, path: Path) -> Any:
        try:
            return json.loads(path.read_text())
        except FileNotFoundError:
            raise RunDirError(f"{path} does not exist; the run has not finished (or was not evaluated)") from None
        except (OSError, ValueError) as exc:
            raise RunDirError(f"{path} cannot be read ({exc}); run `transferkit evaluate {self.path}` to"
                              " write it again") from None


def write_json(path: Path, data: Any) -> None:
    with atomic_write(path, "w") as f:
        f.write(json.dumps(data, indent=2, default=_jsonable))


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


@contextmanager
def atomic_write(path: str | Path, mode: str = "wb", *, interruptible: bool = False, **open_kwargs):
    """Open a temporary file beside `path`; when the block ends, flush it to disk and rename it
    over `path`. Every file transferkit writes goes through here.

    A process killed at any moment leaves either the old file or the new one, never half of one;
    an interrupt during the write waits until the file is whole. A failed write leaves `path` as it
    was and raises a one-line error naming the path and the cause (a full disk, a read-only
    folder) instead of the writer's own.

    `interruptible`: for a block that takes long (rows streamed in as they are computed), signals
    are held only while the file is flushed and renamed; a Ctrl-C during the block abandons the
    temporary file and leaves `path` as it was.
    """
    path = Path(path)
    if "b" not in mode:
        open_kwargs.setdefault("encoding", "utf-8")
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with ExitStack() as held:
        if not interruptible:
            held.enter_context(signals_deferred())
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            with open(tmp, mode, **open_kwargs) as f:
                yield f
                if interruptible:
                    held.enter_context(signals_deferred())
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except OSError as exc:
            raise RunDirError(f"cannot write {path}: {exc.strerror or exc}; free some space or pass a folder"
                              " you can write to") from None
        except RuntimeError as exc:  # torch's zip writer reports a failed write as RuntimeError
            if "enforce fail" not in str(exc) and "write" not in str(exc).lower():
                raise
            raise RunDirError(f"cannot write {path}: the write failed (is the disk full?); free some space"
                              " and resume") from None
        finally:
            tmp.unlink(missing_ok=True)
    _fsync_dir(path.parent)


def atomic_torch_save(obj: Any, path: Path) -> None:
    """``torch.save`` through ``atomic_write``."""
    with atomic_write(path, "wb") as f:
        torch.save(obj, f)


def _fsync_dir(folder: Path) -> None:
    try:
        dfd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
    except OSError:
        pass


def safe_load(path: str | Path, map_location: str | torch.device = "cpu", *, mmap: bool = False) -> dict:
    """Load a checkpoint with ``weights_only=True``: tensors and plain data only, never code
    (`mmap`: tensors stay on disk until read, for a look at the metadata)."""
    path = Path(path)
    if path.is_dir():
        raise CheckpointError(f"checkpoint {path} is a folder; pass a .ckpt file (a run keeps them in"
                              f" {path / 'checkpoints'})" if not path.name == "checkpoints" else
                              f"checkpoint {path} is a folder; pass one of its .ckpt files, e.g. {path / 'best.ckpt'}")
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist; train with `transferkit fit` first")
    try:
        return torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except Exception as exc:
        first = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
        if refused := refused_global(exc):
            raise CheckpointError(f"refusing to load {path}: unpickling it would call {refused}, which a"
                                  " transferkit checkpoint never holds; only use checkpoints written by"
                                  " transferkit from sources you trust") from None
        raise CheckpointError(f"checkpoint {path} cannot be read ({first}); it may be incomplete or"
                              " corrupt: use another checkpoint of the run") from None


