"""Weight averaging and snapshot ensembles: the callbacks that make them during ``fit``.

- ``fit --ema``: an exponential moving average of the weights and BatchNorm buffers, updated after
  every optimizer step with a warmup, ``decay_t = min(D, (1 + t) / (10 + t))`` where ``t`` counts
  the steps already averaged (so the first steps do not dominate). Both the raw and the averaged
  weights are validated each epoch (``val_acc`` and ``val_acc_ema``); every checkpoint holds the
  averaged weights under ``ema_state_dict`` (same keys as ``state_dict``).
- ``fit --swa``: stochastic weight averaging, the equal average of the weights at the end of
  the SWA epochs: the cycle ends with ``--snapshots``, else the last quarter of the epochs (at
  least two), during which the learning rate holds at its value where that phase starts. The
  BatchNorm statistics that training updated are recomputed for the averaged weights at the end,
  over the training images with the eval transform; the result is ``checkpoints/swa.ckpt``.
- ``fit --snapshots M``: M cosine cycles with warm restarts. Each cycle lasts ``epochs // M``
  epochs, the last one also takes the remaining ``epochs % M``; the linear warmup belongs to the
  first cycle. Every cycle ends at the lowest learning rate, where ``checkpoints/snapshot-i.ckpt``
  is written. Early stopping judges only at cycle ends, and its patience counts cycles.

The members that ``evaluate`` and ``predict`` load back are in ``pipelines/evaluate/members.py``.
"""
from __future__ import annotations

import abc
import logging
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import EarlyStopping
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.optim.swa_utils import AveragedModel

from transferkit.pipelines.rundir import CHECKPOINT_META, atomic_torch_save
from transferkit.pipelines.train.module import first_per_index
from transferkit.pipelines.train.schedule import Schedule

log = logging.getLogger(__name__)

EMA_KEY = "ema_state_dict"
SWA_NAME = "swa"
SNAPSHOT_PREFIX = "snapshot-"


# ----------------------------------------------------------------------------- helpers


def _target(pl_module: nn.Module) -> tuple[nn.Module, str]:
    """The network to average and its key prefix in the LightningModule's state_dict."""
    model = getattr(pl_module, "model", None)
    return (model, "model.") if isinstance(model, nn.Module) else (pl_module, "")


def _averaged(module: nn.Module, **kwargs) -> AveragedModel:
    avg = AveragedModel(module, **kwargs)
    avg.module.eval().requires_grad_(False)
    return avg


def ema_multi_avg_fn(decay: float) -> Callable:
    """An ``AveragedModel`` ``multi_avg_fn``: EMA with the warmup ``min(decay, (1 + t) / (10 + t))``,
    ``t`` being the number of weights averaged so far. Integer buffers (BatchNorm's batch count)
    are copied: a blend of counts means nothing. torch's ``get_ema_multi_avg_fn`` has no warmup
    and blends integer tensors."""

    @torch.no_grad()
    def update(averaged: list[Tensor], current: list[Tensor], num_averaged: Tensor | int) -> None:
        t = int(num_averaged)
        d = min(decay, (1 + t) / (10 + t))
        if torch.is_floating_point(averaged[0]):
            torch._foreach_lerp_(averaged, current, 1.0 - d)
        else:
            for a, c in zip(averaged, current):
                a.copy_(c)

    return update


def trained_batchnorms(pl_module: nn.Module) -> set[str]:
    """Names (inside the averaged network) of the BatchNorm layers whose statistics training
    updates: those still in training mode once the module is put in training mode."""
    target, _ = _target(pl_module)
    was = pl_module.training
    pl_module.train()
    names = {n for n, m in target.named_modules() if isinstance(m, _BatchNorm) and m.training}
    pl_module.train(was)
    return names


