"""The settings of a fit: one typed, frozen ``FitConfig``, checked once against one table.

(lines: every setting, its constraint and the rules that tie settings together stay in this one
file: it is the one boundary every value passes.)

Every setting reaches a run through ``FitConfig.build`` (command-line flags, a ``--config`` YAML,
the Python API alike), which checks each value against ``CONSTRAINTS`` (type, range or choices)
and then the rules that tie settings together, in the style of scikit-learn's parameter
validation. Values are never coerced: YAML's ``"false"`` or ``"32"`` is a string and an error.
Messages have one shape, naming the setting as its source spells it, the value and what is
expected. This module imports nothing heavy, so a typo is reported before torch loads.
"""
from __future__ import annotations

import dataclasses
import logging
import math
import time
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Callable

from transferkit.errors import ConfigError

log = logging.getLogger(__name__)

FINETUNE_CHOICES = ("auto", "freeze", "partial", "full", "lp-ft", "gradual")
HEAD_SOLVERS = ("lbfgs", "sgd")
CALIBRATIONS = ("temperature",)
OPTIMIZERS = ("sgd", "momentum", "nesterov", "adagrad", "rmsprop", "adam", "adamw")
SCHEDULES = ("cosine", "step", "linear", "inverse-sqrt", "constant")
CLASS_WEIGHTS = ("none", "balanced")
SAMPLERS = ("shuffle", "balanced")
AUGMENT_PRESETS = ("none", "light", "default", "heavy")
MIX_MODES = ("batch", "pair", "elem")
LOGGERS = ("csv", "tensorboard", "mlflow")
DECODE_CACHES = ("auto", "off", "memory", "disk")


