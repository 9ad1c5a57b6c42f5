"""What the text augmentation tests share: a sentence of ten distinct words and a synonym file."""
from __future__ import annotations

import pytest

WORDS = "alpha bravo charlie delta echo foxtrot golf hotel india juliet".split()
SENTENCE = " ".join(WORDS)
SEEDS = range(8)


def is_subsequence(short: list[str], long: list[str]) -> bool:
    remaining = iter(long)
    return all(word in remaining for word in short)


@pytest.fixture
def synonym_file(tmp_path):
    path = tmp_path / "synonyms.txt"
    path.write_text("# groups of synonyms\nalpha, first\nBravo\tsecond\tdeuxieme\n\nlonely\n", encoding="utf-8")
    return path
