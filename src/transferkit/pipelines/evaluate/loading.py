"""A trained model back from a checkpoint alone: every checkpoint describes itself.

``fit`` stores under the checkpoint's ``transferkit`` key what rebuilding needs (the backbone's
name and architecture, a plugin file, the input size, the class names and the data config), as
timm's pretrained config travels with a timm model. So a checkpoint copied anywhere, without its
run directory, loads: the architecture is built with random weights (nothing is downloaded), the
checkpoint's weights are loaded into it through ``safe_load``.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

from torch import nn

from transferkit.backbones import factory
from transferkit.backbones.factory import DataConfig
from transferkit.errors import CheckpointError
from transferkit.pipelines.evaluate.calibration import apply_temperature, temperature_of
from transferkit.pipelines.rundir import CHECKPOINT_META, RunDir, safe_load
from transferkit.pipelines.settings import FitConfig

def run_config(run: RunDir) -> FitConfig:
    return FitConfig.build(run.read_config()["fit"], source=str(run.config))


@dataclass(frozen=True)
class Blueprint:
    """How to build a checkpoint's network: from its own metadata, or from its run's config."""

    backbone: str
    num_classes: int
    classes: tuple[str, ...]
    plugin: str | None = None
    image_size: int | None = None
    decode_short_side: int | None = None  # the decode rule training used (None: full size)

    @classmethod
    def of_checkpoint(cls, ckpt: dict, path: Path, plugin: str | None = None) -> "Blueprint":
        meta = ckpt.get(CHECKPOINT_META)
        if not isinstance(meta, dict) or "classes" not in meta:
            raise CheckpointError(f"{path} does not describe its model (no `transferkit` metadata); it was"
                                  " written by an older transferkit: load it from its run directory with"
                                  " transferkit.Run.load(RUN_DIR)")
        name = meta["backbone"]
        if name.startswith(("hf-hub:", "local-dir:")) and meta.get("architecture"):
            name = meta["architecture"]  # the weights are in the checkpoint; the hub or folder is not needed
        return cls(name, int(meta["num_classes"]), tuple(meta["classes"]), plugin or meta.get("backbone_plugin"),
                   meta.get("image_size"), (meta.get("data_config") or {}).get("decode_short_side"))

    @classmethod
    def of_run(cls, run: RunDir) -> "Blueprint":
        cfg = run_config(run)
        classes = tuple(run.classes())
        resolved = run.read_config().get("resolved", {}).get("data_config") or {}
        return cls(cfg.backbone, len(classes), classes, cfg.backbone_plugin, cfg.image_size,
                   resolved.get("decode_short_side"))

    def build(self) -> tuple[nn.Module, DataConfig]:
        """The architecture with random weights and its data config."""
        model, dc = factory.create(self.backbone, self.num_classes, pretrained=False, plugin=self.plugin,
                                   image_size=self.image_size, quiet=True)
        return model, dataclasses.replace(dc, decode_short_side=self.decode_short_side)


def load_weights(model: nn.Module, state_dict: dict, source: str | Path = "the checkpoint") -> nn.Module:
    """Load a LightningModule state_dict (keys ``model.…``) into the bare network; eval mode."""
    try:
        model.load_state_dict({k[len("model."):]: v for k, v in state_dict.items() if k.startswith("model.")})
    except RuntimeError as exc:
        lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
        detail = (lines[1] if len(lines) > 1 else lines[0])[:200] if lines else type(exc).__name__
        raise CheckpointError(f"{source} does not fit this run's model ({detail}); was it trained with"
                              " other classes or another backbone?") from None
    return model.eval()


def state_of(ckpt: dict, path: Path, key: str = "state_dict") -> dict:
    if key not in ckpt:
        raise CheckpointError(f"{path} holds no {key}; use a checkpoint written by `transferkit fit`"
                              + (" --ema" if key == "ema_state_dict" else ""))
    return ckpt[key]


def load_checkpoint(path: str | Path, key: str = "state_dict",
                    plugin: str | None = None) -> tuple[nn.Module, DataConfig, list[str]]:
    """The model of a checkpoint file alone (eval mode, CPU), its data config and class names."""
    path = Path(path)
    ckpt = safe_load(path)
    bp = Blueprint.of_checkpoint(ckpt, path, plugin)
    model, data_cfg = bp.build()
    load_weights(model, state_of(ckpt, path, key), path)
    return apply_temperature(model, temperature_of(ckpt, key)), data_cfg, list(bp.classes)


def load_model(run: RunDir, checkpoint: str = "best", key: str = "state_dict") -> tuple[nn.Module, DataConfig]:
    """Rebuild the run's architecture (no download) and load a checkpoint's weights safely;
    ``key="ema_state_dict"`` loads the averaged weights of a ``fit --ema`` run."""
    model, data_cfg = Blueprint.of_run(run).build()
    path = run.checkpoint(checkpoint)
    ckpt = safe_load(path)
    return apply_temperature(load_weights(model, state_of(ckpt, path, key), path), temperature_of(ckpt, key)), data_cfg
