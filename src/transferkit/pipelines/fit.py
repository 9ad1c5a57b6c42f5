"""`transferkit fit`: data -> backbone -> strategy -> Lightning training -> report.

Read top to bottom, this is the recipe; each step is one call into the module that owns it.
"""
from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import EarlyStopping, ModelCheckpoint, TQDMProgressBar
from pytorch_lightning.utilities.exceptions import SIGTERMException

from transferkit.augment.batch import BatchMixer
from transferkit.augment.image import (
    describe_train,
    eval_transform,
    parse_overrides,
    train_transform,
)
from transferkit.backbones import factory
from transferkit.backbones.groups import layer_groups
from transferkit.backbones.strategies import (
    DEFAULT_LAYER_DECAY,
    DEFAULT_LR,
    SCRATCH_LR,
    SGD_LR_FACTOR,
    apply_plan,
    make_plan,
)
from transferkit.errors import CheckpointError, ConfigError, RunInterrupted, TrainingDiverged
from transferkit.pipelines.classifier import ImageClassifier, OptimConfig
from transferkit.pipelines.config import FitConfig
from transferkit.pipelines.data import (
    EpochSeed,
    ImageDataModule,
    ImageDataset,
    ScanResult,
    read_skipped_csv,
    read_split_csv,
    scan_folder,
    stratified_split,
    write_skipped_csv,
    write_split_csv,
)
from transferkit.pipelines.ensembling import RunWeights, averaging_callbacks, check_averaging, early_stopping
from transferkit.pipelines.evaluate import (
    classification_metrics,
    plot_confusion,
    plot_curves,
    predict_proba,
    run_config,
)
from transferkit.pipelines.advise import advice_for
from transferkit.pipelines.features import FeatureDataModule, extract, head_matches
from transferkit.pipelines.images import load_rgb
from transferkit.pipelines.run import AtomicCheckpointIO, MetricsCSV, RunDir, safe_load

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Launch:
    """Where this process stands in a multi-process launch (the CLI reads it from the environment).

    `parent_wrote`: this process was started by Lightning's launcher after rank 0 had written the
    run directory, so it may read the splits and decision from there. Under torchrun or SLURM all
    ranks start together and every rank derives them itself (they are deterministic).
    """

    rank: int = 0
    local_rank: int = 0
    parent_wrote: bool = False


@dataclass
class Prepared:
    """Everything a run needs before the Trainer starts."""

    cfg: FitConfig
    run: RunDir
    classes: list[str]
    train: list
    val: list
    test: list
    skipped: list
    model: torch.nn.Module
    data_cfg: factory.DataConfig
    module: ImageClassifier
    datamodule: ImageDataModule
    finetune: dict
    train_tf: object
    eval_tf: object
    workers: int
    device: torch.device
    launch: Launch
    clean_features: torch.Tensor | None = None  # the advisor's pass over train (eval transform)


def default_out(backbone: str) -> Path:
    return Path("runs") / f"{backbone.replace('/', '_')}-{time.strftime('%Y%m%d-%H%M%S')}"


def default_workers() -> int:
    return min(4, os.cpu_count() or 1)


