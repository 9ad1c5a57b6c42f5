"""A dataset measured against a backbone's pretraining data -> a fine-tuning strategy, with its reasons.

(lines: the measurements and the decision that reads them stay side by side, so that every
threshold sits next to the number it judges.)

``measure`` makes one pass of the frozen backbone over the training split and records what the
decision needs: how many images each class has, how well simple probes separate the classes on
the pooled features (and on earlier stages' features), the LogME score, and how far the data's
activation statistics sit from the BatchNorm running statistics learnt in pretraining.
``decide`` turns those numbers into a strategy with its reasons, the numbers included: the size
decides (what held on datasets the threshold was not chosen on), the rest is reported beside it.

The caller passes a timm model and a DataLoader of ``(images, labels)`` batches already
transformed with the backbone's eval transform.
"""
from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from transferkit.backbones.transferability import (
    PROBE_MAX_IMAGES,
    BatchNormInputs,
    logme,
    probe_accuracy,
    subsample,
)
from transferkit.backbones.strategies import DEFAULT_LR
from transferkit.errors import BackboneError, DataError

__all__ = ["Advice", "Measurements", "THRESHOLDS", "Thresholds", "bn_shift", "decide", "extract_features", "logme", "measure",
           "probe_accuracy", "stage_probe"]

logger = logging.getLogger(__name__)

# --- The decision's threshold, chosen by benchmarks/advisor_grid.py: freeze, partial, full and
# lp-ft trained on hymenoptera, BreastMNIST, cub_birds40 and rsscn7 at 10, 30, 100 and all images
# per class, 3 seeds each, scored leave-one-dataset-out. Reference points, mobilenetv1_025 at
# 224 px on the whole train split:
#   hymenoptera (ImageNet-like photos, 122/class): normalised probe gain 0.79, BN shift 0.009, LogME -0.32
#   BreastMNIST (grayscale ultrasound, 273/class): normalised probe gain 0.18, BN shift 0.18, LogME -0.47
# Similarity is measured and reported but does not decide: size alone picked as well as the best
# size x similarity thresholds, in sample (11 of 13 cells) and on held-out datasets (10 of 13).

@dataclass(frozen=True)
class Thresholds:
    """The numbers ``decide`` compares measurements against (the defaults: ``THRESHOLDS``)."""

    # Median images per class at or above which a dataset counts as large: enough images to move
    # backbone weights without overfitting them. The grid cannot tell apart thresholds between its
    # sizes 10 and 30 (each scores the same); 20 sits between them.
    large_per_class: float = 20

    def describe(self) -> str:
        return f"large >= {self.large_per_class:g}/class"


THRESHOLDS = Thresholds()
# Large data: the share of backbone groups, from the top, that train.
PARTIAL_TOP_FRACTION = 1 / 3
# Suggested head learning rates (AdamW). A frozen backbone takes a large one: a linear head on
# frozen mobilenetv1_025 features reached 0.86 val accuracy on hymenoptera at 1e-2 but 0.75 at
# 3e-3 after 10 epochs. The more of the backbone trains, the smaller, with layer-wise decay below.
FREEZE_HEAD_LR = DEFAULT_LR["freeze"]
PARTIAL_HEAD_LR = DEFAULT_LR["partial"]
FULL_HEAD_LR = DEFAULT_LR["full"]
# lp-ft is a strategy to ask for (its fine-tuning phase's rate; the probe phase is a solved
# freeze): in the grid it was never more than 1 point better than the size rule's pick.
LPFT_HEAD_LR = DEFAULT_LR["lp-ft"]


@dataclass
class Measurements:
    """What ``measure`` found on the training split (see the module docstring)."""

    class_counts: dict[int, int]
    probe: dict
    logme: float | None = None
    bn_shift: float | None = None
    stage_accuracy: dict[str, float] | None = None
    feature_dim: int = 0
    seconds: float = 0.0

    @property
    def num_images(self) -> int:
        return int(sum(self.class_counts.values()))

    @property
    def num_classes(self) -> int:
        return len(self.class_counts)

    @property
    def smallest_class(self) -> int:
        return int(min(self.class_counts.values()))

    @property
    def median_per_class(self) -> float:
        return float(np.median(list(self.class_counts.values())))

    @property
    def similarity(self) -> float | None:
        """The linear probe's accuracy above chance, normalised: 0 at chance, 1 when perfect."""
        return self.probe.get("normalized", {}).get("logreg")

    @classmethod
    def from_dict(cls, d: dict) -> "Measurements":
        """The inverse of ``to_dict`` (the derived keys it adds are ignored)."""
        return cls(class_counts={int(k): int(v) for k, v in d["class_counts"].items()}, probe=d["probe"],
                   logme=d.get("logme"), bn_shift=d.get("bn_shift"), stage_accuracy=d.get("stage_accuracy"),
                   feature_dim=d.get("feature_dim", 0), seconds=d.get("seconds", 0.0))

    def to_dict(self) -> dict:
        out = asdict(self)
        out["class_counts"] = {str(k): v for k, v in self.class_counts.items()}
        out.update(num_images=self.num_images, num_classes=self.num_classes,
                   smallest_class=self.smallest_class, median_per_class=self.median_per_class,
                   similarity=self.similarity)
        return out


