"""`advise`: one backbone's advice, or several backbones ranked on the same training split."""
from __future__ import annotations

import pytest

import transferkit
from transferkit.errors import ConfigError
from transferkit.pipelines.advise import candidates, rank_backbones, ranking_table

FAST = dict(pretrained=False, image_size=32, workers=0)


def test_candidates_pair_each_backbone_with_its_plugin():
    assert candidates("a,b", "pa.py,pb.py") == [("a", "pa.py"), ("b", "pb.py")]
    assert candidates("a, b", "p.py") == [("a", "p.py"), ("b", "p.py")]
    assert candidates("a,b", None) == [("a", None), ("b", None)]
    with pytest.raises(ConfigError, match="names 3 backbones but --backbone-plugin 2 files"):
        candidates("a,b,c", "x.py,y.py")
    with pytest.raises(ConfigError, match="names a backbone twice"):
        candidates("a,a", None)


def test_backbones_are_ranked_by_expected_freeze_accuracy_with_their_costs(color_folder):
    rows = rank_backbones(str(color_folder), "test_efficientnet,test_resnet", progress=False, **FAST)
    assert [r["rank"] for r in rows] == [1, 2]
    assert {r["backbone"] for r in rows} == {"test_efficientnet", "test_resnet"}
    accs = [r["expected_freeze_accuracy"] for r in rows]
    assert accs == sorted(accs, reverse=True) and all(0.0 <= a <= 1.0 for a in accs)
    for r in rows:
        assert r["ms_per_image"] > 0 and r["full_epoch_seconds"] >= r["freeze_epoch_seconds"]
        assert r["strategy"] in ("freeze", "partial", "full", "lp-ft")
    table = ranking_table(rows).splitlines()
    assert table[0].split()[:2] == ["rank", "backbone"] and rows[0]["backbone"] in table[1]


def test_one_weights_file_cannot_serve_several_backbones(color_folder, tmp_path):
    with pytest.raises(ConfigError, match="--weights holds one backbone's weights"):
        rank_backbones(str(color_folder), "test_resnet,test_efficientnet", progress=False,
                       weights=str(tmp_path / "w.safetensors"), image_size=32)


def test_fit_with_several_backbones_fits_the_best_ranked_and_records_the_ranking(color_folder, tmp_path):
    run = transferkit.fit(color_folder, backbone="test_efficientnet,test_resnet", epochs=1, patience=0,
                          out=tmp_path / "run", progress=False, **FAST)
    ranking = run.report["backbone_ranking"]
    assert run.report["backbone"] == ranking[0]["backbone"] == run.config.backbone
    assert [r["rank"] for r in ranking] == [1, 2]
