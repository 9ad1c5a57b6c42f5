"""freeze / partial / full: which layer groups train, at which learning rate.

- freeze: only the new head trains; the backbone's weights and BatchNorm statistics stay as
  loaded, because frozen modules run in eval mode (`set_frozen_eval`).
- partial: the top K backbone groups train too; everything below is frozen as above.
- full: everything trains.
- lp-ft: a linear probe on the frozen backbone first, then full fine-tuning from that head
  (Kumar et al. 2022): a good head keeps the first full steps from distorting the features.
- gradual: the head alone first, then one more group from the top every few epochs (ULMFiT's
  gradual unfreezing; the stages live in the Schedule, a group waits in eval mode until it joins).

Trained backbone groups get layer-wise decayed learning rates: the head gets `lr`, the top
backbone group `lr * decay`, the next `lr * decay**2`, and so on down to the stem. With the
default decay of 0.5 a ResNet's stem trains at 1/32 of the head's rate: low layers hold generic
edges and textures that pretraining already got right.
"""
from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from transferkit.backbones.groups import LayerGroups
from transferkit.errors import ConfigError

DEFAULT_LAYER_DECAY = 0.5
DEFAULT_TRAINABLE_GROUPS = 2

# Head learning rates with AdamW that work for each strategy: a linear head on frozen
# features wants a large step (1e-2 reached 0.86 on hymenoptera where 3e-3 reached 0.75 in the
# same 10 epochs); moving pretrained layers wants a small one.
DEFAULT_LR = {"freeze": 1e-2, "partial": 3e-3, "full": 1e-3, "lp-ft": 1e-3,
              "gradual": 3e-3}  # gradual: partial's rate, not measured on its own
SCRATCH_LR = 3e-3  # random weights: one rate for every layer
# Each optimizer's head rate as a multiple of AdamW's above, measured by
# benchmarks/optimizer_lr.py (partial fine-tuning of MobileNetV1 x0.25 on hymenoptera): momentum
# SGD takes steps about 10x larger than AdamW for the same effect, plain SGD (no momentum) 1/(1-0.9)
# times more again.
OPTIMIZER_LR_FACTOR = {"adamw": 1.0, "adam": 1.0, "rmsprop": 0.1, "adagrad": 3.0, "momentum": 10.0,
                       "nesterov": 10.0, "sgd": 100.0}

@dataclass(frozen=True)
class Plan:
    """The strategy decision, one typed value from the advisor to ``config.yaml``, ``report.json``
    and back on resume: which backbone groups train (indices, bottom = 0), at which head learning
    rate and layer-wise decay, and why (with the advisor's measurements when it decided)."""

    strategy: str
    trainable: tuple[int, ...]
    reason: str
    labels: tuple[str, ...] = ()
    lr: float = 1e-3
    layer_decay: float = DEFAULT_LAYER_DECAY
    advice: dict | None = None

    def to_dict(self) -> dict:
        out = {"strategy": self.strategy, "reason": self.reason,
               "trainable_groups": [self.labels[i] for i in self.trainable] + ["head"],
               "frozen_groups": [lab for i, lab in enumerate(self.labels) if i not in self.trainable],
               "lr": self.lr, "layer_decay": self.layer_decay}
        if self.advice is not None:
            out["advice"] = self.advice
        return out

    @classmethod
    def from_dict(cls, d: dict, groups: LayerGroups) -> "Plan":
        """The plan saved by ``to_dict``, for this backbone's groups (named, so a group count that
        changed is an error, not a silent shift)."""
        labels = list(groups.labels)
        names = [n for n in d["trainable_groups"] if n != "head"]
        missing = [n for n in names if n not in labels]
        if missing:
            raise ConfigError(f"the saved strategy trains groups {', '.join(missing)} that this backbone does not"
                              f" have ({', '.join(labels)}); was the backbone changed?")
        return cls(d["strategy"], tuple(sorted(labels.index(n) for n in names)), d["reason"], tuple(labels),
                   float(d["lr"]), float(d["layer_decay"]), d.get("advice"))


