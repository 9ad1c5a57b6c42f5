"""`transferkit advise`: measure a dataset against a backbone and say how much of it to train."""
from __future__ import annotations

import time
from typing import Any

from transferkit.backbones.advisor import Advice
from transferkit.pipelines.settings import FitConfig


def advise(data: str, backbone: str = "resnet50", *, progress: bool = True, source: str = "api",
           **settings: Any) -> tuple[Advice, dict]:
    """The advice for `data`'s training split (the split `fit` would train on, same seed).

    `settings` are fit's (``weights``, ``backbone_plugin``, ``image_size``, ``val_fraction``,
    ``seed``, ``batch_size``, ``workers``, ``accelerator`` ...), checked by the same table.
    """
    from transferkit.pipelines.data.features import feature_batch
    from transferkit.pipelines.devices import choose_device
    from transferkit.pipelines.train.recipe import advice_for, load_backbone, load_split, make_transforms

    t0 = time.monotonic()
    cfg = FitConfig.build({"data": str(data), "backbone": backbone, **settings}, source=source)
    split = load_split(cfg, None)
    backbone_ = load_backbone(cfg, split, None)
    pixels = make_transforms(cfg.replace(augment="none", aug=[]), backbone_.data_cfg, {})
    advice, _ = advice_for(backbone_.model, backbone_.groups, split.train, pixels.eval,
                           batch_size=feature_batch(cfg.batch_size), workers=cfg.workers or 0, seed=cfg.seed,
                           device=choose_device(cfg.accelerator), progress=progress)
    info = {"data": str(data), "backbone": backbone, "classes": split.classes, "train_images": len(split.train),
            "groups": list(backbone_.groups.labels), "seconds": round(time.monotonic() - t0, 1)}
    return advice, info
