"""Every mistake a user can make has a kind here.

A ``UserError`` carries one line that names the problem and the fix. The CLI prints it to
stderr and exits with code 2; anything else is a bug and keeps its traceback.
"""
from __future__ import annotations

import pickle
import re


class UserError(Exception):
    """A mistake in the user's input, with a one-line message that says what to do."""

    exit_code = 2

    def __init__(self, message: str):
        super().__init__(" ".join(_unwrap_worker(message, type(self).__name__).split()))


def _unwrap_worker(message: str, kind: str) -> str:
    """The original message of an error raised in a DataLoader worker process.

    torch re-raises it in the main process as ``kind("Caught <kind> in DataLoader worker ...
    Original Traceback ...")``: the user would read a traceback inside the one-line message.
    """
    if not message.startswith(f"Caught {kind} ") or "Original Traceback" not in message:
        return message
    found = list(re.finditer(rf"^(?:[\w.]+\.)?{kind}: ", message, re.MULTILINE))
    return message[found[-1].end():] if found else message


class DataError(UserError):
    """The image folder is missing, empty, has one class, or is otherwise unusable."""


class BackboneError(UserError):
    """Unknown backbone, pretrained weights that cannot be had, a weights file that does not fit."""


class ConfigError(UserError):
    """A setting that cannot work: a bad size, a bad combination of flags, an unreadable config."""


class RunDirError(UserError):
    """A run directory that is missing, not a run, or already holds one."""


class CheckpointError(UserError):
    """A checkpoint that is missing, incomplete, or refuses to load safely."""


class TrainingDiverged(UserError):
    """The loss became NaN or infinite."""


class MissingExtra(UserError):
    """An optional dependency or data package is not installed."""


class RunInterrupted(UserError):
    """Training was stopped by SIGINT or SIGTERM; the message says how to resume."""

    exit_code = 130


def refused_global(exc: BaseException) -> str | None:
    """What a ``weights_only`` torch.load refused to call (e.g. ``posix.system``), else None.

    torch's own message advises loading again with weights_only=False: never repeat that advice.
    """
    text = str(exc)
    if not isinstance(exc, pickle.UnpicklingError) or "Weights only load failed" not in text:
        return None
    found = re.search(r"GLOBAL ([\w.]+)", text)
    return found.group(1) if found else "an object that is not a tensor"
