"""Where a frozen pass, an evaluation or a prediction runs: the one rule, honouring ``--accelerator``."""
from __future__ import annotations

import torch

from transferkit.errors import ConfigError

ACCELERATORS = ("auto", "cpu", "gpu", "cuda", "mps")


def choose_device(accelerator: str = "auto", index: int = 0) -> torch.device:
    """``auto``: the first GPU there is, else the CPU; ``cpu`` always the CPU; ``gpu``/``cuda`` and
    ``mps`` that device, or an error saying it is not there. ``index`` picks among several GPUs
    (a process's local rank)."""
    accelerator = str(accelerator).lower()
    if accelerator == "cpu":
        return torch.device("cpu")
    if accelerator in ("auto", "gpu", "cuda") and torch.cuda.is_available():
        return torch.device("cuda", index % torch.cuda.device_count())
    mps = getattr(torch.backends, "mps", None)
    if accelerator in ("auto", "mps") and mps is not None and mps.is_available():
        return torch.device("mps")
    if accelerator in ("gpu", "cuda", "mps"):
        raise ConfigError(f"--accelerator {accelerator}: no such device here; use --accelerator cpu or auto")
    if accelerator != "auto":
        raise ConfigError(f"--accelerator {accelerator!r} is not known here; use one of {', '.join(ACCELERATORS)}")
    return torch.device("cpu")
