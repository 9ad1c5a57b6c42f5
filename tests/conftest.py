"""Shared fixtures: small generated image folders and the location of ../shared."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing in the tests may reach a model hub
os.environ.setdefault("PYTHONHASHSEED", "0")

COLORS = {"red": (200, 40, 40), "green": (40, 180, 60), "blue": (50, 70, 210), "yellow": (220, 210, 40)}


def color_image(rgb, size: int, rng: np.random.Generator) -> Image.Image:
    """A noisy image whose mean colour is `rgb`, with a random bright square on it."""
    arr = np.clip(np.array(rgb, np.float32) + rng.normal(0, 25, (size, size, 3)), 0, 255)
    x, y = rng.integers(0, size // 2, 2)
    arr[y:y + size // 4, x:x + size // 4] += 40
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))


def make_color_folder(root: Path, classes=("red", "green", "blue"), per_class: int = 20, size: int = 40,
                      seed: int = 0, ext: str = "png") -> Path:
    """DATA/<class>/<i>.<ext>: an easy task (classes differ by colour)."""
    rng = np.random.default_rng(seed)
    for c in classes:
        (root / c).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            color_image(COLORS[c], size, rng).save(root / c / f"{c}_{i:03d}.{ext}")
    return root


@pytest.fixture
def color_folder(tmp_path: Path) -> Path:
    return make_color_folder(tmp_path / "data")


@pytest.fixture
def shared() -> Path:
    if not (SHARED / "data").is_dir():
        pytest.skip("../shared data is not present")
    return SHARED


@pytest.fixture(scope="session")
def weights(tmp_path_factory) -> Path:
    """'Pretrained' weights for timm's test_resnet, made and saved by the test (nothing is downloaded)."""
    import timm
    import torch
    from safetensors.torch import save_file

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("weights") / "test_resnet.safetensors"
    save_file({k: v.contiguous() for k, v in timm.create_model("test_resnet").state_dict().items()}, str(path))
    return path


def fit_with_callbacks(args: list[str], *callbacks) -> int:
    """`transferkit ARGS` with extra Lightning callbacks in fit's Trainer."""
    import transferkit.pipelines.train.recipe as recipe
    from transferkit.cli.main import main

    original = recipe.make_trainer

    def make_trainer(*a, **kw):
        trainer = original(*a, **kw)
        trainer.callbacks.extend(callbacks)
        return trainer

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(recipe, "make_trainer", make_trainer)
        return main(args)