@dataclass(frozen=True)
class FitConfig:
    data: str = ""
    out: str | None = None
    # backbone
    backbone: str = "resnet50"
    pretrained: bool = True
    weights: str | None = None
    backbone_plugin: str | None = None
    image_size: int | None = None
    # strategy
    finetune: str = "auto"
    trainable_groups: int = 2
    unfreeze_every: int = 1           # gradual: epochs before the next group from the top joins
    head_solver: str | None = None    # the frozen head: lbfgs (solved) or sgd (epochs); None: lbfgs where it can
    layer_decay: float | None = None  # None: 0.5 for pretrained weights, 1.0 from random weights
    # optimisation
    lr: float | str | None = None     # None: the strategy's default; "find": the LR finder's suggestion
    optimizer: str = "adamw"
    momentum: float = 0.9             # momentum, nesterov, rmsprop
    weight_decay: float = 0.05
    schedule: str = "cosine"
    warmup_epochs: float = 1.0
    step_epochs: int = 0              # step: decay every N epochs (0: a third of the run)
    step_gamma: float = 0.1
    label_smoothing: float = 0.1
    # regularization beyond weight decay and label smoothing
    dropout: float = 0.0              # before the new head (timm's drop_rate)
    drop_path: float = 0.0            # stochastic depth (timm's drop_path_rate)
    # imbalanced classes
    class_weights: str = "none"       # balanced: inverse class frequency in the loss
    sampler: str = "shuffle"          # balanced: batches drawn with inverse class frequency
    grad_clip: float = 0.0
    epochs: int = 20
    batch_size: int = 32
    patience: int = 5
    seed: int = 42
    # data
    val_fraction: float = 0.2
    workers: int | None = None
    strict: bool = False
    augment: str = "default"
    aug: tuple[str, ...] = ()
    # batch mixing (0 alpha: off); timm's names
    mixup: float = 0.0
    cutmix: float = 0.0
    mixup_prob: float = 1.0
    mixup_switch_prob: float = 0.5
    mixup_mode: str = "batch"
    mixup_off_epoch: int = 0          # mixing stops from this epoch (0-based) on; 0: never
    # frozen-backbone feature cache (freeze and the probe phase of lp-ft)
    cache_views: int = 1              # augmented views per training image; 0 turns the cache off
    # decoded pictures kept after the first epoch (pipelines/data/decoded.py); auto: when the backbone trains
    decode_cache: str = "auto"
    # weight averaging and snapshot ensembles
    ema: bool = False
    ema_decay: float = 0.999
    swa: bool = False
    snapshots: int = 0                # M cosine cycles with a snapshot checkpoint at the end of each
    # probabilities: fit a temperature on val after training (stored in best.ckpt)
    calibrate: str | None = None
    # devices, passed to Lightning
    accelerator: str = "auto"
    devices: str = "auto"
    num_nodes: int = 1
    precision: str = "32-true"
    sync_bn: bool = False             # BatchNorm layers that train become SyncBatchNorm under DDP
    channels_last: bool = False       # NHWC memory format (faster convolutions on recent GPUs)
    compile: bool = False             # torch.compile the network; eager where compiling fails
    # experiment tracking beside metrics.csv: Lightning's loggers, comma-separated; mlflow's store
    logger: str | None = None
    mlflow_uri: str | None = None     # None: a file store in RUN/mlruns
    # run directory
    overwrite: bool = False

    # -- building and checking ------------------------------------------------------------
    @classmethod
    def build(cls, values: dict[str, Any], source: str = "api") -> "FitConfig":
        """A checked config from ``values`` (missing keys take their defaults).

        ``source`` says how to name a setting in a message: ``"cli"`` (``--epochs``), ``"api"``
        (``fit(epochs=...)``) or the path of a config file (``config FILE fit.epochs``).
        """
        name = _namer(source)
        values = _renamed(dict(values), name)
        unknown = sorted(set(values) - {f.name for f in fields(cls)})
        if unknown:
            raise ConfigError(f"unknown setting(s): {', '.join(name(k) for k in unknown)}; remove them or check"
                              " their spelling against `transferkit fit --help`")
        for key, value in values.items():
            CONSTRAINTS[key].check(value, name(key))
        if isinstance(values.get("aug"), list):
            values["aug"] = tuple(values["aug"])
        cfg = cls(**values)
        cfg._check_together(name)
        return cfg

    def _check_together(self, name: Callable[[str], str]) -> None:
        """The rules that tie settings to one another."""
        if not self.pretrained and self.weights:
            raise ConfigError(f"{name('pretrained')} false and {name('weights')} contradict each other;"
                              " pass one of them")
        if self.augment == "none" and self.aug:
            raise ConfigError(f"{name('aug')} overrides need an {name('augment')} preset (light, default or"
                              " heavy), not none")
        if (self.mixup or self.cutmix) and self.mixup_off_epoch >= self.epochs:
            raise ConfigError(f"{name('mixup_off_epoch')} {self.mixup_off_epoch} must be 0 (never) or fewer than"
                              f" {name('epochs')} {self.epochs}")
        if self.snapshots > self.epochs:
            raise ConfigError(f"{name('snapshots')} {self.snapshots} needs at least one epoch per cycle; use"
                              f" {name('epochs')} {self.snapshots} or more (each cycle lasts epochs // snapshots"
                              " epochs)")
        if self.snapshots and self.schedule != "cosine":
            raise ConfigError(f"{name('snapshots')} runs its own cosine cycles; drop {name('schedule')}"
                              f" {self.schedule}")
        if (self.step_epochs or self.step_gamma != 0.1) and self.schedule != "step":
            raise ConfigError(f"{name('step_epochs')} and {name('step_gamma')} shape {name('schedule')} step; add it,"
                              f" or drop them for {self.schedule}")
        if self.finetune == "gradual":
            self._check_gradual(name)
        if self.lr == "find":
            self._check_lr_find(name)
        if self.head_solver == "lbfgs":
            self._check_solved_head(name)
        if self.snapshots and self.finetune == "lp-ft":
            raise ConfigError(f"{name('snapshots')} and {name('finetune')} lp-ft cannot be combined yet; the"
                              " probe phase and the cycles would share one schedule: pick one")

    def _check_gradual(self, name: Callable[[str], str]) -> None:
        """Gradual unfreezing's stages are the schedule: one cosine with a warmup per stage."""
        clash = [name(k) for k in ("swa",) if getattr(self, k)] + ([name("snapshots")] if self.snapshots else [])
        if self.schedule != "cosine":
            clash.append(f"{name('schedule')} {self.schedule}")
        if self.lr == "find":
            clash.append(f"{name('lr')} find")
        if clash:
            raise ConfigError(f"{name('finetune')} gradual restarts a warmed-up cosine at every stage; drop"
                              f" {', '.join(clash)}")

    def _check_lr_find(self, name: Callable[[str], str]) -> None:
        """The LR finder sweeps one process's optimizer steps over the strategy's training."""
        if self.finetune == "lp-ft":
            raise ConfigError(f"{name('lr')} find sweeps one phase and lp-ft has two; pass {name('lr')} for its"
                              " fine-tuning phase, or find it with --finetune full")
        if str(self.devices) not in ("auto", "1") or self.num_nodes > 1:
            raise ConfigError(f"{name('lr')} find runs in one process; find the rate first with `transferkit lr-find`"
                              f" and pass it with {name('lr')}")
        if self.head_solver == "lbfgs":
            raise ConfigError(f"{name('lr')} find sweeps optimizer steps and {name('head_solver')} lbfgs takes none;"
                              f" use {name('head_solver')} sgd")

    def _check_solved_head(self, name: Callable[[str], str]) -> None:
        """A solved head is fitted once on cached features of a frozen backbone."""
        solver = f"{name('head_solver')} lbfgs"
        if self.finetune in ("partial", "full", "gradual"):
            raise ConfigError(f"{solver} solves the head of a frozen backbone: it applies to {name('finetune')}"
                              f" freeze, lp-ft and auto, not {self.finetune}; drop it")
        if self.mixup or self.cutmix:
            raise ConfigError(f"{solver} fits cached features and Mixup/CutMix mix images; use"
                              f" {name('head_solver')} sgd to mix")
        clash = [name(k) for k in ("ema", "swa") if getattr(self, k)] + ([name("snapshots")] if self.snapshots else [])
        if clash:
            raise ConfigError(f"{', '.join(clash)} average(s) weights over training steps and {solver} takes none;"
                              f" use {name('head_solver')} sgd")
        if self.cache_views < 1:
            raise ConfigError(f"{solver} needs the feature cache; drop {name('cache_views')} 0")
        if self.sampler == "balanced":
            raise ConfigError(f"{solver} sees every image once, so {name('sampler')} balanced draws nothing; weigh the"
                              f" classes with {name('class_weights')} balanced, or use {name('head_solver')} sgd")

    @property
    def solved_head(self) -> bool:
        """Whether a frozen head is solved (L-BFGS) rather than trained for epochs, where it can be."""
        if self.head_solver is not None:
            return self.head_solver == "lbfgs"
        return not (self.mixup or self.cutmix or self.ema or self.swa or self.snapshots or self.cache_views < 1
                    or self.sampler == "balanced" or self.lr == "find")

    def replace(self, **changes: Any) -> "FitConfig":
        """A new config with `changes`, checked as a whole again."""
        return FitConfig.build({**self.to_dict(), **changes})

    # -- derived values -------------------------------------------------------------------
    @property
    def from_scratch(self) -> bool:
        return not (self.pretrained or self.weights)

    @property
    def devices_arg(self) -> int | str:
        return int(self.devices) if str(self.devices).isdigit() else self.devices

    # -- files ----------------------------------------------------------------------------
    def to_dict(self) -> dict:
        out = dataclasses.asdict(self)
        out["aug"] = list(self.aug)
        return out

    def to_yaml(self, extra: dict | None = None) -> str:
        """The settings as config.yaml holds them (``fit --config`` replays them)."""
        import yaml

        return yaml.safe_dump({"transferkit": 1, "fit": self.to_dict(), **(extra or {})}, sort_keys=False)

    def save(self, path: Path, extra: dict | None = None) -> None:
        from transferkit.pipelines.rundir import atomic_write

        with atomic_write(path, "w") as f:
            f.write(self.to_yaml(extra))

    @staticmethod
    def read(path: str | Path) -> dict:
        """The ``fit:`` settings of a YAML file, unchecked (``build`` checks them)."""
        import yaml

        path = Path(path)
        if path.is_dir():
            raise ConfigError(f"config file {path} is a folder; pass the config.yaml of a run (e.g."
                              f" {path / 'config.yaml'})")
        try:
            body = yaml.load(path.read_text(), Loader=_unique_keys_loader())
        except FileNotFoundError:
            raise ConfigError(f"config file {path} does not exist; pass the config.yaml of a run") from None
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(f"config file {path} cannot be read ({getattr(exc, 'strerror', None) or exc})")\
                from None
        except _DuplicateKey as exc:
            raise ConfigError(f"config file {path} gives {exc} twice; keep one of them") from None
        except yaml.YAMLError as exc:
            first = " ".join(str(exc).split())[:200]
            raise ConfigError(f"config file {path} is not valid YAML ({first})") from None
        if body is None:
            raise ConfigError(f"config file {path} is empty; pass the config.yaml of a run")
        if not isinstance(body, dict):
            raise ConfigError(f"config file {path} is not a mapping of settings (it holds {_a_type(body)});"
                              " pass the config.yaml of a run")
        settings = body.get("fit", body)
        if not isinstance(settings, dict):
            raise ConfigError(f"config file {path}: `fit:` holds {_a_type(settings)}, not a mapping of"
                              " settings; pass the config.yaml of a run")
        return settings

    @classmethod
    def load(cls, path: str | Path) -> "FitConfig":
        return cls.build(cls.read(path), source=str(path))


