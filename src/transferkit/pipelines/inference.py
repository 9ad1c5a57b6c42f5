"""`evaluate` and `predict` on a finished run: test-time augmentation and ensembles, one engine.

Every model of every requested ensemble sees every view of every requested TTA spec once: per
batch, the union of the views goes through each model in one batched forward pass, and each
(TTA, ensemble) combination merges its own views x models after softmax
(``augment.tta.merge_probs``). Evaluation runs in one process, so every sample counts once.

``--tta`` takes specs separated by commas (or ``;``): ``plain,hflip,ten-crop``. A spec itself may
hold ``+`` and ``multiscale:`` scales; a bare number continues the scale list of the multiscale
spec before it, so ``plain,multiscale:0.9,1.0,1.1,hflip`` is three specs.
"""
from __future__ import annotations

import copy
import csv
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import albumentations as A
import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader

from transferkit.augment.image import CV2_INTERPOLATIONS, eval_transform
from transferkit.augment.tta import TTA, View, merge_probs, parse_views, prepared_size
from transferkit.backbones.factory import DataConfig
from transferkit.errors import ConfigError, DataError
from transferkit.pipelines.data import ImageDataset, Sample, read_split_csv, scan_folder
from transferkit.pipelines.ensembling import ENSEMBLES, RunWeights
from transferkit.pipelines.evaluate import (
    build_model,
    classification_metrics,
    load_weights,
    plot_confusion,
    plot_reliability,
    run_config,
)
from transferkit.pipelines.features import head_matches, pre_logits
from transferkit.pipelines.images import is_image_file, probe_image
from transferkit.pipelines.run import RunDir

log = logging.getLogger(__name__)

_NUMBER = re.compile(r"[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?")


def _device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


# ----------------------------------------------------------------------------- flags


def parse_tta_list(text: str | Sequence[str]) -> list[str]:
    """``"plain,hflip,multiscale:0.9,1.1"`` -> ``["plain", "hflip", "multiscale:0.9,1.1"]``, each
    spec checked with ``parse_views``; ``plain`` first, duplicates dropped."""
    parts = [text] if isinstance(text, str) else list(text)
    specs: list[str] = []
    for part in parts:
        for chunk in str(part).split(";"):
            for i, token in enumerate(chunk.split(",")):
                token = token.strip()
                last = specs[-1].split("+")[-1].strip().lower() if specs and i else ""
                if _NUMBER.fullmatch(token) and last.startswith("multiscale:"):
                    specs[-1] += "," + token
                elif _NUMBER.fullmatch(token):
                    raise ConfigError(f"stray number {token!r} in --tta {text!r}; numbers belong after"
                                      " 'multiscale:', e.g. --tta plain,multiscale:0.9,1.0,1.1")
                elif not token:
                    raise ConfigError(f"empty view spec in --tta {text!r}; separate specs with commas,"
                                      " e.g. --tta plain,hflip,ten-crop")
                else:
                    specs.append(token)
    for spec in specs:
        parse_views(spec)
    specs = list(dict.fromkeys(specs))
    return sorted(specs, key=lambda s: s.lower() != "plain")  # stable: plain first, the rest as given


def parse_ensemble_list(text: str | Sequence[str]) -> list[str]:
    """``"none,ema"`` -> ``["none", "ema"]``, each one of ``ENSEMBLES``; ``none`` first."""
    parts = [text] if isinstance(text, str) else list(text)
    names = [t.strip().lower() for p in parts for t in str(p).split(",")]
    for name in names:
        if name not in ENSEMBLES:
            raise ConfigError(f"unknown --ensemble {name!r}; use one or more of {', '.join(ENSEMBLES)},"
                              " separated by commas")
    return sorted(dict.fromkeys(names), key=lambda n: n != "none")


# ----------------------------------------------------------------------------- pixels


