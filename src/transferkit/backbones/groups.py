"""Ordered layer groups (stem -> stages -> head) for any timm model.

The grouping is timm's own coarse `group_matcher` (the one its layer-wise learning-rate decay
uses), so a model from any family, or from a plugin, is grouped the way its authors meant.
The classifier is taken out as the head; everything else is a backbone group, bottom to top.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

from timm.models import group_parameters
from torch import nn


@dataclass(frozen=True)
class LayerGroups:
    """Parameter names of each backbone group, bottom to top, and of the new head."""

    labels: tuple[str, ...]
    params: tuple[tuple[str, ...], ...]
    head: tuple[str, ...]

    def __len__(self) -> int:
        return len(self.params)

    def to_dict(self) -> dict:
        return {"groups": list(self.labels), "head": sorted({p.rsplit(".", 1)[0] for p in self.head})}


def _label(names: list[str]) -> str:
    prefix = os.path.commonprefix([n.split(".") for n in names])
    if prefix and len(prefix) < len(names[0].split(".")):
        return ".".join(prefix)
    tops = list(dict.fromkeys(n.split(".")[0] for n in names))
    return "+".join(tops[:3]) + ("+..." if len(tops) > 3 else "")


def classifier_prefix(model: nn.Module) -> str:
    clf = model.get_classifier() if hasattr(model, "get_classifier") else None
    if isinstance(clf, nn.Module):
        for name, module in model.named_modules():
            if module is clf and name:
                return name
    name = (getattr(model, "pretrained_cfg", None) or {}).get("classifier")
    if isinstance(name, str):
        return name
    raise ValueError(f"cannot find the classifier of {type(model).__name__}")


def layer_groups(model: nn.Module) -> LayerGroups:
    head_prefix = classifier_prefix(model)
    is_head = lambda n: n == head_prefix or n.startswith(head_prefix + ".")  # noqa: E731
    head = tuple(n for n, _ in model.named_parameters() if is_head(n))
    if hasattr(model, "group_matcher"):
        grouped = group_parameters(model, model.group_matcher(coarse=True))
        ordered = [grouped[k] for k in sorted(grouped)]
    else:
        # No matcher (a hand-written plugin model): one group per top-level child.
        ordered = {}
        for n, _ in model.named_parameters():
            ordered.setdefault(n.split(".")[0], []).append(n)
        ordered = list(ordered.values())
    params, labels = [], []
    for names in ordered:
        names = [n for n in names if not is_head(n)]
        if names:
            params.append(tuple(names))
            labels.append(_label(names))
    return LayerGroups(tuple(labels), tuple(params), head)
