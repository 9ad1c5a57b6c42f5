"""The fine-tuning advisor: probes and LogME on synthetic features, BatchNorm shift, the one pass
over a tiny timm model, and the decision (the size decides; the rest is reported)."""
from __future__ import annotations

import importlib.util
import json
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from PIL import Image
from scipy.optimize import minimize
from scipy.stats import multivariate_normal
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from transferkit.backbones.advisor import (
    FREEZE_HEAD_LR, PARTIAL_HEAD_LR, THRESHOLDS, Measurements, Thresholds, bn_shift, decide,
    extract_features, logme, measure, measure_with_features, probe_accuracy, stage_probe)
from transferkit.errors import BackboneError, DataError

SHARED = Path(__file__).resolve().parents[2] / ".." / "shared"


def noisy_one_hot(noise: float, *, n=300, classes=3, dim=16, seed=0):
    """One-hot labels in a random rotation of `dim` dimensions, plus Gaussian noise."""
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % classes
    base = np.zeros((n, dim))
    base[np.arange(n), labels] = 1.0
    rotation = np.linalg.qr(rng.normal(size=(dim, dim)))[0]
    return (base + noise * rng.normal(size=(n, dim))) @ rotation, labels


# --- LogME -------------------------------------------------------------------------------------

def test_logme_falls_as_noise_rises_and_random_features_score_lowest():
    scores = [logme(*noisy_one_hot(s)) for s in (0.05, 0.2, 0.5, 1.0, 2.0)]
    assert all(a > b for a, b in zip(scores, scores[1:])), scores
    rng = np.random.default_rng(1)
    _, labels = noisy_one_hot(0.0)
    random_score = logme(rng.normal(size=(300, 16)), labels)
    assert random_score < min(scores)
    assert scores[0] > 1.0 and random_score < -0.5  # clean features fit far better than noise


def test_logme_ignores_global_feature_scale():
    features, labels = noisy_one_hot(0.5)
    assert logme(features * 1000.0, labels) == pytest.approx(logme(features, labels), abs=1e-6)


def test_logme_is_the_maximised_evidence_of_a_bayesian_linear_model():
    # Brute force: y ~ N(0, F F^T / alpha + I / beta), maximised over (alpha, beta) numerically,
    # averaged over the one-hot columns, per image.
    features, labels = noisy_one_hot(0.7, n=40, classes=2, dim=5, seed=3)
    n = len(labels)
    evidences = []
    for c in (0, 1):
        y = (labels == c).astype(float)

        def negative(log_ab):
            alpha, beta = np.exp(log_ab)
            cov = features @ features.T / alpha + np.eye(n) / beta
            return -multivariate_normal(np.zeros(n), cov).logpdf(y)

        best = minimize(negative, x0=np.zeros(2), method="Nelder-Mead", options={"xatol": 1e-8, "fatol": 1e-10})
        evidences.append(-best.fun / n)
    assert logme(features, labels) == pytest.approx(np.mean(evidences), abs=1e-4)


# --- probes ------------------------------------------------------------------------------------

def test_probe_is_near_perfect_on_separable_features():
    features, labels = noisy_one_hot(0.1, n=150)
    p = probe_accuracy(features, labels)
    assert p["logreg"] >= 0.98 and p["knn"] >= 0.98
    assert p["chance"] == pytest.approx(1 / 3)
    assert p["relative"]["logreg"] == pytest.approx(p["logreg"] - 1 / 3)
    assert p["normalized"]["logreg"] >= 0.97
    assert p["folds"] == 5 and p["images"] == 150 and p["dropped"] == 0


def test_probe_is_near_chance_on_random_features():
    rng = np.random.default_rng(0)
    labels = np.arange(300) % 3
    p = probe_accuracy(rng.normal(size=(300, 20)), labels)
    for name in ("logreg", "knn"):
        assert abs(p[name] - 1 / 3) < 0.1, p
        assert abs(p["normalized"][name]) < 0.15, p


def test_probe_chance_is_the_majority_share():
    features, labels = noisy_one_hot(0.1, n=100, classes=2)
    labels = np.r_[np.zeros(80, int), np.ones(20, int)]
    assert probe_accuracy(features, labels)["chance"] == pytest.approx(0.8)


