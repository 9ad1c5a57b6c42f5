"""`transferkit demo`: the whole transfer-learning story on procedural images, offline.

No pretrained weights can be downloaded offline, so the demo makes its own: it pretrains a small
backbone on a source task of eight shape classes, saves those weights to a file, then fine-tunes
them through ``--weights`` on a different target task with few images per class, beside the same
run from random weights, and evaluates and predicts with the result.
"""
from __future__ import annotations

import logging
import math
import random
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter


log = logging.getLogger(__name__)

SOURCE_CLASSES = ("circle", "square", "triangle", "cross", "ring", "hbar", "vbar", "star")
TARGET_CLASSES = ("diamond", "hexagon", "ellipse", "saltire")


def _polygon(cx: float, cy: float, r: float, sides: int, rot: float) -> list[tuple[float, float]]:
    return [(cx + r * math.cos(rot + 2 * math.pi * i / sides), cy + r * math.sin(rot + 2 * math.pi * i / sides))
            for i in range(sides)]


def _draw_shape(d: ImageDraw.ImageDraw, name: str, cx: float, cy: float, r: float, fill, rng: random.Random):
    w = max(2, int(r / 3))
    if name == "circle":
        d.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
    elif name == "square":
        d.polygon(_polygon(cx, cy, r * 1.2, 4, math.pi / 4 + rng.uniform(-0.15, 0.15)), fill=fill)
    elif name == "triangle":
        d.polygon(_polygon(cx, cy, r * 1.2, 3, -math.pi / 2 + rng.uniform(-0.2, 0.2)), fill=fill)
    elif name == "cross":
        d.rectangle([cx - r, cy - w / 2, cx + r, cy + w / 2], fill=fill)
        d.rectangle([cx - w / 2, cy - r, cx + w / 2, cy + r], fill=fill)
    elif name == "ring":
        d.ellipse([cx - r, cy - r, cx + r, cy + r], outline=fill, width=w)
    elif name == "hbar":
        d.rectangle([cx - r, cy - w, cx + r, cy + w], fill=fill)
    elif name == "vbar":
        d.rectangle([cx - w, cy - r, cx + w, cy + r], fill=fill)
    elif name == "star":
        pts = []
        for i in range(10):
            rr = r * 1.2 if i % 2 == 0 else r * 0.5
            a = -math.pi / 2 + math.pi * i / 5
            pts.append((cx + rr * math.cos(a), cy + rr * math.sin(a)))
        d.polygon(pts, fill=fill)
    elif name == "diamond":
        d.polygon([(cx, cy - r * 1.2), (cx + r * 0.7, cy), (cx, cy + r * 1.2), (cx - r * 0.7, cy)], fill=fill)
    elif name == "hexagon":
        d.polygon(_polygon(cx, cy, r * 1.1, 6, rng.uniform(0, math.pi / 3)), fill=fill)
    elif name == "ellipse":
        if rng.random() < 0.5:
            d.ellipse([cx - r * 1.2, cy - r * 0.55, cx + r * 1.2, cy + r * 0.55], fill=fill)
        else:
            d.ellipse([cx - r * 0.55, cy - r * 1.2, cx + r * 0.55, cy + r * 1.2], fill=fill)
    elif name == "saltire":
        d.line([(cx - r, cy - r), (cx + r, cy + r)], fill=fill, width=w)
        d.line([(cx - r, cy + r), (cx + r, cy - r)], fill=fill, width=w)
    else:
        raise ValueError(name)


def render(name: str, rng: random.Random, size: int = 64) -> Image.Image:
    """One image of shape `name`: random colours, position, size and background noise."""
    bg = tuple(rng.randint(0, 120) for _ in range(3))
    fg = tuple(rng.randint(130, 255) for _ in range(3))
    im = Image.new("RGB", (size, size), bg)
    d = ImageDraw.Draw(im)
    r = rng.uniform(0.18, 0.3) * size
    cx, cy = (rng.uniform(r + 2, size - r - 2) for _ in range(2))
    _draw_shape(d, name, cx, cy, r, fg, rng)
    noise = np.random.default_rng(rng.randrange(2**32)).normal(0, 12, (size, size, 3))
    arr = np.clip(np.asarray(im, dtype=np.float32) + noise, 0, 255).astype(np.uint8)
    return Image.fromarray(arr).filter(ImageFilter.GaussianBlur(0.6))


def make_dataset(root: Path, classes: tuple[str, ...], per_class: int, seed: int, size: int = 64) -> Path:
    """Write ``root/<class>/<i>.png``; the same seed writes the same files."""
    rng = random.Random(seed)
    for c in classes:
        (root / c).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            render(c, rng, size).save(root / c / f"{c}_{i:04d}.png")
    return root


def run_demo(out: Path, *, backbone: str = "resnet10t", image_size: int = 48, seed: int = 0,
             source_per_class: int = 60, target_per_class: int = 20, pretrain_epochs: int = 8,
             finetune_epochs: int = 10, progress: bool = True) -> dict:
    """Pretrain on the source task, fine-tune on the target task, compare with random weights."""
    from safetensors.torch import save_file

    from transferkit.pipelines.api import fit
    from transferkit.pipelines.evaluate.prediction import write_predictions

    out = Path(out)
    data = out / "data"
    log.info("generating demo data in %s", data)
    source = make_dataset(data / "source", SOURCE_CLASSES, source_per_class, seed)
    target = make_dataset(data / "target", TARGET_CLASSES, target_per_class, seed + 1)
    common = dict(backbone=backbone, image_size=image_size, seed=seed, workers=0, batch_size=32,
                  augment="light", overwrite=True, progress=progress)

    log.info("1/4 pretraining %s on %d source classes (stands in for ImageNet weights)", backbone,
             len(SOURCE_CLASSES))
    pretrain = fit(source, out=out / "pretrain", pretrained=False, finetune="full", epochs=pretrain_epochs,
                   patience=0, lr=2e-3, **common)
    weights = out / "pretrained-backbone.safetensors"
    save_file({k: v.contiguous() for k, v in pretrain.model.state_dict().items()}, str(weights))

    log.info("2/4 fine-tuning the pretrained backbone on %d target classes, %d images each",
             len(TARGET_CLASSES), target_per_class)
    tuned = fit(target, out=out / "finetune", weights=str(weights), finetune="auto", epochs=finetune_epochs,
                **common)
    log.info("3/4 the same target run from random weights, for comparison")
    scratch = fit(target, out=out / "scratch", pretrained=False, finetune="full", epochs=finetune_epochs, **common)

    log.info("4/4 evaluating and predicting with the fine-tuned run")
    evaluation = tuned.evaluate(progress=progress)
    sample = sorted((target / TARGET_CLASSES[0]).glob("*.png"))[:3]
    preds = write_predictions(tuned.predict(sample, top_k=2), out / "finetune" / "predictions.csv", top_k=2)
    return {"finetune": tuned.report, "scratch": scratch.report, "evaluation": evaluation, "predictions": str(preds),
            "runs": {"pretrain": str(out / "pretrain"), "finetune": str(out / "finetune"),
                     "scratch": str(out / "scratch")}}
