"""Dataset size + measured similarity to the backbone's pretraining data -> a fine-tuning strategy.

(lines: the measurements and the decision that reads them stay side by side, so that every
threshold sits next to the number it judges.)

``measure`` makes one pass of the frozen backbone over the training split and records what the
decision needs: how many images each class has, how well simple probes separate the classes on
the pooled features (and on earlier stages' features), the LogME score, and how far the data's
activation statistics sit from the BatchNorm running statistics learnt in pretraining.
``decide`` turns those numbers into a strategy with its reasons, the numbers included.

The caller passes a timm model and a DataLoader of ``(images, labels)`` batches already
transformed with the backbone's eval transform.
"""
from __future__ import annotations

import logging
import math
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

# --- The decision's thresholds, all in one place, chosen from benchmarks/advisor_grid.py (every
# strategy trained at 10, 30, 100 and all images per class on hymenoptera and BreastMNIST; the
# grid is in the README). Reference points, mobilenetv1_025 at 224 px on the train split:
#   hymenoptera (ImageNet-like photos, 122/class): normalised probe gain 0.79, BN shift 0.009, LogME -0.32
#   BreastMNIST (grayscale ultrasound, 273/class): normalised probe gain 0.18, BN shift 0.18, LogME -0.47

@dataclass(frozen=True)
class Thresholds:
    """The numbers ``decide`` compares measurements against (the defaults: ``THRESHOLDS``)."""

    # Median images per class at or above which a dataset counts as large: enough images to
    # move backbone weights without overfitting them.
    large_per_class: float = 50
    # Linear-probe accuracy above chance, normalised to (acc - chance) / (1 - chance): at or above
    # similar_gain the frozen features already separate the classes (similar); below
    # different_gain they do not (different); in between, the BatchNorm shift decides.
    similar_gain: float = 0.6
    different_gain: float = 0.3
    # Mean squared Hellinger distance (0..1) between the data's and the running BatchNorm
    # statistics above which a borderline dataset counts as different (the references: 0.009, 0.18).
    # LogME is reported but has no threshold: its scale moves with the number of classes and the
    # feature dimension, so it ranks backbones on one dataset, not datasets against each other.
    bn_shift_different: float = 0.05
    # An earlier stage whose probe beats the final features by this much accuracy says the top
    # groups are specialised to the pretraining task and should be retrained.
    stage_margin: float = 0.03

    def describe(self) -> str:
        return (f"large >= {self.large_per_class:g}/class, similar >= {self.similar_gain:g}, different < "
                f"{self.different_gain:g}, BN shift > {self.bn_shift_different:g}, stage +{self.stage_margin:g}")


THRESHOLDS = Thresholds()
# Large and similar: the share of backbone groups, from the top, that train.
PARTIAL_TOP_FRACTION = 1 / 3
# Suggested head learning rates (AdamW). A frozen backbone takes a large one: a linear head on
# frozen mobilenetv1_025 features reached 0.86 val accuracy on hymenoptera at 1e-2 but 0.75 at
# 3e-3 after 10 epochs. The more of the backbone trains, the smaller, with layer-wise decay below.
FREEZE_HEAD_LR = DEFAULT_LR["freeze"]
PARTIAL_HEAD_LR = DEFAULT_LR["partial"]
FULL_HEAD_LR = DEFAULT_LR["full"]
LPFT_HEAD_LR = DEFAULT_LR["lp-ft"]  # lp-ft is a strategy to ask for; the grid gave no case to pick it  # the fine-tuning phase; its linear-probe phase is a frozen fit at FREEZE_HEAD_LR


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


def _similar(m: Measurements, t: Thresholds) -> tuple[bool, list[str]]:
    p, gain = m.probe, m.similarity
    if gain is None:
        return True, ["too few images per class to cross-validate a probe: similarity unmeasured, "
                      "assumed similar (freezing risks least with so few images)"]
    probe = (f"linear probe accuracy {_fmt(p['logreg'])} = {_fmt(p['relative']['logreg'])} above chance "
             f"{_fmt(p['chance'])} (normalised {_fmt(gain)}; k-NN {_fmt(p.get('knn'))})")
    extras = f"LogME {_fmt(m.logme, 3)}, BatchNorm shift {_fmt(m.bn_shift, 3)}"
    if gain >= t.similar_gain:
        return True, [f"{probe} >= {t.similar_gain:g}: similar", extras]
    if gain < t.different_gain:
        return False, [f"{probe} < {t.different_gain:g}: different", extras]
    if m.bn_shift is None:
        return True, [f"{probe} between {t.different_gain:g} and {t.similar_gain:g}, no BatchNorm to compare: "
                      f"leaning similar", extras]
    similar = m.bn_shift <= t.bn_shift_different
    word = "<=" if similar else ">"
    return similar, [f"{probe} between {t.different_gain:g} and {t.similar_gain:g}; BatchNorm shift "
                     f"{_fmt(m.bn_shift, 3)} {word} {t.bn_shift_different:g}: {'similar' if similar else 'different'}",
                     f"LogME {_fmt(m.logme, 3)}"]


def _best_earlier_stage(m: Measurements) -> tuple[int, str, float, int] | None:
    """(index, name, accuracy, stage count) of the best stage before ``final``, if measured."""
    acc = {k: v for k, v in (m.stage_accuracy or {}).items() if k != "final" and v is not None}
    if not acc:
        return None
    names = list(acc)
    best = max(names, key=lambda k: acc[k])
    return names.index(best), best, acc[best], len(names)