def test_probe_handles_classes_with_one_or_two_images():
    features, labels = noisy_one_hot(0.1, n=30, classes=3)
    # Class 1 keeps two images, class 2 one: that one is left out, folds drop to 2.
    keep = np.r_[np.flatnonzero(labels == 0), np.flatnonzero(labels == 1)[:2], np.flatnonzero(labels == 2)[:1]]
    p = probe_accuracy(features[keep], labels[keep])
    assert p["dropped"] == 1 and p["folds"] == 2 and p["images"] == 12
    assert p["logreg"] is not None
    only_singletons = probe_accuracy(features[:3], labels[:3])
    assert only_singletons["logreg"] is None and only_singletons["dropped"] == 3


# --- the decision, from hand-made measurements --------------------------------------------------

def made(per_class, acc, chance=0.5, *, bn=None, stages=None, classes=2):
    counts = {c: per_class for c in range(classes)}
    gain = acc - chance
    probe = {"logreg": acc, "knn": acc, "chance": chance, "relative": {"logreg": gain, "knn": gain},
             "normalized": {"logreg": gain / (1 - chance), "knn": gain / (1 - chance)},
             "folds": 5, "images": per_class * classes, "dropped": 0}
    return Measurements(class_counts=counts, probe=probe, logme=-0.3, bn_shift=bn, stage_accuracy=stages,
                        feature_dim=256)


def test_small_data_freezes_and_says_why_with_numbers():
    advice = decide(made(12, 0.86), num_groups=6)
    assert (advice.strategy, advice.trainable_groups, advice.lr) == ("freeze", 0, FREEZE_HEAD_LR)
    text = "\n".join(advice.reasons)
    assert "12 images per class" in text and "< 20: small" in text and "0.36 above chance 0.50" in text
    assert "normalised 0.72" in text and "small -> freeze" in text
    assert advice.measurements is not None and advice.measurements.num_images == 24


def test_large_data_trains_the_top_third_and_names_the_groups():
    labels = [f"g{i}" for i in range(9)]
    advice = decide(made(800, 0.95), num_groups=9, group_labels=labels)
    assert (advice.strategy, advice.trainable_groups, advice.lr) == ("partial", 3, PARTIAL_HEAD_LR)
    assert "800 images per class" in advice.reasons[0] and "large" in advice.reasons[0]
    assert advice.reasons[-1].startswith("large -> partial: adapt the top 3 of 9 groups (g6, g7, g8)")


@pytest.mark.parametrize("acc, bn", [(0.95, 0.01), (0.60, 0.3), (0.72, None)])
def test_similarity_is_reported_but_the_size_decides(acc, bn):
    # In the grid no similarity threshold picked better than size alone on held-out datasets.
    stages = {"s0": 0.60, "s1": 0.75, "final": acc}
    small = decide(made(12, acc, bn=bn, stages=stages), num_groups=6)
    large = decide(made(300, acc, bn=bn, stages=stages), num_groups=6)
    assert (small.strategy, large.strategy) == ("freeze", "partial")
    assert any(f"normalised {2 * acc - 1:.2f}" in r for r in large.reasons)
    noted = any("stage s1 probes 0.75" in r for r in large.reasons)
    assert noted == (acc < 0.75)  # a better earlier stage is reported only when there is one


def test_a_model_with_groups_but_no_labels_still_partials():
    with pytest.raises(ValueError, match="group labels"):
        decide(made(40, 0.62), num_groups=4, group_labels=("a", "b", "c", "d", "e"))
    assert decide(made(40, 0.62), num_groups=1).trainable_groups == 1


def test_thresholds_are_a_parameter_and_the_reasons_quote_the_ones_used():
    m = made(80, 0.95)
    assert decide(m, num_groups=6).strategy == "partial"  # 80 >= the shipped 20
    strict = Thresholds(large_per_class=100)
    advice = decide(m, num_groups=6, thresholds=strict)
    assert advice.strategy == "freeze" and "80 images per class" in advice.reasons[0] and "< 100:" in advice.reasons[0]
    assert advice.margins["size"] == pytest.approx(-0.2)
    assert THRESHOLDS == Thresholds() and strict.describe() == "large >= 100/class"


def test_measurements_round_trip_through_their_dict():
    m = made(40, 0.62, bn=0.07, stages={"s0": 0.6, "final": 0.62}, classes=3)
    back = Measurements.from_dict(json.loads(json.dumps(m.to_dict())))
    assert back == m
    assert decide(back, num_groups=6).to_dict() == decide(m, num_groups=6).to_dict()


def test_too_few_images_to_probe_freezes():
    m = made(1, 0.5)
    m.probe.update(logreg=None, knn=None, chance=None, relative={}, normalized={}, folds=0, dropped=2)
    advice = decide(m, num_groups=5)
    assert advice.strategy == "freeze" and "similarity unmeasured" in advice.reasons[1]


