"""Build a timm backbone with a new head, and resolve the data config that travels with it.

Weights come from one of three places, all through timm's own pretrained-config path so that
timm's head handling (dropping a classifier of another size) and key filters apply:

- timm's hub (``pretrained=True``);
- a local ``.safetensors`` / ``.pth`` file (``weights=FILE``), read safely (``weights_only``);
- nowhere, only when asked (``pretrained=False``).

A model that has no pretrained weights never silently falls back to random ones.
"""
from __future__ import annotations

import difflib
import hashlib
import importlib.util
import logging
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import timm
import torch
from torch import nn

from transferkit.errors import BackboneError, ConfigError, refused_global

log = logging.getLogger(__name__)

_NO_WEIGHTS_HINT = ("pass --weights FILE with a local .safetensors/.pth file, or --no-pretrained"
                    " to train from random weights")


@dataclass(frozen=True)
class DataConfig:
    """How images must look for this backbone: timm's resolved data config, plain data."""

    input_size: tuple[int, int, int]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    interpolation: str
    crop_pct: float
    # Files decode to this shorter side first (a run trained from its decode cache; see
    # pipelines/data/decoded.py), so evaluation sees the pixels training saw. None: full size.
    decode_short_side: int | None = None

    @property
    def size(self) -> int:
        return self.input_size[1]

    def to_dict(self) -> dict:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}


def load_plugin(path: str | Path) -> None:
    """Import a Python file that registers extra timm models (``@register_model``)."""
    path = Path(path).expanduser().resolve()
    if not path.is_file() or path.suffix != ".py":
        raise BackboneError(f"--backbone-plugin {path} is not a Python file; pass the .py module that"
                            " registers the model with timm")
    name = "transferkit_plugin_" + hashlib.sha1(str(path).encode()).hexdigest()[:12]
    if name in sys.modules:
        return
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except Exception as exc:
        del sys.modules[name]
        raise BackboneError(f"--backbone-plugin {path} failed to import: {type(exc).__name__}: {exc}") from exc
    log.info("loaded backbone plugin %s", path)


HUB_PREFIXES = ("hf-hub:", "local-dir:")  # timm resolves these itself, config and weights included


def check_name(name: str) -> None:
    if name.startswith(HUB_PREFIXES):
        if name.startswith("local-dir:") and not Path(name[len("local-dir:"):]).expanduser().is_dir():
            raise BackboneError(f"backbone {name!r}: {name[len('local-dir:'):]} is not a folder; pass a folder"
                                " with timm's config.json and model.safetensors")
        return
    arch = name.split(".", 1)[0]
    if timm.is_model(arch):
        return
    close = difflib.get_close_matches(arch, timm.list_models(), n=4, cutoff=0.6)
    hint = f"did you mean {', '.join(close)}?" if close else "see `timm.list_models()` for names"
    raise BackboneError(f"unknown backbone {name!r}; {hint}")


def _looks_like_weights(path: Path) -> bool:
    """A torch checkpoint (a zip archive, or a legacy pickle) or a safetensors file, by its first bytes."""
    with open(path, "rb") as f:
        head = f.read(9)
    if head.startswith(b"PK\x03\x04") or head[:1] == b"\x80":
        return True
    return len(head) == 9 and int.from_bytes(head[:8], "little") < 100_000_000 and head[8:9] == b"{"


