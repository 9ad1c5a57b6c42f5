"""The learning-rate schedule of a fit, computed once from the settings and handed to the module as data.

One ``Schedule`` holds everything that shapes the rate: warmup, the kind (cosine, step, linear,
inverse-sqrt, constant), snapshot cycles with warm restarts (``fit --snapshots``), the flat SWA phase
(``fit --swa``), lp-ft's linear-probe phase, which comes first and trains the head alone, and
gradual unfreezing's stages (the head alone, then one more group from the top every
``unfreeze_every`` epochs, the rate warming up again at each). ``Schedule.for_group(steps_per_epoch,
depth)`` gives the multiplier of a parameter group's base rate at each optimizer step (depth 0:
the head, 1: the top backbone group, ...); the epochs at which snapshots, SWA and early stopping act are
derived from the same object, so the callbacks and the rate never disagree.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

from transferkit.errors import ConfigError


def cycle_ends(epochs: int, cycles: int) -> list[int]:
    """The epochs (1-based) that end each snapshot cycle: ``epochs // cycles`` epochs per cycle,
    the last cycle taking the remainder."""
    if cycles < 1 or epochs < cycles:
        raise ConfigError(f"{cycles} snapshot cycles cannot fit in {epochs} epochs; use --epochs {max(cycles, 1)}"
                          " or more")
    length = epochs // cycles
    return [length * (i + 1) for i in range(cycles - 1)] + [epochs]


def swa_epochs(epochs: int, snapshots: int = 0) -> list[int]:
    """The epochs (1-based) whose final weights SWA averages: the snapshot cycle ends, else the
    last quarter of the run (at least two epochs where there are two)."""
    if snapshots:
        return cycle_ends(epochs, snapshots)
    n = min(epochs, max(2, math.ceil(epochs / 4)))
    return list(range(epochs - n + 1, epochs + 1))


def warmup_cosine(step: int, total: int, warmup: int, min_ratio: float) -> float:
    """Linear warmup over `warmup` steps, then cosine from 1 to `min_ratio` at step `total`."""
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def snapshot_factor(step: int, total: int, warmup: int, cycles: int, min_ratio: float,
                    steps_per_epoch: int = 1) -> float:
    """Multiplier at step ``step`` of ``total`` under ``cycles`` cosine cycles with warm restarts
    (Loshchilov & Hutter's SGDR with equal cycles).

    Cycles start and end on epoch boundaries (``cycle_ends``). The linear warmup (at most half
    of the first cycle) belongs to the first cycle; the last step of every cycle runs at exactly
    ``min_ratio``. torch's CosineAnnealingWarmRestarts was considered: it neither warms up nor
    ends a cycle on its minimum (it restarts one step early), and it counts in epochs or steps
    without aligning cycles to epochs.
    """
    epochs = max(1, total // max(1, steps_per_epoch))
    cycles = min(cycles, epochs)
    bounds = [e * steps_per_epoch for e in cycle_ends(epochs, cycles)]
    bounds[-1] = total
    if step >= total:
        return min_ratio
    cycle = next(i for i, end in enumerate(bounds) if step < end)
    start = bounds[cycle - 1] if cycle else 0
    end = bounds[cycle]
    if cycle == 0:
        warm = min(warmup, (end - start) // 2)
        if step < warm:
            return (step + 1) / warm
        start += warm
    length = end - start
    progress = 1.0 if length <= 1 else (step - start) / (length - 1)
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


@dataclass(frozen=True)
class Schedule:
    """The rate of every step of a fit, as data.

    ``epochs`` counts every epoch the Trainer runs; the first ``probe_epochs`` of them (lp-ft)
    train the head alone at ``probe_lr_scale`` times the head rate, with their own warmup and
    cosine; the rest (the main phase) follow ``kind``, the snapshot cycles or the SWA hold.
    """

    epochs: int
    kind: str = "cosine"              # cosine | step | linear | inverse-sqrt | constant
    warmup_epochs: float = 1.0
    min_lr_ratio: float = 0.01        # cosine floor as a fraction of the peak
    step_epochs: int = 0              # step: decay every N epochs (0: a third of the main phase)
    step_gamma: float = 0.1
    cycles: int = 0                   # snapshot cycles in the main phase
    swa: bool = False                 # hold the rate flat over the SWA epochs (without cycles)
    probe_epochs: int = 0
    probe_lr_scale: float = 1.0
    unfreeze_every: int = 0           # gradual: epochs per stage (0: not gradual)
    groups: int = 0                   # gradual: backbone groups, joining one per stage from the top

    def join_epoch(self, depth: int) -> int:
        """The epoch (0-based) from which the group at `depth` trains (0 for all but gradual)."""
        return depth * self.unfreeze_every

    @property
    def main_epochs(self) -> int:
        return self.epochs - self.probe_epochs

    def _main_epoch(self, epoch: int) -> int:
        return self.probe_epochs + epoch  # 1-based main-phase epoch -> 1-based Trainer epoch

    def snapshot_epochs(self) -> list[int]:
        """Trainer epochs (1-based) at which a snapshot is written (the end of each cycle)."""
        return [self._main_epoch(e) for e in cycle_ends(self.main_epochs, self.cycles)] if self.cycles else []

    def swa_epochs(self) -> list[int]:
        return [self._main_epoch(e) for e in swa_epochs(self.main_epochs, self.cycles)]

    def judged_epochs(self) -> set[int] | None:
        """Epochs (1-based) at which early stopping may judge; None: every epoch."""
        if self.cycles:
            return set(self.snapshot_epochs())
        if self.probe_epochs:
            return set(range(self.probe_epochs + 1, self.epochs + 1))
        if self.unfreeze_every:  # once every group trains (or at the last epoch, if they never all do)
            return set(range(min(self.join_epoch(self.groups) + 1, self.epochs), self.epochs + 1))
        return None

    def for_group(self, steps_per_epoch: int, depth: int) -> Callable[[int], float]:
        """The multiplier of the base rate of the parameter group at `depth` (0: the head)."""
        if not self.unfreeze_every:
            return self.factors(steps_per_epoch)[0 if depth == 0 else 1]
        spe = max(1, steps_per_epoch)
        total = self.epochs * spe
        starts = [k * self.unfreeze_every * spe for k in range(self.groups + 1)]
        starts = [b for b in starts if b < total] or [0]
        ends = starts[1:] + [total]
        join = self.join_epoch(depth) * spe

        def factor(step: int) -> float:
            if step < join:
                return 0.0
            stage = max(i for i, b in enumerate(starts) if b <= step)
            length = ends[stage] - starts[stage]
            warmup = min(int(round(self.warmup_epochs * spe)), length // 2)
            return warmup_cosine(step - starts[stage], length, warmup, self.min_lr_ratio)
        return factor

    def factors(self, steps_per_epoch: int) -> tuple[Callable[[int], float], Callable[[int], float]]:
        """(head, backbone) multipliers of the base rates at optimizer step ``step`` (0-based)."""
        spe = max(1, steps_per_epoch)
        probe_steps = self.probe_epochs * spe
        main_total = max(1, self.main_epochs * spe)

        def warm(total: int) -> int:
            return min(int(round(self.warmup_epochs * spe)), total // 2)

        main = self._main(main_total, warm(main_total), spe)

        def probe(step: int) -> float:
            return self.probe_lr_scale * warmup_cosine(step, probe_steps, warm(probe_steps), self.min_lr_ratio)

        def head(step: int) -> float:
            return probe(step) if step < probe_steps else main(step - probe_steps)

        def body(step: int) -> float:
            return 0.0 if step < probe_steps else main(step - probe_steps)

        return head, body

    def _main(self, total: int, warmup: int, spe: int) -> Callable[[int], float]:
        if self.cycles:
            return lambda s: snapshot_factor(s, total, warmup, self.cycles, self.min_lr_ratio, spe)

        def base(step: int) -> float:
            if warmup > 0 and step < warmup:
                return (step + 1) / warmup
            if self.kind == "constant":
                return 1.0
            if self.kind == "step":
                every = max(1, self.step_epochs or math.ceil(total / spe / 3)) * spe
                return self.step_gamma ** ((step - warmup) // every)
            if self.kind == "linear":  # from 1 after warmup to the floor at the last step
                progress = min(1.0, (step - warmup) / max(1, total - warmup))
                return 1.0 - (1.0 - self.min_lr_ratio) * progress
            if self.kind == "inverse-sqrt":  # 1 / sqrt(1 + epochs since warmup)
                return 1.0 / math.sqrt(1.0 + (step - warmup) / spe)
            return warmup_cosine(step, total, warmup, self.min_lr_ratio)

        if self.swa:  # SWALR's flat phase: the rate where the SWA epochs start, held
            hold = max(warmup, (min(swa_epochs(self.main_epochs)) - 1) * spe)
            return lambda s: base(min(s, hold))
        return base
