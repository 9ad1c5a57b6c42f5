"""`transferkit advise`: measure a dataset against a backbone and say how much of it to train."""
from __future__ import annotations

import time
from typing import Any

import torch
from torch.utils.data import DataLoader

from transferkit.backbones.advisor import Advice, decide, measure_with_features
from transferkit.backbones.groups import LayerGroups
from transferkit.pipelines.data.datasets import ImageDataset, Sample
from transferkit.pipelines.settings import FitConfig


def advice_for(model, groups: LayerGroups, samples: list[Sample], transform, *, batch_size: int = 64,
               workers: int = 0, seed: int = 0, device: str | torch.device = "cpu",
               progress: bool = True) -> tuple[Advice, torch.Tensor]:
    """Measure `samples` with the frozen `model` and decide; also return the pooled features
    (fit reuses them as the clean view of its feature cache)."""
    loader = DataLoader(ImageDataset(samples, transform), batch_size=batch_size, num_workers=workers)
    m, feats, _ = measure_with_features(model, loader, seed=seed, device=device, progress=progress)
    return decide(m, num_groups=len(groups), group_labels=groups.labels), torch.from_numpy(feats)


def advise(data: str, backbone: str = "resnet50", *, progress: bool = True, source: str = "api",
           **settings: Any) -> tuple[Advice, dict]:
    """The advice for `data`'s training split (the split `fit` would train on, same seed).

    `settings` are fit's (``weights``, ``backbone_plugin``, ``image_size``, ``val_fraction``,
    ``seed``, ``batch_size``, ``workers``, ``accelerator`` ...), checked by the same table.
    """
    from transferkit.pipelines.data.features import feature_batch
    from transferkit.pipelines.devices import choose_device
    from transferkit.pipelines.train.recipe import load_backbone, load_split, make_transforms

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
