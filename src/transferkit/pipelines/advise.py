"""`transferkit advise`: measure a dataset against a backbone and say how much of it to train,
or rank several backbones for it.

Ranking runs the advisor's one frozen pass per candidate over the same training split: the
solved probe's cross-validated accuracy is the accuracy ``freeze`` is expected to deliver (the
same solver fits the freeze head), LogME (You et al., 2021) breaks ties, and a timed forward pass
gives the cost per image, from which the seconds of an epoch are estimated.
"""
from __future__ import annotations

import math
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


def candidates(backbone: str, plugin: str | None) -> list[tuple[str, str | None]]:
    """``"a,b,c"`` with plugins ``"pa,pb,pc"`` (one per backbone, one for all, or none) as pairs."""
    from transferkit.errors import ConfigError

    names = [n.strip() for n in backbone.split(",") if n.strip()]
    plugins = [p.strip() for p in plugin.split(",")] if plugin else [None]
    if len(plugins) == 1:
        plugins = plugins * len(names)
    if len(plugins) != len(names):
        raise ConfigError(f"--backbone names {len(names)} backbones but --backbone-plugin {len(plugins)} files;"
                          " give one plugin per backbone (in the same order), one for all, or none")
    if len(set(names)) != len(names):
        raise ConfigError(f"--backbone {backbone} names a backbone twice; list each once")
    return list(zip(names, plugins))


def forward_ms(model, input_size: tuple[int, ...], device, batch: int = 16, repeats: int = 3) -> float:
    """Milliseconds per image of an inference forward pass (the best of `repeats` timed batches)."""
    import torch

    x = torch.randn(batch, *input_size, device=device)
    model.eval().to(device)
    best = math.inf
    with torch.inference_mode():
        model(x[:2])  # warm-up: lazy initialisation, allocator
        for _ in range(repeats):
            t0 = time.perf_counter()
            model(x)
            if device.type == "cuda":
                torch.cuda.synchronize()
            best = min(best, time.perf_counter() - t0)
    return 1000.0 * best / batch


def rank_backbones(data: str, backbone: str, *, progress: bool = True, source: str = "api",
                   **settings: Any) -> list[dict]:
    """Every backbone of ``"a,b,c"`` measured on `data`'s training split, best first.

    Each row: ``backbone``, ``rank``, ``expected_freeze_accuracy`` (the solved probe's held-out
    accuracy), ``logme``, ``strategy`` (the advisor's pick for it), ``ms_per_image`` and the
    estimated seconds of an epoch for ``freeze`` (one frozen pass, to fill the cache) and for
    ``full`` (forward and backward: about three forward passes) over the training split.
    """
    from transferkit.errors import ConfigError
    from transferkit.pipelines.data.features import feature_batch
    from transferkit.pipelines.devices import choose_device
    from transferkit.pipelines.train.recipe import advice_for, load_backbone, load_split, make_transforms

    pairs = candidates(backbone, settings.pop("backbone_plugin", None))
    if settings.get("weights") and len(pairs) > 1:
        raise ConfigError("--weights holds one backbone's weights; with several backbones give each its weights"
                          " through its --backbone-plugin or timm's hub")
    cfg = FitConfig.build({"data": str(data), "backbone": pairs[0][0], **settings}, source=source)
    split = load_split(cfg, None)
    device = choose_device(cfg.accelerator)
    rows = []
    for name, plugin in pairs:
        c = cfg.replace(backbone=name, backbone_plugin=plugin)
        b = load_backbone(c, split, None)
        pixels = make_transforms(c.replace(augment="none", aug=[]), b.data_cfg, {})
        t0 = time.monotonic()
        advice, _ = advice_for(b.model, b.groups, split.train, pixels.eval, batch_size=feature_batch(c.batch_size),
                               workers=c.workers or 0, seed=c.seed, device=device, progress=progress)
        ms = forward_ms(b.model, tuple(b.data_cfg.input_size), device)
        m = advice.measurements
        rows.append({"backbone": name, "backbone_plugin": plugin, "expected_freeze_accuracy": m.probe.get("logreg"),
                     "logme": m.logme, "strategy": advice.strategy, "ms_per_image": round(ms, 2),
                     "freeze_epoch_seconds": round(ms * len(split.train) / 1000, 1),
                     "full_epoch_seconds": round(3 * ms * len(split.train) / 1000, 1),
                     "measure_seconds": round(time.monotonic() - t0, 1)})
    rows.sort(key=lambda r: (-(r["expected_freeze_accuracy"] or 0.0), -(r["logme"] if r["logme"] is not None
                                                                          else -math.inf)))
    for i, r in enumerate(rows, start=1):
        r["rank"] = i
    return rows


def ranking_table(rows: list[dict]) -> str:
    lines = [f"{'rank':>4}  {'backbone':<24} {'freeze acc':>10} {'LogME':>7} {'ms/img':>7} {'epoch s (freeze/full)':>21}"
             "  advice"]
    for r in rows:
        acc = "n/a" if r["expected_freeze_accuracy"] is None else f"{r['expected_freeze_accuracy']:.3f}"
        logme = "n/a" if r["logme"] is None else f"{r['logme']:.3f}"
        lines.append(f"{r['rank']:>4}  {r['backbone']:<24} {acc:>10} {logme:>7} {r['ms_per_image']:>7.2f}"
                     f" {r['freeze_epoch_seconds']:>10.1f} / {r['full_epoch_seconds']:<8.1f}  {r['strategy']}")
    return "\n".join(lines)


def fit_best(cfg: FitConfig, *, progress: bool = True) -> dict | None:
    """``fit`` with several backbones (``cfg.backbone = "a,b,c"``): rank them on the training
    split, fit the first, and keep the ranking in report.json (``backbone_ranking``). One process
    only: a multi-device fit takes one backbone."""
    import logging
    import os

    from transferkit.errors import ConfigError
    from transferkit.pipelines.rundir import RunDir
    from transferkit.pipelines.train.recipe import fit

    if cfg.num_nodes > 1 or (isinstance(cfg.devices_arg, int) and cfg.devices_arg > 1) or \
            int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise ConfigError(f"--backbone {cfg.backbone} ranks backbones in one process; run `transferkit advise DATA"
                          f" --backbone {cfg.backbone}` first, then fit the best one on several devices")
    RunDir(cfg.out).check_creatable(overwrite=cfg.overwrite)  # before minutes of measuring
    keys = ("pretrained", "weights", "backbone_plugin", "image_size", "val_fraction", "seed", "batch_size",
            "workers", "accelerator")
    rows = rank_backbones(cfg.data, cfg.backbone, progress=progress, **{k: getattr(cfg, k) for k in keys})
    best = rows[0]
    logging.getLogger(__name__).info("backbone ranking: %s; fitting %s", ", ".join(
        f"{r['rank']}. {r['backbone']} ({r['expected_freeze_accuracy']:.3f})" for r in rows), best["backbone"])
    report = fit(cfg.replace(backbone=best["backbone"], backbone_plugin=best["backbone_plugin"]), progress=progress)
    if report is not None:
        report["backbone_ranking"] = rows
        RunDir(cfg.out).write_json(RunDir(cfg.out).report, report)
    return report
