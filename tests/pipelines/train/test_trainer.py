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


def test_one_trainer_shards_itself_and_reloads_data_only_for_lp_ft(tmp_path):
    cfg = FitConfig.build({"epochs": 3, "patience": 2, "accelerator": "cpu"})
    first = RankZeroDecides(None, lambda d: None)
    plain = make_trainer(cfg, RunDir(tmp_path), Schedule(epochs=3), first=[first], bn_loader=None, progress=False)
    assert plain.callbacks[0] is first and plain.max_epochs == 3
    assert plain._accelerator_connector.use_distributed_sampler is False
    assert plain.reload_dataloaders_every_n_epochs == 0
    lpft = make_trainer(cfg, RunDir(tmp_path), Schedule(epochs=6, probe_epochs=3), first=[], bn_loader=None,
                        progress=False)
    assert lpft.max_epochs == 6 and lpft.reload_dataloaders_every_n_epochs == 1
    stopper = next(c for c in lpft.callbacks if type(c).__name__ == "JudgedEarlyStopping")
    assert stopper.epochs == {4, 5, 6}  # not during the probe
