"""`transferkit search`: random hyperparameter search, coarse to fine, on Optuna.

Each trial is a whole ``fit`` (its own run directory under OUT/trials/) with settings drawn by
Optuna's random sampler: learning rate and weight decay log-uniform, label smoothing, dropout,
the augmentation preset and, when asked, the strategy. The first half of the trials (the coarse
round) draws from the full ranges; the rest (the fine round) from the region the best quarter of
the finished trials spans, widened by a factor of 2 on log scales. Which round a trial belongs
to is read from the study itself, so several processes (or machines) that share one ``--storage``
database work on one study. Unpromising trials stop early: every epoch's val accuracy is reported
to Optuna's successive-halving pruner.

A freeze trial trains its head for epochs (``--head-solver sgd``: the learning rate is what is
searched) on the cached features, so it costs seconds. Outputs: OUT/trials.csv (one row per
trial), OUT/search.png (val accuracy against each setting) and OUT/best-config.yaml, the best
trial's config.yaml, which ``fit --config`` replays.
"""
from __future__ import annotations

import csv
import logging
import math
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytorch_lightning as pl

from transferkit.errors import ConfigError, MissingExtra
from transferkit.pipelines.rundir import atomic_write
from transferkit.pipelines.settings import FINETUNE_CHOICES, FitConfig

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Dim:
    """One searched setting: a float range (log or linear) or a list of choices."""

    low: float = 0.0
    high: float = 0.0
    log: bool = False
    choices: tuple[str, ...] = ()


SPACE = {
    "lr": Dim(1e-4, 1e-1, log=True),
    "weight_decay": Dim(1e-5, 1e-1, log=True),
    "label_smoothing": Dim(0.0, 0.2),
    "dropout": Dim(0.0, 0.5),
    "augment": Dim(choices=("light", "default", "heavy")),
}
FINE_SHARE = 0.5      # the last half of the trials search the fine region
TOP_SHARE = 0.25      # which finished trials define it


def _optuna():
    try:
        import optuna
    except ImportError:
        raise MissingExtra("transferkit search needs optuna: pip install 'transferkit[search]'") from None
    return optuna


class _Report(pl.Callback):
    """Each epoch's val accuracy to the trial; the pruner may stop it."""

    def __init__(self, trial):
        self.trial = trial

    def on_validation_end(self, trainer, pl_module) -> None:
        if trainer.sanity_checking or "val_acc" not in trainer.callback_metrics:
            return
        self.trial.report(float(trainer.callback_metrics["val_acc"]), trainer.current_epoch)
        if self.trial.should_prune():
            raise _optuna().TrialPruned()


def _region(study, space: dict[str, Dim], trials: int) -> tuple[str, dict[str, Dim]]:
    """("coarse", the full space) until half the trials have finished (completed or pruned), then
    ("fine", around the best quarter of the completed ones)."""
    optuna = _optuna()
    state = optuna.trial.TrialState
    finished = study.get_trials(deepcopy=False, states=(state.COMPLETE, state.PRUNED))  # pruned trials count
    done = [t for t in finished if t.state == state.COMPLETE]
    if len(finished) < math.ceil(trials * (1 - FINE_SHARE)) or len(done) < 2:
        return "coarse", space
    top = sorted(done, key=lambda t: -t.value)[:max(2, math.ceil(len(done) * TOP_SHARE))]
    fine = {}
    for name, dim in space.items():
        seen = [settings_of(t)[name] for t in top if name in settings_of(t)]
        if not seen:
            fine[name] = dim
        elif dim.choices:
            fine[name] = Dim(choices=tuple(c for c in dim.choices if c in seen))
        elif dim.log:
            fine[name] = Dim(max(dim.low, min(seen) / 2), min(dim.high, max(seen) * 2), log=True)
        else:
            pad = (dim.high - dim.low) * 0.1
            fine[name] = Dim(max(dim.low, min(seen) - pad), min(dim.high, max(seen) + pad))
    return "fine", fine


def _draw(trial, region: dict[str, Dim], space: dict[str, Dim]) -> dict[str, Any]:
    """Optuna draws every float (a range may shrink between trials) and a choice over the whole
    space; a choice narrowed by the fine round (Optuna keeps a categorical's values fixed) is drawn
    from the trial's own generator and kept as a user attribute."""
    import random

    out = {}
    rng = random.Random(trial.number)
    for name, dim in region.items():
        if dim.choices and dim.choices == space[name].choices:
            out[name] = trial.suggest_categorical(name, list(dim.choices))
        elif dim.choices:
            out[name] = rng.choice(dim.choices)
            trial.set_user_attr(name, out[name])
        else:
            out[name] = trial.suggest_float(name, dim.low, dim.high, log=dim.log)
    return out


def settings_of(trial) -> dict[str, Any]:
    """What a trial was run with: Optuna's params and the narrowed choices (see ``_draw``)."""
    attrs = getattr(trial, "user_attrs", {}) or {}
    return {**trial.params, **{k: v for k, v in attrs.items() if k in SPACE or k == "finetune"}}


