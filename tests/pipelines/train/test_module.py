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