def prepare(cfg: FitConfig, *, write: bool = True, saved: RunDir | None = None, resume: bool = False,
            progress: bool = True, launch: Launch = Launch()) -> Prepared:
    """Validate everything that can be wrong before a single file is written.

    With `saved`, the classes, splits and strategy of that run directory are used, not a new scan
    and measurement; with `resume`, the model starts from its last checkpoint too.
    """
    check_averaging(cfg.validate())
    _check_devices(cfg)
    overrides = parse_overrides(cfg.aug)
    if cfg.augment == "none" and overrides:
        raise ConfigError("--aug overrides need an --augment preset (light, default or heavy), not none")
    if cfg.augment != "none":
        describe_train(cfg.augment, **overrides)  # unknown ops and settings fail before any work
    if write and cfg.out and RunDir(cfg.out).holds_run() and not cfg.overwrite:
        RunDir.create(cfg.out, overwrite=False)  # raises the one-line error
    pl.seed_everything(cfg.seed, workers=True, verbose=False)

    if saved is not None:
        classes = saved.classes()
        train = read_split_csv(saved.splits / "train.csv", classes)
        val = read_split_csv(saved.splits / "val.csv", classes)
        test_csv = saved.splits / "test.csv"
        test = read_split_csv(test_csv, classes) if test_csv.exists() else []
        scan = ScanResult(Path(cfg.data), classes, {"train": train, "val": val}, read_skipped_csv(saved.skipped),
                          presplit=True)
    else:
        scan = scan_folder(cfg.data, strict=cfg.strict)
        classes = scan.classes
        if scan.presplit:
            train, val = scan.splits["train"], scan.splits["val"]
        else:
            train, val = stratified_split(scan.splits["train"], cfg.val_fraction, cfg.seed)
        test = scan.splits.get("test", [])

    if resume:  # everything comes from the checkpoint: no hub, no weights file needed again
        model, data_cfg = factory.create(cfg.backbone, len(classes), pretrained=False, plugin=cfg.backbone_plugin,
                                         image_size=cfg.image_size, quiet=True)
        state = safe_load(saved.checkpoint("last"))["state_dict"]
        model.load_state_dict({k[len("model."):]: v for k, v in state.items() if k.startswith("model.")})
    else:
        model, data_cfg = factory.create(cfg.backbone, len(classes), pretrained=cfg.pretrained,
                                         weights=cfg.weights, plugin=cfg.backbone_plugin,
                                         image_size=cfg.image_size)
    groups = layer_groups(model)
    device = _device(cfg, launch.local_rank)
    size = data_cfg.input_size[1:]
    eval_tf = eval_transform(size, data_cfg.mean, data_cfg.std, data_cfg.crop_pct, data_cfg.interpolation)
    workers = default_workers() if cfg.workers is None else cfg.workers
    from_scratch = not (cfg.pretrained or cfg.weights)
    decision = _decide(cfg, model, groups, train, eval_tf, workers, from_scratch, device,
                       saved=saved.read_config().get("resolved", {}).get("finetune") if saved else None,
                       progress=progress)
    strategy = decision["strategy"]
    plan = make_plan(strategy, groups, decision["trainable_groups"] or cfg.trainable_groups, decision["reason"])
    apply_plan(model, groups, plan)
    lr = cfg.lr or decision.get("suggested_lr") or (SCRATCH_LR if from_scratch else DEFAULT_LR[strategy])
    lr *= SGD_LR_FACTOR if cfg.optimizer == "sgd" and not cfg.lr else 1.0
    # Random low layers have nothing worth protecting: one rate for all of them.
    layer_decay = cfg.layer_decay if cfg.layer_decay is not None else (1.0 if from_scratch else DEFAULT_LAYER_DECAY)

    if cfg.augment == "none":
        train_tf = eval_tf
    else:
        train_tf = train_transform(cfg.augment, size=size, mean=data_cfg.mean, std=data_cfg.std,
                                   interpolation=data_cfg.interpolation, **overrides)
    dm = ImageDataModule(train, val, train_tf, eval_tf, batch_size=cfg.batch_size, num_workers=workers,
                         seed=cfg.seed)
    optim = OptimConfig(optimizer=cfg.optimizer, lr=lr, weight_decay=cfg.weight_decay,
                        layer_decay=layer_decay, schedule=cfg.schedule,
                        warmup_epochs=cfg.warmup_epochs, label_smoothing=cfg.label_smoothing)
    mixer = None
    if cfg.mixup > 0 or cfg.cutmix > 0:
        mixer = BatchMixer(len(classes), mixup_alpha=cfg.mixup, cutmix_alpha=cfg.cutmix, prob=cfg.mix_prob,
                           switch_prob=cfg.mix_switch_prob, mode=cfg.mix_mode,
                           label_smoothing=cfg.label_smoothing)
    module = ImageClassifier(model, groups, plan, optim, len(classes), mixer=mixer,
                             mix_until_epoch=cfg.epochs - cfg.mix_off_epoch if cfg.mix_off_epoch else None)
    finetune = {**plan.to_dict(), "lr": lr, "layer_decay": layer_decay,
                "trainable_parameters": sum(p.numel() for p in model.parameters() if p.requires_grad),
                "total_parameters": sum(p.numel() for p in model.parameters()),
                **{k: decision[k] for k in ("advice", "suggested_lr") if k in decision}}
    run = RunDir(cfg.out) if cfg.out else RunDir(default_out(cfg.backbone))
    if write:
        run = RunDir.create(run.path, overwrite=cfg.overwrite)
        cfg.out = str(run.path)
        augment = describe_train(cfg.augment, **overrides) if cfg.augment != "none" else {"preset": "none"}
        cfg.save(run.config, extra={"resolved": {"data_config": data_cfg.to_dict(), "finetune": finetune,
                                                 "augment": augment}})
        run.write_json(run.classes_json, classes)
        write_split_csv(run.splits / "train.csv", train, classes)
        write_split_csv(run.splits / "val.csv", val, classes)
        if test:
            write_split_csv(run.splits / "test.csv", test, classes)
        write_skipped_csv(run.skipped, scan.skipped)
    return Prepared(cfg, run, classes, train, val, test, scan.skipped, model, data_cfg, module, dm, finetune,
                    train_tf, eval_tf, workers, device, launch, decision.get("clean_features"))


