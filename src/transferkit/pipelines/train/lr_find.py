"""`fit --lr find` and `transferkit lr-find`: Lightning's LR finder over what the plan trains.

The finder (Smith 2017, as Lightning's ``Tuner.lr_find`` runs it) raises the rate exponentially
from ``MIN_LR`` to ``MAX_LR`` over ``STEPS`` optimizer steps on the training data, records the
smoothed loss, and suggests the rate where the loss falls fastest per step of the sweep
(``steepest``). It runs on the module as the
plan trains it (a freeze head on the cached features, the top groups of partial, everything for
full), in a Trainer of its own with no callbacks, in one process, before the run directory is
written; the module's weights are restored after it. Every parameter group sweeps the same rate
(Lightning's finder replaces the schedule), so the suggestion is the head's rate; the groups below
keep their layer-wise decay from it in training.
"""
from __future__ import annotations

import dataclasses
import logging
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytorch_lightning as pl

from transferkit.errors import TrainingDiverged
from transferkit.pipelines.settings import FitConfig
from transferkit.pipelines.train.module import ImageClassifier

log = logging.getLogger(__name__)

MIN_LR, MAX_LR, STEPS = 1e-6, 1.0, 100


@dataclass(frozen=True)
class LRFinding:
    """The finder's sweep and its suggestion."""

    suggestion: float
    lrs: tuple[float, ...]
    losses: tuple[float, ...]

    def to_dict(self) -> dict:
        return {"suggestion": self.suggestion, "min_lr": MIN_LR, "max_lr": MAX_LR, "steps": len(self.lrs),
                "lr": list(self.lrs), "loss": list(self.losses)}

    def plot(self, path: Path, title: str = "") -> None:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(6, 4))
        ax.plot(self.lrs, self.losses)
        ax.axvline(self.suggestion, color="crimson", ls=":", label=f"suggested {self.suggestion:.3g}")
        ax.set(xscale="log", xlabel="learning rate (head)", ylabel="training loss (smoothed)",
               title=title or "LR finder")
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        fig.savefig(path, dpi=90)
        plt.close(fig)


def steepest(lrs, losses, skip_begin: int = 10, skip_end: int = 1) -> float | None:
    """The rate where the smoothed loss falls fastest per step of the exponential sweep, that is
    against log(rate), as fastai's finder reads it; the first and last steps are left out.

    Lightning 2.6's ``suggestion()`` takes the slope against the rate itself, which the first,
    tiny rates dominate: on hymenoptera's frozen head it pointed at 1.1e-4, on a flat stretch of
    the curve, where the loss falls fastest at 1.6e-2.
    """
    lrs, losses = np.asarray(lrs, dtype=float), np.asarray(losses, dtype=float)
    end = len(lrs) - skip_end
    keep = np.arange(skip_begin, max(skip_begin, end))
    keep = keep[np.isfinite(losses[keep])]
    if len(keep) < 3:
        return None
    return float(lrs[keep[int(np.argmin(np.gradient(losses[keep])))]])


def find_lr(cfg: FitConfig, module: ImageClassifier, data: pl.LightningDataModule, *, progress: bool = True,
            steps: int = STEPS) -> LRFinding:
    """Sweep the rate on `module` as its plan trains it; the module's weights come back as they were."""
    from pytorch_lightning.tuner import Tuner

    phases = module.phases
    if phases.head_until:  # the sweep may run past --epochs: the head-only epochs must last it
        module.phases = dataclasses.replace(phases, head_until=10**9, solve=False)
    try:
        with tempfile.TemporaryDirectory(prefix="transferkit-lr-find-") as tmp:
            trainer = pl.Trainer(max_epochs=10**6, accelerator=cfg.accelerator, devices=1, precision=cfg.precision,
                                 logger=False, enable_checkpointing=False, enable_model_summary=False,
                                 enable_progress_bar=progress, default_root_dir=tmp, num_sanity_val_steps=0,
                                 use_distributed_sampler=False, gradient_clip_val=cfg.grad_clip or None)
            result = Tuner(trainer).lr_find(module, datamodule=data, min_lr=MIN_LR, max_lr=MAX_LR,
                                            num_training=steps, update_attr=False)
    finally:
        module.phases = phases
    lrs, losses = result.results.get("lr", []), result.results.get("loss", [])
    suggestion = steepest(lrs, losses)
    if suggestion is None:
        raise TrainingDiverged("the LR finder found no rate at which the loss falls (the loss diverged at once or the"
                               " sweep was too short); pass a rate with --lr")
    log.info("LR finder: %d steps from %g to %g; the loss falls fastest at %.3g", len(lrs), MIN_LR, MAX_LR,
             suggestion)
    return LRFinding(float(suggestion), tuple(map(float, lrs)), tuple(map(float, losses)))
