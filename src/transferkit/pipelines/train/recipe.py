"""`transferkit fit`, read top to bottom: the recipe (lines: the steps stay in this one file on
purpose, so that the whole fit reads in order, as torchvision's reference train.py does).

    split     = load_split(cfg, saved)            the images: scanned and split, or a run's saved split
    backbone  = load_backbone(cfg, ...)           the timm model, its layer groups and data config
    pixels    = make_transforms(cfg, backbone)    train and eval transforms
    plan      = choose_plan(cfg, ...)             the strategy: as asked, as saved, or measured
    schedule  = make_schedule(cfg, plan)          the rate of every step, as data
    module    = make_module(...)                  the LightningModule
    data      = make_data(...)                    the DataModule (images, or cached features)
    finding   = find_lr(cfg, module, data)        --lr find: the LR finder's rate goes into the plan
    write_run(run, ...)                           config.yaml, classes, splits (rank 0)
    trainer   = make_trainer(...)                 one Trainer for every strategy
    train(trainer, ...)                           fit, with interrupts made resumable
    report    = write_report(...)                 report.json, per-image rows, plots, report.html (rank 0)

Each step returns one typed value; the config is frozen after it is checked. With several
processes, rank 0 measures and writes; the others receive its decision through Lightning's
broadcast (``RankZeroDecides``) before the model is wrapped.
"""
from __future__ import annotations

import dataclasses
import logging
import os
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import EarlyStopping, ModelCheckpoint
from pytorch_lightning.utilities.exceptions import SIGTERMException
from torch.utils.data import DataLoader

from transferkit import __version__
from transferkit.augment.batch import BatchMixer
from transferkit.augment.image import describe_train, eval_transform, parse_overrides, train_transform
from transferkit.backbones import factory
from transferkit.backbones.advisor import Advice, decide, measure_with_features
from transferkit.backbones.groups import LayerGroups, layer_groups
from transferkit.backbones.probe import ProbeFit, solve_probe
from transferkit.backbones.strategies import (DEFAULT_LAYER_DECAY, DEFAULT_LR, OPTIMIZER_LR_FACTOR, SCRATCH_LR, Plan,
                                              make_plan)
from transferkit.errors import CheckpointError, ConfigError, RunInterrupted, TrainingDiverged
from transferkit.pipelines.data.datamodule import FeatureCache, FitDataModule
from transferkit.pipelines.data.datasets import ImageDataset, Sample
from transferkit.pipelines.data.decoded import DecodeRule, short_side_for
from transferkit.pipelines.data.failures import FailureLog, Skipped, merge
from transferkit.pipelines.data.features import extract, feature_batch, head_matches
from transferkit.pipelines.data.folders import scan_folder, stratified_split
from transferkit.pipelines.data.images import load_rgb
from transferkit.pipelines.data.splits import read_skipped_csv, read_split_csv, write_skipped_csv, write_split_csv
from transferkit.pipelines.devices import choose_device
from transferkit.pipelines.evaluate.calibration import calibration_record, fit_temperature, store_temperature
from transferkit.pipelines.evaluate.members import RunWeights
from transferkit.pipelines.evaluate.metrics import classification_metrics, predict_proba
from transferkit.pipelines.evaluate.page import write_page
from transferkit.pipelines.evaluate.per_image import per_image_rows, write_per_image
from transferkit.pipelines.evaluate.per_image import summary as per_image_summary
from transferkit.pipelines.evaluate.plots import plot_confusion, plot_curves
from transferkit.pipelines.rundir import RunDir, safe_load
from transferkit.pipelines.settings import FitConfig, default_out
from transferkit.pipelines.train.callbacks import RankZeroDecides
from transferkit.pipelines.train.lr_find import find_lr
from transferkit.pipelines.train.module import ImageClassifier, Optim, Phases, Speed
from transferkit.pipelines.train.schedule import Schedule
from transferkit.pipelines.train.timings import EpochClock, Timings
from transferkit.pipelines.train.trainer import check_devices, launched_as_rank_zero, make_trainer, share_cpu_threads

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Split:
    classes: list[str]
    train: list[Sample]
    val: list[Sample]
    test: list[Sample]
    skipped: list[Skipped]

    def without(self, lost: list[Skipped]) -> "Split":
        """The split with files that broke after the scan left out, and listed."""
        if not lost:
            return self
        gone = {e.path for e in lost}
        keep = lambda samples: [s for s in samples if s.path not in gone]  # noqa: E731
        return Split(self.classes, keep(self.train), keep(self.val), keep(self.test), merge(self.skipped, lost))


@dataclass(frozen=True)
class Backbone:
    model: torch.nn.Module
    groups: LayerGroups
    data_cfg: factory.DataConfig