class EvalRegion:
    """Picklable image -> normalized CHW float32: the fit-time eval pixels, widened to the region
    that TTA cuts its views from.

    Resizes exactly as ``augment.image.eval_transform`` (albumentations ``SmallestMaxSize`` to
    ``floor(size / crop_pct)``) and keeps a centered region of that size (one pixel less where
    needed to stay centered), placed so that TTA's ``plain`` view is the very crop
    ``eval_transform`` takes: plain evaluation reproduces fit's validation to the pixel.
    ``augment.tta.tta_prepare`` was considered: it resizes with PIL like timm, whose pixels
    differ slightly from the OpenCV resize that the model was validated with.
    """

    def __init__(self, data_cfg: DataConfig):
        h, w = data_cfg.input_size[1:]
        self.description = eval_transform((h, w), data_cfg.mean, data_cfg.std, data_cfg.crop_pct,
                                          data_cfg.interpolation).description  # validates the settings
        self.size = (h, w)
        rh, rw = prepared_size((h, w), data_cfg.crop_pct)
        # An even margin around the crop centres it exactly under both rounding rules.
        self.region = (rh - (rh - h) % 2, rw - (rw - w) % 2)
        self._resize = A.SmallestMaxSize(max_size_hw=(rh, rw), interpolation=CV2_INTERPOLATIONS[
            data_cfg.interpolation], area_for_downscale="image", p=1.0)
        # The same arithmetic as augment.image.ImageTransform, so plain pixels are bit-identical.
        self._shift = torch.tensor([255.0 * m for m in data_cfg.mean], dtype=torch.float32).view(3, 1, 1)
        self._scale = torch.tensor([1.0 / (255.0 * s) for s in data_cfg.std], dtype=torch.float32).view(3, 1, 1)

    def __call__(self, image) -> torch.Tensor:
        array = np.asarray(image.convert("RGB") if hasattr(image, "convert") else image)
        out = self._resize(image=array)["image"]
        rh, rw = self.region
        (h, w), (H, W) = self.size, out.shape[:2]
        if H < rh or W < rw:  # a rounding short of the target: pad as eval's CenterCrop would
            ph, pw = max(0, rh - H), max(0, rw - W)
            out = np.pad(out, ((ph // 2, ph - ph // 2), (pw // 2, pw - pw // 2), (0, 0)))
            H, W = out.shape[:2]
        top = (H - h) // 2 - (rh - h) // 2
        left = (W - w) // 2 - (rw - w) // 2
        crop = np.ascontiguousarray(out[top:top + rh, left:left + rw].transpose(2, 0, 1))
        return torch.from_numpy(crop).to(torch.float32).sub_(self._shift).mul_(self._scale)

    def __repr__(self) -> str:
        return f"EvalRegion(size={self.size}, region={self.region}, {self.description})"


# ----------------------------------------------------------------------------- the engine


def _same_but_classifier(models: Sequence[nn.Module]) -> bool:
    """True when the models hold equal tensors everywhere but in timm's classifier."""
    if len(models) < 2 or not all(hasattr(m, "get_classifier") and hasattr(m, "forward_head") for m in models):
        return False
    head = models[0].get_classifier()
    prefix = next((n + "." for n, mod in models[0].named_modules() if mod is head and n), None)
    if prefix is None:
        return False
    ref = {k: v for k, v in models[0].state_dict().items() if not k.startswith(prefix)}
    return all(torch.equal(v, other[k]) for m in models[1:] for other in [m.state_dict()] for k, v in ref.items())


@dataclass(frozen=True)
class Combination:
    tta: str
    ensemble: str
    views: tuple[int, ...]     # indices into the union of views
    members: tuple[int, ...]   # indices into the loaded models


class Predictor:
    """The models of the requested ensembles of one run and the union of the requested views.

    ``predict`` returns the merged probabilities of every (TTA spec, ensemble) combination, in
    ``self.combinations`` order (ensemble-major, plain and none first).
    """

    def __init__(self, run: RunDir, tta: str | Sequence[str] = "plain", ensemble: str | Sequence[str] = "none",
                 checkpoint: str = "best", merge: str = "mean", device: torch.device | str | None = None):
        self.run = run
        self.specs = parse_tta_list(tta)
        self.ensembles = parse_ensemble_list(ensemble)
        self.merge = merge
        self.device = torch.device(device) if device is not None else _device()
        weights = RunWeights(run, checkpoint)
        members = {e: weights.members(e) for e in self.ensembles}  # errors before any model is built
        self.members = list(dict.fromkeys(m for ms in members.values() for m in ms))
        template, self.data_cfg = build_model(run)
        self.models = [load_weights(copy.deepcopy(template), weights.state_dict(m)).to(self.device)
                       for m in self.members]
        views = {spec: parse_views(spec) for spec in self.specs}
        union: list[View] = list(dict.fromkeys(v for vs in views.values() for v in vs))
        self.tta = TTA(union, size=tuple(self.data_cfg.input_size[1:]), merge=merge,
                       interpolation=self.data_cfg.interpolation)
        self.combinations = [
            Combination(spec, e, tuple(union.index(v) for v in views[spec]),
                        tuple(self.members.index(m) for m in members[e]))
            for e in self.ensembles for spec in self.specs
        ]
        self.transform = EvalRegion(self.data_cfg)
        # Members of a frozen run differ only in the classifier: one backbone pass serves them all
        # (confirmed on the first batch, as fit's feature cache does).
        self.shared_backbone: bool | None = None if _same_but_classifier(self.models) else False

    def images_per_batch(self, batch_size: int) -> int:
        """Images per loader batch so that one forward pass holds about `batch_size` views.

        On a CPU, one pass over ten times the batch measured slower than ten passes (12-30x plain
        instead of 10x: the activations leave the cache); keeping the pass at the batch size a
        run was trained with keeps ten-crop at about ten times plain.
        """
        return max(1, batch_size // self.tta.num_views)

    def member_names(self, c: Combination) -> list[str]:
        return [self.members[i].name for i in c.members]

    def view_probs(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Softmax outputs (U, B, K) of every model on the union of views, one forward pass each."""
        if self.shared_backbone is False:
            return [self.tta.view_probs(m, x) for m in self.models]
        views = self.tta.views(x)
        if self.shared_backbone is None:
            self.shared_backbone = head_matches(self.models[0], views[:2])
            if not self.shared_backbone:
                return self.view_probs(x)
            log.info("the %d models share their backbone: one backbone pass per batch", len(self.models))
        with torch.inference_mode():
            features = pre_logits(self.models[0], views)
            return [torch.softmax(m.get_classifier()(features).float(), -1).reshape(self.tta.num_views, len(x), -1)
                    for m in self.models]

    def merged(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Merged probabilities (B, K) of every combination for a batch of ``self.transform`` images."""
        per_model = self.view_probs(x.to(self.device))
        return [merge_probs(torch.cat([per_model[i][list(c.views)] for i in c.members]), self.merge).cpu()
                for c in self.combinations]

    def predict(self, loader: DataLoader, desc: str = "predicting",
                progress: bool = True) -> tuple[list[np.ndarray], np.ndarray]:
        """Probabilities of every combination over ``loader`` (batches of image, label, ...)."""
        from tqdm.auto import tqdm

        out: list[list[torch.Tensor]] = [[] for _ in self.combinations]
        labels = []
        for batch in tqdm(loader, desc=desc, leave=False, disable=not progress):
            for acc, probs in zip(out, self.merged(batch[0])):
                acc.append(probs)
            labels.append(torch.as_tensor(batch[1]))
        k = len(self.run.classes())
        probs = [torch.cat(p).numpy() if p else np.zeros((0, k), np.float32) for p in out]
        return probs, (torch.cat(labels).numpy() if labels else np.zeros(0, np.int64))


# ----------------------------------------------------------------------------- evaluate


def eval_samples(run: RunDir, data: str | Path | None, split: str, classes: Sequence[str]) -> list[Sample]:
    """The images to evaluate: the run's saved split, or a folder given now."""
    if data is None:
        path = run.splits / f"{split}.csv"
        if not path.exists():
            raise DataError(f"the run has no saved {split} split ({path}); pass DATA with a {split}/ folder")
        return read_split_csv(path, classes)
    scan = scan_folder(data)
    if scan.presplit:
        if split not in scan.splits:
            raise DataError(f"{data} has no {split}/ folder; use --split val, or pass a folder of class folders")
        samples = scan.splits[split]
    else:
        samples = scan.splits["train"]
    if list(scan.classes) != list(classes):
        raise DataError(f"{data} has classes {scan.classes} but the run was trained on {list(classes)};"
                        " evaluate on a folder with the same class sub-folders")
    return samples


def evaluate_run(run_dir: str | Path, data: str | Path | None = None, split: str = "val",
                 checkpoint: str = "best", tta: str | Sequence[str] = "plain",
                 ensemble: str | Sequence[str] = "none", merge: str = "mean", batch_size: int | None = None,
                 workers: int = 0, progress: bool = True) -> dict:
    """Metrics of every (TTA, ensemble) combination on a split; writes RUN/evaluation.json, and the
    confusion matrix and reliability diagram of the best combination (accuracy, then NLL)."""
    run = RunDir.open(run_dir)
    classes = run.classes()
    cfg = run_config(run)
    predictor = Predictor(run, tta, ensemble, checkpoint=checkpoint, merge=merge)
    samples = eval_samples(run, data, split, classes)
    loader = DataLoader(ImageDataset(samples, predictor.transform),
                        batch_size=predictor.images_per_batch(batch_size or cfg.batch_size), num_workers=workers)
    probs, labels = predictor.predict(loader, desc=f"evaluating {split}", progress=progress)
    results = []
    for c, p in zip(predictor.combinations, probs):
        metrics = classification_metrics(p, labels, classes)
        results.append({"split": split, "data": str(data) if data else "run split", "checkpoint": checkpoint,
                        "tta": c.tta, "ensemble": c.ensemble, "merge": merge, "views": len(c.views),
                        "members": predictor.member_names(c), **metrics})
    best = min(range(len(results)), key=lambda i: (-results[i]["accuracy"], results[i]["nll"], i))
    body = {"run": str(run.path), "classes": classes, "split": split, "checkpoint": checkpoint, "merge": merge,
            "best": {"tta": results[best]["tta"], "ensemble": results[best]["ensemble"]}, "results": results}
    run.write_json(run.evaluation, body)
    r = results[best]
    label = f"{split}, {r['tta']} / ensemble {r['ensemble']}"
    plot_confusion(r["confusion_matrix"], classes, run.plots / f"confusion-{split}.png",
                   title=f"{label}: accuracy {r['accuracy']:.3f}")
    plot_reliability(probs[best], labels, run.plots / f"reliability-{split}.png",
                     title=f"{label}: ECE {r['ece']:.3f}")
    log.info("evaluation written to %s", run.evaluation)
    return body


def results_table(body: dict) -> str:
    """The results of ``evaluate_run`` as one text table, the best combination marked with ``*``."""
    rows = body["results"]
    top5 = any("top5_accuracy" in r for r in rows)
    wt = max([3] + [len(r["tta"]) for r in rows])
    we = max([8] + [len(r["ensemble"]) for r in rows])
    head = (f"  {'tta':<{wt}} {'ensemble':<{we}} {'models':>6} {'views':>5} {'accuracy':>9}"
            + (f" {'top5':>7}" if top5 else "") + f" {'macro_f1':>9} {'nll':>8} {'ece':>7} {'n':>6}")
    lines = [head]
    best = body.get("best", {})
    for r in rows:
        mark = "*" if (r["tta"], r["ensemble"]) == (best.get("tta"), best.get("ensemble")) else " "
        lines.append(f"{mark} {r['tta']:<{wt}} {r['ensemble']:<{we}} {len(r['members']):>6} {r['views']:>5}"
                     f" {r['accuracy']:>9.4f}" + (f" {r.get('top5_accuracy', float('nan')):>7.4f}" if top5 else "")
                     + f" {r['macro_f1']:>9.4f} {r['nll']:>8.4f} {r['ece']:>7.4f} {r['count']:>6d}")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- predict


def collect_images(paths: Sequence[str | Path]) -> tuple[list[Path], list[tuple[str, str]]]:
    """Image files from files and folders (recursively), and the unusable ones with reasons."""
    found: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            for dirpath, dirnames, files in os.walk(p):
                dirnames.sort()
                found += [Path(dirpath) / f for f in sorted(files) if is_image_file(Path(f))]
        elif p.is_file():
            found.append(p)
        else:
            raise DataError(f"{p} does not exist; pass image files or folders of images")
    good, bad = [], []
    for f in found:
        reason = probe_image(f) if is_image_file(f) else f"not an image extension ({f.suffix or 'none'})"
        (bad.append((str(f), reason)) if reason else good.append(f))
    for path, reason in bad:
        log.warning("skipping %s: %s", path, reason)
    if not good:
        raise DataError(f"no readable images in {', '.join(map(str, paths))}; pass image files or folders")
    return good, bad


def predict_paths(run_dir: str | Path, paths: Sequence[str | Path], out: str | Path = "predictions.csv",
                  top_k: int = 1, checkpoint: str = "best", batch_size: int = 32, workers: int = 0,
                  progress: bool = True, tta: str = "plain", ensemble: str = "none", merge: str = "mean") -> Path:
    """Write `path,label,probability` (+ label_k, probability_k up to top_k) for every image,
    predicted with one TTA spec and one ensemble."""
    run = RunDir.open(run_dir)
    classes = run.classes()
    if not 1 <= top_k <= len(classes):
        raise DataError(f"--top-k {top_k} must be between 1 and the number of classes ({len(classes)})")
    if len(parse_tta_list(tta)) != 1 or len(parse_ensemble_list(ensemble)) != 1:
        raise ConfigError(f"predict takes one --tta spec and one --ensemble (got {tta!r} and {ensemble!r});"
                          " compare several with `transferkit evaluate`")
    files, _ = collect_images(paths)
    predictor = Predictor(run, tta, ensemble, checkpoint=checkpoint, merge=merge)
    loader = DataLoader(ImageDataset([Sample(str(f), -1) for f in files], predictor.transform),
                        batch_size=predictor.images_per_batch(batch_size), num_workers=workers)
    (probs,), _ = predictor.predict(loader, progress=progress)
    order = np.argsort(-probs, axis=1, kind="stable")[:, :top_k]
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    header = ["path", "label", "probability"]
    for k in range(2, top_k + 1):
        header += [f"label_{k}", f"probability_{k}"]
    tmp = out.with_suffix(out.suffix + ".tmp")
    with tmp.open("w", newline="", encoding="utf-8", errors="surrogateescape") as f:
        w = csv.writer(f)
        w.writerow(header)
        for path, row, top in zip(files, probs, order):
            cells = [str(path)]
            for j in top:
                cells += [classes[j], f"{row[j]:.6f}"]
            w.writerow(cells)
    tmp.replace(out)
    return out