@dataclass
class Advice:
    """A fine-tuning strategy and why.

    ``trainable_groups`` counts backbone layer groups from the top that train (the new head
    always does): 0 for ``freeze``, ``None`` for all of them (``full``, and ``lp-ft`` after its
    linear-probe phase). ``lr`` is the suggested head learning rate.
    """

    strategy: str
    trainable_groups: int | None
    lr: float
    reasons: list[str]
    measurements: Measurements
    # How far each measurement cleared the threshold that decided it (see ``decide``), and the
    # strategy the closest one would have given on the other side, when it is close.
    margins: dict[str, float] = field(default_factory=dict)
    runner_up: str | None = None

    def to_dict(self) -> dict:
        return {"strategy": self.strategy, "trainable_groups": self.trainable_groups, "lr": self.lr,
                "reasons": list(self.reasons), "margins": dict(self.margins), "runner_up": self.runner_up,
                "measurements": self.measurements.to_dict()}

    def summary(self) -> str:
        groups = {0: "backbone frozen", None: "all groups train"}.get(
            self.trainable_groups, f"top {self.trainable_groups} group(s) train")
        lines = [f"advice: {self.strategy} ({groups}), head lr {self.lr:g}"]
        lines += [f"  - {r}" for r in self.reasons]
        expected = self.measurements.probe.get("logreg")
        if expected is not None:
            lines.append(f"  - expected freeze accuracy {expected:.3f} (the solved head's held-out accuracy in"
                         f" {self.measurements.probe.get('folds')}-fold cross-validation)")
        if self.margins:
            sure = ", ".join(f"{k} {v:+.2f}" for k, v in self.margins.items())
            close = (f"; a close call: the runner-up is {self.runner_up}" if self.runner_up
                     else "; no threshold is close")
            lines.append(f"  - margins past the thresholds: {sure}{close}")
        return "\n".join(lines)


# --- One pass of the frozen backbone -----------------------------------------------------------

def _pool(t: torch.Tensor) -> torch.Tensor:
    if t.ndim == 4:
        return t.mean(dim=(2, 3))
    if t.ndim == 3:  # tokens (N, L, C)
        return t.mean(dim=1)
    return t.flatten(1)


def _stage_names(model: nn.Module, count: int) -> list[str]:
    info = getattr(model, "feature_info", None)
    names = [d.get("module") for d in info] if isinstance(info, list) else []
    if len(names) == count and all(names) and len(set(names)) == count:
        return [str(n) for n in names]
    return [f"stage{i}" for i in range(count)]


@dataclass
class _Pass:
    features: np.ndarray
    labels: np.ndarray
    stages: dict[str, np.ndarray] | None
    bn_shift: float | None


def _run(model: nn.Module, loader, *, device, stages: bool, batchnorm: bool, progress: bool,
         max_batches: int | None = None) -> _Pass:
    if not (hasattr(model, "forward_features") and hasattr(model, "forward_head")):
        raise BackboneError(f"the advisor needs a timm model (forward_features / forward_head); "
                            f"got {type(model).__name__}: create it with timm.create_model or pick a strategy")
    device = torch.device(device)
    was_training = model.training
    model.to(device).eval()
    bn = BatchNormInputs(model) if batchnorm else None
    use_intermediates = stages and hasattr(model, "forward_intermediates")
    if stages and not use_intermediates:
        logger.info("no per-stage probe: %s has no forward_intermediates", type(model).__name__)
    feats, labs, inter = [], [], []
    total = len(loader) if hasattr(loader, "__len__") else None
    if total is not None and max_batches is not None:
        total = min(total, max_batches)
    try:
        with torch.inference_mode(), tqdm(loader, total=total, desc="advisor: frozen features", unit="batch",
                                          disable=not progress, leave=False) as bar:
            for i, batch in enumerate(bar):
                if max_batches is not None and i >= max_batches:
                    break
                images = batch[0].to(device, non_blocking=True)
                final = None
                if use_intermediates:
                    try:
                        final, taken = model.forward_intermediates(images)
                        inter.append([_pool(t).float().cpu() for t in taken])
                    except (NotImplementedError, TypeError, AssertionError) as exc:
                        logger.info("no per-stage probe: %s.forward_intermediates failed (%s)",
                                    type(model).__name__, exc)
                        use_intermediates, inter = False, []
                if final is None:
                    final = model.forward_features(images)
                feats.append(model.forward_head(final, pre_logits=True).float().cpu())
                labs.append(torch.as_tensor(batch[1]).reshape(-1).cpu())
    finally:
        if bn is not None:
            bn.remove()
        model.train(was_training)
    if not feats:
        raise DataError("the training loader yielded no images: check the training split is not empty")
    stage_feats = None
    if use_intermediates and inter:
        names = _stage_names(model, len(inter[0]))
        stage_feats = {name: torch.cat([b[j] for b in inter]).numpy() for j, name in enumerate(names)}
    return _Pass(torch.cat(feats).numpy(), torch.cat(labs).numpy(), stage_feats,
                 bn.shift() if bn is not None else None)