@dataclass(frozen=True)
class Pixels:
    train: object
    eval: object
    augment: dict            # what the train stack does, as config.yaml records it


@dataclass(frozen=True)
class Decision:
    """What rank 0 decided and every process trains: the plan, and the run directory."""

    plan: Plan
    run_path: str


def default_workers() -> int:
    return min(4, os.cpu_count() or 1)


# ----------------------------------------------------------------------------- the recipe


def fit(cfg: FitConfig, *, progress: bool = True, find_only: bool = False,
        callbacks: Sequence[pl.Callback] = (), started: float | None = None) -> dict | None:
    """Train and write the run directory ``cfg.out`` (default ``runs/<backbone>-<time>``); the
    report on rank 0, None on other ranks. Several backbones (``"a,b,c"``): ``advise.fit_best``.
    `find_only` (``transferkit lr-find``, with ``cfg.lr == "find"``): stop after the LR finder
    has written its plot and suggestion; the finding is returned. `callbacks`: more Lightning
    callbacks for the Trainer (``transferkit search`` reports each epoch to Optuna with one).
    `started`: when the command began (``time.time()``), for report.json's setup time; default now."""
    if "," in cfg.backbone:
        raise ConfigError(f"--backbone {cfg.backbone} names several backbones: fit them through"
                          " `advise.fit_best` (what `transferkit fit` and `transferkit.fit` do), which fits the best")
    if not cfg.out:
        cfg = cfg.replace(out=default_out(cfg.backbone))
    if find_only and cfg.lr != "find":
        raise ConfigError("lr-find sweeps the rate itself; drop --lr")
    return _recipe(cfg, RunDir(cfg.out), saved=None, progress=progress, find_only=find_only, callbacks=callbacks,
                   timings=Timings(started))


def resume(run_dir: str | Path, *, progress: bool = True, started: float | None = None) -> dict | None:
    """Continue an interrupted run from its last complete epoch, with its own config and splits."""
    run = RunDir.open(run_dir)
    settings = run.read_config()["fit"]
    settings.setdefault("head_solver", "sgd")  # a run from before solved heads trained its head for epochs
    cfg = FitConfig.build({**settings, "out": str(run.path)}, source=str(run.config))
    if launched_as_rank_zero():
        run.lock()
    ckpt = run.resumable()
    if ckpt is None:
        run.release()
        if run.has_checkpoints():
            raise CheckpointError(f"no checkpoint in {run.checkpoints} holds a whole training state (the files"
                                  " there cannot be read, or hold weights only); evaluate them, or train again")
        raise CheckpointError(f"no epoch of {run.path} finished, so there is nothing to resume; run the same"
                              f" `transferkit fit` command again (or `transferkit fit --config {run.config}`):"
                              " it reuses the folder")
    if ckpt != run.checkpoint("last"):
        log.warning("%s is missing or incomplete; resuming from %s", run.checkpoint("last"), ckpt)
    for stale in run.checkpoints.glob(".*.tmp"):
        stale.unlink()  # a write cut short by a kill; the complete file it was replacing is intact
    return _recipe(cfg, run, saved=run, progress=progress, ckpt=ckpt, timings=Timings(started))


def _recipe(cfg: FitConfig, run: RunDir, *, saved: RunDir | None, progress: bool, timings: Timings,
            ckpt: Path | None = None, find_only: bool = False, callbacks: Sequence[pl.Callback] = ()) -> dict | None:
    try:
        return _steps(cfg, run, saved=saved, progress=progress, ckpt=ckpt, find_only=find_only, callbacks=callbacks,
                      timings=timings)
    finally:
        run.release()