def make_plan(strategy: str, groups: LayerGroups, trainable_groups: int = DEFAULT_TRAINABLE_GROUPS,
              reason: str = "", *, lr: float = 1e-3, layer_decay: float = DEFAULT_LAYER_DECAY,
              advice: dict | None = None) -> Plan:
    n = len(groups)
    labels = list(groups.labels)
    if strategy == "freeze":
        trainable = []
    elif strategy == "partial":
        if not 1 <= trainable_groups <= n:
            raise ConfigError(f"--trainable-groups {trainable_groups} is out of range; this backbone has"
                              f" {n} layer groups ({', '.join(labels)}): use 1 to {n}")
        trainable = list(range(n - trainable_groups, n))
    elif strategy in ("full", "lp-ft", "gradual"):
        trainable = list(range(n))  # gradual: each from its stage on (Schedule.join_epoch)
    else:
        raise ConfigError(f"unknown --finetune {strategy!r}; use one of freeze, partial, full, lp-ft, gradual, auto")
    return Plan(strategy, tuple(trainable), reason or f"--finetune {strategy}", tuple(labels), lr, layer_decay,
                advice)


def apply_plan(model: nn.Module, groups: LayerGroups, plan: Plan) -> None:
    """Set requires_grad so that exactly the planned groups and the head train."""
    trainable = set(groups.head)
    for i in plan.trainable:
        trainable.update(groups.params[i])
    for name, p in model.named_parameters():
        p.requires_grad_(name in trainable)


def frozen_modules(model: nn.Module, also: set[str] = frozenset()) -> list[nn.Module]:
    """The largest sub-modules whose parameters are all frozen (they run in eval mode): not
    requiring gradients, or named in `also` (gradual unfreezing's groups that have not joined)."""
    out: list[nn.Module] = []
    held = {id(p) for name, p in model.named_parameters() if name in also}

    def visit(module: nn.Module) -> None:
        params = list(module.parameters())
        if params and not any(p.requires_grad and id(p) not in held for p in params):
            out.append(module)
            return
        for child in module.children():
            visit(child)

    visit(model)
    return out


def set_frozen_eval(model: nn.Module, also: set[str] = frozenset()) -> None:
    """Put frozen parts in eval mode so BatchNorm statistics and dropout stay as loaded."""
    for m in frozen_modules(model, also):
        m.eval()


def param_groups(model: nn.Module, groups: LayerGroups, plan: Plan, lr: float,
                 layer_decay: float = DEFAULT_LAYER_DECAY, weight_decay: float = 0.05) -> list[dict]:
    """Optimizer parameter groups: decayed lr per depth; no weight decay on biases, norms and what
    the model names in ``no_weight_decay()`` (a ViT's ``pos_embed`` and ``cls_token``), as timm's
    own ``param_groups_weight_decay`` does."""
    named = dict(model.named_parameters())
    skip = set(model.no_weight_decay()) if hasattr(model, "no_weight_decay") else set()
    plain = lambda k: named[k].ndim <= 1 or k.endswith(".bias") or k in skip  # noqa: E731
    n = len(groups)
    scaled: list[tuple[float, list[str], bool, int]] = [(1.0, list(groups.head), True, 0)]
    for i in plan.trainable:
        scaled.append((layer_decay ** (n - i), list(groups.params[i]), False, n - i))
    out = []
    for scale, names, is_head, depth in scaled:
        decay = [named[k] for k in names if named[k].requires_grad and not plain(k)]
        no_decay = [named[k] for k in names if named[k].requires_grad and plain(k)]
        for params, wd in ((decay, weight_decay), (no_decay, 0.0)):
            if params:
                out.append({"params": params, "lr": lr * scale, "weight_decay": wd, "lr_scale": scale,
                            "is_head": is_head, "depth": 0 if is_head else depth})
    return out
