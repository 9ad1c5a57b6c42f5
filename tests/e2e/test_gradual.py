"""Gradual unfreezing: which groups train in each stage, tensor by tensor; an interrupt in any
stage resumes to the same end."""
from __future__ import annotations

import copy
import csv

import pytest
import pytorch_lightning as pl
import torch

from transferkit.cli.main import main

# test_resnet's groups, bottom to top: conv1+bn1, layer1.0, layer2.0, layer3.0, layer4.0
GROUPS = ("conv1", "bn1", "layer1", "layer2", "layer3", "layer4")
JOINS = {"fc": 1, "layer4": 2, "layer3": 3, "layer2": 4, "layer1": 5, "conv1": 6, "bn1": 6}  # 1-based epoch


def _args(weights, epochs=6):
    return ["--backbone", "test_resnet", "--weights", str(weights), "--image-size", "32", "--workers", "0",
            "--batch-size", "8", "--epochs", str(epochs), "--patience", "0", "--seed", "3", "--finetune", "gradual",
            "--unfreeze-every", "1"]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    from conftest import make_color_folder

    return make_color_folder(tmp_path_factory.mktemp("gradual") / "data", per_class=12, size=32)


class _Snapshots(pl.Callback):
    """The model's tensors (parameters and BatchNorm buffers) at the start and at each epoch end."""

    def __init__(self):
        self.states: list[dict[str, torch.Tensor]] = []

    def _take(self, pl_module) -> None:
        self.states.append(copy.deepcopy({k: v.detach().cpu() for k, v in pl_module.model.state_dict().items()}))

    def on_train_start(self, trainer, pl_module):
        self._take(pl_module)

    def on_train_epoch_end(self, trainer, pl_module):
        self._take(pl_module)


def test_the_head_trains_alone_then_one_group_joins_per_epoch_from_the_top(data, weights, tmp_path):
    from conftest import fit_with_callbacks

    snaps = _Snapshots()
    out = tmp_path / "run"
    assert fit_with_callbacks(["fit", str(data), "--out", str(out), *_args(weights)], snaps) == 0
    start = snaps.states[0]
    for epoch, state in enumerate(snaps.states[1:], start=1):
        for top, joins in JOINS.items():
            names = [k for k in state if k.split(".")[0] == top and not k.endswith("num_batches_tracked")]
            changed = [k for k in names if not torch.equal(state[k], start[k])]
            if epoch < joins:
                assert not changed, (epoch, top, changed)  # weights and BatchNorm statistics as loaded
            else:
                assert changed, (epoch, top)
    report = (out / "report.json").read_text()
    assert '"joins_at_epoch"' in report and '"layer4.0": 2' in report and '"conv1+bn1": 6' in report
    with (out / "metrics.csv").open() as f:
        lrs = [float(r["lr"]) for r in csv.DictReader(f)]
    assert len(lrs) == 6


@pytest.mark.parametrize("cut_at", [1, 3])
def test_an_interrupt_in_any_stage_resumes_to_the_same_end(data, weights, tmp_path, cut_at):
    from conftest import fit_with_callbacks

    class Interrupt(pl.Callback):
        def on_train_epoch_start(self, trainer, pl_module):
            if trainer.current_epoch == cut_at:
                raise KeyboardInterrupt

    whole, cut = tmp_path / "whole", tmp_path / "cut"
    args = _args(weights, epochs=4)
    assert main(["fit", str(data), "--out", str(whole), *args]) == 0
    assert fit_with_callbacks(["fit", str(data), "--out", str(cut), *args], Interrupt()) == 130
    assert main(["fit", "--resume", str(cut)]) == 0
    a = torch.load(whole / "checkpoints/last.ckpt", weights_only=True)
    b = torch.load(cut / "checkpoints/last.ckpt", weights_only=True)
    for k, v in a["state_dict"].items():
        assert torch.equal(v, b["state_dict"][k]), k
    strip = lambda p: [{k: v for k, v in r.items() if k != "seconds"} for r in csv.DictReader(p.open())]  # noqa: E731
    assert strip(cut / "metrics.csv") == strip(whole / "metrics.csv")