class _DuplicateKey(Exception):
    pass


def _unique_keys_loader():
    """yaml's SafeLoader, except that a key given twice in one mapping is an error: PyYAML would
    silently keep the last, so `epochs: 2` followed by `epochs: 3` would train for 3."""
    import yaml

    class UniqueKeys(yaml.SafeLoader):
        def construct_mapping(self, node, deep=False):
            seen = set()
            for key_node, _ in node.value:
                key = self.construct_object(key_node, deep=True)
                if key in seen:
                    raise _DuplicateKey(f"{key!r} (line {key_node.start_mark.line + 1})")
                seen.add(key)
            return super().construct_mapping(node, deep)

    return UniqueKeys


def default_out(backbone: str) -> str:
    name = backbone.replace('/', '_').replace(':', '_').replace(',', '+')
    return str(Path("runs") / f"{name}-{time.strftime('%Y%m%d-%H%M%S')}")


# ----------------------------------------------------------------------------- the table


@dataclass(frozen=True)
class Constraint:
    """What one setting accepts: a type, a range or a list of choices, and whether None is allowed."""

    kind: str                               # "int" | "float" | "bool" | "str" | "strings"
    low: float | None = None
    high: float | None = None
    low_open: bool = False                  # low < value instead of low <= value
    high_open: bool = False
    choices: tuple[str, ...] = ()
    optional: bool = False
    several: bool = False                   # choices joined by commas, e.g. "csv,mlflow"
    words: tuple[str, ...] = ()             # strings a number setting also takes, e.g. lr "find"

    def expected(self) -> str:
        if self.choices and self.several:
            text = f"one or more of {', '.join(self.choices)}, separated by commas"
        elif self.choices:
            text = f"one of {', '.join(self.choices)}"
        elif self.kind == "bool":
            text = "true or false"
        elif self.kind == "strings":
            text = "a list of strings"
        else:
            text = {"int": "an integer", "float": "a number", "str": "a string"}[self.kind]
            if self.low is not None and self.high is not None:
                text += (f" in {'(' if self.low_open else '['}{self.low:g}, {self.high:g}"
                         f"{')' if self.high_open else ']'}")
            elif self.low is not None:
                text += f" {'>' if self.low_open else '>='} {self.low:g}"
        text += "".join(f" or {w}" for w in self.words)
        return text + (" (or null for the default)" if self.optional else "")

    def check(self, value: Any, name: str) -> None:
        if value is None:
            if self.optional:
                return
            raise ConfigError(f"{name}: null is not allowed; expected {self.expected()}")
        if isinstance(value, str) and value in self.words:
            return
        ok_type = {
            "int": isinstance(value, int) and not isinstance(value, bool),
            "float": isinstance(value, (int, float)) and not isinstance(value, bool),
            "bool": isinstance(value, bool),
            "str": isinstance(value, str),
            "strings": isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value),
        }[self.kind]
        if not ok_type:
            raise ConfigError(f"{name}: {_show(value)} is {_a_type(value)}; expected {self.expected()}")
        if self.kind == "float" and not math.isfinite(value):
            raise ConfigError(f"{name}: {value} is not a finite number; expected {self.expected()}")
        if self.several:
            if not all(part in self.choices for part in value.split(",")):
                raise ConfigError(f"{name}: {_show(value)} is not a choice; expected {self.expected()}")
        elif self.choices and value not in self.choices:
            raise ConfigError(f"{name}: {_show(value)} is not a choice; expected {self.expected()}")
        if self.kind in ("int", "float"):
            below = self.low is not None and (value <= self.low if self.low_open else value < self.low)
            above = self.high is not None and (value >= self.high if self.high_open else value > self.high)
            if below or above:
                raise ConfigError(f"{name}: {value} is out of range; expected {self.expected()}")