def _steps(cfg: FitConfig, run: RunDir, *, saved: RunDir | None, progress: bool, ckpt: Path | None,
           timings: Timings, find_only: bool = False, callbacks: Sequence[pl.Callback] = ()) -> dict | None:
    t0 = time.monotonic()
    rank0 = launched_as_rank_zero()
    check_devices(cfg)
    overrides = parse_overrides(list(cfg.aug))
    if cfg.augment != "none":
        describe_train(cfg.augment, **overrides)  # unknown ops and settings fail before any work
    if saved is None and rank0:
        run.check_creatable(overwrite=cfg.overwrite)
    pl.seed_everything(cfg.seed, workers=True, verbose=False)

    with timings.phase("scan"):
        split = load_split(cfg, saved, quiet=not rank0)
    backbone = load_backbone(cfg, split, saved)
    pixels = make_transforms(cfg, backbone.data_cfg, overrides)
    with timings.phase("advisor"):
        plan, clean, lost = choose_plan(cfg, backbone, split, pixels, saved=saved, measure=rank0, progress=progress)
    split = split.without(lost)
    failures = FailureLog(run.failures, strict=cfg.strict)  # files that break from here on
    # only freeze and lp-ft read features (auto may turn out freeze, on a rank that has not measured)
    feature_ok = cfg.finetune in ("auto", "freeze", "lp-ft") and features_exact(cfg, backbone.model, split, pixels)
    solve = feature_ok and cfg.solved_head and solvable(cfg, backbone.model)
    schedule = make_schedule(cfg, plan, solve)
    full_size_cfg = backbone.data_cfg
    backbone = dataclasses.replace(backbone, data_cfg=decoded_config(cfg, plan, full_size_cfg))
    module = make_module(cfg, backbone, plan, schedule, split)
    module.phases = phases_for(plan, schedule, feature_ok, solve)
    data = make_data(cfg, run, split, pixels, module, clean, failures, progress, timings)
    data.set_decoding(DecodeRule(backbone.data_cfg.decode_short_side), cfg.decode_cache)
    module.head_solver = lambda: solve_head(cfg, data, split)
    finding = None
    if cfg.lr == "find" and saved is None:
        finding = find_lr(cfg, module, data, progress=progress)
        plan = dataclasses.replace(plan, lr=finding.suggestion,
                                   reason=f"{plan.reason}; head lr {finding.suggestion:.3g} from the LR finder")
        module.set_plan(plan)
    if saved is None and rank0:
        run.make(overwrite=cfg.overwrite)
        write_run(run, cfg, split, backbone, plan, pixels, module)
        if finding is not None:
            run.write_json(run.lr_find, finding.to_dict())
            finding.plot(run.plots / "lr_find.png", title=f"LR finder: {plan.strategy}, {cfg.optimizer}")
    if find_only:
        return {"lr_find": finding.to_dict(), "finetune": finetune_record(plan, module)}

    def decided(d: Decision) -> None:  # the same on every rank once rank 0's decision arrives
        module.set_plan(d.plan)
        module.schedule = make_schedule(cfg, d.plan, solve)  # a solved freeze head takes one epoch
        module.phases = phases_for(d.plan, module.schedule, feature_ok, solve)
        trainer.fit_loop.max_epochs = module.schedule.epochs
        data.set_decoding(DecodeRule(decoded_config(cfg, d.plan, full_size_cfg).decode_short_side), cfg.decode_cache)
        data.run_path = Path(d.run_path)
        failures.folder = RunDir(d.run_path).failures

    trainer = make_trainer(cfg, run, schedule, first=[RankZeroDecides(Decision(plan, str(run.path)), decided)],
                           bn_loader=lambda: torch.utils.data.DataLoader(  # SWA's BatchNorm statistics only
                               ImageDataset(split.train, pixels.eval, replace_failed=True, rule=data.train_ds.rule,
                                            stage="SWA batch-norm statistics", failures=failures),
                               batch_size=cfg.batch_size, num_workers=data.num_workers),
                           progress=progress)
    trainer.callbacks.extend([EpochClock(timings), *callbacks])
    share_cpu_threads(trainer)
    timings.mark_setup_done()
    t_fit, features_before = time.perf_counter(), timings.seconds["features"]
    train(trainer, module, data, run, ckpt_path=ckpt)
    timings.add("training", time.perf_counter() - t_fit - timings.seconds["validation"]
                - (timings.seconds["features"] - features_before))
    if not trainer.is_global_zero:
        return None
    return write_report(run, cfg, trainer, module, data, split, failures, backbone, time.monotonic() - t0,
                        progress, timings)


# ----------------------------------------------------------------------------- the steps


def load_split(cfg: FitConfig, saved: RunDir | None, quiet: bool = False) -> Split:
    """The images: a run's saved split, or the data folder scanned and split with the seed
    (`quiet`: a process other than rank 0, which scans the same folder but leaves reporting to it)."""
    if saved is not None:
        classes = saved.classes()
        test_csv = saved.splits / "test.csv"
        return Split(classes, read_split_csv(saved.splits / "train.csv", classes),
                     read_split_csv(saved.splits / "val.csv", classes),
                     read_split_csv(test_csv, classes) if test_csv.exists() else [],
                     read_skipped_csv(saved.skipped))
    scan = scan_folder(cfg.data, strict=cfg.strict, quiet=quiet, progress=not quiet)
    if scan.presplit:
        train, val = scan.splits["train"], scan.splits["val"]
    else:
        train, val = stratified_split(scan.splits["train"], cfg.val_fraction, cfg.seed)
    return Split(scan.classes, train, val, scan.splits.get("test", []), scan.skipped)


