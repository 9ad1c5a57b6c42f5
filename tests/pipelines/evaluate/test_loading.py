"""A checkpoint's network is rebuilt from its own metadata; one without it says where to look."""
from __future__ import annotations

import pytest
import torch

from transferkit.errors import CheckpointError
from transferkit.pipelines.evaluate.loading import Blueprint, load_checkpoint
from transferkit.pipelines.rundir import atomic_torch_save


def test_a_checkpoint_without_metadata_points_to_its_run(tmp_path):
    atomic_torch_save({"state_dict": {}}, tmp_path / "old.ckpt")
    with pytest.raises(CheckpointError, match=r"does not describe its model .* transferkit.Run.load\(RUN_DIR\)"):
        load_checkpoint(tmp_path / "old.ckpt")


def test_a_hub_or_folder_backbone_is_rebuilt_from_its_architecture(tmp_path):
    meta = {"backbone": "local-dir:/gone/folder", "architecture": "test_resnet", "num_classes": 2,
            "classes": ["a", "b"], "image_size": 32}
    bp = Blueprint.of_checkpoint({"transferkit": meta}, tmp_path / "x.ckpt")
    assert bp.backbone == "test_resnet" and bp.classes == ("a", "b")
    model, dc = bp.build()
    state = {"model." + k: v for k, v in model.state_dict().items()}
    atomic_torch_save({"state_dict": state, "transferkit": meta}, tmp_path / "x.ckpt")
    loaded, data_cfg, classes = load_checkpoint(tmp_path / "x.ckpt")
    assert classes == ["a", "b"] and data_cfg.input_size == (3, 32, 32) and not loaded.training
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in loaded.state_dict().items())