def _int(low=None, high=None, optional=False) -> Constraint:
    return Constraint("int", low, high, optional=optional)


def _float(low=None, high=None, low_open=False, high_open=False, optional=False) -> Constraint:
    return Constraint("float", low, high, low_open, high_open, optional=optional)


def _str(optional=False) -> Constraint:
    return Constraint("str", optional=optional)


def _choice(choices: tuple[str, ...], optional=False) -> Constraint:
    return Constraint("str", choices=choices, optional=optional)


_BOOL = Constraint("bool")

CONSTRAINTS: dict[str, Constraint] = {
    "data": _str(), "out": _str(optional=True),
    "backbone": _str(), "pretrained": _BOOL, "weights": _str(optional=True),
    "backbone_plugin": _str(optional=True), "image_size": _int(16, 2048, optional=True),
    "finetune": _choice(FINETUNE_CHOICES), "trainable_groups": _int(1), "unfreeze_every": _int(1),
    "head_solver": _choice(HEAD_SOLVERS, optional=True),
    "layer_decay": _float(0, 1, low_open=True, optional=True),
    "lr": Constraint("float", 0, low_open=True, optional=True, words=("find",)), "optimizer": _choice(OPTIMIZERS),
    "momentum": _float(0, 1, high_open=True),
    "weight_decay": _float(0), "schedule": _choice(SCHEDULES), "warmup_epochs": _float(0),
    "step_epochs": _int(0), "step_gamma": _float(0, 1, low_open=True),
    "dropout": _float(0, 1, high_open=True), "drop_path": _float(0, 1, high_open=True),
    "class_weights": _choice(CLASS_WEIGHTS), "sampler": _choice(SAMPLERS),
    "label_smoothing": _float(0, 1, high_open=True), "grad_clip": _float(0),
    "epochs": _int(1), "batch_size": _int(1), "patience": _int(0), "seed": _int(0, 2**32 - 1),
    "val_fraction": _float(0, 1, low_open=True, high_open=True), "workers": _int(0, optional=True),
    "strict": _BOOL, "augment": _choice(AUGMENT_PRESETS), "aug": Constraint("strings"),
    "mixup": _float(0), "cutmix": _float(0), "mixup_prob": _float(0, 1), "mixup_switch_prob": _float(0, 1),
    "mixup_mode": _choice(MIX_MODES), "mixup_off_epoch": _int(0),
    "cache_views": _int(0), "decode_cache": _choice(DECODE_CACHES),
    "ema": _BOOL, "ema_decay": _float(0, 1, low_open=True, high_open=True), "swa": _BOOL, "snapshots": _int(0),
    "calibrate": _choice(CALIBRATIONS, optional=True),
    "accelerator": _str(), "devices": _str(), "num_nodes": _int(1), "precision": _str(),
    "sync_bn": _BOOL, "channels_last": _BOOL, "compile": _BOOL,
    "logger": Constraint("str", choices=LOGGERS, optional=True, several=True), "mlflow_uri": _str(optional=True),
    "overwrite": _BOOL,
}
assert set(CONSTRAINTS) == {f.name for f in fields(FitConfig)}, "every setting needs a constraint"