def load_backbone(cfg: FitConfig, split: Split, saved: RunDir | None) -> Backbone:
    """The backbone with a new head; on resume the architecture alone (the checkpoint has the weights)."""
    if saved is not None:
        model, data_cfg = factory.create(cfg.backbone, len(split.classes), pretrained=False,
                                         plugin=cfg.backbone_plugin, image_size=cfg.image_size, quiet=True,
                                         drop_rate=cfg.dropout, drop_path_rate=cfg.drop_path)
    else:
        model, data_cfg = factory.create(cfg.backbone, len(split.classes), pretrained=cfg.pretrained,
                                         weights=cfg.weights, plugin=cfg.backbone_plugin, image_size=cfg.image_size,
                                         drop_rate=cfg.dropout, drop_path_rate=cfg.drop_path)
    return Backbone(model, layer_groups(model), data_cfg)


def make_transforms(cfg: FitConfig, dc: factory.DataConfig, overrides: dict) -> Pixels:
    size = dc.input_size[1:]
    eval_tf = eval_transform(size, dc.mean, dc.std, dc.crop_pct, dc.interpolation)
    if cfg.augment == "none":
        return Pixels(eval_tf, eval_tf, {"preset": "none"})
    train_tf = train_transform(cfg.augment, size=size, mean=dc.mean, std=dc.std, interpolation=dc.interpolation,
                               **overrides)
    return Pixels(train_tf, eval_tf, describe_train(cfg.augment, **overrides))


def decoded_config(cfg: FitConfig, plan: Plan, dc: factory.DataConfig) -> factory.DataConfig:
    """The data config with the decode rule of ``--decode-cache`` (``auto``: on when the backbone
    trains, so that epochs read images again). It travels in checkpoints: evaluation and predict
    decode the way training did."""
    if cfg.decode_cache == "off" or (cfg.decode_cache == "auto" and plan.strategy == "freeze"):
        return dataclasses.replace(dc, decode_short_side=None)
    return dataclasses.replace(dc, decode_short_side=short_side_for(dc.input_size[1:], dc.crop_pct))


def choose_plan(cfg: FitConfig, backbone: Backbone, split: Split, pixels: Pixels, *, saved: RunDir | None,
                measure: bool, progress: bool) -> tuple[Plan, torch.Tensor | None, list[Skipped]]:
    """The strategy: as saved in the run, as asked, or measured by the advisor (``auto``).

    Also returns the advisor's pooled features of the training split (the clean view of the
    feature cache) and the files it could not read, which leave the split (their rows are left
    out of the features). `measure` False (ranks other than 0): a provisional plan; rank 0's
    arrives through ``RankZeroDecides`` before training.
    """
    groups = backbone.groups
    if saved is not None:
        return Plan.from_dict(saved.read_config().get("resolved", {})["finetune"], groups), None, []
    decay = cfg.layer_decay if cfg.layer_decay is not None else (1.0 if cfg.from_scratch else DEFAULT_LAYER_DECAY)

    def rate(strategy: str, suggested: float | None = None) -> float:
        given = cfg.lr if cfg.lr != "find" else None  # the finder replaces the default later
        lr = given or suggested or (SCRATCH_LR if cfg.from_scratch else DEFAULT_LR[strategy])
        return lr if given else lr * OPTIMIZER_LR_FACTOR[cfg.optimizer]

    if cfg.finetune != "auto":
        reason = f"--finetune {cfg.finetune}" + (f": the head alone, then one more group from the top every"
                                                  f" {cfg.unfreeze_every} epoch(s)" if cfg.finetune == "gradual" else "")
        return make_plan(cfg.finetune, groups, cfg.trainable_groups, reason,
                         lr=rate(cfg.finetune), layer_decay=decay), None, []
    if cfg.from_scratch:
        return make_plan("full", groups, reason="random weights (--no-pretrained): nothing pretrained to keep -> full",
                         lr=rate("full"), layer_decay=decay), None, []
    if not measure:
        return make_plan("full", groups, reason="provisional: rank 0 measures", lr=rate("full"),
                         layer_decay=decay), None, []
    with tempfile.TemporaryDirectory(prefix="transferkit-advisor-") as tmp:  # the run folder is not made yet
        seen = FailureLog(tmp, strict=cfg.strict)
        advice, feats = advice_for(backbone.model, groups, split.train, pixels.eval,
                                   batch_size=feature_batch(cfg.batch_size),
                                   workers=default_workers() if cfg.workers is None else cfg.workers, seed=cfg.seed,
                                   device=choose_device(cfg.accelerator), progress=progress, failures=seen)
        lost = seen.entries()
    if lost:
        gone = {e.path for e in lost}
        feats = feats[[i for i, s in enumerate(split.train) if s.path not in gone]]
    log.info(advice.summary())
    plan = make_plan(advice.strategy, groups, advice.trainable_groups or cfg.trainable_groups, "; ".join(advice.reasons),
                     lr=rate(advice.strategy, advice.lr), layer_decay=decay, advice=advice.to_dict())
    return plan, feats, lost


