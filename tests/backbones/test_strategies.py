"""Which tensors a strategy lets training change, compared bit for bit before and after."""
from __future__ import annotations

import dataclasses
import pytest
import pytorch_lightning as pl
import timm
import torch
from torch.utils.data import DataLoader, Dataset

from transferkit.backbones.groups import layer_groups
from transferkit.backbones.strategies import apply_plan, make_plan, param_groups
from transferkit.errors import ConfigError
from transferkit.pipelines.train.module import ImageClassifier, Optim
from transferkit.pipelines.train.schedule import Schedule


class Noise(Dataset):
    def __init__(self, n=24, size=32, classes=3):
        g = torch.Generator().manual_seed(0)
        self.x = torch.randn(n, 3, size, size, generator=g)
        self.y = torch.randint(0, classes, (n,), generator=g)

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return self.x[i], self.y[i], i


def train_once(name: str, strategy: str, k: int = 2):
    torch.manual_seed(0)
    model = timm.create_model(name, num_classes=3)
    groups = layer_groups(model)
    plan = make_plan(strategy, groups, k)
    apply_plan(model, groups, plan)
    before = {n: t.detach().clone() for n, t in model.state_dict().items()}
    plan = dataclasses.replace(plan, lr=1e-2)
    module = ImageClassifier(model, groups, plan, Schedule(epochs=1, warmup_epochs=0), Optim(), 3)
    trainer = pl.Trainer(max_epochs=1, accelerator="cpu", logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0)
    trainer.fit(module, DataLoader(Noise(), batch_size=8))
    after = model.state_dict()
    changed = {n for n in before if not torch.equal(before[n], after[n])}
    return groups, changed, model


def _group_tensors(model, names):
    """Parameter names plus the buffers (BatchNorm statistics) of the same modules."""
    modules = {n.rsplit(".", 1)[0] for n in names}
    return {n for n, _ in model.state_dict().items() if n.rsplit(".", 1)[0] in modules}


@pytest.mark.parametrize("name", ["test_resnet", "test_efficientnet"])
def test_freeze_keeps_every_backbone_tensor_and_bn_statistic(name):
    groups, changed, model = train_once(name, "freeze")
    head = set(groups.head)
    assert head <= changed
    assert changed - head == set()  # weights, BN running mean/var and counters untouched
    bn_buffers = [n for n in model.state_dict() if "running_mean" in n]
    assert bn_buffers, "the model should have BatchNorm layers for this test to mean anything"


@pytest.mark.parametrize("name", ["test_resnet", "test_efficientnet"])
def test_partial_changes_exactly_the_top_groups_and_the_head(name):
    k = 2
    groups, changed, model = train_once(name, "partial", k)
    n = len(groups)
    for i, names in enumerate(groups.params):
        tensors = _group_tensors(model, names)
        if i >= n - k:
            assert tensors & changed, f"top group {groups.labels[i]} should train"
            assert {p for p in names if model.get_parameter(p).requires_grad} == set(names)
        else:
            assert not tensors & changed, f"group {groups.labels[i]} should stay frozen"
    assert set(groups.head) <= changed


def test_full_changes_every_group():
    groups, changed, _ = train_once("test_resnet", "full")
    for label, names in zip(groups.labels, groups.params):
        assert set(names) <= changed, label
    assert set(groups.head) <= changed


def test_layer_wise_learning_rates_decay_with_depth():
    model = timm.create_model("test_resnet", num_classes=3)
    groups = layer_groups(model)
    plan = make_plan("full", groups)
    apply_plan(model, groups, plan)
    pg = param_groups(model, groups, plan, lr=1e-2, layer_decay=0.5)
    lr_of = {}
    for g in pg:
        for p in g["params"]:
            lr_of[id(p)] = g["lr"]
    head_lr = lr_of[id(model.get_parameter(groups.head[0]))]
    top_lr = lr_of[id(model.get_parameter(groups.params[-1][0]))]
    stem_lr = lr_of[id(model.get_parameter(groups.params[0][0]))]
    assert head_lr == pytest.approx(1e-2)
    assert top_lr == pytest.approx(5e-3)
    assert stem_lr == pytest.approx(1e-2 * 0.5 ** len(groups))
    no_wd = [g for g in pg if g["weight_decay"] == 0.0]
    assert all(p.ndim <= 1 for g in no_wd for p in g["params"])


def test_partial_with_too_many_groups_is_a_clear_error():
    model = timm.create_model("test_resnet", num_classes=3)
    groups = layer_groups(model)
    with pytest.raises(ConfigError, match="--trainable-groups 9 is out of range"):
        make_plan("partial", groups, 9)


def test_groups_run_bottom_to_top_and_exclude_the_head():
    model = timm.create_model("test_resnet", num_classes=3)
    groups = layer_groups(model)
    assert groups.labels[0].startswith("conv1")
    assert groups.head == ("fc.weight", "fc.bias")
    all_params = {n for n, _ in model.named_parameters()}
    grouped = {n for g in groups.params for n in g} | set(groups.head)
    assert grouped == all_params


def test_no_weight_decay_names_of_a_vit_get_none():
    model = timm.create_model("test_vit", num_classes=3)
    groups = layer_groups(model)
    plan = make_plan("full", groups)
    apply_plan(model, groups, plan)
    named = {id(p): n for n, p in model.named_parameters()}
    decayed = {named[id(p)] for g in param_groups(model, groups, plan, 1e-3, 0.5, 0.05) if g["weight_decay"] > 0
               for p in g["params"]}
    assert {"pos_embed", "cls_token"} <= set(model.no_weight_decay())
    assert "pos_embed" not in decayed and "cls_token" not in decayed
    assert "patch_embed.proj.weight" in decayed
