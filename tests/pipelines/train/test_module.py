"""The module's phases: head-only epochs never touch the backbone; checkpoints carry metadata."""
from __future__ import annotations

from types import SimpleNamespace

import timm
import torch

from transferkit.backbones.groups import layer_groups
from transferkit.backbones.strategies import make_plan
from transferkit.pipelines.train.module import ImageClassifier, Optim, Phases
from transferkit.pipelines.train.schedule import Schedule


def _module(phases: Phases, strategy: str = "lp-ft") -> ImageClassifier:
    torch.manual_seed(0)
    model = timm.create_model("test_resnet", num_classes=3)
    groups = layer_groups(model)
    module = ImageClassifier(model, groups, make_plan(strategy, groups), Schedule(epochs=4, probe_epochs=2), Optim(),
                             3, phases=phases, meta={"classes": ["a", "b", "c"]})
    module._trainer = SimpleNamespace(current_epoch=0)  # the module reads the epoch from its trainer
    return module


def test_a_probe_epoch_on_images_gives_the_backbone_no_gradient_and_keeps_its_statistics():
    module = _module(Phases(head_until=2, features=False))
    module.train()
    stem = module.model.conv1[0].weight
    mean = module.model.bn1.running_mean.clone()
    module(torch.randn(4, 3, 32, 32)).sum().backward()  # epoch 0 of 2 probe epochs
    assert stem.grad is None and module.model.fc.weight.grad is not None
    assert torch.equal(mean, module.model.bn1.running_mean)  # the frozen pass runs in eval mode
    module.zero_grad(set_to_none=True)
    module._trainer.current_epoch = 2  # fine-tuning: everything trains
    module(torch.randn(4, 3, 32, 32)).sum().backward()
    assert stem.grad is not None and not torch.equal(mean, module.model.bn1.running_mean)


def test_feature_epochs_run_the_classifier_alone_and_checkpoints_describe_the_model():
    module = _module(Phases(head_until=99, features=True), "freeze")
    features = torch.randn(5, module.model.num_features)
    assert torch.equal(module(features), module.model.get_classifier()(features))
    ckpt: dict = {}
    module.on_save_checkpoint(ckpt)
    assert ckpt["transferkit"] == {"classes": ["a", "b", "c"]}


EXPECTED_OPTIMIZERS = {  # ours -> (torch class, momentum, nesterov)
    "sgd": ("SGD", 0.0, False), "momentum": ("SGD", 0.8, False), "nesterov": ("SGD", 0.8, True),
    "adagrad": ("Adagrad", None, None), "rmsprop": ("RMSprop", 0.8, None), "adam": ("Adam", None, None),
    "adamw": ("AdamW", None, None)}


def test_each_optimizer_name_builds_the_torch_optimizer_it_says():
    for name, (cls, momentum, nesterov) in EXPECTED_OPTIMIZERS.items():
        module = _module(Phases(), "full")
        module.optim = Optim(name, weight_decay=0.01, momentum=0.8)
        module._trainer = SimpleNamespace(max_epochs=2, estimated_stepping_batches=4, current_epoch=0)
        opt = module.configure_optimizers()["optimizer"]
        assert type(opt).__name__ == cls, name
        group = opt.param_groups[0]
        if momentum is not None:
            assert group["momentum"] == momentum, name
        if nesterov is not None:
            assert group["nesterov"] is nesterov, name


def test_class_weights_weigh_the_training_loss():
    module = _module(Phases(), "full")
    x, y = torch.randn(6, 3, 32, 32), torch.tensor([0, 0, 0, 0, 1, 2])
    module.eval()
    logits = module(x)
    plain = torch.nn.functional.cross_entropy(logits, y, label_smoothing=0.1)
    module.optim = Optim(class_weights=(0.5, 2.0, 2.0))
    weighted = torch.nn.functional.cross_entropy(logits, y, weight=module._class_weight(logits), label_smoothing=0.1)
    assert not torch.allclose(plain, weighted)
    assert module._class_weight(logits).tolist() == [0.5, 2.0, 2.0]


def test_sync_bn_converts_the_batchnorm_layers_that_train_and_leaves_frozen_ones_and_the_keys_alone():
    from transferkit.pipelines.train.module import sync_trained_batchnorm

    module = _module(Phases(), "partial")
    model = module.model.eval()
    x = torch.randn(2, 3, 32, 32)
    before, keys = model(x), list(model.state_dict())
    trained = {n for n, p in model.named_parameters() if p.requires_grad}
    converted = sync_trained_batchnorm(model, trained)
    kinds = {name: type(m) for name, m in model.named_modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)}
    trains = {name for name in kinds if any(f"{name}.{k}" in trained for k in ("weight", "bias"))}
    assert converted == len(trains) > 0 and len(kinds) > len(trains)  # partial: some train, some stay frozen
    assert all(kinds[n] is torch.nn.SyncBatchNorm for n in trains)
    assert all(kinds[n] is torch.nn.BatchNorm2d for n in set(kinds) - trains)
    assert list(model.state_dict()) == keys and torch.allclose(model(x), before)  # same math in eval mode


def test_compile_that_fails_falls_back_to_the_eager_network_with_a_warning(monkeypatch, caplog):
    from transferkit.pipelines.train.module import Speed

    def broken(model):
        def run(x):
            raise RuntimeError("no C++ compiler found\nmore detail")
        return run

    monkeypatch.setattr(torch, "compile", broken)
    module = _module(Phases(), "full")
    module.speed = Speed(compile=True, channels_last=True)
    module._trainer = SimpleNamespace(current_epoch=0, world_size=1)
    module.setup("fit")
    assert "_compiled" not in dict(module.named_modules()) and all("_orig_mod" not in k for k in module.state_dict())
    with caplog.at_level("WARNING"):
        out = module(torch.randn(2, 3, 32, 32))
    assert out.shape == (2, 3) and module._compiled is None
    assert "--compile: torch.compile failed (RuntimeError: no C++ compiler found); training eagerly" in caplog.text
    assert module.model.conv1[0].weight.is_contiguous(memory_format=torch.channels_last)