def _read_weights(path: Path) -> dict[str, torch.Tensor]:
    if path.is_dir():
        inside = sorted(p.name for p in path.iterdir() if p.suffix in (".safetensors", ".pth", ".pt", ".bin"))
        hint = (f"pass the file inside it, e.g. --weights {path / inside[0]}" if inside else
                "pass a .safetensors or .pth file")
        raise BackboneError(f"--weights {path} is a folder; {hint}, or --backbone local-dir:{path} for a folder"
                            " in timm's format (config.json + weights)")
    if not path.is_file():
        raise BackboneError(f"weights file {path} does not exist; pass an existing .safetensors or .pth file")
    if not _looks_like_weights(path):
        raise BackboneError(f"weights file {path} is not a weights file (neither a torch checkpoint nor"
                            " safetensors); pass a .safetensors or .pth file of tensors")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            sd = load_file(str(path))
        else:
            sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        if refused := refused_global(exc):
            raise BackboneError(f"weights file {path} cannot be read safely: unpickling it would call"
                                f" {refused}, which weights never need; pass a .safetensors file or a .pth"
                                " holding only tensors, from a source you trust") from None
        raise BackboneError(f"weights file {path} cannot be read safely ({type(exc).__name__}: "
                            f"{str(exc).splitlines()[0] if str(exc) else ''}); pass a .safetensors file or a"
                            " .pth holding only tensors") from exc
    for key in ("state_dict", "model", "model_state_dict", "state_dict_ema"):
        if isinstance(sd, dict) and isinstance(sd.get(key), dict):
            sd = sd[key]
            break
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise BackboneError(f"weights file {path} does not hold a state dict of tensors")
    prefixes = ("module.", "model.", "backbone.")
    for p in prefixes:
        if sd and all(k.startswith(p) for k in sd):
            sd = {k[len(p):]: v for k, v in sd.items()}
    return sd


def _check_fits(model: nn.Module, sd: dict[str, torch.Tensor], path: Path) -> None:
    """Name the first tensors that do not fit; the classifier may differ (it is replaced)."""
    own = model.state_dict()
    clf_prefix = (model.pretrained_cfg or {}).get("classifier", "")
    is_head = lambda k: bool(clf_prefix) and k.startswith(clf_prefix + ".")  # noqa: E731
    bad = [f"{k} {tuple(v.shape)} vs {tuple(own[k].shape)}" for k, v in sd.items()
           if k in own and own[k].shape != v.shape and not is_head(k)]
    missing = [k for k in own if k not in sd and not is_head(k) and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in sd if k not in own and not is_head(k)]
    if bad or missing or unexpected:
        parts = []
        if bad:
            parts.append("shape mismatch: " + "; ".join(bad[:3]))
        if missing:
            parts.append(f"{len(missing)} missing, e.g. {', '.join(missing[:3])}")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected, e.g. {', '.join(unexpected[:3])}")
        raise BackboneError(f"weights file {path} does not fit backbone {model.default_cfg.get('architecture')}"
                            f" ({'; '.join(parts)}); pass weights saved from the same architecture")


def _has_pretrained_source(cfg: dict) -> bool:
    return any(cfg.get(k) for k in ("file", "state_dict", "hf_hub_id", "url"))