def search(base: FitConfig, out: str | Path, *, trials: int = 30, budget_minutes: float | None = None,
           storage: str | None = None, study_name: str = "transferkit", strategies: tuple[str, ...] = (),
           seed: int = 0, progress: bool = False) -> dict:
    """Run `trials` more trials (or until `budget_minutes`) of the study in `storage` (default: a
    sqlite file in `out`); write trials.csv, search.png and best-config.yaml; the summary."""
    from transferkit.pipelines.train.recipe import fit

    optuna = _optuna()
    if trials < 1:
        raise ConfigError(f"--trials {trials}: run at least one trial")
    bad = [s for s in strategies if s not in FINETUNE_CHOICES or s == "auto"]
    if bad:
        raise ConfigError(f"--strategies {','.join(bad)}: choose from {', '.join(c for c in FINETUNE_CHOICES if c != 'auto')}")
    out = Path(out)
    (out / "trials").mkdir(parents=True, exist_ok=True)
    storage = storage or f"sqlite:///{(out / 'study.db').absolute()}"
    space = dict(SPACE)
    if strategies:
        space["finetune"] = Dim(choices=tuple(strategies))
    study = optuna.create_study(study_name=study_name, storage=storage, load_if_exists=True, direction="maximize",
                                sampler=optuna.samplers.RandomSampler(seed=seed + len(study_trials(storage, study_name))),
                                pruner=optuna.pruners.SuccessiveHalvingPruner())
    deadline = time.monotonic() + budget_minutes * 60 if budget_minutes else None

    def objective(trial) -> float:
        phase, region = _region(study, space, trials)
        params = _draw(trial, region, space)
        trial.set_user_attr("round", phase)
        finetune = params.get("finetune", base.finetune)
        settings = {**base.to_dict(), **params, "out": str(out / "trials" / f"trial-{trial.number:04d}"),
                    "overwrite": True}
        if finetune in ("freeze", "lp-ft", "auto"):
            settings["head_solver"] = "sgd"  # the rate is what is searched: the head trains for epochs
        cfg = FitConfig.build(settings, source="api")
        start = time.monotonic()
        report = fit(cfg, progress=progress, callbacks=[_Report(trial)])
        trial.set_user_attr("seconds", round(time.monotonic() - start, 1))
        trial.set_user_attr("run", cfg.out)
        log.info("trial %d (%s): val accuracy %.4f with %s", trial.number, phase, report["accuracy"], params)
        return float(report["accuracy"])

    study.optimize(objective, n_trials=trials, timeout=None if deadline is None else max(1.0, deadline - time.monotonic()),
                   catch=(), show_progress_bar=progress)
    return write_results(study, out)


def study_trials(storage: str, study_name: str) -> list:
    """The trials the study already holds (none when it does not exist yet)."""
    optuna = _optuna()
    try:
        return optuna.load_study(study_name=study_name, storage=storage).get_trials(deepcopy=False)
    except KeyError:
        return []


def write_results(study, out: Path) -> dict:
    optuna = _optuna()
    rows = []
    names = sorted({k for t in study.trials for k in settings_of(t)})
    for t in study.trials:
        rows.append({"trial": t.number, "round": t.user_attrs.get("round", ""), "state": t.state.name.lower(),
                     "val_accuracy": "" if t.value is None else f"{t.value:.6f}",
                     "seconds": t.user_attrs.get("seconds", ""), "run": t.user_attrs.get("run", ""),
                     **{k: settings_of(t).get(k, "") for k in names}})
    with atomic_write(out / "trials.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["trial", "round", "state", "val_accuracy", "seconds", *names, "run"])
        w.writeheader()
        w.writerows(rows)
    done = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
    if not done:
        raise ConfigError(f"no trial of study {study.study_name!r} finished; see {out / 'trials.csv'}")
    best = study.best_trial
    shutil.copyfile(Path(best.user_attrs["run"]) / "config.yaml", out / "best-config.yaml")
    _plot(done, names, out / "search.png")
    pruned = sum(t.state == optuna.trial.TrialState.PRUNED for t in study.trials)
    return {"trials": len(study.trials), "complete": len(done), "pruned": pruned, "best_trial": best.number,
            "best_accuracy": best.value, "best_params": settings_of(best), "best_config": str(out / "best-config.yaml")}


def _plot(done, names: list[str], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(names), figsize=(3.2 * len(names), 3.2), squeeze=False)
    for ax, name in zip(axes[0], names):
        pts = [(settings_of(t)[name], t.value, t.user_attrs.get("round")) for t in done if name in settings_of(t)]
        for phase, colour in (("coarse", "tab:blue"), ("fine", "tab:orange")):
            xs = [p[0] for p in pts if p[2] == phase]
            ax.scatter(xs, [p[1] for p in pts if p[2] == phase], s=14, color=colour, label=phase)
        if name in SPACE and SPACE[name].log:
            ax.set_xscale("log")
        ax.set(xlabel=name, ylabel="val accuracy" if ax is axes[0][0] else None)
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