def extract_features(model: nn.Module, loader, *, device="cpu", progress: bool = True
                     ) -> tuple[np.ndarray, np.ndarray]:
    """Pooled pre-logits features ``(n, d)`` of the frozen model (eval mode) and the labels ``(n,)``."""
    run = _run(model, loader, device=device, stages=False, batchnorm=False, progress=progress)
    return run.features, run.labels


def bn_shift(model: nn.Module, loader, *, device="cpu", max_batches: int | None = None,
             progress: bool = False) -> float | None:
    """How far the data's activations sit from the BatchNorm running statistics (0 = none, 1 = disjoint).

    The mean over BatchNorm layers of the mean over channels of the squared Hellinger distance
    between two Gaussians: the data's per-channel mean and variance of the layer's input (the
    model in eval mode) and the layer's running mean and variance. ``None`` without BatchNorm.
    """
    return _run(model, loader, device=device, stages=False, batchnorm=True, progress=progress,
                max_batches=max_batches).bn_shift


def _stage_accuracy(stages: dict[str, np.ndarray], labels: np.ndarray, final: float | None,
                    seed: int) -> dict[str, float]:
    out = {name: probe_accuracy(f, labels, seed=seed, knn=False)["logreg"] for name, f in stages.items()}
    out["final"] = final
    return out


def stage_probe(model: nn.Module, loader, *, device="cpu", seed: int = 0, progress: bool = True
                ) -> dict[str, float]:
    """Cross-validated linear-probe accuracy on the pooled features of each stage (timm's
    ``forward_intermediates``, keyed by ``feature_info`` module name), plus ``final``: the pooled
    pre-logits features. Only ``final`` when the model has no ``forward_intermediates``.
    """
    run = _run(model, loader, device=device, stages=True, batchnorm=False, progress=progress)
    final = probe_accuracy(run.features, run.labels, seed=seed, knn=False)["logreg"]
    return _stage_accuracy(run.stages or {}, run.labels, final, seed)


def measure(model: nn.Module, loader, *, device="cpu", stages: str | Sequence[int] | None = "auto",
            progress: bool = True, seed: int = 0) -> Measurements:
    """Measure the training split in one pass of the frozen backbone (see the module docstring).

    ``stages``: ``"auto"`` and ``"all"`` probe every stage's features (where the model exposes
    them), a sequence of stage indices only those, ``None``
    never.
    """
    return measure_with_features(model, loader, device=device, stages=stages, progress=progress, seed=seed)[0]


def measure_with_features(model: nn.Module, loader, *, device="cpu",
                          stages: str | Sequence[int] | None = "auto", progress: bool = True,
                          seed: int = 0) -> tuple[Measurements, np.ndarray, np.ndarray]:
    """`measure`, also returning the pooled features and labels of its pass, for reuse."""
    if isinstance(stages, str) and stages not in ("auto", "all"):
        raise ValueError(f"stages must be 'auto', 'all', None or stage indices, got {stages!r}")
    start = time.perf_counter()
    run = _run(model, loader, device=device, stages=stages is not None, batchnorm=True, progress=progress)
    classes, counts = np.unique(run.labels, return_counts=True)
    class_counts = {int(c): int(n) for c, n in zip(classes, counts)}
    if len(classes) < 2:
        raise DataError(f"the advisor needs images of at least 2 classes; the loader gave only label "
                        f"{int(classes[0])}: check the training split")
    probe = probe_accuracy(run.features, run.labels, seed=seed)
    score = logme(*subsample(run.features, run.labels, PROBE_MAX_IMAGES, seed))
    stage_acc = None
    if run.stages:
        if stages in ("all", "auto"):
            stage_acc = _stage_accuracy(run.stages, run.labels, probe["logreg"], seed)
        elif not isinstance(stages, str):
            names = list(run.stages)
            try:
                chosen = {names[i]: run.stages[names[i]] for i in stages}
            except IndexError:
                raise ValueError(f"stages {list(stages)} out of range: the model has {len(names)}") from None
            stage_acc = _stage_accuracy(chosen, run.labels, probe["logreg"], seed)
    m = Measurements(class_counts=class_counts, probe=probe, logme=score, bn_shift=run.bn_shift,
                     stage_accuracy=stage_acc, feature_dim=int(run.features.shape[1]),
                     seconds=time.perf_counter() - start)
    logger.info("advisor measured %d images in %.1f s: probe %.3f, LogME %.3f, BN shift %s",
                m.num_images, m.seconds, probe["logreg"], score, run.bn_shift)
    return m, run.features, run.labels


