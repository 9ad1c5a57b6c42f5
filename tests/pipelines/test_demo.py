"""`transferkit demo`: the README's first command, offline, and the claim it makes."""
from __future__ import annotations

import csv
import json

import pytest

from transferkit.cli.main import main

pytestmark = pytest.mark.slow


def test_demo_fine_tunes_beats_random_weights_and_writes_what_it_says(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    tuned = json.loads((out / "finetune" / "report.json").read_text())
    scratch = json.loads((out / "scratch" / "report.json").read_text())
    assert tuned["accuracy"] >= 0.9 and tuned["accuracy"] >= scratch["accuracy"] + 0.3
    assert f"val accuracy {tuned['accuracy']:.3f}" in printed and f"val accuracy {scratch['accuracy']:.3f}" in printed
    assert (out / "pretrained-backbone.safetensors").is_file()
    with (out / "finetune" / "predictions.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 3 and all(r["label"] and r["error"] == "" for r in rows)
    assert (out / "finetune" / "evaluation.json").is_file()
