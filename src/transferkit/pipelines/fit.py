"""`transferkit fit`: data -> backbone -> strategy -> Lightning training -> report.

Read top to bottom, this is the recipe; each step is one call into the module that owns it.
"""
from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import EarlyStopping, ModelCheckpoint, TQDMProgressBar
from pytorch_lightning.utilities.exceptions import SIGTERMException

from transferkit.augment.image import describe_train, eval_transform, parse_overrides, train_transform
from transferkit.backbones import factory
from transferkit.backbones.groups import layer_groups
from transferkit.backbones.strategies import (DEFAULT_LAYER_DECAY, DEFAULT_LR, SCRATCH_LR, SGD_LR_FACTOR,
                                              apply_plan, choose_by_size, make_plan)
from transferkit.errors import CheckpointError, ConfigError, RunInterrupted
from transferkit.pipelines.classifier import ImageClassifier, OptimConfig
from transferkit.pipelines.config import FitConfig
from transferkit.pipelines.data import (EpochSeed, ImageDataModule, ImageDataset, ScanResult,
                                        read_split_csv, scan_folder, stratified_split, write_skipped_csv,
                                        write_split_csv)
from transferkit.pipelines.evaluate import (classification_metrics, plot_confusion, plot_curves,
                                            predict_proba, run_config)
from transferkit.pipelines.run import AtomicCheckpointIO, MetricsCSV, RunDir, safe_load

log = logging.getLogger(__name__)


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


def default_workers() -> int:
    return min(4, os.cpu_count() or 1)


def prepare(cfg: FitConfig, *, write: bool = True, resume: RunDir | None = None) -> Prepared:
    """Validate everything that can be wrong before a single file is written.

    With `resume`, the classes and splits saved in that run are used, not a new scan.
    """
    cfg.validate()
    if write and cfg.out and RunDir(cfg.out).holds_run() and not cfg.overwrite:
        RunDir.create(cfg.out, overwrite=False)  # raises the one-line error
    pl.seed_everything(cfg.seed, workers=True, verbose=False)

    if resume is not None:
        classes = resume.classes()
        train = read_split_csv(resume.splits / "train.csv", classes)
        val = read_split_csv(resume.splits / "val.csv", classes)
        test_csv = resume.splits / "test.csv"
        test = read_split_csv(test_csv, classes) if test_csv.exists() else []
        scan = ScanResult(Path(cfg.data), classes, {"train": train, "val": val}, [], presplit=True)
    else:
        scan = scan_folder(cfg.data, strict=cfg.strict)
        classes = scan.classes
        if scan.presplit:
            train, val = scan.splits["train"], scan.splits["val"]
        else:
            train, val = stratified_split(scan.splits["train"], cfg.val_fraction, cfg.seed)
        test = scan.splits.get("test", [])

    model, data_cfg = factory.create(cfg.backbone, len(classes), pretrained=cfg.pretrained,
                                     weights=cfg.weights, plugin=cfg.backbone_plugin,
                                     image_size=cfg.image_size)
    groups = layer_groups(model)
    counts = sorted(scan.counts("train").values()) if scan.presplit else None
    per_class = _per_class_median(train, len(classes)) if counts is None else _median(counts)
    if cfg.finetune == "auto" and not (cfg.pretrained or cfg.weights):
        strategy, reason = "full", "random weights (--no-pretrained): nothing pretrained to keep -> full"
    elif cfg.finetune == "auto":
        strategy, reason = choose_by_size(per_class)
    else:
        strategy, reason = cfg.finetune, f"--finetune {cfg.finetune}"
    plan = make_plan(strategy, groups, cfg.trainable_groups, reason)
    apply_plan(model, groups, plan)
    from_scratch = not (cfg.pretrained or cfg.weights)
    lr = cfg.lr or (SCRATCH_LR if from_scratch else DEFAULT_LR[strategy])
    lr *= SGD_LR_FACTOR if cfg.optimizer == "sgd" and not cfg.lr else 1.0
    # Random low layers have nothing worth protecting: one rate for all of them.
    layer_decay = cfg.layer_decay or (1.0 if from_scratch else DEFAULT_LAYER_DECAY)

    overrides = parse_overrides(cfg.aug)
    size = data_cfg.input_size[1:]
    train_tf = train_transform(cfg.augment, size=size, mean=data_cfg.mean, std=data_cfg.std,
                               interpolation=data_cfg.interpolation, **overrides)
    eval_tf = eval_transform(size, data_cfg.mean, data_cfg.std, data_cfg.crop_pct, data_cfg.interpolation)
    workers = default_workers() if cfg.workers is None else cfg.workers
    dm = ImageDataModule(train, val, train_tf, eval_tf, batch_size=cfg.batch_size, num_workers=workers,
                         test=test, seed=cfg.seed)
    optim = OptimConfig(optimizer=cfg.optimizer, lr=lr, weight_decay=cfg.weight_decay,
                        layer_decay=layer_decay, schedule=cfg.schedule,
                        warmup_epochs=cfg.warmup_epochs, label_smoothing=cfg.label_smoothing)
    module = ImageClassifier(model, groups, plan, optim, len(classes))
    finetune = {**plan.to_dict(), "lr": lr, "layer_decay": layer_decay,
                "images_per_class_median": per_class,
                "trainable_parameters": sum(p.numel() for p in model.parameters() if p.requires_grad),
                "total_parameters": sum(p.numel() for p in model.parameters())}
    run = RunDir(cfg.out) if cfg.out else RunDir(default_out(cfg.backbone))
    if write:
        run = RunDir.create(run.path, overwrite=cfg.overwrite)
        cfg.out = str(run.path)
        cfg.save(run.config, extra={"resolved": {"data_config": data_cfg.to_dict(), "finetune": finetune,
                                                 "augment": describe_train(cfg.augment, **overrides)}})
        run.write_json(run.classes_json, classes)
        write_split_csv(run.splits / "train.csv", train, classes)
        write_split_csv(run.splits / "val.csv", val, classes)
        if test:
            write_split_csv(run.splits / "test.csv", test, classes)
        write_skipped_csv(run.skipped, scan.skipped)
    return Prepared(cfg, run, classes, train, val, test, scan.skipped, model, data_cfg, module, dm, finetune)


