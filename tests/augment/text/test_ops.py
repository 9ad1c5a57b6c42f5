"""Word operations: swap, delete and crop keep what they promise."""
from __future__ import annotations

import random

from transferkit.augment.text import RandomCrop, RandomDelete, RandomSwap

from _texts import SEEDS, SENTENCE, WORDS, is_subsequence


# --------------------------------------------------------------------------- word ops

def test_swap_keeps_the_words_and_moves_three_of_ten():
    op = RandomSwap(aug_p=0.3)
    # nlpaug capitalises a word swapped into first place
    outputs = [op(SENTENCE, seed).lower().split() for seed in SEEDS]
    for out in outputs:
        assert sorted(out) == sorted(WORDS)
        assert out != WORDS
        # three swaps of neighbours move at most 6 words
        assert 2 <= sum(a != b for a, b in zip(out, WORDS)) <= 6
    assert len({tuple(out) for out in outputs}) > 1


def test_delete_removes_three_of_ten_words_and_keeps_order():
    op = RandomDelete(aug_p=0.3)
    outputs = [op(SENTENCE, seed).split() for seed in SEEDS]
    for out in outputs:
        # nlpaug keeps the second word when it deletes the first two (capitalisation fix-up)
        assert 7 <= len(out) <= 9
        assert is_subsequence(out, WORDS)
    assert sum(len(out) == 7 for out in outputs) >= len(outputs) // 2
    assert len({tuple(out) for out in outputs}) > 1


def test_crop_removes_one_contiguous_run():
    op = RandomCrop(aug_p=0.3)
    starts = set()
    for seed in SEEDS:
        out = op(SENTENCE, seed).split()
        start = next(i for i, (a, b) in enumerate(zip(out + [None], WORDS)) if a != b)
        assert out == WORDS[:start] + WORDS[start + 3:]
        starts.add(start)
    assert len(starts) > 1


def test_crop_of_one_word_works_on_short_texts_and_keeps_a_word():
    op = RandomCrop()  # aug_p=0.1 on 4 tokens: a run of one word
    outs = {op("hello there my friend", seed) for seed in range(20)}
    assert outs == {"there my friend", "hello my friend", "hello there friend", "hello there my"}
    assert op("hello", 0) == "hello"


def test_crop_keeps_a_sentence_capitalised():
    outs = {RandomCrop(aug_p=0.5)("Alpha bravo charlie delta", random.Random(seed)) for seed in SEEDS}
    assert "Charlie delta" in outs
    assert all(out[0].isupper() for out in outs)
