"""The plots a run leaves are real images of the size asked for."""
from __future__ import annotations

import numpy as np
from PIL import Image

from transferkit.pipelines.evaluate.plots import plot_confusion, plot_curves, plot_reliability


def test_curves_confusion_and_reliability_are_written_as_pngs(tmp_path):
    (tmp_path / "metrics.csv").write_text("epoch,train_loss,train_acc,val_loss,val_acc\n1,1.0,0.5,1.1,0.4\n"
                                         "2,0.6,0.8,0.7,0.75\n")
    plot_curves(tmp_path / "metrics.csv", tmp_path / "curves.png")
    plot_confusion([[3, 1], [0, 4]], ["ants", "bees"], tmp_path / "confusion.png")
    probs = np.array([[0.9, 0.1], [0.3, 0.7], [0.6, 0.4]])
    plot_reliability(probs, np.array([0, 1, 1]), tmp_path / "reliability.png")
    sizes = {}
    for name in ("curves", "confusion", "reliability"):
        with Image.open(tmp_path / f"{name}.png") as im:
            sizes[name] = im.size
            assert np.asarray(im.convert("L")).std() > 5  # not a blank canvas
    assert sizes["curves"] == (1260, 360) and sizes["reliability"] == (500, 600)  # three panels: loss, accuracy, lr
