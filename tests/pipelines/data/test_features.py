"""The frozen-feature cache: exact features, and the same model as training without it."""
from __future__ import annotations

import csv
import json

import pytest
import timm
import torch

from transferkit.augment.image import eval_transform
from transferkit.cli.main import main
from transferkit.pipelines.data.folders import scan_folder
from transferkit.pipelines.data.splits import read_split_csv
from transferkit.pipelines.evaluate.loading import load_model
from transferkit.pipelines.data.datasets import EpochSampler
from transferkit.pipelines.data.features import FeatureDataset, extract, head_matches, pre_logits
from transferkit.pipelines.data.images import load_rgb
from transferkit.pipelines.rundir import RunDir

FAST = ["--backbone", "test_resnet", "--image-size", "32", "--workers", "0", "--batch-size", "8",
        "--epochs", "4", "--patience", "0"]


def test_cached_features_equal_a_direct_forward_pass(color_folder):
    model = timm.create_model("test_resnet", num_classes=3).eval()
    samples = scan_folder(color_folder).splits["train"][:10]
    tf = eval_transform(32)
    cached = extract(model, samples, tf, batch_size=4, progress=False)
    assert cached.shape == (1, 10, model.num_features)
    with torch.inference_mode():
        direct = pre_logits(model, torch.stack([tf(load_rgb(s.path)) for s in samples]))
    torch.testing.assert_close(cached[0], direct, atol=1e-5, rtol=1e-5)
    assert head_matches(model, torch.stack([tf(load_rgb(s.path)) for s in samples[:2]]))


def test_view_sampler_visits_every_image_once_per_epoch_through_one_view():
    n, views = 7, 3
    ds = FeatureDataset(torch.arange(views * n * 2, dtype=torch.float32).reshape(views, n, 2), [0] * n)
    s = EpochSampler(n, seed=1, generator=torch.Generator(), views=views)
    flat = list(s)
    assert sorted(ds[i][2] for i in flat) == list(range(n))
    assert max(flat) < views * n
    s.set_epoch(1)
    assert list(s) != flat
    s.set_epoch(0)
    assert list(s) == flat


def _predictions(run, data, tmp_path, name):
    out = tmp_path / f"{name}.csv"
    assert main(["predict", str(run), str(data), "--out", str(out), "--top-k", "3"]) == 0
    with out.open() as f:
        return {r["path"]: r for r in csv.DictReader(f)}


def test_cached_freeze_checkpoint_predicts_like_its_uncached_twin(color_folder, weights, tmp_path):
    runs = {}
    for name, cache in (("cached", "1"), ("uncached", "0")):
        runs[name] = tmp_path / name
        # the same epochs of head training (sgd) on both sides: only where the features come from differs
        assert main(["fit", str(color_folder), "--weights", str(weights), "--finetune", "freeze", "--head-solver",
                     "sgd", "--augment", "none", "--cache-views", cache, "--out", str(runs[name]), *FAST]) == 0
    a = torch.load(runs["cached"] / "checkpoints/last.ckpt", weights_only=True)["state_dict"]
    b = torch.load(runs["uncached"] / "checkpoints/last.ckpt", weights_only=True)["state_dict"]
    assert a.keys() == b.keys() and any(k.startswith("model.layer1") for k in a)  # a whole model
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-5, rtol=1e-4, msg=k)
    pa = _predictions(runs["cached"], color_folder, tmp_path, "a")
    pb = _predictions(runs["uncached"], color_folder, tmp_path, "b")
    assert pa.keys() == pb.keys()
    for path in pa:
        assert pa[path]["label"] == pb[path]["label"]
        assert float(pa[path]["probability"]) == pytest.approx(float(pb[path]["probability"]), abs=1e-4)
    ra = json.loads((runs["cached"] / "report.json").read_text())
    rb = json.loads((runs["uncached"] / "report.json").read_text())
    assert ra["accuracy"] == rb["accuracy"]


def test_augmented_views_are_cached_beside_the_clean_one(color_folder, weights, tmp_path, monkeypatch):
    import transferkit.pipelines.train.recipe as fit_module

    made = []
    real = fit_module.extract

    def record(*args, **kwargs):
        features = real(*args, **kwargs)
        if kwargs.get("views", 1) > 1:
            made.append(features.clone())
        return features

    monkeypatch.setattr(fit_module, "extract", record)
    out = tmp_path / "run"
    assert main(["fit", str(color_folder), "--weights", str(weights), "--finetune", "freeze",
                 "--cache-views", "3", "--out", str(out), *FAST]) == 0
    (train,) = made
    assert train.shape[0] == 3 and train.shape[1] == len(scan_folder(color_folder).splits["train"]) * 4 // 5
    assert not torch.equal(train[1], train[0]) and not torch.equal(train[2], train[1])  # augmented draws
    # view 0 is the clean eval view: the same features a direct pass over the saved train split gives
    model, dc = load_model(RunDir(out))
    samples = read_split_csv(out / "splits/train.csv", json.loads((out / "classes.json").read_text()))
    tf = eval_transform(dc.input_size[1:], dc.mean, dc.std, dc.crop_pct, dc.interpolation)
    clean = extract(model, samples, tf, progress=False)[0]
    torch.testing.assert_close(train[0], clean, atol=1e-5, rtol=1e-5)


def test_lp_ft_probes_the_head_then_trains_every_group(color_folder, weights, tmp_path):
    out = tmp_path / "run"
    assert main(["fit", str(color_folder), "--weights", str(weights), "--finetune", "lp-ft",
                 "--out", str(out), *FAST]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["finetune"]["strategy"] == "lp-ft"
    state = torch.load(out / "checkpoints/last.ckpt", weights_only=True)["state_dict"]
    from safetensors.torch import load_file

    loaded = load_file(str(weights))
    changed = [k for k, v in loaded.items() if not k.startswith("fc.") and v.dtype.is_floating_point
               and not torch.equal(state["model." + k], v)]
    assert any(k.startswith("conv1") for k in changed) and any(k.startswith("layer4") for k in changed)


def test_advise_prints_a_strategy_with_reasons(color_folder, weights, capsys):
    assert main(["advise", str(color_folder), "--backbone", "test_resnet", "--weights", str(weights),
                 "--image-size", "32", "--json"]) == 0
    body = json.loads(capsys.readouterr().out)
    # 16 train images per class is "small" (below 20): freeze
    assert body["measurements"]["median_per_class"] == 16
    assert body["measurements"]["similarity"] >= 0.6
    assert body["strategy"] == "freeze" and body["trainable_groups"] == 0
    assert body["reasons"] and "images per class" in body["reasons"][0]
    assert {"probe", "logme", "bn_shift"} <= set(body["measurements"])