@torch.no_grad()
def recompute_batchnorm(model: nn.Module, loader: Iterable, names: set[str], device=None,
                        progress: bool = True) -> int:
    """Recompute the running statistics of the BatchNorm layers ``names`` over ``loader``.

    torch's ``swa_utils.update_bn`` resets every BatchNorm and runs the whole model in training
    mode; here the layers that stayed frozen during training keep their pretrained statistics
    and normalise with them, as they did while the weights were averaged. Returns the number of
    layers recomputed.
    """
    from tqdm.auto import tqdm

    layers = [m for n, m in model.named_modules() if n in names and isinstance(m, _BatchNorm)]
    if not layers:
        return 0
    model.eval()
    momenta = {}
    for m in layers:
        m.reset_running_stats()
        momenta[m] = m.momentum
        m.momentum = None  # a cumulative average over every batch
        m.train()
    try:
        for batch in tqdm(loader, desc="recomputing BatchNorm statistics", leave=False, disable=not progress):
            x = batch[0] if isinstance(batch, (list, tuple)) else batch
            model(x.to(device) if device is not None else x)
    finally:
        for m, momentum in momenta.items():
            m.momentum = momentum
        model.eval()
    return len(layers)


class _OncePerEpoch(pl.Callback, abc.ABC):
    """Runs ``_epoch_end`` once per training epoch, before the epoch's checkpoints are written.

    Lightning runs ModelCheckpoint after every other callback in ``on_validation_end``, so work
    done there is in ``last.ckpt`` when it says the epoch is complete; ``on_train_epoch_end``
    covers an epoch without validation.
    """

    def __init__(self):
        self._seen_epoch = -1

    @abc.abstractmethod
    def _epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """The work to do at the end of each training epoch."""

    def _maybe(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking or self._seen_epoch == trainer.current_epoch:
            return
        self._seen_epoch = trainer.current_epoch
        self._epoch_end(trainer, pl_module)

    def on_validation_end(self, trainer, pl_module) -> None:
        if trainer.state.fn == "fit":
            self._maybe(trainer, pl_module)

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        self._maybe(trainer, pl_module)


# ----------------------------------------------------------------------------- EMA


class EMACallback(pl.Callback):
    """Exponential moving average of the weights and buffers (``fit --ema``).

    Built on ``torch.optim.swa_utils.AveragedModel`` with a warmup ``multi_avg_fn``. Lightning's
    ``EMAWeightAveraging`` was considered: it validates only the averaged weights (we report
    both), puts them in place of ``state_dict`` in every checkpoint (``best.ckpt`` must stay the
    raw weights that ``val_acc`` chose) and has no warmup.

    Every rank keeps the same average (DDP keeps the weights equal), and the ``val_acc_ema`` of
    each sample is counted once across ranks.
    """

    def __init__(self, decay: float = 0.999):
        self.decay = decay
        self.average: AveragedModel | None = None
        self._prefix = ""
        self._last_step = 0
        self._rows: list[Tensor] = []
        self._tensors: dict[str, Tensor] = {}

    def setup(self, trainer, pl_module, stage: str) -> None:
        if stage == "fit" and self.average is None:
            target, self._prefix = _target(pl_module)
            self.average = _averaged(target, multi_avg_fn=ema_multi_avg_fn(self.decay), use_buffers=True)

    def on_fit_start(self, trainer, pl_module) -> None:
        self.average.to(pl_module.device)  # setup ran before the strategy moved the model

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        # One update per optimizer step (several batches per step under gradient accumulation).
        if trainer.global_step > self._last_step:
            self.average.update_parameters(_target(pl_module)[0])
            self._last_step = trainer.global_step

    def on_validation_epoch_start(self, trainer, pl_module) -> None:
        self._rows = []
        module = self.average.module if self.average is not None else None
        self._tensors = {} if module is None else {
            self._prefix + k: v for k, v in [*module.named_parameters(), *module.named_buffers()]}

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        if self.average is None or trainer.sanity_checking or int(self.average.n_averaged) == 0:
            return
        x, y, idx = batch[0], batch[1], batch[2]
        # The module's own forward with the averaged tensors in place: it knows what a batch
        # holds (images, or cached features of a frozen backbone).
        with trainer.precision_plugin.forward_context():
            logits = torch.func.functional_call(pl_module, self._tensors, (x,)).float()
        loss = nn.functional.cross_entropy(logits, y, reduction="none")
        correct = (logits.argmax(-1) == y).float()
        self._rows.append(torch.stack([idx.float(), loss, correct], dim=1))

    def on_validation_epoch_end(self, trainer, pl_module) -> None:
        if self.average is None or trainer.sanity_checking or int(self.average.n_averaged) == 0:
            return  # the same on every rank: no rank waits in all_gather alone
        rows = torch.cat(self._rows) if self._rows else torch.zeros(0, 3, device=pl_module.device)
        self._rows = []
        if trainer.world_size > 1:
            rows = pl_module.all_gather(rows).reshape(-1, 3)
        rows = first_per_index(rows)
        n = max(1, len(rows))
        pl_module.log("val_loss_ema", rows[:, 1].sum() / n, rank_zero_only=False)
        pl_module.log("val_acc_ema", rows[:, 2].sum() / n, prog_bar=True, rank_zero_only=False)

    def averaged_state_dict(self) -> dict[str, Tensor]:
        """The averaged weights with the LightningModule's keys (``model.…``)."""
        return {self._prefix + k: v.detach() for k, v in self.average.module.state_dict().items()}

    def state_dict(self) -> dict:
        n = int(self.average.n_averaged) if self.average is not None else 0
        return {"n_averaged": n, "last_step": self._last_step}

    def load_state_dict(self, state: dict) -> None:
        self._last_step = int(state.get("last_step", 0))
        if self.average is not None:
            self.average.n_averaged.fill_(int(state.get("n_averaged", 0)))

    def on_save_checkpoint(self, trainer, pl_module, checkpoint: dict) -> None:
        if self.average is not None:
            checkpoint[EMA_KEY] = self.averaged_state_dict()

    def on_load_checkpoint(self, trainer, pl_module, checkpoint: dict) -> None:
        if self.average is None:
            return
        state = checkpoint.get(EMA_KEY)
        if state is None:
            log.warning("the checkpoint holds no EMA weights; the average starts again from the resumed weights")
            self.average.n_averaged.zero_()
            return
        n = len(self._prefix)
        self.average.module.load_state_dict({k[n:]: v for k, v in state.items() if k.startswith(self._prefix)})


# ----------------------------------------------------------------------------- SWA


class SWACallback(_OncePerEpoch):
    """Stochastic weight averaging (``fit --swa``): the equal average of the weights at the end
    of ``epochs`` (1-based), its BatchNorm statistics recomputed at the end of training over
    ``bn_loader()``, written to ``dirpath/swa.ckpt``.

    Built on ``torch.optim.swa_utils.AveragedModel``. Lightning's ``StochasticWeightAveraging``
    was considered: it replaces the step-wise schedule with an epoch-wise SWALR, adds a training
    epoch for the BatchNorm update (one more row in metrics.csv, one more checkpoint) and
    recomputes frozen BatchNorm layers too.
    """

    def __init__(self, dirpath: str | Path, epochs: Sequence[int], bn_loader: Callable[[], Iterable] | None = None,
                 progress: bool = True):
        super().__init__()
        self.dirpath = Path(dirpath)
        self.epochs = sorted(set(int(e) for e in epochs))
        self.bn_loader = bn_loader
        self.progress = progress
        self.average: AveragedModel | None = None
        self.averaged_epochs: list[int] = []
        self._prefix = ""

    @property
    def path(self) -> Path:
        return self.dirpath / f"{SWA_NAME}.ckpt"

    def setup(self, trainer, pl_module, stage: str) -> None:
        if stage == "fit" and self.average is None:
            target, self._prefix = _target(pl_module)
            self.average = _averaged(target)  # use_buffers=False: buffers follow the model, then get recomputed

    def on_fit_start(self, trainer, pl_module) -> None:
        self.average.to(pl_module.device)

    def _epoch_end(self, trainer, pl_module) -> None:
        epoch = trainer.current_epoch + 1
        if epoch in self.epochs and epoch not in self.averaged_epochs:
            self.average.update_parameters(_target(pl_module)[0])
            self.averaged_epochs.append(epoch)

    def on_train_end(self, trainer, pl_module) -> None:
        if not self.averaged_epochs:
            log.warning("training stopped before the SWA epochs %s; swa.ckpt holds the final weights",
                        self.epochs)
            self.average.update_parameters(_target(pl_module)[0])
        if not trainer.is_global_zero:
            return
        names = trained_batchnorms(pl_module)
        if names and self.bn_loader is not None:
            count = recompute_batchnorm(self.average.module, self.bn_loader(), names, pl_module.device,
                                        progress=self.progress)
            log.info("SWA: recomputed the statistics of %d BatchNorm layers", count)
        state = {self._prefix + k: v.detach().cpu() for k, v in self.average.module.state_dict().items()}
        atomic_torch_save({"state_dict": state, "epoch": trainer.current_epoch, "global_step": trainer.global_step,
                           "swa_epochs": list(self.averaged_epochs),
                           CHECKPOINT_META: getattr(pl_module, "meta", {})}, self.path)
        log.info("SWA: averaged the weights of epochs %s into %s", self.averaged_epochs, self.path)

    def state_dict(self) -> dict:
        if self.average is None:
            return {}
        return {"averaged_epochs": list(self.averaged_epochs), "n_averaged": int(self.average.n_averaged),
                "average": {k: v.detach() for k, v in self.average.module.state_dict().items()}}

    def load_state_dict(self, state: dict) -> None:
        if self.average is None or not state:
            return
        self.averaged_epochs = [int(e) for e in state["averaged_epochs"]]
        self.average.module.load_state_dict(state["average"])
        self.average.n_averaged.fill_(int(state["n_averaged"]))


# ----------------------------------------------------------------------------- snapshots


class SnapshotCallback(_OncePerEpoch):
    """Writes ``dirpath/snapshot-i.ckpt`` (weights only) at the end of snapshot cycle ``i``, the
    Trainer epochs ``ends`` (1-based) that the ``Schedule`` ends its cycles at."""

    def __init__(self, dirpath: str | Path, ends: Sequence[int]):
        super().__init__()
        self.dirpath = Path(dirpath)
        self.ends = list(ends)

    def _epoch_end(self, trainer, pl_module) -> None:
        epoch = trainer.current_epoch + 1
        if epoch in self.ends:
            path = self.dirpath / f"{SNAPSHOT_PREFIX}{self.ends.index(epoch) + 1}.ckpt"
            trainer.save_checkpoint(path, weights_only=True)  # every rank calls it; rank 0 writes
            if trainer.is_global_zero:
                log.info("snapshot %d of %d written to %s", self.ends.index(epoch) + 1, len(self.ends), path)


class JudgedEarlyStopping(EarlyStopping):
    """Early stopping that judges only at ``epochs`` (1-based): the ends of snapshot cycles, where
    mid-cycle the rate is high and the accuracy says little (patience then counts cycles), or the
    epochs after lp-ft's probe phase."""

    def __init__(self, epochs: set[int], **kwargs):
        super().__init__(**kwargs)
        self.epochs = set(epochs)

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        if trainer.current_epoch + 1 in self.epochs:
            super().on_train_epoch_end(trainer, pl_module)

    def on_validation_end(self, trainer, pl_module) -> None:
        if trainer.current_epoch + 1 in self.epochs:
            super().on_validation_end(trainer, pl_module)


def averaging_callbacks(cfg, schedule: Schedule, checkpoints: str | Path,
                        bn_loader: Callable[[], Iterable] | None = None, progress: bool = True) -> list[pl.Callback]:
    """The callbacks that ``cfg.ema``, ``cfg.swa`` and ``cfg.snapshots`` ask for."""
    out: list[pl.Callback] = []
    if cfg.ema:
        out.append(EMACallback(cfg.ema_decay))
    if cfg.snapshots:
        out.append(SnapshotCallback(checkpoints, schedule.snapshot_epochs()))
    if cfg.swa:
        out.append(SWACallback(checkpoints, schedule.swa_epochs(), bn_loader, progress=progress))
    return out


def early_stopping(patience: int, schedule: Schedule, monitor: str = "val_acc", mode: str = "max") -> EarlyStopping:
    """Early stopping that judges where the schedule allows (see ``Schedule.judged_epochs``)."""
    judged = schedule.judged_epochs()
    if judged is not None:
        return JudgedEarlyStopping(judged, monitor=monitor, mode=mode, patience=patience)
    return EarlyStopping(monitor=monitor, mode=mode, patience=patience)
