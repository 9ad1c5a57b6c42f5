"""Augmentation from the command line: fit's presets, overrides and mixing, preview, text."""
from __future__ import annotations

import csv

import pytest
import yaml
from PIL import Image

from transferkit.cli.main import main

FAST = ["--backbone", "test_resnet", "--no-pretrained", "--image-size", "32", "--workers", "0",
        "--batch-size", "8", "--epochs", "2", "--patience", "0"]


@pytest.mark.parametrize("flags", [["--mixup-mode", "elem", "--mixup-off-epoch", "1"],
                                   ["--mix-mode", "elem", "--mix-off-epoch", "1"]],  # the old names
                         ids=["timm names", "deprecated names"])
def test_fit_mixes_batches_until_the_off_epoch_and_records_it(color_folder, tmp_path, monkeypatch, flags):
    from transferkit.augment.batch import BatchMixer

    calls = []
    real = BatchMixer.__call__

    def counted(self, x, y):
        calls.append((self.mode, len(x)))
        return real(self, x, y)

    monkeypatch.setattr(BatchMixer, "__call__", counted)
    out = tmp_path / "run"
    assert main(["fit", str(color_folder), "--out", str(out), "--augment", "heavy",
                 "--aug", "erasing.p=0.5", "--aug", "noise=off", "--mixup", "0.2", "--cutmix", "1.0",
                 *flags, *FAST]) == 0
    # 48 training images in batches of 8: six mixed batches in epoch 0, none from epoch 1 on
    assert calls == [("elem", 8)] * 6
    cfg = yaml.safe_load((out / "config.yaml").read_text())
    assert cfg["fit"]["mixup"] == 0.2 and cfg["fit"]["cutmix"] == 1.0 and cfg["fit"]["mixup_mode"] == "elem"
    assert cfg["fit"]["mixup_off_epoch"] == 1 and "mix_mode" not in cfg["fit"]
    aug = cfg["resolved"]["augment"]
    assert aug["preset"] == "heavy" and aug["erasing"]["p"] == 0.5 and aug["noise"] is None


def test_unknown_augmentation_setting_is_one_line_and_exit_2(color_folder, tmp_path, capsys):
    assert main(["fit", str(color_folder), "--out", str(tmp_path / "run"), "--aug", "erasing.size=3", *FAST]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("transferkit: error: unknown setting erasing.size") and "\n" not in err
    assert "p, area, aspect, fill" in err
    assert not (tmp_path / "run").exists()


def test_preview_writes_a_grid(color_folder, tmp_path):
    out = tmp_path / "grid.png"
    assert main(["augment", "preview", str(color_folder / "red"), str(color_folder / "blue"),
                 "--preset", "heavy", "--cutmix", "1.0", "--size", "48", "--draws", "3",
                 "--max-images", "2", "-o", str(out)]) == 0
    with Image.open(out) as im:
        assert im.width > 4 * 48 and im.height > 3 * 48  # 2 rows of draws + a mixed row


def test_text_expands_a_dataset_keeping_labels(tmp_path, capsys):
    src = tmp_path / "sms.tsv"
    src.write_text("Label\tSMS\nham\tsee you at the station at six tonight\n"
                   "spam\twin a free prize now by calling this number today\n", encoding="utf-8")
    out = tmp_path / "out.csv"
    assert main(["augment", "text", str(src), "--column", "SMS", "--label-column", "Label",
                 "--ops", "swap,delete", "--n", "2", "-o", str(out)]) == 0
    with out.open() as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 6
    assert [r["Label"] for r in rows] == ["ham"] * 3 + ["spam"] * 3
    assert [r["aug_op"] for r in rows].count("original") == 2
    assert '"rows_out": 6' in capsys.readouterr().out