def advice_for(model, groups: LayerGroups, samples: list[Sample], transform, *, batch_size: int = 64,
               workers: int = 0, seed: int = 0, device: str | torch.device = "cpu",
               progress: bool = True, failures: FailureLog | None = None) -> tuple[Advice, torch.Tensor]:
    """Measure `samples` with the frozen `model` and decide; also return the pooled features
    (fit reuses them as the clean view of its feature cache). A file that cannot be read is
    reported to `failures` (stage "advisor") and measured through a stand-in."""
    loader = DataLoader(ImageDataset(samples, transform, replace_failed=True, stage="advisor", failures=failures),
                        batch_size=batch_size, num_workers=workers)
    m, feats, _ = measure_with_features(model, loader, seed=seed, device=device, progress=progress)
    return decide(m, num_groups=len(groups), group_labels=groups.labels), torch.from_numpy(feats)


def make_schedule(cfg: FitConfig, plan: Plan, solve: bool = False) -> Schedule:
    """lp-ft first trains the head alone for ``epochs`` epochs at the frozen head's rate, then
    everything for ``epochs`` more. A solved head (`solve`) takes one epoch: all of freeze, and
    lp-ft's probe."""
    lp_ft = cfg.finetune == "lp-ft" or plan.strategy == "lp-ft"
    probe = (1 if solve else cfg.epochs) if lp_ft else 0
    if solve and plan.strategy == "freeze":
        return Schedule(epochs=1, kind=cfg.schedule, warmup_epochs=0.0)
    gradual = plan.strategy == "gradual"
    return Schedule(epochs=cfg.epochs + probe, kind=cfg.schedule, warmup_epochs=cfg.warmup_epochs,
                    unfreeze_every=cfg.unfreeze_every if gradual else 0, groups=len(plan.labels) if gradual else 0,
                    step_epochs=cfg.step_epochs, step_gamma=cfg.step_gamma, cycles=cfg.snapshots, swa=cfg.swa and not cfg.snapshots, probe_epochs=probe,
                    probe_lr_scale=DEFAULT_LR["freeze"] / plan.lr if probe else 1.0)


def phases_for(plan: Plan, schedule: Schedule, feature_ok: bool, solve: bool) -> Phases:
    """Which epochs train the head alone (freeze: all; lp-ft: the probe), whether they read
    cached features (`feature_ok`: the cache is on, nothing mixes images, and the architecture's
    classifier reads the pooled features alone), and whether the head is solved there."""
    if plan.strategy == "freeze":
        return Phases(head_until=schedule.epochs, features=feature_ok, solve=solve)
    if plan.strategy == "lp-ft":
        return Phases(head_until=schedule.probe_epochs, features=feature_ok, solve=solve)
    return Phases()


def solvable(cfg: FitConfig, model: torch.nn.Module) -> bool:
    """A solved head is an ``nn.Linear`` on the pooled features; other classifiers train (sgd)."""
    head = model.get_classifier()
    if isinstance(head, torch.nn.Linear):
        return True
    if cfg.head_solver == "lbfgs":
        raise ConfigError(f"--head-solver lbfgs solves a linear head; {cfg.backbone}'s classifier is a"
                          f" {type(head).__name__}: use --head-solver sgd")
    log.info("%s's classifier is a %s, not a linear layer: the head trains for --epochs (sgd)", cfg.backbone,
             type(head).__name__)
    return False


def solve_head(cfg: FitConfig, data: FitDataModule, split: Split) -> ProbeFit:
    """The frozen head solved on every cached view of the training images that could be read."""
    cache = data.features()
    rows = cache.train_rows if cache.train_rows is not None else list(range(len(split.train)))
    fit = solve_probe(cache.train[:, rows], [split.train[i].label for i in rows], num_classes=len(split.classes),
                      label_smoothing=cfg.label_smoothing, class_weight=class_weights(cfg, split), seed=cfg.seed)
    log.info("head solved on %d image(s) x %d view(s): L2 %g chosen by %d-fold cross-validation (held-out accuracy"
             " %s), %d L-BFGS iterations, %.1f s", len(rows), cache.train.shape[0], fit.l2, fit.folds,
             "n/a" if fit.cv_accuracy is None else f"{fit.cv_accuracy:.3f}", fit.iterations, fit.seconds)
    return fit


