"""The engine of `evaluate` and `predict`: test-time augmentation and ensembles in one pass.

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
import logging
import re
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader

from transferkit.augment.tta import TTA, View, merge_probs, parse_views, tta_prepare
from transferkit.backbones.factory import DataConfig
from transferkit.pipelines.data.decoded import DecodeRule
from transferkit.errors import ConfigError
from transferkit.pipelines.data.features import head_matches, pre_logits
from transferkit.pipelines.devices import choose_device
from transferkit.pipelines.evaluate.calibration import apply_temperature, temperature_of
from transferkit.pipelines.evaluate.loading import Blueprint, load_weights
from transferkit.pipelines.evaluate.members import ENSEMBLES, RunWeights
from transferkit.pipelines.rundir import RunDir

log = logging.getLogger(__name__)

_NUMBER = re.compile(r"[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?")


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
    """Models (the members of one or more ensembles) and the union of the requested views.

    ``predict`` returns the merged probabilities of every (TTA spec, ensemble) combination, in
    ``self.combinations`` order (ensemble-major, plain and none first). Build one for a run
    (``for_run``: its checkpoints and ensembles) or for one model (``for_model``).
    """

    def __init__(self, models: Sequence[nn.Module], member_names: Sequence[str], ensembles: dict[str, list[int]],
                 data_cfg: DataConfig, num_classes: int, tta: str | Sequence[str] = "plain", merge: str = "mean",
                 device: torch.device | None = None):
        self.specs = parse_tta_list(tta)
        self.ensembles = list(ensembles)
        self.merge = merge
        self.device = device if device is not None else choose_device()
        self.data_cfg = data_cfg
        self.num_classes = num_classes
        self.names = list(member_names)
        self.models = [m.eval().to(self.device) for m in models]
        views = {spec: parse_views(spec) for spec in self.specs}
        union: list[View] = list(dict.fromkeys(v for vs in views.values() for v in vs))
        self.tta = TTA(union, size=tuple(data_cfg.input_size[1:]), merge=merge, interpolation=data_cfg.interpolation)
        self.combinations = [Combination(spec, e, tuple(union.index(v) for v in views[spec]), tuple(ensembles[e]))
                             for e in self.ensembles for spec in self.specs]
        self.transform = tta_prepare(tuple(data_cfg.input_size[1:]), data_cfg.mean, data_cfg.std, data_cfg.crop_pct,
                                     data_cfg.interpolation)
        self.rule = DecodeRule(data_cfg.decode_short_side)  # files decode as in training
        # Members of a frozen run differ only in the classifier: one backbone pass serves them all
        # (confirmed on the first batch, as fit's feature cache does).
        self.shared_backbone: bool | None = None if _same_but_classifier(self.models) else False

    @classmethod
    def for_run(cls, run: RunDir, tta: str | Sequence[str] = "plain", ensemble: str | Sequence[str] = "none",
                checkpoint: str = "best", merge: str = "mean", accelerator: str = "auto") -> "Predictor":
        weights = RunWeights(run, checkpoint)
        names = parse_ensemble_list(ensemble)
        members = {e: weights.members(e) for e in names}  # errors before any model is built
        unique = list(dict.fromkeys(m for ms in members.values() for m in ms))
        template, data_cfg = Blueprint.of_run(run).build()
        models = [apply_temperature(load_weights(copy.deepcopy(template), weights.state_dict(m),
                                                 run.checkpoint(m.checkpoint)),
                                    temperature_of(weights.load(m.checkpoint), m.key)) for m in unique]
        return cls(models, [m.name for m in unique], {e: [unique.index(m) for m in ms] for e, ms in members.items()},
                   data_cfg, len(run.classes()), tta, merge, choose_device(accelerator))

    @classmethod
    def for_model(cls, model: nn.Module, data_cfg: DataConfig, num_classes: int, tta: str | Sequence[str] = "plain",
                  merge: str = "mean", accelerator: str = "auto", name: str = "model") -> "Predictor":
        return cls([model], [name], {"none": [0]}, data_cfg, num_classes, tta, merge, choose_device(accelerator))

    def images_per_batch(self, batch_size: int) -> int:
        """Images per loader batch so that one forward pass holds about `batch_size` views.

        On a CPU, one pass over ten times the batch measured slower than ten passes (12-30x plain
        instead of 10x: the activations leave the cache); keeping the pass at the batch size a
        run was trained with keeps ten-crop at about ten times plain.
        """
        return max(1, batch_size // self.tta.num_views)

    def member_names(self, c: Combination) -> list[str]:
        return [self.names[i] for i in c.members]

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
                progress: bool = True) -> tuple[list[np.ndarray], np.ndarray, np.ndarray]:
        """Probabilities of every combination over ``loader`` (batches of image, label[, index]), the
        labels, and the sample index of each row (each index once; 0..n-1 without one)."""
        from tqdm.auto import tqdm

        out: list[list[torch.Tensor]] = [[] for _ in self.combinations]
        labels, index = [], []
        for batch in tqdm(loader, desc=desc, leave=False, disable=not progress):
            for acc, probs in zip(out, self.merged(batch[0])):
                acc.append(probs)
            labels.append(torch.as_tensor(batch[1]))
            if len(batch) > 2:
                index.append(torch.as_tensor(batch[2]))
        k = self.num_classes
        probs = [torch.cat(p).numpy() if p else np.zeros((0, k), np.float32) for p in out]
        labels = torch.cat(labels).numpy() if labels else np.zeros(0, np.int64)
        if not index:
            return probs, labels, np.arange(len(labels))
        # A stand-in for a file that broke repeats its own index: count each index once.
        index = torch.cat(index).numpy()
        _, first = np.unique(index, return_index=True)
        keep = np.sort(first)
        return [p[keep] for p in probs], labels[keep], index[keep]


