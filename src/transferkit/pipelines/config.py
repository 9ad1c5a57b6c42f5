"""The one typed config that flows from the CLI through a run, saved as ``config.yaml``."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field, fields
from pathlib import Path

import yaml

from transferkit.errors import ConfigError

FINETUNE_CHOICES = ("auto", "freeze", "partial", "full", "lp-ft")


@dataclass
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
    layer_decay: float | None = None  # None: 0.5 for pretrained weights, 1.0 from random weights
    # optimisation
    lr: float | None = None           # None: the strategy's default
    optimizer: str = "adamw"
    weight_decay: float = 0.05
    schedule: str = "cosine"
    warmup_epochs: float = 1.0
    label_smoothing: float = 0.1
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
    aug: list[str] = field(default_factory=list)
    # batch mixing (0 alpha: off)
    mixup: float = 0.0
    cutmix: float = 0.0
    mix_prob: float = 1.0
    mix_switch_prob: float = 0.5
    mix_mode: str = "batch"
    mix_off_epoch: int = 0            # mixing stops for the last N epochs
    # frozen-backbone feature cache (freeze and the probe stage of lp-ft)
    cache_views: int = 1              # augmented views per training image; 0 turns the cache off
    # weight averaging and snapshot ensembles
    ema: bool = False
    ema_decay: float = 0.999
    swa: bool = False
    snapshots: int = 0                # M cosine cycles with a snapshot checkpoint at the end of each
    # devices, passed to Lightning
    accelerator: str = "auto"
    devices: str = "auto"
    num_nodes: int = 1
    precision: str = "32-true"
    # run directory
    overwrite: bool = False

    def validate(self) -> "FitConfig":
        if self.finetune not in FINETUNE_CHOICES:
            raise ConfigError(f"unknown --finetune {self.finetune!r}; use one of {', '.join(FINETUNE_CHOICES)}")
        if self.batch_size < 1:
            raise ConfigError(f"--batch-size {self.batch_size} cannot work; use a positive number such as 32")
        if self.epochs < 1:
            raise ConfigError(f"--epochs {self.epochs} cannot work; use at least 1")
        if self.lr is not None and not self.lr > 0:
            raise ConfigError(f"--lr {self.lr} must be positive, e.g. 1e-3")
        if self.image_size is not None and not 16 <= self.image_size <= 2048:
            raise ConfigError(f"--image-size {self.image_size} cannot work; use 16 to 2048 pixels")
        if self.weight_decay < 0:
            raise ConfigError(f"--weight-decay {self.weight_decay} must be 0 or more, e.g. 0.05")
        if not 0 <= self.label_smoothing < 1:
            raise ConfigError(f"--label-smoothing {self.label_smoothing} must be in [0, 1), e.g. 0.1")
        if self.grad_clip < 0:
            raise ConfigError(f"--grad-clip {self.grad_clip} must be 0 (off) or a positive norm, e.g. 1.0")
        if self.workers is not None and self.workers < 0:
            raise ConfigError(f"--workers {self.workers} must be 0 or more")
        if self.layer_decay is not None and not 0 < self.layer_decay <= 1:
            raise ConfigError(f"--layer-decay {self.layer_decay} must be in (0, 1]; 1 means one rate for all layers")
        if not 0 < self.val_fraction < 1:
            raise ConfigError(f"--val-fraction {self.val_fraction} must be between 0 and 1, e.g. 0.2")
        if self.patience < 0:
            raise ConfigError(f"--patience {self.patience} must be 0 (off) or more")
        if self.mix_off_epoch < 0 or self.mix_off_epoch >= self.epochs and (self.mixup or self.cutmix):
            raise ConfigError(f"--mix-off-epoch {self.mix_off_epoch} must be 0 or fewer than --epochs {self.epochs}")
        if self.cache_views < 0:
            raise ConfigError(f"--cache-views {self.cache_views} must be 0 (no cache) or more")
        if not self.pretrained and self.weights:
            raise ConfigError("--no-pretrained and --weights contradict each other; pass one of them")
        return self

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def save(self, path: Path, extra: dict | None = None) -> None:
        body = {"transferkit": 1, "fit": self.to_dict(), **(extra or {})}
        tmp = path.with_suffix(".tmp")
        tmp.write_text(yaml.safe_dump(body, sort_keys=False))
        tmp.replace(path)

    @classmethod
    def from_dict(cls, d: dict, source: str = "config") -> "FitConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ConfigError(f"{source} has unknown settings: {', '.join(unknown)}; remove them or check"
                              " their spelling against `transferkit fit --help`")
        return cls(**d)

    @classmethod
    def load(cls, path: str | Path) -> "FitConfig":
        path = Path(path)
        try:
            body = yaml.safe_load(path.read_text())
        except FileNotFoundError:
            raise ConfigError(f"config file {path} does not exist; pass the config.yaml of a run") from None
        except yaml.YAMLError as exc:
            raise ConfigError(f"config file {path} is not valid YAML ({str(exc).splitlines()[0]})") from None
        if not isinstance(body, dict):
            raise ConfigError(f"config file {path} does not hold settings; pass the config.yaml of a run")
        return cls.from_dict(body.get("fit", body), source=str(path))