def make_module(cfg: FitConfig, backbone: Backbone, plan: Plan, schedule: Schedule, split: Split) -> ImageClassifier:
    classes = split.classes
    mixer = None
    if cfg.mixup > 0 or cfg.cutmix > 0:
        mixer = BatchMixer(len(classes), mixup_alpha=cfg.mixup, cutmix_alpha=cfg.cutmix, prob=cfg.mixup_prob,
                           switch_prob=cfg.mixup_switch_prob, mode=cfg.mixup_mode,
                           label_smoothing=cfg.label_smoothing)
    meta = checkpoint_meta(cfg, backbone, classes)
    return ImageClassifier(backbone.model, backbone.groups, plan, schedule,
                           Optim(cfg.optimizer, cfg.weight_decay, cfg.momentum, cfg.label_smoothing,
                                 class_weights(cfg, split)), len(classes),
                           mixer=mixer, mix_until_epoch=cfg.mixup_off_epoch or None, meta=meta,
                           speed=Speed(cfg.sync_bn, cfg.channels_last, cfg.compile))


def class_weights(cfg: FitConfig, split: Split) -> tuple[float, ...] | None:
    """``--class-weights balanced``: n / (k * n_c) per class c, scikit-learn's "balanced" (None: equal)."""
    if cfg.class_weights == "none":
        return None
    counts = np.bincount([s.label for s in split.train], minlength=len(split.classes)).astype(float)
    return tuple(float(len(split.train) / (len(counts) * c)) if c else 0.0 for c in counts)


def checkpoint_meta(cfg: FitConfig, backbone: Backbone, classes: list[str]) -> dict:
    """What a checkpoint needs to rebuild its model alone (see ``evaluate/loading.py``)."""
    arch = (getattr(backbone.model, "pretrained_cfg", None) or {}).get("architecture")
    return {"format": 1, "transferkit_version": __version__, "backbone": cfg.backbone, "architecture": arch,
            "backbone_plugin": cfg.backbone_plugin, "image_size": cfg.image_size, "classes": list(classes),
            "num_classes": len(classes), "data_config": backbone.data_cfg.to_dict()}


def make_data(cfg: FitConfig, run: RunDir, split: Split, pixels: Pixels, module: ImageClassifier,
              clean: torch.Tensor | None, failures: FailureLog, progress: bool, timings: Timings) -> FitDataModule:
    workers = default_workers() if cfg.workers is None else cfg.workers
    batch = feature_batch(cfg.batch_size)

    def build_cache(device: torch.device, rank: int, run_path: Path) -> FeatureCache:
        """Features of train (the clean view + cache_views-1 augmented draws) and val, computed once.
        One (views, n, d) store, memory-mapped when large, in this rank's folder of the run."""
        t = time.monotonic()
        folder = run_path / "cache" / f"rank{rank}"
        kw = dict(seed=cfg.seed, batch_size=batch, workers=workers, progress=progress, device=device,
                  failures=failures, rule=data.train_ds.rule)
        train = extract(module.model, split.train, pixels.eval, views=cfg.cache_views, augment=pixels.train,
                        first_view=clean if clean is not None and rank == 0 else None,
                        cache_file=folder / "train.npy", desc="frozen features: train", **kw)
        val = extract(module.model, split.val, pixels.eval, cache_file=folder / "val.npy",
                      desc="frozen features: val", **kw)
        log.info("cached frozen features of %d train images x %d view(s) and %d val images in %.1f s",
                 len(split.train), train.shape[0], len(split.val), time.monotonic() - t)
        timings.add("features", time.monotonic() - t)
        bad = {e.path for e in failures.entries("feature cache")}
        rows = lambda samples: [i for i, s in enumerate(samples) if s.path not in bad] if bad else None  # noqa: E731
        return FeatureCache(train, val, rows(split.train), rows(split.val))

    data = FitDataModule(split.train, split.val, pixels.train, pixels.eval, batch_size=cfg.batch_size,
                         num_workers=workers, seed=cfg.seed, run_path=run.path,
                         reads_features=lambda epoch: module.phases.reads_features(epoch), build_cache=build_cache,
                         failures=failures, balanced=cfg.sampler == "balanced",
                         few_cores=None if cfg.workers is None else False)  # --workers given: kept
    return data


def features_exact(cfg: FitConfig, model: torch.nn.Module, split: Split, pixels: Pixels) -> bool:
    """Whether head-only epochs may read cached features instead of images."""
    if cfg.cache_views < 1:
        return False
    if cfg.mixup > 0 or cfg.cutmix > 0:
        log.info("Mixup/CutMix mix images, so frozen features are not cached")
        return False
    probe_x = torch.stack([pixels.eval(load_rgb(s.path)) for s in split.val[:2]])
    if not head_matches(model, probe_x):
        log.info("%s's classifier does not read pooled features alone; frozen features are not cached",
                 cfg.backbone)
        return False
    return True