def decide(m: Measurements, *, num_groups: int, group_labels: Sequence[str] | None = None,
           thresholds: Thresholds = THRESHOLDS) -> Advice:
    """Pick a strategy from the size and similarity quadrants (``thresholds``: ``THRESHOLDS`` unless given).

    ``num_groups`` is how many layer groups the backbone has, bottom to top, the head not counted;
    ``group_labels`` (``LayerGroups.labels``), when given, place the best earlier stage among
    them by module name, else stages map onto groups by their share of the depth.
    small & similar -> freeze; large & similar -> partial (top groups); different -> partial from
    the best earlier stage up when one beats the final features by ``stage_margin``, else freeze
    when small and partial (top groups) when large.
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
    similar, why = _similar(m, t)
    reasons += why

    choice = _choose(m, t, small, similar, num_groups, group_labels, reasons)
    margins = _margins(m, t)
    runner_up = None
    close = [k for k, v in margins.items() if abs(v) < CLOSE_MARGIN[k]]
    if close:
        nearest = min(close, key=lambda k: abs(margins[k]) / CLOSE_MARGIN[k])
        other = _choose(m, t, small ^ (nearest == "size"), similar ^ (nearest != "size"), num_groups, group_labels, [])
        runner_up = other[0] if other[0] != choice[0] else None
    return Advice(*choice, reasons=reasons, measurements=m, margins=margins, runner_up=runner_up)


# A decision is close when a measurement sits this near its threshold: a quarter of the size
# threshold (relative), 0.05 of normalised probe gain, 0.02 of BatchNorm shift.
CLOSE_MARGIN = {"size": 0.25, "similarity": 0.05, "batchnorm shift": 0.02}


def _margins(m: Measurements, t: Thresholds) -> dict[str, float]:
    """Signed distance of each deciding measurement past its threshold (positive: large, similar)."""
    out = {"size": (m.median_per_class - t.large_per_class) / t.large_per_class}
    gain = m.similarity
    if gain is None:
        return out
    if gain >= t.similar_gain:
        out["similarity"] = gain - t.similar_gain
    elif gain < t.different_gain:
        out["similarity"] = gain - t.different_gain
    elif m.bn_shift is not None:
        out["batchnorm shift"] = t.bn_shift_different - m.bn_shift  # positive: similar
    return out


def _choose(m: Measurements, t: Thresholds, small: bool, similar: bool, num_groups: int, group_labels: Sequence[str] | None,
            reasons: list[str]) -> tuple[str, int | None, float]:
    if small and similar:
        reasons.append(f"small and similar -> freeze: train only the new head on the frozen features, "
                       f"lr {FREEZE_HEAD_LR:g}")
        return "freeze", 0, FREEZE_HEAD_LR
    if similar:
        k = max(1, min(num_groups - 1, round(num_groups * PARTIAL_TOP_FRACTION)))
        reasons.append(f"large and similar -> partial: adapt the top {k} of {num_groups} groups, keep the "
                       f"generic lower ones")
        return "partial", k, PARTIAL_HEAD_LR
    return _different(m, t, small, num_groups, group_labels, reasons)


def _groups_above(stage: str, index: int, count: int, num_groups: int,
                  group_labels: Sequence[str] | None) -> int:
    """How many top groups lie above ``stage`` (at least one)."""
    for g, label in enumerate(group_labels or ()):
        if label == stage or label.startswith(stage + ".") or stage.startswith(label + "."):
            return max(1, num_groups - 1 - g)
    # No label to match: the groups above the stage's share of the depth.
    return min(num_groups, max(1, math.ceil(num_groups * (count - 1 - index) / count)))


def _different(m: Measurements, t: Thresholds, small: bool, num_groups: int, group_labels: Sequence[str] | None,
               reasons: list[str]) -> tuple[str, int | None, float]:
    """Different data: measured, not guessed, by probing each stage's features.

    An earlier stage that beats the final features says the top groups are specialised to the
    pretraining task: retrain from that stage up, keep the generic lower groups. Otherwise a
    large dataset retrains the top groups (full fine-tuning never beat partial in the grid), and
    a small one keeps the frozen features, which with so few images were still the best in the
    grid (lp-ft lost 6 to 12 points there).
    """
    size = "small" if small else "large"
    final = (m.stage_accuracy or {}).get("final", m.probe.get("logreg"))
    best = _best_earlier_stage(m)
    if best is not None and final is not None and best[2] - final >= t.stage_margin:
        index, name, acc, count = best
        k = _groups_above(name, index, count, num_groups, group_labels)
        reasons.append(f"stage {name} probes {acc:.2f} vs {final:.2f} for the final features "
                       f"(+{acc - final:.2f} >= {t.stage_margin:g}): the top groups are specialised to the "
                       f"pretraining task")
        reasons.append(f"{size} and different -> partial: retrain the top {k} of {num_groups} groups, "
                       f"keep the lower ones")
        return "partial", k, PARTIAL_HEAD_LR
    if best is None:
        reasons.append("no per-stage probe measured")
    else:
        reasons.append(f"no earlier stage beats the final features by {t.stage_margin:g} (best {best[1]} "
                       f"{best[2]:.2f} vs {_fmt(final)})")
    if small:
        reasons.append(f"small and different -> freeze: too few images to retrain features safely; "
                       f"train the new head, lr {FREEZE_HEAD_LR:g}")
        return "freeze", 0, FREEZE_HEAD_LR
    k = max(1, min(num_groups - 1, round(num_groups * PARTIAL_TOP_FRACTION)))
    reasons.append(f"large and different -> partial: retrain the top {k} of {num_groups} groups (in the grid,"
                   " partial matched or beat full in every large cell)")
    return "partial", k, PARTIAL_HEAD_LR