# --- The decision ------------------------------------------------------------------------------

def _fmt(x: float | None, digits: int = 2) -> str:
    return "n/a" if x is None else f"{x:.{digits}f}"


def _similarity_notes(m: Measurements) -> list[str]:
    """What the frozen pass measured, for the user: reported with the decision, not deciding it."""
    p, gain = m.probe, m.similarity
    if gain is None:
        return ["too few images per class to cross-validate a probe: similarity unmeasured"]
    notes = [f"linear probe accuracy {_fmt(p['logreg'])} = {_fmt(p['relative']['logreg'])} above chance "
             f"{_fmt(p['chance'])} (normalised {_fmt(gain)}; k-NN {_fmt(p.get('knn'))}), LogME {_fmt(m.logme, 3)}, "
             f"BatchNorm shift {_fmt(m.bn_shift, 3)}"]
    final = (m.stage_accuracy or {}).get("final", p.get("logreg"))
    best = _best_earlier_stage(m)
    if best is not None and final is not None and best[1] > final:
        notes.append(f"stage {best[0]} probes {best[1]:.2f} vs {final:.2f} for the final features: the top "
                     f"groups are specialised to the pretraining task")
    return notes


def _best_earlier_stage(m: Measurements) -> tuple[str, float] | None:
    """(name, accuracy) of the best stage before ``final``, if measured."""
    acc = {k: v for k, v in (m.stage_accuracy or {}).items() if k != "final" and v is not None}
    if not acc:
        return None
    best = max(acc, key=lambda k: acc[k])
    return best, acc[best]


def _choose(small: bool, num_groups: int, group_labels: Sequence[str] | None,
            reasons: list[str]) -> tuple[str, int | None, float]:
    if small:
        reasons.append(f"small -> freeze: train only the new head on the frozen features (solved), "
                       f"lr {FREEZE_HEAD_LR:g}")
        return "freeze", 0, FREEZE_HEAD_LR
    k = max(1, min(num_groups - 1, round(num_groups * PARTIAL_TOP_FRACTION)))
    named = f" ({', '.join(group_labels[-k:])})" if group_labels else ""
    reasons.append(f"large -> partial: adapt the top {k} of {num_groups} groups{named}, keep the generic "
                   f"lower ones")
    return "partial", k, PARTIAL_HEAD_LR


def decide(m: Measurements, *, num_groups: int, group_labels: Sequence[str] | None = None,
           thresholds: Thresholds = THRESHOLDS) -> Advice:
    """Pick a strategy from the dataset's size (``thresholds``: ``THRESHOLDS`` unless given).

    ``num_groups`` is how many layer groups the backbone has, bottom to top, the head not counted;
    ``group_labels`` (``LayerGroups.labels``), when given, name the groups that train. Small ->
    freeze; large -> partial (the top third of the groups). The similarity measurements go in the
    reasons beside the decision.
    """
    t = thresholds
    if num_groups < 1:
        raise ValueError(f"num_groups must be at least 1, got {num_groups}")
    if group_labels is not None and len(group_labels) != num_groups:
        raise ValueError(f"{len(group_labels)} group labels for num_groups={num_groups}")
    median = m.median_per_class
    small = median < t.large_per_class
    reasons = [f"{median:g} images per class (median of {m.num_classes}; smallest {m.smallest_class}) "
               f"{'<' if small else '>='} {t.large_per_class:g}: {'small' if small else 'large'}"]
    reasons += _similarity_notes(m)
    biggest = max(m.class_counts.values())
    if biggest >= IMBALANCE_RATIO * m.smallest_class:
        reasons.append(f"imbalanced classes: {biggest} images in the largest, {m.smallest_class} in the smallest "
                       f"({biggest / m.smallest_class:.0f}:1); consider --class-weights balanced or --sampler balanced")
    choice = _choose(small, num_groups, group_labels, reasons)
    margins = {"size": (median - t.large_per_class) / t.large_per_class}
    runner_up = None
    if abs(margins["size"]) < CLOSE_MARGIN:
        runner_up = _choose(not small, num_groups, group_labels, [])[0]
    return Advice(*choice, reasons=reasons, measurements=m, margins=margins, runner_up=runner_up)


# A decision is close when the size sits within a quarter of its threshold.
CLOSE_MARGIN = 0.25
# Largest / smallest class at which the advice mentions weighing the classes.
IMBALANCE_RATIO = 5
