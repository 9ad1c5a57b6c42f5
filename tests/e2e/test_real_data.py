"""The real photos and the real pretrained backbone in ../shared (skipped when absent)."""
from __future__ import annotations

import json

import pytest

from transferkit.cli.main import main

pytestmark = [pytest.mark.real, pytest.mark.slow]


def _fit(shared, out, *extra):
    args = ["fit", str(shared / "data" / "hymenoptera"), "--backbone", "mobilenetv1_025",
            "--backbone-plugin", str(shared / "weights" / "mobilenetv1_025.py"), "--out", str(out),
            "--workers", "2", "--epochs", "10", *extra]
    assert main(args) == 0
    return json.loads((out / "report.json").read_text())


def test_frozen_pretrained_backbone_beats_random_weights_by_far(shared, tmp_path):
    frozen = _fit(shared, tmp_path / "freeze", "--finetune", "freeze")
    assert frozen["accuracy"] >= 0.85
    assert frozen["finetune"]["strategy"] == "freeze"
    scratch = _fit(shared, tmp_path / "scratch", "--no-pretrained", "--finetune", "full")
    assert scratch["accuracy"] <= frozen["accuracy"] - 0.15


def test_auto_measures_hymenoptera_as_large(shared, tmp_path):
    report = _fit(shared, tmp_path / "auto")
    assert report["finetune"]["strategy"] == "partial"
    assert ">= 20: large" in report["finetune"]["reason"] and "large -> partial" in report["finetune"]["reason"]
    assert report["finetune"]["advice"]["measurements"]["probe"]["logreg"] > 0.8
    assert report["accuracy"] >= 0.85
