"""`transferkit search`: trials written and replayable, coarse then fine, one study shared by
several processes through its storage, and on real data at least the default's accuracy."""
from __future__ import annotations

import csv
import subprocess
import sys
from types import SimpleNamespace

import pytest

import transferkit
from transferkit.cli.main import main
from transferkit.pipelines.search import SPACE, Dim, _region

optuna = pytest.importorskip("optuna")


def _common(weights):
    return ["--backbone", "test_resnet", "--weights", str(weights), "--image-size", "32", "--workers", "0",
            "--finetune", "freeze", "--epochs", "3", "--patience", "0"]


def test_a_search_writes_its_trials_and_a_config_that_replays_the_best(color_folder, weights, tmp_path, capsys):
    out = tmp_path / "search"
    assert main(["search", str(color_folder), *_common(weights), "--trials", "4", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    with (out / "trials.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 4 and {r["state"] for r in rows} <= {"complete", "pruned"}
    assert {"lr", "weight_decay", "label_smoothing", "dropout", "augment"} <= set(rows[0])
    assert (out / "search.png").stat().st_size > 0
    best = max((r for r in rows if r["state"] == "complete"), key=lambda r: float(r["val_accuracy"]))
    assert f"best val accuracy {float(best['val_accuracy']):.4f}" in printed
    replay = transferkit.fit(color_folder, out=tmp_path / "replay", **{
        k: v for k, v in transferkit.pipelines.settings.FitConfig.load(out / "best-config.yaml").to_dict().items()
        if k not in ("data", "out", "overwrite", "backbone", "finetune", "epochs")},
        backbone="test_resnet", finetune="freeze", epochs=3)
    assert replay.report["accuracy"] == pytest.approx(float(best["val_accuracy"]), abs=1e-6)


def test_a_second_process_adds_its_trials_to_the_same_study(color_folder, weights, tmp_path):
    storage = f"sqlite:///{tmp_path / 'shared.db'}"
    args = ["search", str(color_folder), *_common(weights), "--trials", "2", "--storage", storage]
    assert main([*args, "--out", str(tmp_path / "a")]) == 0
    done = subprocess.run([sys.executable, "-m", "transferkit.cli.main", *args, "--out", str(tmp_path / "b")],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    study = optuna.load_study(study_name="transferkit", storage=storage)
    assert len(study.trials) == 4
    lrs = [t.params["lr"] for t in study.trials]
    assert len(set(lrs)) == 4  # the second process draws its own settings, not the first one's again
    with (tmp_path / "b" / "trials.csv").open() as f:
        assert len(list(csv.DictReader(f))) == 4


def test_the_fine_round_searches_around_the_best_quarter():
    def trial(value, lr, augment):
        return SimpleNamespace(value=value, params={"lr": lr, "augment": augment, "weight_decay": 1e-3,
                                                    "label_smoothing": 0.1, "dropout": 0.0}, user_attrs={},
                               state=optuna.trial.TrialState.COMPLETE)

    done = [trial(0.9, 1e-2, "light"), trial(0.8, 1e-3, "heavy"), trial(0.88, 2e-2, "light"),
            trial(0.5, 1e-4, "default"), trial(0.6, 5e-2, "heavy"), trial(0.7, 3e-4, "default"),
            trial(0.4, 1e-1, "heavy"), trial(0.3, 2e-4, "default")]
    study = SimpleNamespace(get_trials=lambda deepcopy, states: done)
    phase, region = _region(study, SPACE, trials=30)
    assert phase == "coarse" and region == SPACE  # 8 of 30: still the coarse half
    phase, region = _region(study, SPACE, trials=16)
    assert phase == "fine"
    assert region["lr"] == Dim(5e-3, 4e-2, log=True)  # the best two (0.9, 0.88) span 1e-2..2e-2, widened 2x
    assert region["augment"].choices == ("light",)


@pytest.mark.real
@pytest.mark.slow
def test_thirty_freeze_trials_on_hymenoptera_reach_the_default_freeze_run(shared, tmp_path, capsys):
    import time

    plugin = shared / "weights" / "mobilenetv1_025.py"
    data = shared / "data" / "hymenoptera"
    default = transferkit.fit(data, out=tmp_path / "default", backbone="mobilenetv1_025", backbone_plugin=str(plugin),
                              finetune="freeze", workers=2).report["accuracy"]
    start = time.monotonic()
    assert main(["search", str(data), "--backbone", "mobilenetv1_025", "--backbone-plugin", str(plugin),
                 "--finetune", "freeze", "--epochs", "10", "--workers", "2", "--trials", "30",
                 "--out", str(tmp_path / "search")]) == 0
    minutes = (time.monotonic() - start) / 60
    with (tmp_path / "search" / "trials.csv").open() as f:
        rows = list(csv.DictReader(f))
    best = max(float(r["val_accuracy"]) for r in rows if r["state"] == "complete")
    print(f"hymenoptera freeze search: 30 trials in {minutes:.1f} min, best {best:.4f}, default {default:.4f},"
          f" pruned {sum(r['state'] == 'pruned' for r in rows)}, rounds {sorted({r['round'] for r in rows})}")
    assert len(rows) == 30 and {r["round"] for r in rows} == {"coarse", "fine"}
    assert best >= default
    assert minutes < 8