def test_advice_serialises_and_summarises():
    advice = decide(made(8, 0.86, bn=0.02, stages={"s0": 0.7, "final": 0.86}), num_groups=6)
    data = json.loads(json.dumps(advice.to_dict()))
    assert data["strategy"] == "freeze" and data["measurements"]["median_per_class"] == 8
    assert data["measurements"]["class_counts"] == {"0": 8, "1": 8}
    lines = advice.summary().splitlines()
    assert lines[0] == "advice: freeze (backbone frozen), head lr 0.01"
    assert lines[1:-2] == [f"  - {r}" for r in advice.reasons]
    assert lines[-2].startswith("  - expected freeze accuracy ")
    assert advice.reasons[-1].startswith("small -> freeze")
    assert lines[-1] == "  - margins past the thresholds: size -0.60; no threshold is close"
    assert data["margins"] == {"size": pytest.approx(-0.6)} and data["runner_up"] is None


def test_a_close_call_names_the_runner_up():
    close = decide(made(18, 0.95), num_groups=6)  # 18 per class: just under the size threshold of 20
    assert close.strategy == "freeze" and close.runner_up == "partial"
    assert close.margins["size"] == pytest.approx(-0.1)
    assert "a close call: the runner-up is partial" in close.summary()
    assert decide(made(22, 0.95), num_groups=6).runner_up == "freeze"
    far = decide(made(500, 0.95), num_groups=6)
    assert far.strategy == "partial" and far.runner_up is None


def test_decide_rejects_a_model_without_groups():
    with pytest.raises(ValueError, match="num_groups"):
        decide(made(31, 0.86), num_groups=0)


# --- the pass over a tiny timm model ------------------------------------------------------------

def colour_batches(n_per_class=12, size=32, seed=0, batch_size=8):
    """Images whose class is their mean colour (an easy task), as a DataLoader."""
    g = torch.Generator().manual_seed(seed)
    means = torch.tensor([[0.8, -0.5, -0.5], [-0.5, 0.8, -0.5], [-0.5, -0.5, 0.8]])
    images = torch.cat([m.view(1, 3, 1, 1) + 0.3 * torch.randn(n_per_class, 3, size, size, generator=g)
                        for m in means])
    labels = torch.arange(3).repeat_interleave(n_per_class)
    return DataLoader(TensorDataset(images, labels), batch_size=batch_size)


@pytest.fixture(scope="module")
def resnet():
    torch.manual_seed(0)
    return timm.create_model("test_resnet", pretrained=False, num_classes=3)


def test_extract_features_pools_pre_logits_and_restores_the_mode(resnet):
    resnet.train()
    features, labels = extract_features(resnet, colour_batches(), progress=True)
    assert features.shape == (36, resnet.num_features) and features.dtype == np.float32
    assert labels.tolist() == [0] * 12 + [1] * 12 + [2] * 12
    assert resnet.training
    again, _ = extract_features(resnet, colour_batches(), progress=False)
    np.testing.assert_allclose(features, again, rtol=1e-5, atol=1e-6)  # eval mode: deterministic


def test_stage_probe_names_timm_stages(resnet):
    acc = stage_probe(resnet, colour_batches(), progress=False)
    assert list(acc) == [d["module"] for d in resnet.feature_info] + ["final"]
    assert all(0.0 <= a <= 1.0 for a in acc.values())
    assert acc["act1"] >= 0.9  # colour is visible right after the stem


def calibrated(model, images):
    """Running BatchNorm statistics set from exactly these images (cumulative average, one batch)."""
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.reset_running_stats()
            m.momentum = None
    model.train()
    with torch.no_grad():
        model(images)
    return model.eval()


def test_bn_shift_is_zero_on_the_calibration_data_and_grows_with_a_shift():
    torch.manual_seed(0)
    model = timm.create_model("test_resnet", pretrained=False, num_classes=3)
    loader = colour_batches()
    images = loader.dataset.tensors[0]
    calibrated(model, images)
    same = bn_shift(model, loader)
    assert same == pytest.approx(0.0, abs=1e-3)
    shifted = DataLoader(TensorDataset(images * 3 + 2, loader.dataset.tensors[1]), batch_size=8)
    far = bn_shift(model, shifted)
    assert far > 0.05 and far > 50 * max(same, 1e-6)
    assert bn_shift(model, shifted, max_batches=1) > 0.05