def _decide(cfg: FitConfig, model, groups, train: list, eval_tf, workers: int, from_scratch: bool,
            device: torch.device, saved: dict | None, progress: bool) -> dict:
    """The strategy: as given, as saved in the run directory, or measured by the advisor (auto)."""
    if saved is not None:
        k = len(saved["trainable_groups"]) - 1 if saved["strategy"] == "partial" else None
        return {"strategy": saved["strategy"], "trainable_groups": k, "reason": saved["reason"],
                "suggested_lr": saved.get("suggested_lr"), **({"advice": saved["advice"]} if "advice" in saved else {})}
    if cfg.finetune != "auto":
        return {"strategy": cfg.finetune, "trainable_groups": None, "reason": f"--finetune {cfg.finetune}"}
    if from_scratch:
        return {"strategy": "full", "trainable_groups": None,
                "reason": "random weights (--no-pretrained): nothing pretrained to keep -> full"}
    advice, feats = advice_for(model, groups, train, eval_tf, batch_size=cfg.batch_size, workers=workers,
                               seed=cfg.seed, device=device, progress=progress)
    log.info(advice.summary())
    return {"strategy": advice.strategy, "trainable_groups": advice.trainable_groups,
            "reason": "; ".join(advice.reasons), "suggested_lr": advice.lr, "advice": advice.to_dict(),
            "clean_features": feats}


def _device(cfg: FitConfig, local_rank: int) -> torch.device:
    """Where the frozen passes (advisor, feature cache, final evaluation) run."""
    if cfg.accelerator in ("auto", "gpu", "cuda") and torch.cuda.is_available():
        return torch.device("cuda", local_rank % torch.cuda.device_count())
    return torch.device("cpu")


