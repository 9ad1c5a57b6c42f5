"""ImageDataset: a file that breaks after the scan is replaced and reported with its stage, or an error."""
from __future__ import annotations

import pytest

from transferkit.errors import DataError
from transferkit.pipelines.data.datasets import ImageDataset, Sample, drop_tiny_last
from transferkit.pipelines.data.failures import FailureLog


def test_training_replaces_a_broken_file_once_evaluation_names_it(color_folder, tmp_path, caplog):
    good = sorted((color_folder / "red").glob("*.png"))[:2]
    broken = tmp_path / "broken.png"
    broken.write_bytes(good[0].read_bytes()[:60])
    samples = [Sample(str(broken), 0), Sample(str(good[1]), 1)]
    failures = FailureLog(tmp_path / "failures")
    train = ImageDataset(samples, replace_failed=True, stage="validation", failures=failures)
    (_, label, index), again = train[0], train[0]
    assert (label, index) == (1, 1) and again[2] == 1  # the stand-in returns its own index
    assert caplog.text.count(f"could not read {broken} at validation") == 1  # reported once, not at every epoch
    [entry] = failures.entries()
    assert (entry.path, entry.stage) == (str(broken), "validation") and "truncated" in entry.reason
    with pytest.raises(DataError, match=f"{broken} could not be read"):
        ImageDataset(samples)[0]


def test_only_a_last_batch_of_one_is_dropped():
    assert drop_tiny_last(33, 32) and not drop_tiny_last(34, 32) and not drop_tiny_last(1, 32)


def test_a_balanced_sampler_draws_every_class_about_equally_and_repeats_per_epoch():
    import torch

    from transferkit.pipelines.data.datasets import EpochSampler

    labels = [0] * 190 + [1] * 10  # 19:1
    draws = list(EpochSampler(200, 7, torch.Generator(), 3, labels=labels))
    assert len(draws) == 200
    minority = sum(labels[i] == 1 for i in draws)
    assert 70 <= minority <= 130  # about half, where a shuffle gives exactly 10
    assert draws == list(EpochSampler(200, 7, torch.Generator(), 3, labels=labels))  # a function of (seed, epoch)
    assert draws != list(EpochSampler(200, 7, torch.Generator(), 4, labels=labels))
    ranks = [list(EpochSampler(200, 7, torch.Generator(), 3, labels=labels, rank=r, world=2)) for r in (0, 1)]
    assert sorted(ranks[0] + ranks[1]) == sorted(draws)  # two processes share one epoch's draws
