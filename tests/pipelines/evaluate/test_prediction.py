"""Prediction rows: any kind of image in, one row each, an unreadable file marked, not fatal."""
from __future__ import annotations

import numpy as np
import pytest
import timm

from transferkit.backbones.factory import resolve_data_config
from transferkit.errors import ConfigError, DataError
from transferkit.pipelines.evaluate.prediction import (expand_inputs, predict_batches, predict_items,
                                                       write_predictions)
from transferkit.pipelines.evaluate.predictor import Predictor


@pytest.fixture(scope="module")
def predictor():
    model = timm.create_model("test_resnet", num_classes=3).eval()
    return Predictor.for_model(model, resolve_data_config(model, 32), 3, accelerator="cpu")


def test_rows_for_files_arrays_and_a_broken_file(predictor, color_folder, tmp_path):
    files = sorted((color_folder / "red").glob("*.png"))[:2]
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n not really")
    items = expand_inputs([files[0], np.zeros((40, 40, 3), np.uint8), broken])
    rows = predict_items(predictor, items, ["a", "b", "c"], top_k=2, progress=False)
    assert [r["error"] == "" for r in rows] == [True, True, False]
    assert rows[1]["path"] == "<image 1>" and sum(rows[0]["probabilities"]) == pytest.approx(1, abs=1e-5)
    assert rows[2]["error"].startswith("cannot read:") and rows[2]["label"] == ""
    out = write_predictions(rows, tmp_path / "p.csv", top_k=2)
    lines = out.read_text().splitlines()
    assert lines[0] == "path,label,probability,label_2,probability_2,error" and len(lines) == 4
    with pytest.raises(ConfigError, match="is a folder; pass a file name"):
        write_predictions(rows, tmp_path, top_k=2)


def test_what_cannot_be_predicted_on_is_named(predictor):
    with pytest.raises(DataError, match="cannot predict on a int"):
        expand_inputs([3])
    with pytest.raises(ConfigError, match="--top-k 4 must be between 1 and the number of classes"):
        predict_items(predictor, [np.zeros((8, 8, 3), np.uint8)], ["a", "b", "c"], top_k=4, progress=False)


def test_batches_come_one_loader_batch_at_a_time_under_a_bar_over_the_images(predictor, monkeypatch):
    import tqdm.auto

    bars = []

    class Bar:
        def __init__(self, *args, **kwargs):
            self.kwargs, self.n = kwargs, 0
            bars.append(self)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

        def update(self, n):
            self.n += n

    monkeypatch.setattr(tqdm.auto, "tqdm", Bar)
    items = [np.full((20, 20, 3), v, np.uint8) for v in range(0, 250, 10)]
    with pytest.raises(ConfigError, match="--top-k 0"):
        predict_batches(predictor, items, ["a", "b", "c"], top_k=0)  # checked before any batch
    batches = predict_batches(predictor, items, ["a", "b", "c"], top_k=2, batch_size=8, probabilities=False)
    sizes = [len(rows) for rows in batches]
    assert sizes == [8, 8, 8, 1]
    (bar,) = bars
    assert bar.kwargs["total"] == 25 and bar.kwargs["unit"] == "img" and bar.n == 25
    rows = [r for rows in predict_batches(predictor, items, ["a", "b", "c"], top_k=2, progress=False,
                                          probabilities=False) for r in rows]
    assert "probabilities" not in rows[0]
    assert rows == [{k: v for k, v in r.items() if k != "probabilities"}
                    for r in predict_items(predictor, items, ["a", "b", "c"], top_k=2, progress=False)]