def default_out(backbone: str) -> Path:
    return Path("runs") / f"{backbone.replace('/', '_')}-{time.strftime('%Y%m%d-%H%M%S')}"


def _median(values: list[int]) -> float:
    v = sorted(values)
    mid = len(v) // 2
    return float(v[mid]) if len(v) % 2 else (v[mid - 1] + v[mid]) / 2


def _per_class_median(samples: list, k: int) -> float:
    counts = [0] * k
    for s in samples:
        counts[s.label] += 1
    return _median(counts)


def make_trainer(p: Prepared, *, progress: bool = True) -> pl.Trainer:
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
    if cfg.patience > 0:
        callbacks.append(EarlyStopping(monitor="val_acc", mode="max", patience=cfg.patience))
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
        deterministic="warn" if torch.cuda.is_available() else True,
    )


def fit(cfg: FitConfig, *, progress: bool = True) -> dict | None:
    """Train and write the run directory; return the report on rank 0 (None on other ranks)."""
    p = prepare(cfg, write=not _is_child_process())
    return _train(p, progress=progress)


def resume(run_dir: str | Path, *, progress: bool = True) -> dict | None:
    """Continue an interrupted run from its last complete epoch, with its own config and splits."""
    run = RunDir.open(run_dir)
    if not run.checkpoint("last").exists():
        raise CheckpointError(f"{run.checkpoint('last')} does not exist: no epoch of this run finished;"
                              f" start it again with `transferkit fit --config {run.config} --overwrite`")
    for stale in run.checkpoints.glob(".*.tmp"):
        stale.unlink()  # a write cut short by a kill; the complete file it was replacing is intact
    cfg = run_config(run)
    cfg.out = str(run.path)
    p = prepare(cfg, write=False, resume=run)
    return _train(p, progress=progress, ckpt_path=run.checkpoint("last"))


def _train(p: Prepared, *, progress: bool, ckpt_path: Path | None = None) -> dict | None:
    log.info("fine-tuning: %s (%s); trainable groups: %s", p.finetune["strategy"], p.finetune["reason"],
             ", ".join(p.finetune["trainable_groups"]))
    trainer = make_trainer(p, progress=progress)
    t0 = time.monotonic()
    try:
        trainer.fit(p.module, datamodule=p.datamodule, ckpt_path=str(ckpt_path) if ckpt_path else None,
                    weights_only=True)
    except SystemExit as exc:  # Lightning turns SIGINT into sys.exit(1) and SIGTERM into SIGTERMException
        if trainer.interrupted or isinstance(exc, SIGTERMException):
            raise _interrupted(p.run, "SIGTERM" if isinstance(exc, SIGTERMException) else "Ctrl-C") from None
        raise
    if trainer.interrupted:
        raise _interrupted(p.run, "an interrupt")
    if not trainer.is_global_zero:
        return None
    return finish(p, trainer, time.monotonic() - t0, progress=progress)


def _interrupted(run: RunDir, what: str) -> RunInterrupted:
    last = run.checkpoint("last")
    if not last.exists():
        return RunInterrupted(f"stopped by {what} before the first epoch finished; nothing to resume,"
                              f" start again with `transferkit fit --config {run.config} --overwrite`")
    epoch = safe_load(last).get("epoch", 0) + 1
    return RunInterrupted(f"stopped by {what}; {last} holds the {epoch} complete epoch(s); continue with"
                          f" `transferkit fit --resume {run.path}`")


def _is_child_process() -> bool:
    return int(os.environ.get("LOCAL_RANK", "0")) != 0 or int(os.environ.get("NODE_RANK", "0")) != 0


def finish(p: Prepared, trainer: pl.Trainer, seconds: float, progress: bool = True) -> dict:
    """Evaluate the best checkpoint on val in one process and write report.json and the plots."""
    run = p.run
    best = run.checkpoint("best")
    if not best.exists():
        raise ConfigError(f"no checkpoint was written to {run.checkpoints}; train for at least one epoch")
    state = safe_load(best)["state_dict"]
    p.module.load_state_dict(state)
    loader = torch.utils.data.DataLoader(ImageDataset(p.val, p.datamodule.val_ds.transform),
                                         batch_size=p.cfg.batch_size, num_workers=p.datamodule.num_workers)
    probs, labels = predict_proba(p.module.model, loader, desc="evaluating best checkpoint",
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
    run.write_json(run.report, report)
    plot_curves(run.metrics, run.plots / "curves.png")
    plot_confusion(metrics["confusion_matrix"], p.classes, run.plots / "confusion.png",
                   title=f"val, best checkpoint: accuracy {metrics['accuracy']:.3f}")
    log.info("report written to %s", run.report)
    return report


def load_report(run: RunDir) -> dict:
    return json.loads(run.report.read_text())
