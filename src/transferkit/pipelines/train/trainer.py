"""The one function that builds the Trainer of a fit, and the checks of its device settings."""
from __future__ import annotations

import os

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import LearningRateMonitor, ModelCheckpoint, TQDMProgressBar

from transferkit.errors import ConfigError, MissingExtra
from transferkit.pipelines.rundir import RunDir
from transferkit.pipelines.settings import FitConfig
from transferkit.pipelines.train.averaging import averaging_callbacks, early_stopping
from transferkit.pipelines.train.callbacks import AtomicCheckpointIO, EpochSeed, MetricsCSV
from transferkit.pipelines.train.schedule import Schedule


def launched_as_rank_zero() -> bool:
    """Whether this process will be global rank 0, before the Trainer knows it: Lightning's rank
    utility reads the launchers' variables (RANK under torchrun, SLURM_PROCID, LOCAL_RANK of the
    processes its own launcher starts); NODE_RANK names the machine under Lightning's launcher."""
    from pytorch_lightning.utilities import rank_zero_only

    return getattr(rank_zero_only, "rank", 0) == 0 and os.environ.get("NODE_RANK", "0") in ("", "0")


def check_devices(cfg: FitConfig) -> None:
    """Let Lightning judge --accelerator/--devices/--precision before anything is written, and
    check the processes a cluster's launcher started against --devices x --num-nodes."""
    from lightning_fabric.utilities.exceptions import MisconfigurationException

    try:
        trainer = pl.Trainer(accelerator=cfg.accelerator, devices=cfg.devices_arg, num_nodes=cfg.num_nodes,
                             precision=cfg.precision, logger=False, enable_checkpointing=False,
                             enable_progress_bar=False, enable_model_summary=False)
    except (ValueError, TypeError, RuntimeError, ImportError, MisconfigurationException) as exc:  # tpu: no torch_xla
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ConfigError(f"--accelerator {cfg.accelerator} --devices {cfg.devices} --precision {cfg.precision}"
                          f" cannot run here: {first}") from None
    check_launcher(cfg, trainer.num_devices, trainer.num_nodes)


def check_launcher(cfg: FitConfig, devices: int, nodes: int) -> None:
    """torchrun and srun start the processes themselves, and Lightning takes their number from
    the environment; it compares it with devices x num_nodes only in its own launcher, which
    these launches do not use. A launch that disagrees would train separate copies into one run
    directory (with --devices 1, every process alone, each writing the same checkpoints, rows and
    report), so it is refused here. `devices` and `nodes`: what Lightning made of the flags."""
    from lightning_fabric.plugins.environments import SLURMEnvironment, TorchElasticEnvironment

    if TorchElasticEnvironment.detect():  # Lightning's order: torchrun inside a SLURM job is torchrun's
        env, launcher, fix = TorchElasticEnvironment(), "torchrun", "--nproc-per-node and --nnodes"
    elif SLURMEnvironment.detect():
        env, launcher, fix = SLURMEnvironment(), "SLURM", "--ntasks-per-node and --nodes"
    else:
        return
    try:
        env.validate_settings(num_devices=devices, num_nodes=nodes)
        if env.world_size() != devices * nodes:
            raise ValueError(f"it started {env.world_size()} process(es) and --devices x --num-nodes make"
                             f" {devices} x {nodes}")
    except ValueError as exc:
        why = str(exc).strip().splitlines()[0].rstrip(".")
        raise ConfigError(f"{launcher} launched this process, but --devices {cfg.devices} --num-nodes {cfg.num_nodes}"
                          f" disagree with its {fix} ({why}); pass --devices and --num-nodes equal to them") from None


def share_cpu_threads(trainer: pl.Trainer) -> None:
    """Processes training on one machine's CPU share its cores (each would take them all, and two
    processes on two cores then train about ten times slower); OMP_NUM_THREADS, where set, rules."""
    if trainer.world_size > 1 and trainer.strategy.root_device.type == "cpu" and "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // max(1, trainer.num_devices)))