def write_run(run: RunDir, cfg: FitConfig, split: Split, backbone: Backbone, plan: Plan, pixels: Pixels,
              module: ImageClassifier) -> None:
    """config.yaml (every resolved setting and the decision), classes, splits and skipped files."""
    cfg.replace(out=str(run.path)).save(run.config, extra={"resolved": {
        "data_config": backbone.data_cfg.to_dict(), "finetune": finetune_record(plan, module),
        "augment": pixels.augment}})
    run.write_json(run.classes_json, split.classes)
    write_split_csv(run.splits / "train.csv", split.train, split.classes)
    write_split_csv(run.splits / "val.csv", split.val, split.classes)
    if split.test:
        write_split_csv(run.splits / "test.csv", split.test, split.classes)
    write_skipped_csv(run.skipped, split.skipped)


def finetune_record(plan: Plan, module: ImageClassifier) -> dict:
    params = list(module.model.parameters())
    out = {**plan.to_dict(), "trainable_parameters": sum(p.numel() for p in params if p.requires_grad),
           "total_parameters": sum(p.numel() for p in params)}
    if module.schedule.unfreeze_every:  # gradual: the epoch (1-based) from which each group trains
        n = len(plan.labels)
        out["joins_at_epoch"] = {"head": 1, **{plan.labels[i]: module.schedule.join_epoch(n - i) + 1
                                               for i in reversed(range(n))}}
    if plan.advice is not None:
        out["suggested_lr"] = plan.advice.get("lr")
    return out


def train(trainer: pl.Trainer, module: ImageClassifier, data: FitDataModule, run: RunDir,
          ckpt_path: Path | None) -> None:
    """``trainer.fit``; an interrupt or a diverged loss becomes a one-line error naming what was kept."""
    log.info("fine-tuning: %s (%s); trainable groups: %s", module.plan.strategy, module.plan.reason,
             ", ".join(module.plan.to_dict()["trainable_groups"]))
    try:
        trainer.fit(module, datamodule=data, ckpt_path=str(ckpt_path) if ckpt_path else None, weights_only=True)
    except SystemExit as exc:  # Lightning turns SIGINT into sys.exit(1) and SIGTERM into SIGTERMException
        if trainer.interrupted or isinstance(exc, SIGTERMException):
            raise _interrupted(run, "SIGTERM" if isinstance(exc, SIGTERMException) else "Ctrl-C",
                               trainer.world_size) from None
        raise
    except TrainingDiverged as exc:
        raise _diverged(run, exc) from None
    if trainer.interrupted:
        raise _interrupted(run, "an interrupt", trainer.world_size)


def _diverged(run: RunDir, exc: TrainingDiverged) -> TrainingDiverged:
    """The divergence message, with what the run directory really kept."""
    msg = str(exc)
    last = run.checkpoint("last")
    if not last.exists():
        return TrainingDiverged(f"{msg}; no epoch had finished, so no checkpoint was written")
    ckpt = safe_load(last)
    finite = all(torch.isfinite(v).all() for v in ckpt["state_dict"].values() if v.is_floating_point())
    return TrainingDiverged(f"{msg}; {last} keeps the weights after epoch {ckpt.get('epoch', 0) + 1}"
                            + ("" if finite else ", but they are not finite either"))


def _interrupted(run: RunDir, what: str, world: int = 1) -> RunInterrupted:
    last = run.checkpoint("last")
    if not last.exists():
        return RunInterrupted(f"stopped by {what} before the first epoch finished; nothing to resume: run the"
                              " same `transferkit fit` command again, which reuses the folder")
    epoch = safe_load(last).get("epoch", 0) + 1
    again = f" launched as before ({world} processes: on every machine, with the same launcher)" if world > 1 else ""
    return RunInterrupted(f"stopped by {what}; {last} holds the {epoch} complete epoch(s); continue with"
                          f" `transferkit fit --resume {run.path}`{again}")