def _check_devices(cfg: FitConfig) -> None:
    """Let Lightning judge --accelerator/--devices/--precision before anything is written."""
    from lightning_fabric.utilities.exceptions import MisconfigurationException

    devices: int | str = int(cfg.devices) if str(cfg.devices).isdigit() else cfg.devices
    try:
        pl.Trainer(accelerator=cfg.accelerator, devices=devices, num_nodes=cfg.num_nodes, precision=cfg.precision,
                   logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    except (ValueError, TypeError, RuntimeError, MisconfigurationException) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ConfigError(f"--accelerator {cfg.accelerator} --devices {cfg.devices} --precision {cfg.precision}"
                          f" cannot run here: {first}") from None


def make_trainer(p: Prepared, *, progress: bool = True, cached: bool = False) -> pl.Trainer:
    """The Trainer; `cached`: the data are frozen features whose sampler shards itself by rank."""
    cfg = p.cfg
    callbacks: list[pl.Callback] = [
        ModelCheckpoint(dirpath=p.run.checkpoints, filename="best", monitor="val_acc", mode="max",
                        save_top_k=1, enable_version_counter=False),
        # Lightning's save_last only follows an improved best; resume needs every epoch's end.
        ModelCheckpoint(dirpath=p.run.checkpoints, filename="last", monitor=None, save_top_k=1,
                        enable_version_counter=False),
        MetricsCSV(p.run.metrics),
        EpochSeed(cfg.seed),
    ]
    callbacks += averaging_callbacks(cfg, p.run.checkpoints, progress=progress, bn_loader=lambda: (
        torch.utils.data.DataLoader(ImageDataset(p.train, p.eval_tf, replace_failed=True),  # BN statistics only
                                    batch_size=cfg.batch_size, num_workers=p.workers)))
    if cfg.patience > 0:
        callbacks.append(early_stopping(cfg, monitor="val_acc", mode="max"))  # at cycle ends with --snapshots
    if progress:
        callbacks.append(TQDMProgressBar(leave=False))
    devices: int | str = int(cfg.devices) if str(cfg.devices).isdigit() else cfg.devices
    strategy = "auto"
    if isinstance(devices, int) and devices > 1 or cfg.num_nodes > 1:
        from pytorch_lightning.strategies import DDPStrategy

        strategy = DDPStrategy(find_unused_parameters=False, checkpoint_io=AtomicCheckpointIO())
    plugins = [] if strategy != "auto" else [AtomicCheckpointIO()]
    return pl.Trainer(
        max_epochs=cfg.epochs, accelerator=cfg.accelerator, devices=devices, num_nodes=cfg.num_nodes,
        strategy=strategy, precision=cfg.precision, callbacks=callbacks, plugins=plugins, logger=False,
        default_root_dir=p.run.path, gradient_clip_val=cfg.grad_clip or None,
        enable_progress_bar=progress, enable_model_summary=False, num_sanity_val_steps=0,
        deterministic="warn" if torch.cuda.is_available() else True, use_distributed_sampler=not cached,
    )


def fit(cfg: FitConfig, *, progress: bool = True, launch: Launch = Launch()) -> dict | None:
    """Train and write the run directory; return the report on rank 0 (None on other ranks)."""
    child = launch.rank != 0
    if child and not cfg.out:
        raise ConfigError("with several processes every rank needs the same run directory: pass --out")
    # Children of Lightning's launcher start after rank 0 wrote the run: they take its classes,
    # splits and strategy instead of scanning and measuring again.
    saved = RunDir(cfg.out) if child and launch.parent_wrote else None
    p = prepare(cfg, write=not child, saved=saved, progress=progress, launch=launch)
    return _train(p, progress=progress)


def resume(run_dir: str | Path, *, progress: bool = True, launch: Launch = Launch()) -> dict | None:
    """Continue an interrupted run from its last complete epoch, with its own config and splits."""
    run = RunDir.open(run_dir)
    if not run.checkpoint("last").exists():
        raise CheckpointError(f"{run.checkpoint('last')} does not exist: no epoch of this run finished;"
                              f" start it again with `transferkit fit --config {run.config} --overwrite`")
    for stale in run.checkpoints.glob(".*.tmp"):
        stale.unlink()  # a write cut short by a kill; the complete file it was replacing is intact
    cfg = run_config(run)
    cfg.out = str(run.path)
    p = prepare(cfg, write=False, saved=run, resume=True, progress=progress, launch=launch)
    return _train(p, progress=progress, ckpt_path=run.checkpoint("last"))


def _train(p: Prepared, *, progress: bool, ckpt_path: Path | None = None) -> dict | None:
    strategy = p.finetune["strategy"]
    log.info("fine-tuning: %s (%s); trainable groups: %s", strategy, p.finetune["reason"],
             ", ".join(p.finetune["trainable_groups"]))
    t0 = time.monotonic()
    # lp-ft needs its probe once: not on resume (the checkpoint has moved on), not on ranks > 0
    # (DDP copies rank 0's weights to every rank when it wraps the model).
    probe = strategy == "lp-ft" and ckpt_path is None and p.launch.rank == 0
    cache = _feature_cache(p, progress) if strategy == "freeze" or probe else None
    if probe:
        _linear_probe(p, cache, progress)
    datamodule = cache if cache is not None and strategy == "freeze" else p.datamodule
    p.module.head_only = datamodule is cache
    trainer = make_trainer(p, progress=progress, cached=datamodule is cache)
    try:
        trainer.fit(p.module, datamodule=datamodule, ckpt_path=str(ckpt_path) if ckpt_path else None,
                    weights_only=True)
    except SystemExit as exc:  # Lightning turns SIGINT into sys.exit(1) and SIGTERM into SIGTERMException
        if trainer.interrupted or isinstance(exc, SIGTERMException):
            raise _interrupted(p.run, "SIGTERM" if isinstance(exc, SIGTERMException) else "Ctrl-C") from None
        raise
    except TrainingDiverged as exc:
        raise _diverged(p.run, exc) from None
    if trainer.interrupted:
        raise _interrupted(p.run, "an interrupt")
    if not trainer.is_global_zero:
        return None
    val_features = datamodule.val_ds.features[0] if datamodule is cache else None
    return finish(p, trainer, time.monotonic() - t0, progress=progress, val_features=val_features)


def _feature_cache(p: Prepared, progress: bool) -> FeatureDataModule | None:
    """Frozen features of train (clean view + cache_views-1 augmented) and val, or None.

    None when the cache is off, when mixing needs images, or when this architecture's classifier
    does not see exactly the pooled features (then every epoch runs the backbone as usual).
    """
    cfg, model = p.cfg, p.model
    if cfg.cache_views < 1:
        return None
    if p.module.mixer is not None:
        log.info("Mixup/CutMix mix images, so frozen features are not cached")
        return None
    probe_x = torch.stack([p.eval_tf(load_rgb(s.path)) for s in p.val[:2]])
    if not head_matches(model, probe_x):
        log.info("%s's classifier does not read pooled features alone; frozen features are not cached",
                 cfg.backbone)
        return None
    t0 = time.monotonic()
    kw = dict(seed=cfg.seed, batch_size=max(cfg.batch_size, 64), workers=p.workers, progress=progress,
              device=p.device)
    cache_dir = p.run.path / "cache" / f"rank{p.launch.rank}"
    # One (views, n, d) store, memory-mapped when large: view 0 is the clean eval view (the
    # advisor's pass when there was one), views 1.. are augmented draws.
    train = extract(model, p.train, p.eval_tf, views=cfg.cache_views, augment=p.train_tf,
                    first_view=p.clean_features, cache_file=cache_dir / "train.npy",
                    desc="frozen features: train", **kw)
    val = extract(model, p.val, p.eval_tf, cache_file=cache_dir / "val.npy", desc="frozen features: val", **kw)
    log.info("cached frozen features of %d train images x %d view(s) and %d val images in %.1f s",
             len(p.train), train.shape[0], len(p.val), time.monotonic() - t0)
    return FeatureDataModule(train, [s.label for s in p.train], val, [s.label for s in p.val],
                             batch_size=cfg.batch_size, seed=cfg.seed)


def _linear_probe(p: Prepared, cache: FeatureDataModule | None, progress: bool) -> None:
    """lp-ft's first phase: fit the head on the frozen backbone, then unfreeze for fine-tuning."""
    cfg = p.cfg
    freeze = make_plan("freeze", p.module.groups, reason="lp-ft: linear probe")
    apply_plan(p.model, p.module.groups, freeze)
    probe = ImageClassifier(p.model, p.module.groups, freeze,
                            OptimConfig(lr=DEFAULT_LR["freeze"], weight_decay=cfg.weight_decay,
                                        warmup_epochs=cfg.warmup_epochs, label_smoothing=cfg.label_smoothing),
                            len(p.classes), head_only=cache is not None)
    log.info("lp-ft: linear probe for %d epochs at lr %g", cfg.epochs, DEFAULT_LR["freeze"])
    pl.Trainer(max_epochs=cfg.epochs, accelerator=cfg.accelerator, devices=1, logger=False,
               enable_checkpointing=False, enable_progress_bar=progress, enable_model_summary=False,
               callbacks=[EpochSeed(cfg.seed)], num_sanity_val_steps=0, deterministic=True
               ).fit(probe, datamodule=cache if cache is not None else p.datamodule)
    apply_plan(p.model, p.module.groups, p.module.plan)


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


def _interrupted(run: RunDir, what: str) -> RunInterrupted:
    last = run.checkpoint("last")
    if not last.exists():
        return RunInterrupted(f"stopped by {what} before the first epoch finished; nothing to resume,"
                              f" start again with `transferkit fit --config {run.config} --overwrite`")
    epoch = safe_load(last).get("epoch", 0) + 1
    return RunInterrupted(f"stopped by {what}; {last} holds the {epoch} complete epoch(s); continue with"
                          f" `transferkit fit --resume {run.path}`")


def finish(p: Prepared, trainer: pl.Trainer, seconds: float, progress: bool = True,
           val_features: torch.Tensor | None = None) -> dict:
    """Evaluate the best checkpoint on val in one process and write report.json and the plots.

    With `val_features` (a frozen run's cache), the classifier reads them instead of the images:
    the same numbers (checked by `head_matches`) without another pass of the backbone.
    """
    run = p.run
    best = run.checkpoint("best")
    if not best.exists():
        raise ConfigError(f"no checkpoint was written to {run.checkpoints}; train for at least one epoch")
    state = safe_load(best)["state_dict"]
    p.module.load_state_dict(state)
    if val_features is not None:
        with torch.inference_mode():
            clf = p.model.eval().get_classifier().cpu()
            probs = torch.softmax(clf(val_features), -1).numpy()
        labels = np.array([s.label for s in p.val])
    else:
        loader = torch.utils.data.DataLoader(ImageDataset(p.val, p.eval_tf), batch_size=p.cfg.batch_size,
                                             num_workers=p.workers)
        probs, labels = predict_proba(p.model, loader, p.device, desc="evaluating best checkpoint",
                                      progress=progress)
    metrics = classification_metrics(probs, labels, p.classes)
    es = next((c for c in trainer.callbacks if isinstance(c, EarlyStopping)), None)
    mc = next(c for c in trainer.callbacks if isinstance(c, ModelCheckpoint) and c.monitor)
    report = {
        "accuracy": metrics["accuracy"], "macro_f1": metrics["macro_f1"],
        "split": "val", "checkpoint": "best",
        "best_val_acc_during_training": float(mc.best_model_score) if mc.best_model_score is not None else None,
        "epochs_trained": trainer.current_epoch,
        "stopped_early": bool(es and es.stopped_epoch > 0),
        "train_seconds": round(seconds, 1),
        "backbone": p.cfg.backbone, "classes": p.classes,
        "images": {"train": len(p.train), "val": len(p.val), "test": len(p.test), "skipped": len(p.skipped)},
        "finetune": p.finetune, "data_config": p.data_cfg.to_dict(),
        "metrics": metrics,
    }

    report["ensembles"] = RunWeights(run).available()  # the `evaluate --ensemble` values this run offers
    run.write_json(run.report, report)
    plot_curves(run.metrics, run.plots / "curves.png")
    plot_confusion(metrics["confusion_matrix"], p.classes, run.plots / "confusion.png",
                   title=f"val, best checkpoint: accuracy {metrics['accuracy']:.3f}")
    log.info("report written to %s", run.report)
    return report