def create(name: str, num_classes: int, *, pretrained: bool = True, weights: str | Path | None = None,
           plugin: str | Path | None = None, image_size: int | None = None,
           drop_rate: float = 0.0, drop_path_rate: float = 0.0, quiet: bool = False) -> tuple[nn.Module, DataConfig]:
    """Build `name` with a fresh `num_classes` head and resolve its data config.

    `drop_rate`: dropout before the classifier; `drop_path_rate`: stochastic depth, where the
    architecture has it (a ConfigError where it does not).

    Raises BackboneError when the name is unknown, when pretrained weights cannot be had, or
    when a weights file does not fit.
    """
    if plugin:
        load_plugin(plugin)
    check_name(name)
    if num_classes < 2:
        raise ConfigError(f"a classifier needs at least 2 classes, got {num_classes}")
    _check_size_range(image_size)
    kwargs: dict = {"num_classes": num_classes, "drop_rate": drop_rate}
    if drop_path_rate:
        kwargs["drop_path_rate"] = drop_path_rate
        try:
            timm.create_model(name, pretrained=False, num_classes=num_classes, drop_path_rate=drop_path_rate)
        except TypeError as exc:
            if "drop_path_rate" not in str(exc):
                raise
            raise ConfigError(f"--drop-path {drop_path_rate:g}: {name} has no stochastic depth (timm's drop_path_rate);"
                              " drop --drop-path, or pick a backbone with residual blocks") from None
    cfg = timm.models.get_pretrained_cfg(name)
    if image_size is not None and cfg is not None and cfg.fixed_input_size:
        # Position embeddings and attention windows are built for one size: build them for
        # this one (timm resamples pretrained position embeddings to it when loading).
        kwargs["img_size"] = image_size
    if weights:
        path = Path(weights).expanduser()
        sd = _read_weights(path)
        probe = timm.create_model(name, pretrained=False)
        _check_fits(probe, sd, path)
        del probe
        # timm loads a state dict given in the pretrained config; it drops a classifier whose
        # class count differs and adapts the stem when in_chans differ.
        model = timm.create_model(name, pretrained=True, pretrained_cfg_overlay={"state_dict": sd}, **kwargs)
        log.info("loaded backbone weights from %s", path)
    elif pretrained:
        if not name.startswith(HUB_PREFIXES) and (cfg is None or not _has_pretrained_source(cfg.to_dict())):
            raise BackboneError(f"backbone {name!r} has no pretrained weights in timm; {_NO_WEIGHTS_HINT}")
        try:
            model = timm.create_model(name, pretrained=True, **kwargs)
        except (OSError, RuntimeError, ValueError, ConnectionError) as exc:
            lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
            first = "; ".join(lines[:2])[:200] if lines else type(exc).__name__
            raise BackboneError(f"pretrained weights for {name!r} could not be loaded ({first}); "
                                f"{_NO_WEIGHTS_HINT}") from exc
    else:
        # quiet: the architecture is rebuilt only to receive a checkpoint's weights
        log.log(logging.DEBUG if quiet else logging.WARNING, "training %s from random weights (--no-pretrained)", name)
        model = timm.create_model(name, pretrained=False, **kwargs)
    reset_head(model)
    data_cfg = resolve_data_config(model, image_size)
    if image_size is not None:
        check_input_size(model, name, data_cfg)
    return model, data_cfg


def check_input_size(model: nn.Module, name: str, data_cfg: DataConfig) -> None:
    """One forward pass of a blank image, so that a size the network cannot take fails now.

    Too small for the downsampling, or not a multiple of a patch or window size, would
    otherwise fail at the first training step with a shape error from deep inside the model.
    """
    c, h, w = data_cfg.input_size
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            model(torch.zeros(1, c, h, w))
    except (RuntimeError, AssertionError, ValueError, IndexError) as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:160]
        default = (model.pretrained_cfg or {}).get("input_size", (3, 224, 224))[1]
        raise ConfigError(f"--image-size {h} does not work with backbone {name} ({first}); use its"
                          f" pretrained size {default}, or try {max(32, -(-h // 32) * 32)} (a multiple of 32)"
                          ) from None
    finally:
        model.train(was_training)


def _check_size_range(image_size: int | None) -> None:
    if image_size is not None and not 16 <= image_size <= 2048:
        raise ConfigError(f"--image-size {image_size} cannot work; use a size between 16 and 2048 pixels")


def reset_head(model: nn.Module) -> None:
    """Start the new head near zero so that its first predictions are uniform.

    Some families initialise their classifier for training from scratch (EfficientNet's uniform
    +-1/sqrt(num_classes)); on pretrained features that gives logits of +-7 and a first epoch
    spent unlearning them.
    """
    head = model.get_classifier() if hasattr(model, "get_classifier") else None
    for m in (head.modules() if isinstance(head, nn.Module) else []):
        if isinstance(m, (nn.Linear, nn.Conv2d)):
            nn.init.trunc_normal_(m.weight, std=0.01)
            if m.bias is not None:
                nn.init.zeros_(m.bias)


def resolve_data_config(model: nn.Module, image_size: int | None = None) -> DataConfig:
    from timm.data import resolve_data_config as timm_resolve

    cfg = timm_resolve({}, model=model)
    c, h, w = cfg["input_size"]
    if image_size is not None:
        _check_size_range(image_size)
        h = w = image_size
    return DataConfig((c, h, w), tuple(cfg["mean"]), tuple(cfg["std"]), cfg["interpolation"],
                      float(cfg["crop_pct"]))