def write_report(run: RunDir, cfg: FitConfig, trainer: pl.Trainer, module: ImageClassifier, data: FitDataModule,
                 split: Split, failures: FailureLog, backbone: Backbone, seconds: float, progress: bool,
                 timings: Timings) -> dict:
    """Evaluate the best checkpoint on val in one process; write report.json and the plots.

    A freeze run's cached val features stand in for the images: the same numbers (checked by
    ``head_matches``) without another pass of the backbone; other runs read val's decoded
    pictures where the decode cache kept them.
    """
    t_eval = time.perf_counter()
    best = run.checkpoint("best")
    if not best.exists():
        raise ConfigError(f"no checkpoint was written to {run.checkpoints}; train for at least one epoch")
    saved = safe_load(best)
    module.load_state_dict(saved["state_dict"])
    model = backbone.model
    # Validation ran the best checkpoint's weights on every val image already (one process, full
    # precision): that epoch's probabilities are the final evaluation's.
    kept_val = module.val_outputs.get(saved.get("epoch", -1))
    if kept_val is not None and str(cfg.precision).startswith(("32", "64")) and trainer.world_size == 1:
        index, probs, labels = (t.numpy() for t in kept_val)
        _, first = np.unique(index, return_index=True)
        probs, labels, kept = probs[np.sort(first)], labels[np.sort(first)], index[np.sort(first)]
        log.info("final evaluation: the validation of epoch %d, the best checkpoint's, is reused",
                 saved["epoch"] + 1)
    elif module.plan.strategy == "freeze" and data.cache is not None:
        rows = data.cache.val_rows if data.cache.val_rows is not None else list(range(len(split.val)))
        with torch.inference_mode():
            clf = model.eval().get_classifier().cpu()
            probs = torch.softmax(clf(data.cache.val[0][rows]), -1).numpy()
        labels = np.array([split.val[i].label for i in rows])
        kept = np.asarray(rows)
    else:
        # A file that breaks now is left out (its stand-in's row repeats an index; each index
        # counts once) and listed, not fatal.
        ds = ImageDataset(split.val, data.val_ds.transform, replace_failed=True, stage="final evaluation",
                          failures=failures, rule=data.val_ds.rule)
        ds.cache = data.val_ds.cache
        loader = DataLoader(ds, batch_size=cfg.batch_size, num_workers=data.num_workers)
        probs, labels, index = predict_proba(model, loader, choose_device(cfg.accelerator),
                                             desc="evaluating best checkpoint", progress=progress)
        _, first = np.unique(index, return_index=True)
        probs, labels, kept = probs[np.sort(first)], labels[np.sort(first)], index[np.sort(first)]
    timings.add("final_evaluation", time.perf_counter() - t_eval)
    t_report = time.perf_counter()
    lost = failures.entries()
    if lost:
        log.warning("%d file(s) could not be read after the scan and were left out, e.g. %s (%s: %s); all are"
                    " listed in %s", len(lost), lost[0].path, lost[0].stage, lost[0].reason, run.skipped)
    split = Split(split.classes, split.train, split.val, split.test, merge(split.skipped, lost))
    write_skipped_csv(run.skipped, split.skipped)
    metrics = classification_metrics(probs, labels, split.classes)
    es = next((c for c in trainer.callbacks if isinstance(c, EarlyStopping)), None)
    mc = next(c for c in trainer.callbacks if isinstance(c, ModelCheckpoint) and c.monitor)
    report = {
        "accuracy": metrics["accuracy"], "macro_f1": metrics["macro_f1"],
        "split": "val", "checkpoint": "best",
        "best_val_acc_during_training": float(mc.best_model_score) if mc.best_model_score is not None else None,
        "epochs_trained": trainer.current_epoch, "world_size": trainer.world_size, "num_nodes": trainer.num_nodes,
        "stopped_early": bool(es and es.stopped_epoch > 0),
        "train_seconds": round(seconds, 1),
        "backbone": cfg.backbone, "classes": split.classes,
        "images": {"train": len(split.train), "val": len(split.val), "test": len(split.test),
                   "skipped": len(split.skipped)},
        "finetune": finetune_record(module.plan, module), "head_solver": module.solved,
        "classes_balance": {"train_counts": dict(zip(split.classes, np.bincount(
            [s.label for s in split.train], minlength=len(split.classes)).tolist())),
            "class_weights": list(module.optim.class_weights or []) or None, "sampler": cfg.sampler},
        "data_config": backbone.data_cfg.to_dict(), "decode_cache": data.decode_record(),
        "metrics": metrics,
    }
    rows = per_image_rows([str(split.val[i].path) for i in kept], probs, labels, split.classes)
    write_per_image(rows, run.predictions("val"))
    report.update(per_image_summary(rows))
    if cfg.calibrate == "temperature":
        t = fit_temperature(probs, labels)
        report["calibration"] = calibration_record(probs, labels, t)
        store_temperature(best, t)
        log.info("temperature %.3f: val NLL %.4f -> %.4f, ECE %.4f -> %.4f (fitted on val)", t,
                 report["calibration"]["before"]["nll"], report["calibration"]["after"]["nll"],
                 report["calibration"]["before"]["ece"], report["calibration"]["after"]["ece"])
    if run.lr_find.is_file():
        report["lr_find"] = {k: v for k, v in run.read_json(run.lr_find).items() if k in ("suggestion", "steps")}
    report["ensembles"] = RunWeights(run).available()  # the `evaluate --ensemble` values this run offers
    run.write_json(run.report, report)
    plot_curves(run.metrics, run.plots / "curves.png")
    plot_confusion(metrics["confusion_matrix"], split.classes, run.plots / "confusion.png",
                   title=f"val, best checkpoint: accuracy {metrics['accuracy']:.3f}")
    write_page(run)
    timings.add("report", time.perf_counter() - t_report)
    report["timings"] = timings.to_dict()  # written again, now that the report's own time is known
    run.write_json(run.report, report)
    log.info("report written to %s", run.report)
    return report