def experiment_loggers(cfg: FitConfig, run: RunDir) -> list:
    """Lightning's loggers that ``--logger`` names, writing under RUN/logs (mlflow: RUN/mlruns or
    ``--mlflow-uri``), each given the run's settings; metrics.csv is written either way."""
    names = list(dict.fromkeys(cfg.logger.split(","))) if cfg.logger else []
    out = []
    for name in names:
        if name == "csv":
            from pytorch_lightning.loggers import CSVLogger

            out.append(CSVLogger(run.path / "logs", name="csv", version=""))
        elif name == "tensorboard":
            _need("tensorboard", "--logger tensorboard")
            from pytorch_lightning.loggers import TensorBoardLogger

            out.append(TensorBoardLogger(run.path / "logs", name="tensorboard", version="", default_hp_metric=False))
        else:
            _need("mlflow", "--logger mlflow")
            from pytorch_lightning.loggers import MLFlowLogger

            uri = cfg.mlflow_uri or (run.path / "mlruns").absolute().as_uri()
            if uri.startswith("file:"):
                # MLflow 3 keeps its file store (no server, nothing to install) behind this switch;
                # `mlflow migrate-filestore` moves such a store into a database later.
                os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
            out.append(MLFlowLogger(experiment_name="transferkit", run_name=run.path.name, tracking_uri=uri))
    for logger in out:
        logger.log_hyperparams({k: v if isinstance(v, (int, float, str, bool)) or v is None else str(v)
                                for k, v in cfg.to_dict().items()})
    return out


def _need(module: str, flag: str) -> None:
    import importlib.util

    if importlib.util.find_spec(module) is None:
        raise MissingExtra(f"{flag} needs the {module} package: pip install 'transferkit[track]'")


def make_trainer(cfg: FitConfig, run: RunDir, schedule: Schedule, *, first: list[pl.Callback],
                 bn_loader, progress: bool = True) -> pl.Trainer:
    """The Trainer: checkpoints (best by val accuracy, last at every epoch end), metrics.csv,
    per-epoch seeds, the averaging the config asks for and early stopping, under the devices and
    precision asked for. `first`: callbacks that must set up before all others."""
    callbacks: list[pl.Callback] = [
        *first,
        ModelCheckpoint(dirpath=run.checkpoints, filename="best", monitor="val_acc", mode="max",
                        save_top_k=1, enable_version_counter=False),
        # Lightning's save_last only follows an improved best; resume needs every epoch's end.
        ModelCheckpoint(dirpath=run.checkpoints, filename="last", monitor=None, save_top_k=1,
                        enable_version_counter=False),
        MetricsCSV(run.metrics),
        EpochSeed(cfg.seed),
        *averaging_callbacks(cfg, schedule, run.checkpoints, bn_loader=bn_loader, progress=progress),
    ]
    if cfg.patience > 0:
        callbacks.append(early_stopping(cfg.patience, schedule))
    if progress:
        callbacks.append(TQDMProgressBar(leave=False))
    loggers = experiment_loggers(cfg, run)
    if loggers:
        callbacks.append(LearningRateMonitor(logging_interval="epoch"))
    devices = cfg.devices_arg
    strategy: object = "auto"
    plugins = [AtomicCheckpointIO()]
    if isinstance(devices, int) and devices > 1 or cfg.num_nodes > 1:
        from pytorch_lightning.strategies import DDPStrategy

        # lp-ft's probe epochs leave the backbone out of the graph; DDP must expect that.
        strategy = DDPStrategy(find_unused_parameters=schedule.probe_epochs > 0, checkpoint_io=plugins.pop())
    return pl.Trainer(
        max_epochs=schedule.epochs, accelerator=cfg.accelerator, devices=devices, num_nodes=cfg.num_nodes,
        strategy=strategy, precision=cfg.precision, callbacks=callbacks, plugins=plugins,
        logger=loggers or False, log_every_n_steps=1,
        default_root_dir=run.path, gradient_clip_val=cfg.grad_clip or None,
        enable_progress_bar=progress, enable_model_summary=False, num_sanity_val_steps=0,
        deterministic="warn" if torch.cuda.is_available() else True,
        # Our samplers shard by rank (data/datamodule.py); lp-ft switches from features to images.
        use_distributed_sampler=False, reload_dataloaders_every_n_epochs=1,  # epochs may switch source (features, cached pictures)
    )