def test_bn_shift_is_none_without_batchnorm():
    vit = timm.create_model("test_vit", pretrained=False, num_classes=3, img_size=32)
    assert bn_shift(vit, colour_batches()) is None


def test_measure_records_everything_in_one_pass(resnet):
    m, feats, labels = measure_with_features(resnet, colour_batches(), progress=False)
    assert m.class_counts == {0: 12, 1: 12, 2: 12} and m.num_images == 36
    assert m.smallest_class == 12 and m.median_per_class == 12
    assert m.feature_dim == resnet.num_features
    assert m.probe["folds"] == 5 and m.probe["chance"] == pytest.approx(1 / 3)
    assert m.bn_shift is not None and 0.0 <= m.bn_shift <= 1.0
    assert m.logme == pytest.approx(logme(feats, labels), rel=1e-6)  # the score of the pass's own features
    assert set(m.stage_accuracy) == {d["module"] for d in resnet.feature_info} | {"final"}
    assert m.stage_accuracy["final"] == m.probe["logreg"]
    json.dumps(m.to_dict())
    assert measure(resnet, colour_batches(), stages=None, progress=False).stage_accuracy is None
    assert list(measure(resnet, colour_batches(), stages=[0], progress=False).stage_accuracy) == ["act1", "final"]


def test_measure_refuses_one_class_and_an_empty_loader(resnet):
    one = DataLoader(TensorDataset(torch.randn(4, 3, 32, 32), torch.zeros(4, dtype=torch.long)), batch_size=2)
    with pytest.raises(DataError, match="at least 2 classes"):
        measure(resnet, one, progress=False)
    empty = DataLoader(TensorDataset(torch.empty(0, 3, 32, 32), torch.empty(0, dtype=torch.long)), batch_size=2)
    with pytest.raises(DataError, match="no images"):
        measure(resnet, empty, progress=False)


def test_measure_refuses_a_model_that_is_not_timm():
    with pytest.raises(BackboneError, match="timm model"):
        measure(nn.Sequential(nn.Flatten(), nn.Linear(3 * 32 * 32, 3)), colour_batches(), progress=False)


# --- real data: ../shared ------------------------------------------------------------------------

def rgb(path):
    return Image.open(path).convert("RGB")  # one training image is palette-mode


def real_backbone():
    path = SHARED / "weights" / "mobilenetv1_025.py"
    if not path.exists():
        pytest.skip("../shared is absent")
    if "mobilenetv1_025" not in sys.modules:
        spec = importlib.util.spec_from_file_location("mobilenetv1_025", path)
        module = importlib.util.module_from_spec(spec)
        sys.modules["mobilenetv1_025"] = module
        spec.loader.exec_module(module)
    model = timm.create_model("mobilenetv1_025", pretrained=True, num_classes=0)
    transform = timm.data.create_transform(**timm.data.resolve_data_config({}, model=model))
    return model, transform


@pytest.mark.real
@pytest.mark.slow
def test_real_hymenoptera_is_similar_and_measured_within_a_minute():
    from torchvision.datasets import ImageFolder

    model, transform = real_backbone()
    data = ImageFolder(str(SHARED / "data" / "hymenoptera" / "train"), transform=transform, loader=rgb)
    start = time.perf_counter()
    m = measure(model, DataLoader(data, batch_size=32, num_workers=2), progress=False)
    seconds = time.perf_counter() - start
    print(f"hymenoptera: {seconds:.1f} s", json.dumps(m.to_dict()))
    assert seconds < 60
    assert m.probe["logreg"] > 0.8 and m.similarity > 0.6
    assert decide(m, num_groups=7).strategy == "partial"  # 122 per class: large


@pytest.mark.real
@pytest.mark.slow
def test_real_breastmnist_is_further_from_imagenet_than_hymenoptera():
    path = SHARED / "data" / "breastmnist.npz"
    if not path.exists():
        pytest.skip("../shared is absent")
    model, transform = real_backbone()
    arrays = np.load(path)
    images = torch.stack([transform(Image.fromarray(a).convert("RGB")) for a in arrays["train_images"]])
    labels = torch.as_tensor(arrays["train_labels"].reshape(-1)).long()
    m = measure(model, DataLoader(TensorDataset(images, labels), batch_size=64), progress=False)
    print("breastmnist:", json.dumps(m.to_dict()))
    assert m.similarity < 0.5 and m.bn_shift > 0.05
    assert decide(m, num_groups=7).strategy == "partial"  # 273 per class: large
