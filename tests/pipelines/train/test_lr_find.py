"""The LR finder: its suggestion on a problem whose good rate is known, on real data against the
default, and what `fit --lr find` and `transferkit lr-find` write."""
from __future__ import annotations

import json

import numpy as np
import pytest
import timm
import torch

import transferkit
from transferkit.backbones.groups import layer_groups
from transferkit.backbones.strategies import make_plan
from transferkit.cli.main import main
from transferkit.errors import ConfigError
from transferkit.pipelines.data.datamodule import FeatureCache, FitDataModule
from transferkit.pipelines.data.datasets import Sample
from transferkit.pipelines.settings import FitConfig
from transferkit.pipelines.train.lr_find import find_lr, steepest
from transferkit.pipelines.train.module import ImageClassifier, Optim, Phases
from transferkit.pipelines.train.schedule import Schedule


def test_the_steepest_fall_is_read_against_the_log_of_the_rate():
    lrs = np.logspace(-6, 0, 61)
    losses = 1.0 - 0.5 * np.tanh(2 * (np.log10(lrs) + 2))  # falls fastest at 1e-2
    losses[:3] = [0.2, 0.4, 0.6]  # the first steps' smoothing artefact is skipped
    assert steepest(lrs, losses) == pytest.approx(1e-2)
    assert steepest(lrs[:14], losses[:14]) is not None and steepest(lrs[:12], losses[:12]) is None  # too short


@pytest.mark.parametrize("batch_size", [64, 512])
def test_on_a_linear_head_the_suggestion_is_within_3x_of_one_over_the_curvature(batch_size):
    # Gradient descent's textbook rate is 1/L, L the largest eigenvalue of the loss's Hessian.
    torch.manual_seed(0)
    n, k = 512, 4
    model = timm.create_model("test_resnet", num_classes=k)
    d = model.num_features
    g = torch.Generator().manual_seed(1)
    x = torch.randn(n, d, generator=g) * torch.linspace(0.5, 2.0, d)
    y = (x @ torch.randn(d, k, generator=g)).argmax(1)
    head = model.get_classifier()
    start = torch.cat([head.weight.detach().flatten(), head.bias.detach()])

    def loss(w):
        return torch.nn.functional.cross_entropy(x @ w[: d * k].view(k, d).T + w[d * k:], y)

    curvature = torch.linalg.eigvalsh(torch.autograd.functional.hessian(loss, start)).max().item()
    samples = [Sample(str(i), int(y[i])) for i in range(n)]
    groups = layer_groups(model)
    module = ImageClassifier(model, groups, make_plan("freeze", groups, lr=0.1),
                             Schedule(epochs=10, kind="constant", warmup_epochs=0),
                             Optim("sgd", weight_decay=0.0, label_smoothing=0.0), k,
                             phases=Phases(head_until=10, features=True))
    data = FitDataModule(samples, samples[:64], None, None, batch_size=batch_size, reads_features=lambda e: True,
                         build_cache=lambda *a: FeatureCache(x[None], x[None, :64]))
    before = head.weight.detach().clone()
    found = find_lr(FitConfig.build({"data": "d", "lr": "find", "finetune": "freeze"}), module, data,
                    progress=False)
    assert 1 / 3 <= found.suggestion * curvature <= 3, (found.suggestion, 1 / curvature)
    assert torch.equal(head.weight, before)  # the sweep's steps are undone
    assert module.phases.head_until == 10  # and the phases are the module's again


def test_fit_lr_find_trains_with_the_suggestion_and_lr_find_only_plots(color_folder, weights, tmp_path, capsys):
    common = ["--backbone", "test_resnet", "--weights", str(weights), "--image-size", "32", "--workers", "0",
              "--finetune", "partial", "--epochs", "2", "--patience", "0"]
    assert main(["lr-find", str(color_folder), *common, "--out", str(tmp_path / "sweep")]) == 0
    out = capsys.readouterr().out
    found = json.loads((tmp_path / "sweep" / "lr_find.json").read_text())
    assert f"suggested head learning rate: {found['suggestion']:.3g} (partial, adamw)" in out
    assert (tmp_path / "sweep" / "plots" / "lr_find.png").stat().st_size > 0
    assert found["steps"] >= 50 and len(found["lr"]) == len(found["loss"]) == found["steps"]
    assert not list((tmp_path / "sweep" / "checkpoints").glob("*.ckpt"))  # nothing trained

    run = transferkit.fit(color_folder, out=tmp_path / "run", backbone="test_resnet", weights=str(weights),
                          image_size=32, workers=0, finetune="partial", epochs=2, patience=0, lr="find")
    assert run.report["lr_find"]["suggestion"] == pytest.approx(run.report["finetune"]["lr"])
    assert "from the LR finder" in run.report["finetune"]["reason"]
    assert run.config.lr == "find"


@pytest.mark.parametrize("extra, message", [
    ({"finetune": "lp-ft"}, "lr= find sweeps one phase and lp-ft has two"),
    ({"devices": "2"}, "lr= find runs in one process; find the rate first with `transferkit lr-find`"),
    ({"head_solver": "lbfgs", "finetune": "freeze"}, "lr= find sweeps optimizer steps and head_solver= lbfgs takes"
                                                     " none"),
])
def test_what_the_finder_cannot_sweep_is_refused(extra, message):
    with pytest.raises(ConfigError, match=message):
        FitConfig.build({"data": "d", "lr": "find", **extra})
    assert not FitConfig.build({"data": "d", "lr": "find"}).solved_head  # freeze's head then trains (sgd)


@pytest.mark.real
@pytest.mark.slow
def test_on_hymenoptera_the_found_rate_does_as_well_as_the_default(shared, tmp_path):
    plugin = shared / "weights" / "mobilenetv1_025.py"
    acc, found = {}, None
    for lr in ("find", None):
        run = transferkit.fit(shared / "data" / "hymenoptera", out=tmp_path / str(lr), backbone="mobilenetv1_025",
                              backbone_plugin=str(plugin), finetune="freeze", head_solver="sgd", lr=lr, epochs=10,
                              patience=0, seed=0, workers=2)
        acc[lr] = run.report["accuracy"]
        found = found or run.report.get("lr_find")
    print("hymenoptera freeze (sgd head), val accuracy: found", acc["find"], "default", acc[None],
          "found rate", found)
    assert acc["find"] >= acc[None] - 0.01