# Old spellings kept for one release: old name -> (new name, how the old value maps).
DEPRECATED = {
    "mix_prob": ("mixup_prob", None),
    "mix_switch_prob": ("mixup_switch_prob", None),
    "mix_mode": ("mixup_mode", None),
    # "stop mixing for the last N epochs" became timm's "the epoch at which mixing stops".
    "mix_off_epoch": ("mixup_off_epoch", lambda n, values: values.get("epochs", FitConfig.epochs) - n if n else 0),
}


def _renamed(values: dict, name: Callable[[str], str]) -> dict:
    for old, (new, convert) in DEPRECATED.items():
        if old not in values:
            continue
        value = values.pop(old)
        if new in values:
            raise ConfigError(f"{name(old)} and {name(new)} are the same setting; keep {name(new)}")
        if convert is not None:
            _int(0).check(value, name(old))
            value = convert(value, values)
        log.warning("%s is deprecated and will be removed in the next release; use %s", name(old), name(new))
        values[new] = value
    return values


def _namer(source: str) -> Callable[[str], str]:
    if source == "cli":
        return lambda key: "--" + key.replace("_", "-")
    if source == "api":
        return lambda key: f"{key}="
    return lambda key: f"config {source} fit.{key}"


def _show(value: Any) -> str:
    text = f'"{value}"' if isinstance(value, str) else repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _a_type(value: Any) -> str:
    if isinstance(value, bool):
        return "a boolean"
    return {str: "a string", int: "an integer", float: "a number", list: "a list", tuple: "a list",
            dict: "a mapping"}.get(type(value), f"a {type(value).__name__}")

