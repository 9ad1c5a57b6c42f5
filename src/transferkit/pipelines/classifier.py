"""The LightningModule: backbone + head, loss, optimizer and learning-rate schedule.

Cross-cutting behaviour (checkpoints, early stopping, metrics files, weight averaging) lives in
callbacks; this module keeps the math.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch import nn

from transferkit.augment.batch import soft_target_cross_entropy
from transferkit.backbones.groups import LayerGroups
from transferkit.backbones.strategies import Plan, param_groups, set_frozen_eval
from transferkit.errors import ConfigError, TrainingDiverged


@dataclass
class OptimConfig:
    optimizer: str = "adamw"          # adamw | sgd
    lr: float = 1e-3                  # head learning rate
    weight_decay: float = 0.05
    layer_decay: float = 0.5
    momentum: float = 0.9
    schedule: str = "cosine"          # cosine | step | constant
    warmup_epochs: float = 1.0
    step_epochs: int = 0              # step schedule: decay every N epochs (0: a third of the run)
    step_gamma: float = 0.1
    label_smoothing: float = 0.1
    min_lr_ratio: float = 0.01        # cosine floor as a fraction of the peak


def lr_factor(step: int, total: int, warmup: int, cfg: OptimConfig, steps_per_epoch: int) -> float:
    """The multiplier of every group's base lr at optimizer step `step` (0-based)."""
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    if cfg.schedule == "constant":
        return 1.0
    if cfg.schedule == "step":
        every = max(1, cfg.step_epochs or math.ceil(total / steps_per_epoch / 3)) * steps_per_epoch
        return cfg.step_gamma ** ((step - warmup) // every)
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def first_per_index(rows: torch.Tensor) -> torch.Tensor:
    """Rows (index, ...) with each sample index once: a distributed sampler repeats samples to pad ranks."""
    idx = rows[:, 0].long()
    keep = torch.zeros_like(idx, dtype=torch.bool)
    if len(idx):
        order = torch.argsort(idx, stable=True)
        first = torch.ones_like(idx, dtype=torch.bool)
        first[1:] = idx[order][1:] != idx[order][:-1]
        keep[order[first]] = True
    return rows[keep]


class ImageClassifier(pl.LightningModule):
    """A timm model trained under a fine-tuning plan.

    `mixer`, when given, takes (images, labels) and returns (mixed images, soft targets); the
    loss is then a soft-target cross-entropy. With `head_only`, batches hold cached pre-logits
    features of a frozen backbone and only the classifier runs (see pipelines/features.py).
    """

    def __init__(self, model: nn.Module, groups: LayerGroups, plan: Plan, optim: OptimConfig,
                 num_classes: int, mixer: Callable | None = None, mix_until_epoch: int | None = None,
                 head_only: bool = False):
        super().__init__()
        self.model = model
        self.groups = groups
        self.plan = plan
        self.optim = optim
        self.num_classes = num_classes
        self.mixer = mixer
        self.mix_until_epoch = mix_until_epoch  # mixing stops from this epoch (0-based) on
        self.head_only = head_only
        self._val: list[torch.Tensor] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model.get_classifier()(x) if self.head_only else self.model(x)

    def train(self, mode: bool = True):
        super().train(mode)
        if mode:
            set_frozen_eval(self.model)
        return self

    # -- training ---------------------------------------------------------------------------
    def on_train_epoch_start(self) -> None:
        # Lightning keeps whatever mode modules are in; make sure frozen parts run in eval mode.
        self.train()
        if self.mixer is not None and self.mix_until_epoch is not None:
            self.mixer.enabled = self.current_epoch < self.mix_until_epoch

    def training_step(self, batch, batch_idx):
        x, y, _ = batch
        if self.mixer is not None and self.mixer.enabled:
            # Label smoothing is folded into the mixer's soft targets.
            x, soft = self.mixer(x, y)
            logits = self(x)
            loss = soft_target_cross_entropy(logits, soft)
        else:
            logits = self(x)
            loss = F.cross_entropy(logits, y, label_smoothing=self.optim.label_smoothing)
        if not torch.isfinite(loss):
            half = not str(self.trainer.precision).startswith(("32", "64"))
            raise TrainingDiverged(
                f"the training loss became {loss.item()} at epoch {self.current_epoch + 1}, step"
                f" {batch_idx + 1}; lower --lr (now {self.optim.lr:g})"
                + (" or train with --precision 32-true" if half else ""))
        correct = (logits.argmax(-1) == y).float().sum()
        self.log("train_loss", loss, on_step=False, on_epoch=True, prog_bar=True, sync_dist=True,
                 batch_size=len(y))
        return {"loss": loss, "correct": correct.detach(), "count": len(y)}

    # -- validation -------------------------------------------------------------------------
    def on_validation_epoch_start(self) -> None:
        self._val = []

    def validation_step(self, batch, batch_idx):
        x, y, idx = batch
        logits = self(x).float()
        loss = F.cross_entropy(logits, y, reduction="none")
        correct = (logits.argmax(-1) == y).float()
        self._val.append(torch.stack([idx.float(), loss, correct], dim=1))

    def on_validation_epoch_end(self) -> None:
        rows = torch.cat(self._val) if self._val else torch.zeros(0, 3, device=self.device)
        self._val = []
        if self.trainer.world_size > 1:
            # The distributed sampler pads ranks to equal length with repeated samples: gather
            # every rank's rows and count each sample index once.
            rows = self.all_gather(rows).reshape(-1, 3)
        rows = first_per_index(rows)
        n = max(1, len(rows))
        self.log("val_loss", rows[:, 1].sum() / n, prog_bar=False, rank_zero_only=False)
        self.log("val_acc", rows[:, 2].sum() / n, prog_bar=True, rank_zero_only=False)
        self.log("val_count", float(len(rows)), rank_zero_only=False)

    # -- optimizer --------------------------------------------------------------------------
    def configure_optimizers(self):
        o = self.optim
        groups = param_groups(self.model, self.groups, self.plan, o.lr, o.layer_decay, o.weight_decay)
        if o.optimizer == "adamw":
            opt = torch.optim.AdamW(groups, lr=o.lr)
        elif o.optimizer == "sgd":
            opt = torch.optim.SGD(groups, lr=o.lr, momentum=o.momentum, nesterov=True)
        else:
            raise ConfigError(f"unknown --optimizer {o.optimizer!r}; use adamw or sgd")
        total = max(1, int(self.trainer.estimated_stepping_batches))
        epochs = max(1, self.trainer.max_epochs or 1)
        per_epoch = max(1, total // epochs)
        warmup = min(int(round(o.warmup_epochs * per_epoch)), total // 2)
        from transferkit.pipelines.ensembling import averaging_schedule

        # Snapshot cycles and SWA reshape the schedule; without them this is lr_factor itself.
        factor = averaging_schedule(self.trainer, lambda s: lr_factor(s, total, warmup, o, per_epoch),
                                    total=total, warmup=warmup, steps_per_epoch=per_epoch,
                                    min_ratio=o.min_lr_ratio)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, factor)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}
