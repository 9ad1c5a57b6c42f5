"""The Trainer of every fit, and who counts as rank 0 before it exists."""
from __future__ import annotations

import pytest
from pytorch_lightning.utilities import rank_zero_only

from transferkit.errors import ConfigError
from transferkit.pipelines.rundir import RunDir
from transferkit.pipelines.settings import FitConfig
from transferkit.pipelines.train.callbacks import RankZeroDecides
from transferkit.pipelines.train.schedule import Schedule
from transferkit.pipelines.train.trainer import check_devices, launched_as_rank_zero, make_trainer


def test_rank_zero_is_read_from_lightning_and_the_machine_rank(monkeypatch):
    monkeypatch.setattr(rank_zero_only, "rank", 0)
    monkeypatch.delenv("NODE_RANK", raising=False)
    assert launched_as_rank_zero()
    monkeypatch.setenv("NODE_RANK", "1")  # the first process of the second machine
    assert not launched_as_rank_zero()
    monkeypatch.setenv("NODE_RANK", "0")
    monkeypatch.setattr(rank_zero_only, "rank", 1)
    assert not launched_as_rank_zero()


def test_device_settings_that_cannot_run_are_one_line():
    with pytest.raises(ConfigError, match="--precision 12-bit cannot run here"):
        check_devices(FitConfig.build({"precision": "12-bit", "accelerator": "cpu"}))


def test_one_trainer_shards_itself_and_asks_for_each_epochs_data(tmp_path):
    cfg = FitConfig.build({"epochs": 3, "patience": 2, "accelerator": "cpu"})
    first = RankZeroDecides(None, lambda d: None)
    plain = make_trainer(cfg, RunDir(tmp_path), Schedule(epochs=3), first=[first], bn_loader=None, progress=False)
    assert plain.callbacks[0] is first and plain.max_epochs == 3
    assert plain._accelerator_connector.use_distributed_sampler is False
    assert plain.reload_dataloaders_every_n_epochs == 1  # an epoch may read cached pictures in-process
    lpft = make_trainer(cfg, RunDir(tmp_path), Schedule(epochs=6, probe_epochs=3), first=[], bn_loader=None,
                        progress=False)
    assert lpft.max_epochs == 6 and lpft.reload_dataloaders_every_n_epochs == 1
    stopper = next(c for c in lpft.callbacks if type(c).__name__ == "JudgedEarlyStopping")
    assert stopper.epochs == {4, 5, 6}  # not during the probe


def test_loggers_write_tensorboard_events_an_mlflow_store_and_csv_offline(color_folder, weights, tmp_path,
                                                                           monkeypatch):
    import transferkit

    monkeypatch.delenv("MLFLOW_ALLOW_FILE_STORE", raising=False)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:9")  # a store we did not ask for is not used
    run = transferkit.fit(color_folder, out=tmp_path / "run", backbone="test_resnet", weights=str(weights),
                          finetune="partial", epochs=2, image_size=32, workers=0, patience=0,
                          logger="csv,tensorboard,mlflow")
    assert len((run.path / "metrics.csv").read_text().splitlines()) == 3  # ours, beside the loggers
    logged = (run.path / "logs" / "csv" / "metrics.csv").read_text()
    assert "val_acc" in logged.splitlines()[0] and "lr-" in logged.splitlines()[0]
    assert "finetune" in (run.path / "logs" / "csv" / "hparams.yaml").read_text()
    events = list((run.path / "logs" / "tensorboard").glob("events.out.tfevents.*"))
    assert events and events[0].stat().st_size > 0
    val_acc = list((run.path / "mlruns").glob("*/*/metrics/val_acc"))
    assert len(val_acc) == 1 and len(val_acc[0].read_text().splitlines()) == 2  # one line per epoch
    params = val_acc[0].parent.parent / "params"
    assert (params / "backbone").read_text() == "test_resnet"


def test_an_unknown_logger_is_refused_before_anything_is_written(tmp_path):
    with pytest.raises(ConfigError, match=r"--logger: \"csv,wandb\" is not a choice; expected one or more of csv,"
                                          r" tensorboard, mlflow, separated by commas"):
        FitConfig.build({"data": "d", "logger": "csv,wandb"}, source="cli")
    assert FitConfig.build({"data": "d", "logger": "mlflow,csv"}).logger == "mlflow,csv"
