"""What every command module shares: the help formatter and the progress-bar switch."""
from __future__ import annotations

import argparse
import sys


class Formatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    pass


def progress() -> bool:
    """Progress bars only where a person watches (a terminal), not in logs and CI."""
    return sys.stderr.isatty()
