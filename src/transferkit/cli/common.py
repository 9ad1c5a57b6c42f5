"""What every command module shares: the help formatter and the progress-bar switch."""
from __future__ import annotations

import argparse
import sys


class Formatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    pass


def progress() -> bool:
    """Progress bars only where a person watches (a terminal), not in logs and CI."""
    return sys.stderr.isatty()


def quiet_lightning(verbose: bool = False) -> None:
    """Lightning's own logging and warnings, down to errors unless --verbose. Called by the
    commands that train, after their flags are checked (importing Lightning takes seconds)."""
    import logging
    import warnings

    import pytorch_lightning  # noqa: F401 - it sets its own log level on import; override after

    for name in ("pytorch_lightning", "lightning", "lightning_fabric", "lightning.pytorch"):
        logging.getLogger(name).setLevel(logging.INFO if verbose else logging.ERROR)
    if not verbose:
        warnings.filterwarnings("ignore", module="pytorch_lightning")
        warnings.filterwarnings("ignore", module="lightning_fabric")
        warnings.filterwarnings("ignore", message=".*does not have many workers.*")
