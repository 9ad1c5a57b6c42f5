"""Text augmentation: word ops, synonyms, back-translation through a tiny local MarianMT."""
from __future__ import annotations

import random

import numpy as np
import pytest

from transferkit.augment.text import (
    augment_texts,
    augment_texts_with_ops,
    parse_ops,
)
from transferkit.errors import ConfigError

from _texts import SENTENCE
from _texts import synonym_file  # noqa: F401 - a fixture


# --------------------------------------------------------------------------- word ops

def test_same_seed_same_output_other_seed_other_output(synonym_file):
    texts = [SENTENCE, "kilo lima mike november oscar papa alpha bravo"]
    ops = "swap,delete,crop,synonym,insert"
    first = augment_texts(texts, ops, n=5, seed=1, synonyms=synonym_file, aug_p=0.3)
    assert augment_texts(texts, ops, n=5, seed=1, synonyms=synonym_file, aug_p=0.3) == first
    assert augment_texts(texts, ops, n=5, seed=2, synonyms=synonym_file, aug_p=0.3) != first


def test_augment_leaves_global_random_generators_as_they_were():
    random.seed(5)
    np.random.seed(5)
    expected = (random.random(), np.random.random())
    random.seed(5)
    np.random.seed(5)
    augment_texts([SENTENCE], "swap,delete", n=3, seed=0)
    assert (random.random(), np.random.random()) == expected


def test_ops_take_turns_across_variants():
    texts = [SENTENCE] * 3

    def names(n):
        return [[op for op, _ in row] for row in augment_texts_with_ops(texts, "swap,delete,crop", n=n)]

    assert names(1) == [["swap"], ["delete"], ["crop"]]
    assert names(2) == [["swap", "delete"], ["crop", "swap"], ["delete", "crop"]]
    assert [len(row) for row in augment_texts(texts, ["swap", "delete"], n=4)] == [4, 4, 4]


def test_parse_ops_and_unknown_op():
    assert parse_ops(" swap, Delete ,crop") == ["swap", "delete", "crop"]
    assert parse_ops(["swap,delete", "insert"]) == ["swap", "delete", "insert"]
    with pytest.raises(ConfigError) as info:
        parse_ops("swap,shuffle")
    assert str(info.value) == (
        "unknown text augmentation op(s) shuffle: choose from swap, delete, crop, synonym, "
        "insert, backtranslate (comma-separated)"
    )


def test_bad_options_are_config_errors():
    with pytest.raises(ConfigError, match="unknown text augmentation option.s. colour: valid options are"):
        augment_texts([SENTENCE], "swap", colour="red")
    with pytest.raises(ConfigError, match="aug_p=1.5"):
        augment_texts([SENTENCE], "swap", aug_p=1.5)
    with pytest.raises(ConfigError, match="n=0"):
        augment_texts([SENTENCE], "swap", n=0)
    # an option of an op that is not chosen is ignored, and None means the default
    assert len(augment_texts([SENTENCE], "swap", synonyms="unused.txt")[0]) == 1
    assert augment_texts([SENTENCE], "swap", aug_p=None, cache_path=None) == augment_texts([SENTENCE], "swap")


# --------------------------------------------------------------------------- synonym sources
