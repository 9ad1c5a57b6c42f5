"""transferkit: transfer learning on image folders, with the augmentation that feeds it.

The public API, re-exported from the modules that own it. Heavy modules load on first use so
that `import transferkit` stays fast.
"""
from __future__ import annotations

import importlib

__version__ = "0.1.0"

_EXPORTS = {
    "UserError": "transferkit.errors",
    "create_backbone": ("transferkit.backbones.factory", "create"),
    "layer_groups": "transferkit.backbones.groups",
    "train_transform": "transferkit.augment.image",
    "eval_transform": "transferkit.augment.image",
    "BatchMixer": "transferkit.augment.batch",
    "augment_texts": "transferkit.augment.text",
    "TTA": "transferkit.augment.tta",
    "FitConfig": "transferkit.pipelines.settings",
    "fit": "transferkit.pipelines.api",
    "resume": "transferkit.pipelines.api",
    "advise": "transferkit.pipelines.api",
    "load": "transferkit.pipelines.api",
    "Run": "transferkit.pipelines.api",
    "LoadedModel": "transferkit.pipelines.api",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    target = _EXPORTS.get(name)
    if target is None:
        raise AttributeError(f"module 'transferkit' has no attribute {name!r}")
    module, attr = target if isinstance(target, tuple) else (target, name)
    return getattr(importlib.import_module(module), attr)
