"""The LightningModule: backbone + head, loss, optimizer and the learning-rate schedule.

It keeps the math. What shapes it comes in as data: the ``Plan`` (which groups train, at which
rates), the ``Schedule`` (the rate of every step, phases included) and the ``Phases`` (which
epochs read cached features of the frozen backbone instead of images). Cross-cutting behaviour
(checkpoints, early stopping, metrics files, weight averaging) lives in callbacks.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch import nn

from transferkit.augment.batch import soft_target_cross_entropy
from transferkit.backbones.groups import LayerGroups
from transferkit.backbones.strategies import Plan, apply_plan, param_groups, set_frozen_eval
from transferkit.errors import TrainingDiverged
from transferkit.pipelines.data.features import pre_logits
from transferkit.pipelines.rundir import CHECKPOINT_META
from transferkit.pipelines.train.schedule import Schedule

if TYPE_CHECKING:
    from transferkit.backbones.probe import ProbeFit

log = logging.getLogger(__name__)

# Where a checkpoint keeps how its head was solved (l2, folds, accuracy), for the report.
SOLVED_KEY = "solved_head"


@dataclass(frozen=True)
class Optim:
    """The optimizer's and the loss's settings (the rate itself comes from the Plan)."""

    optimizer: str = "adamw"          # settings.OPTIMIZERS
    weight_decay: float = 0.05
    momentum: float = 0.9             # momentum, nesterov, rmsprop
    label_smoothing: float = 0.1
    class_weights: tuple[float, ...] | None = None  # per class, in the loss

    def timm_args(self) -> dict:
        """timm's ``create_optimizer_v2`` name and momentum: timm's "sgd" means Nesterov, ours plain SGD."""
        name, momentum = {"sgd": ("momentum", 0.0), "momentum": ("momentum", self.momentum),
                          "nesterov": ("nesterov", self.momentum)}.get(self.optimizer, (self.optimizer, self.momentum))
        return {"opt": name, "momentum": momentum}


@dataclass(frozen=True)
class Phases:
    """Which epochs train the head alone, and whether they read cached features.

    ``head_until``: epochs ``0 .. head_until-1`` run the backbone frozen (in eval mode, no
    gradient) and train only the classifier: every epoch of ``freeze``, lp-ft's probe epochs.
    ``features``: those epochs read cached pre-logits features instead of images.
    ``solve``: the head is solved (``backbones/probe.py``) at the start of the head phase, which
    is then one epoch at a learning rate of 0 (it logs the training loss and validates; the steps
    leave every weight as solved, to the bit, weight decay included; Lightning allows no
    step-skipping under DDP).
    """

    head_until: int = 0
    features: bool = False
    solve: bool = False

    def solves(self, epoch: int) -> bool:
        return self.solve and self.features and epoch == 0 < self.head_until

    def head_only(self, epoch: int) -> bool:
        return epoch < self.head_until

    def reads_features(self, epoch: int) -> bool:
        return self.features and epoch < self.head_until


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


def _after(first: int, factor: Callable[[int], float]) -> Callable[[int], float]:
    """`factor`, but 0 for the first `first` steps (the epochs of a solved head)."""
    return lambda step: 0.0 if step < first else factor(step)


@dataclass(frozen=True)
class Speed:
    """How the network runs, not what it learns: ``--sync-bn``, ``--channels-last``, ``--compile``."""

    sync_bn: bool = False
    channels_last: bool = False
    compile: bool = False


def sync_trained_batchnorm(model: nn.Module, trained: set[str]) -> int:
    """Replace each BatchNorm layer with a parameter in `trained` by a SyncBatchNorm holding the
    same parameters and statistics (state_dict keys unchanged); frozen ones stay as they are.
    Returns how many were converted."""
    ids = {id(p) for name, p in model.named_parameters() if name in trained}
    count = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if (isinstance(child, nn.modules.batchnorm._BatchNorm) and not isinstance(child, nn.SyncBatchNorm)
                    and any(id(p) in ids for p in child.parameters())):
                setattr(parent, name, nn.SyncBatchNorm.convert_sync_batchnorm(child))
                count += 1
    return count


class ImageClassifier(pl.LightningModule):
    """A timm model trained under a fine-tuning plan.

    `mixer`, when given, takes (images, labels) and returns (mixed images, soft targets); the
    loss is then a soft-target cross-entropy. `meta` is the self-description every checkpoint
    carries (backbone, classes, data config), so a checkpoint file loads on its own. `speed`:
    SyncBatchNorm, channels-last and torch.compile, applied in ``setup`` once the plan is final.
    """

    def __init__(self, model: nn.Module, groups: LayerGroups, plan: Plan, schedule: Schedule, optim: Optim,
                 num_classes: int, *, phases: Phases = Phases(), mixer: Callable | None = None,
                 mix_until_epoch: int | None = None, meta: dict | None = None, speed: Speed = Speed()):
        super().__init__()
        self.model = model
        self.speed = speed
        self._compiled: Callable | None = None  # not a submodule: checkpoints keep the plain keys
        self.groups = groups
        self.schedule = schedule
        self.optim = optim
        self.num_classes = num_classes
        self.phases = phases
        self.mixer = mixer
        self.mix_until_epoch = mix_until_epoch  # mixing stops from this epoch (0-based) on
        self.meta = dict(meta or {})
        # Solves the head on the cached features (set by the recipe); what it found, for the report.
        self.head_solver: Callable[[], "ProbeFit"] | None = None
        self.solved: dict | None = None
        self._val: list[torch.Tensor] = []
        self._val_probs: list[torch.Tensor] = []
        # One process: validation probabilities (index, probs, labels) of the last epoch and of the
        # best so far by val_acc, by epoch; the final report reuses the best checkpoint's epoch's.
        self.val_outputs: dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}
        self._best_acc, self._best_epoch = -1.0, -1
        self.set_plan(plan)

    def set_plan(self, plan: Plan) -> None:
        """Train what `plan` says (requires_grad); before the optimizer is built."""
        self.plan = plan
        apply_plan(self.model, self.groups, plan)

    # -- forward ----------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        epoch = self.current_epoch if self._trainer is not None else self.phases.head_until
        if self.phases.reads_features(epoch):
            return self.model.get_classifier()(x)
        if self.phases.head_only(epoch) and self.plan.trainable:
            # lp-ft's probe epochs without a feature cache: the backbone runs as a fixed feature
            # extractor, in eval mode and without a graph, whatever its plan says for later.
            body = [m for m in self.model.children() if m is not self.model.get_classifier()]
            modes = [m.training for m in body]
            for m in body:
                m.eval()
            with torch.no_grad():
                features = pre_logits(self.model, x)
            for m, mode in zip(body, modes):
                m.train(mode)
            return self.model.get_classifier()(features)
        if self.speed.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        if self._compiled is not None:
            return self._run_compiled(x)
        return self.model(x)

    def _run_compiled(self, x: torch.Tensor) -> torch.Tensor:
        try:
            return self._compiled(x)
        except Exception as exc:  # noqa: BLE001 - any compiler failure: the eager network is the same math
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
            log.warning("--compile: torch.compile failed (%s: %s); training eagerly from here on",
                        type(exc).__name__, first)
            self._compiled = None
            return self.model(x)

    def setup(self, stage: str) -> None:
        """After RankZeroDecides (a callback's setup) has set the final plan; before DDP wraps the
        network and the optimizer is built."""
        if self.speed.sync_bn and self.trainer.world_size > 1:
            if self.trainer.strategy.root_device.type == "cpu":
                log.warning("--sync-bn: SyncBatchNorm has no CPU kernel; each process keeps its own"
                            " BatchNorm statistics")
            else:
                trained = set(self.groups.head) | {n for i in self.plan.trainable for n in self.groups.params[i]}
                log.info("--sync-bn: %d BatchNorm layer(s) that train synchronise across %d processes",
                         sync_trained_batchnorm(self.model, trained), self.trainer.world_size)
        if self.speed.channels_last:
            self.model.to(memory_format=torch.channels_last)
        if self.speed.compile and self._compiled is None:
            object.__setattr__(self, "_compiled", torch.compile(self.model))  # unregistered: not in state_dict

    def train(self, mode: bool = True):
        super().train(mode)
        if mode:
            set_frozen_eval(self.model, self._waiting())
        return self

    def _waiting(self) -> set[str]:
        """Gradual unfreezing: the parameter names of the groups that have not joined yet."""
        if not self.schedule.unfreeze_every or self._trainer is None:
            return set()
        n, epoch = len(self.groups), self.current_epoch
        return {name for i in range(n) if epoch < self.schedule.join_epoch(n - i) for name in self.groups.params[i]}

    def on_before_optimizer_step(self, optimizer) -> None:
        # Groups that have not joined step at a rate of 0; dropping their gradients also keeps the
        # optimizer's moments of them untouched until they join.
        if self.schedule.unfreeze_every:
            names = self._waiting()
            waiting = {id(p) for name, p in self.model.named_parameters() if name in names}
            for group in optimizer.param_groups:
                for p in group["params"]:
                    if id(p) in waiting:
                        p.grad = None

    # -- training ---------------------------------------------------------------------------
    def on_train_epoch_start(self) -> None:
        # Lightning keeps whatever mode modules are in; make sure frozen parts run in eval mode.
        self.train()
        if self.mixer is not None and self.mix_until_epoch is not None:
            self.mixer.enabled = self.current_epoch < self.mix_until_epoch
        if self.phases.solves(self.current_epoch):
            self._solve_head()

    def _solve_head(self) -> None:
        """Rank 0 solves; every rank takes its answer, so that all hold the same head."""
        assert self.head_solver is not None, "a solved head needs the recipe's head_solver"
        fit = self.head_solver() if self.global_rank == 0 else None
        if self.trainer.world_size > 1:
            fit = self.trainer.strategy.broadcast(fit, src=0)
        fit.load_into(self.model.get_classifier())
        self.solved = fit.to_dict()

    def training_step(self, batch, batch_idx):
        x, y, _ = batch
        if self.mixer is not None and self.mixer.enabled and not self.phases.reads_features(self.current_epoch):
            # Label smoothing is folded into the mixer's soft targets.
            x, soft = self.mixer(x, y)
            logits = self(x)
            loss = soft_target_cross_entropy(logits, soft)
        else:
            logits = self(x)
            loss = F.cross_entropy(logits, y, weight=self._class_weight(logits),
                                   label_smoothing=self.optim.label_smoothing)
        if not torch.isfinite(loss):
            half = not str(self.trainer.precision).startswith(("32", "64"))
            raise TrainingDiverged(
                f"the training loss became {loss.item()} at epoch {self.current_epoch + 1}, step"
                f" {batch_idx + 1}; lower --lr (now {self.plan.lr:g})"
                + (" or train with --precision 32-true" if half else ""))
        correct = (logits.argmax(-1) == y).float().sum()
        self.log("train_loss", loss, on_step=False, on_epoch=True, prog_bar=True, sync_dist=True,
                 batch_size=len(y))
        return {"loss": loss, "correct": correct.detach(), "count": len(y)}

    def _class_weight(self, logits: torch.Tensor) -> torch.Tensor | None:
        w = self.optim.class_weights
        return None if w is None else torch.tensor(w, dtype=logits.dtype, device=logits.device)

    # -- validation -------------------------------------------------------------------------
    def on_validation_epoch_start(self) -> None:
        self._val, self._val_probs = [], []

    def validation_step(self, batch, batch_idx):
        x, y, idx = batch
        logits = self(x).float()
        loss = F.cross_entropy(logits, y, reduction="none")
        correct = (logits.argmax(-1) == y).float()
        self._val.append(torch.stack([idx.float(), loss, correct, y.float()], dim=1))
        if self.trainer.world_size == 1:
            self._val_probs.append(torch.softmax(logits, -1).detach())

    def on_validation_epoch_end(self) -> None:
        rows = torch.cat(self._val) if self._val else torch.zeros(0, 4, device=self.device)
        probs = torch.cat(self._val_probs).cpu() if self._val_probs and not self.trainer.sanity_checking else None
        self._val, self._val_probs = [], []
        labels, rows = rows[:, 3].long().cpu(), rows[:, :3]
        if self.trainer.world_size > 1:
            # Samplers pad ranks to equal length with repeated samples: gather every rank's rows
            # and count each sample index once.
            rows = self.all_gather(rows).reshape(-1, 3)
        rows = first_per_index(rows)
        n = max(1, len(rows))
        if probs is not None:
            self._keep_val_outputs(rows[:, 0].long().cpu(), probs, labels, float(rows[:, 2].sum() / n))
        self.log("val_loss", rows[:, 1].sum() / n, prog_bar=False, rank_zero_only=False)
        self.log("val_acc", rows[:, 2].sum() / n, prog_bar=True, rank_zero_only=False)
        self.log("val_count", float(len(rows)), rank_zero_only=False)

    def _keep_val_outputs(self, index: torch.Tensor, probs: torch.Tensor, labels: torch.Tensor, acc: float) -> None:
        """Keep this epoch's outputs and those of the best epoch by val_acc (the best checkpoint's
        rule: strictly better replaces), nothing older."""
        epoch = self.current_epoch
        if acc > self._best_acc:
            self._best_acc, self._best_epoch = acc, epoch
        self.val_outputs[epoch] = (index, probs, labels)
        self.val_outputs = {e: v for e, v in self.val_outputs.items() if e in (epoch, self._best_epoch)}

    # -- optimizer --------------------------------------------------------------------------
    def configure_optimizers(self):
        from timm.optim import create_optimizer_v2

        p, o = self.plan, self.optim
        groups = param_groups(self.model, self.groups, p, p.lr, p.layer_decay, o.weight_decay)
        # timm's factory over our groups.
        opt = create_optimizer_v2(groups, lr=p.lr, weight_decay=o.weight_decay, **o.timm_args())
        epochs = max(1, self.trainer.max_epochs or 1)
        per_epoch = max(1, int(self.trainer.estimated_stepping_batches) // epochs)
        factors = [self.schedule.for_group(per_epoch, g["depth"]) for g in opt.param_groups]
        if self.phases.solve:
            factors = [_after(self.phases.head_until * per_epoch, f) if g["is_head"] else f
                       for f, g in zip(factors, opt.param_groups)]
        sched = torch.optim.lr_scheduler.LambdaLR(opt, factors)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    # -- self-describing checkpoints --------------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint[CHECKPOINT_META] = self.meta
        if self.solved is not None:
            checkpoint[SOLVED_KEY] = self.solved

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        self.solved = checkpoint.get(SOLVED_KEY, self.solved)
