"""`transferkit advise`: measure a dataset against a backbone and say how much of it to train."""
from __future__ import annotations

import time

from torch.utils.data import DataLoader

import torch

from transferkit.augment.image import eval_transform
from transferkit.backbones import factory
from transferkit.backbones.advisor import Advice, decide, measure_with_features
from transferkit.backbones.groups import LayerGroups, layer_groups
from transferkit.pipelines.data import ImageDataset, Sample, scan_folder, stratified_split


def advice_for(model, groups: LayerGroups, samples: list[Sample], transform, *, batch_size: int = 32,
               workers: int = 0, seed: int = 0, device: str | torch.device = "cpu",
               progress: bool = True) -> tuple[Advice, torch.Tensor]:
    """Measure `samples` with the frozen `model` and decide; also return the pooled features."""
    loader = DataLoader(ImageDataset(samples, transform), batch_size=batch_size, num_workers=workers)
    m, feats, _ = measure_with_features(model, loader, seed=seed, device=device, progress=progress)
    return decide(m, num_groups=len(groups), group_labels=groups.labels), torch.from_numpy(feats)


def advise(data: str, backbone: str, *, pretrained: bool = True, weights: str | None = None,
           plugin: str | None = None, image_size: int | None = None, val_fraction: float = 0.2,
           seed: int = 42, batch_size: int = 32, workers: int = 0, progress: bool = True) -> tuple[Advice, dict]:
    """The advice for `data`'s training split (the split `fit` would train on, same seed)."""
    t0 = time.monotonic()
    scan = scan_folder(data)
    if scan.presplit:
        train = scan.splits["train"]
    else:
        train, _ = stratified_split(scan.splits["train"], val_fraction, seed)
    model, dc = factory.create(backbone, len(scan.classes), pretrained=pretrained, weights=weights,
                               plugin=plugin, image_size=image_size)
    groups = layer_groups(model)
    tf = eval_transform(dc.input_size[1:], dc.mean, dc.std, dc.crop_pct, dc.interpolation)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    advice, _ = advice_for(model, groups, train, tf, batch_size=batch_size, workers=workers, seed=seed,
                           device=device, progress=progress)
    info = {"data": str(data), "backbone": backbone, "classes": scan.classes, "train_images": len(train),
            "groups": list(groups.labels), "seconds": round(time.monotonic() - t0, 1)}
    return advice, info
