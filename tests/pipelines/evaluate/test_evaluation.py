"""The evaluation table marks the best combination; a folder of other classes is refused."""
from __future__ import annotations

import pytest

from transferkit.errors import DataError
from transferkit.pipelines.evaluate.evaluation import eval_samples, results_table
from transferkit.pipelines.rundir import RunDir


def _row(tta, ensemble, acc, nll):
    return {"tta": tta, "ensemble": ensemble, "members": ["best"], "views": 1, "accuracy": acc, "macro_f1": acc,
            "nll": nll, "ece": 0.05, "count": 10}


def test_the_best_row_is_starred():
    body = {"results": [_row("plain", "none", 0.8, 0.5), _row("hflip", "none", 0.9, 0.4)],
            "best": {"tta": "hflip", "ensemble": "none"}}
    lines = results_table(body).splitlines()
    assert lines[1].startswith("  plain") and lines[2].startswith("* hflip")


def test_a_folder_with_other_classes_is_refused(color_folder, tmp_path):
    run = RunDir(tmp_path)
    with pytest.raises(DataError, match=r"has classes \['blue', 'green', 'red'\] but the run was trained on"):
        eval_samples(run, color_folder, "val", ["cat", "dog"])
    with pytest.raises(DataError, match="the run has no saved test split"):
        eval_samples(run, None, "test", ["cat", "dog"])
