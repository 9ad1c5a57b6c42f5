"""Per-image rows, the most confused pairs and the top losses, from hand-made probabilities."""
from __future__ import annotations

import numpy as np
import pytest

from transferkit.pipelines.evaluate.metrics import classification_metrics
from transferkit.pipelines.evaluate.per_image import (most_confused, per_image_rows, read_per_image, top_losses,
                                                      write_per_image)

CLASSES = ["ant", "bee", "wasp"]


def test_rows_hold_the_prediction_its_loss_and_the_next_classes():
    probs = np.array([[0.7, 0.2, 0.1], [0.5, 0.3, 0.2], [0.4, 0.4, 0.2]])
    rows = per_image_rows(["a.jpg", "b.jpg", "c.jpg"], probs, np.array([0, 2, 1]), CLASSES, top_k=3)
    assert rows[0] == {"path": "a.jpg", "label": "ant", "predicted": "ant", "probability": pytest.approx(0.7),
                       "loss": pytest.approx(-np.log(0.7)), "correct": True, "predicted_2": "bee",
                       "probability_2": pytest.approx(0.2), "predicted_3": "wasp", "probability_3": pytest.approx(0.1)}
    assert (rows[1]["predicted"], rows[1]["correct"], rows[1]["loss"]) == ("ant", False, pytest.approx(-np.log(0.2)))
    # A tie goes to the first class, as the confusion matrix (argmax) counts it.
    assert (rows[2]["predicted"], rows[2]["predicted_2"], rows[2]["correct"]) == ("ant", "bee", False)
    assert "predicted_2" not in per_image_rows(["a"], probs[:1], np.array([0]), CLASSES, top_k=1)[0]
    with pytest.raises(ValueError, match="2 paths, 3 probability rows"):
        per_image_rows(["a", "b"], probs, np.array([0, 1, 2]), CLASSES)


def test_most_confused_is_the_confusion_matrix_off_its_diagonal():
    rng = np.random.default_rng(0)
    probs = rng.dirichlet(np.ones(3), size=300)
    labels = rng.integers(0, 3, 300)
    rows = per_image_rows([f"{i}.png" for i in range(300)], probs, labels, CLASSES)
    cm = np.array(classification_metrics(probs, labels, CLASSES)["confusion_matrix"])
    pairs = most_confused(rows, limit=None)
    expected = {(CLASSES[i], CLASSES[j]): int(cm[i, j]) for i in range(3) for j in range(3) if i != j and cm[i, j]}
    assert {(p["label"], p["predicted"]): p["count"] for p in pairs} == expected
    assert [p["count"] for p in pairs] == sorted(expected.values(), reverse=True)
    assert len(most_confused(rows, limit=2)) == 2


def test_top_losses_are_the_wrong_images_most_confident_first():
    probs = np.array([[0.9, 0.05, 0.05], [0.1, 0.8, 0.1], [0.3, 0.6, 0.1], [0.2, 0.2, 0.6], [0.6, 0.3, 0.1]])
    labels = np.array([0, 0, 0, 2, 1])
    rows = per_image_rows(list("abcde"), probs, labels, CLASSES)
    worst = top_losses(rows, limit=None)
    assert [r["path"] for r in worst] == ["b", "c", "e"]  # losses -log .1, -log .3, -log .3 (path breaks the tie)
    assert worst[0] == {"path": "b", "label": "ant", "predicted": "bee", "probability": pytest.approx(0.8),
                        "loss": pytest.approx(-np.log(0.1))}
    assert [r["path"] for r in top_losses(rows, limit=1)] == ["b"]


def test_the_csv_round_trips(tmp_path):
    probs = np.array([[0.9, 0.05, 0.05], [0.1, 0.8, 0.1]])
    rows = per_image_rows(["x/a,1.png", "b.png"], probs, np.array([0, 0]), CLASSES, top_k=2)
    path = write_per_image(rows, tmp_path / "predictions-val.csv")
    assert path.read_text().splitlines()[0] == "path,label,predicted,probability,loss,correct,predicted_2,probability_2"
    back = read_per_image(path)
    assert [r["path"] for r in back] == ["x/a,1.png", "b.png"] and [r["correct"] for r in back] == [True, False]
    assert back[1]["loss"] == pytest.approx(-np.log(0.1), rel=1e-5) and back[1]["predicted_2"] == "ant"
    assert top_losses(back) == [{"path": "b.png", "label": "ant", "predicted": "bee",
                                 "probability": pytest.approx(0.8, rel=1e-5), "loss": pytest.approx(2.302585, rel=1e-5)}]


def test_a_fit_lists_exactly_its_misclassified_val_images_by_loss(tmp_path, weights):
    import transferkit
    from conftest import COLORS, color_image, make_color_folder

    data = tmp_path / "data"
    make_color_folder(data / "train", per_class=12)
    make_color_folder(data / "val", per_class=6, seed=1)
    rng = np.random.default_rng(2)
    # Hard on purpose: green images filed under red, and blue-green ones filed under blue.
    for i in range(3):
        color_image(COLORS["green"], 40, rng).save(data / "val" / "red" / f"hard_{i}.png")
    mixed = tuple((a + b) // 2 for a, b in zip(COLORS["blue"], COLORS["green"]))
    for i in range(3):
        color_image(mixed, 40, rng).save(data / "val" / "blue" / f"mixed_{i}.png")
    run = transferkit.fit(data, out=tmp_path / "run", backbone="test_resnet", weights=str(weights),
                          finetune="freeze", image_size=40, workers=0, batch_size=16)
    rows = run.predictions("val")
    assert len(rows) == 24 and (run.path / "predictions-val.csv").is_file()

    # Independently: the saved model run again on every val file.
    index = {c: i for i, c in enumerate(run.classes)}
    again = run.predict([r["path"] for r in rows])
    loss = {r["path"]: -np.log(p["probabilities"][index[r["label"]]]) for r, p in zip(rows, again)}
    wrong = {r["path"] for r, p in zip(rows, again) if p["label"] != r["label"]}
    assert {f"hard_{i}.png" for i in range(3)} <= {w.rsplit("/", 1)[1] for w in wrong}

    worst = run.report["top_losses"]
    assert {w["path"] for w in worst} == wrong
    assert [w["loss"] for w in worst] == sorted((w["loss"] for w in worst), reverse=True)
    for w in worst:
        assert w["loss"] == pytest.approx(loss[w["path"]], rel=1e-4, abs=1e-5)
    cm = np.array(run.report["metrics"]["confusion_matrix"])
    names = run.classes
    assert {(m["label"], m["predicted"]): m["count"] for m in run.report["most_confused"]} == {
        (names[i], names[j]): int(cm[i, j]) for i in range(3) for j in range(3) if i != j and cm[i, j]}
    # The Python API reads the same rows.
    assert [w["path"] for w in run.top_losses(limit=None)] == [w["path"] for w in worst]
    assert run.most_confused() == run.report["most_confused"]
