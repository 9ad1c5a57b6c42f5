"""The weights an ensemble merges: a run's checkpoints, their EMA weights, SWA and snapshots.

``evaluate --ensemble`` names: ``none`` (the ``--checkpoint`` weights), ``ema`` (that checkpoint's
averaged weights), ``swa``, ``snapshots`` (all snapshot checkpoints) and ``all`` (every model the
run holds, a weight file counted once).
"""
from __future__ import annotations

import re
from dataclasses import dataclass

from torch import Tensor

from transferkit.errors import CheckpointError, ConfigError
from transferkit.pipelines.rundir import RunDir, safe_load

ENSEMBLES = ("none", "ema", "swa", "snapshots", "all")
EMA_KEY = "ema_state_dict"
SWA_NAME = "swa"
SNAPSHOT_PREFIX = "snapshot-"



@dataclass(frozen=True)
class Member:
    """One set of weights in an ensemble: ``key`` of ``checkpoints/<checkpoint>.ckpt``."""

    checkpoint: str
    key: str = "state_dict"

    @property
    def name(self) -> str:
        return self.checkpoint + (":ema" if self.key == EMA_KEY else "")


def snapshot_names(run: RunDir) -> list[str]:
    """``snapshot-1`` ... in cycle order."""
    found = []
    for path in run.checkpoints.glob(f"{SNAPSHOT_PREFIX}*.ckpt"):
        m = re.fullmatch(rf"{SNAPSHOT_PREFIX}(\d+)", path.stem)
        if m:
            found.append((int(m.group(1)), path.stem))
    return [name for _, name in sorted(found)]


class RunWeights:
    """Checkpoints of a run loaded once each (through ``safe_load``) and the members of each ensemble."""

    def __init__(self, run: RunDir, checkpoint: str = "best"):
        self.run = run
        self.checkpoint = checkpoint
        self._loaded: dict[str, dict] = {}

    def load(self, name: str) -> dict:
        if name not in self._loaded:
            path = self.run.checkpoint(name)
            if not path.exists() and not path.is_symlink():
                have = sorted(p.stem for p in self.run.checkpoints.glob("*.ckpt"))
                hint = {"ema": " (a run trained with --ema keeps its EMA weights inside each checkpoint:"
                               " use --ensemble ema)",
                        "swa": " (train with `transferkit fit --swa` to get swa.ckpt)"}.get(name, "")
                raise CheckpointError(f"{self.run.path} has no checkpoint {name!r} ({path} does not exist); it has"
                                      f" {', '.join(have) or 'none'}: pass one of them with --checkpoint{hint}")
            self._loaded[name] = safe_load(path)
        return self._loaded[name]

    def state_dict(self, member: Member) -> dict[str, Tensor]:
        ckpt = self.load(member.checkpoint)
        if member.key not in ckpt:
            raise CheckpointError(f"{self.run.checkpoint(member.checkpoint)} holds no {member.key}; "
                                  + ("train with `transferkit fit --ema`" if member.key == EMA_KEY
                                     else "use a checkpoint written by `transferkit fit`"))
        return ckpt[member.key]

    def available(self) -> list[str]:
        """The ``--ensemble`` values this run can provide."""
        out = ["none"]
        if self.run.checkpoint(self.checkpoint).exists() and EMA_KEY in self.load(self.checkpoint):
            out.append("ema")
        if self.run.checkpoint(SWA_NAME).exists():
            out.append("swa")
        if snapshot_names(self.run):
            out.append("snapshots")
        return out + ["all"]

    def members(self, ensemble: str) -> list[Member]:
        """The weights that ``ensemble`` merges; CheckpointError naming the fit flag when the run lacks them."""
        base = Member(self.checkpoint)
        if ensemble == "none":
            self.load(self.checkpoint)
            return [base]
        if ensemble == "ema":
            if EMA_KEY not in self.load(self.checkpoint):
                raise CheckpointError(f"{self.run.checkpoint(self.checkpoint)} holds no EMA weights; train with"
                                      " `transferkit fit --ema` to evaluate --ensemble ema")
            return [Member(self.checkpoint, EMA_KEY)]
        if ensemble == "swa":
            if not self.run.checkpoint(SWA_NAME).exists():
                raise CheckpointError(f"{self.run.path} has no SWA weights ({self.run.checkpoint(SWA_NAME)});"
                                      " train with `transferkit fit --swa` to evaluate --ensemble swa")
            return [Member(SWA_NAME)]
        if ensemble == "snapshots":
            names = snapshot_names(self.run)
            if not names:
                raise CheckpointError(f"{self.run.checkpoints} holds no snapshot-*.ckpt; train with"
                                      " `transferkit fit --snapshots 3` to evaluate --ensemble snapshots")
            return [Member(n) for n in names]
        if ensemble == "all":
            found = [m for e in self.available() if e not in ("none", "all") for m in self.members(e)]
            # best.ckpt often is one of the snapshots (same step): count those weights once.
            steps = {self.load(m.checkpoint).get("global_step") for m in found
                     if m.checkpoint.startswith(SNAPSHOT_PREFIX)}
            if self.load(self.checkpoint).get("global_step") not in steps:
                found.insert(0, base)
            return found
        raise ConfigError(f"unknown --ensemble {ensemble!r}; use one of {', '.join(ENSEMBLES)}")
