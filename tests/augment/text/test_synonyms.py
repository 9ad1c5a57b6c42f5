"""Synonyms from a file or WordNet, and the ops that use them."""
from __future__ import annotations

import sys

import pytest

from transferkit.augment.text import synonyms as tx_synonyms
from transferkit.augment.text import (
    SynonymInsert,
    SynonymSubstitute,
    SynonymTable,
    WordNetSynonyms,
)
from transferkit.errors import ConfigError, MissingExtra

from _texts import SEEDS, SENTENCE, WORDS, is_subsequence
from _texts import synonym_file  # noqa: F401 - a fixture


# --------------------------------------------------------------------------- word ops

def test_synonym_replaces_a_word_by_one_of_its_group(synonym_file):
    op = SynonymSubstitute(synonyms=synonym_file, aug_p=0.1)
    seen = set()
    for seed in SEEDS:
        out = op(SENTENCE, seed).split()
        changed = [(i, word) for i, (word, old) in enumerate(zip(out, WORDS)) if word != old]
        assert len(out) == len(WORDS) and len(changed) == 1
        index, word = changed[0]
        assert (index, word) in {(0, "first"), (1, "second"), (1, "deuxieme")}
        seen.add(word)
    assert len(seen) > 1


def test_synonym_leaves_a_text_without_synonyms_unchanged(synonym_file):
    assert SynonymSubstitute(synonyms=synonym_file)("charlie delta echo", 0) == "charlie delta echo"


def test_insert_adds_synonyms_and_keeps_the_original_words_in_order(synonym_file):
    op = SynonymInsert(synonyms=synonym_file, aug_p=0.2)
    for seed in SEEDS:
        out = op(SENTENCE, seed).split()
        assert len(out) == 12
        assert is_subsequence(WORDS, out)
        extra = list(out)
        for word in WORDS:
            extra.remove(word)
        assert set(extra) <= {"first", "second", "deuxieme"}


def test_synonym_file_format(synonym_file):
    table = SynonymTable.from_file(synonym_file)
    assert table("BRAVO") == ["second", "deuxieme"]
    assert table("deuxieme") == ["bravo", "second"]
    assert table("lonely") == [] and table("zulu") == []
    assert SynonymTable([["big", "large"], ["big", "huge", "large"]])("big") == ["large", "huge"]


def test_bad_synonym_files(tmp_path):
    with pytest.raises(ConfigError, match="cannot read synonym file .*missing.txt"):
        SynonymTable.from_file(tmp_path / "missing.txt")
    (tmp_path / "single.txt").write_text("one\ntwo\n")
    with pytest.raises(ConfigError, match="holds no group of two or more words"):
        SynonymTable.from_file(tmp_path / "single.txt")


class _FakeSynset:
    def __init__(self, *names):
        self.names = names

    def lemma_names(self, lang="eng"):
        return list(self.names)


class _FakeWordNet:
    """Answers like nltk's wordnet reader for a few words."""

    synsets_of = {
        "car": [_FakeSynset("car", "auto", "motor_car"), _FakeSynset("car", "railcar")],
        "fast": [_FakeSynset("fast", "quick")],
    }

    def synsets(self, word, lang="eng"):
        return self.synsets_of.get(word.lower(), [])


def test_wordnet_lookup_dedupes_and_spells_multiword_lemmas_with_spaces():
    wordnet = WordNetSynonyms(reader=_FakeWordNet())
    assert wordnet("car") == ["auto", "motor car", "railcar"]
    assert wordnet("Car") == ["auto", "motor car", "railcar"]
    assert wordnet("zebra") == []


def test_synonym_ops_use_wordnet_without_a_file(monkeypatch):
    monkeypatch.setattr(tx_synonyms, "_load_wordnet", lambda lang: _FakeWordNet())
    text = "the car is fast"
    outs = {SynonymSubstitute(aug_p=0.25)(text, seed) for seed in range(12)}
    assert outs == {"the auto is fast", "the motor car is fast", "the railcar is fast", "the car is quick"}
    inserted = SynonymInsert(aug_p=0.25)(text, 0).split()
    assert len(inserted) == 5 and is_subsequence(text.split(), inserted)


def test_missing_wordnet_data_says_how_to_install_it(monkeypatch, tmp_path):
    nltk = pytest.importorskip("nltk")
    monkeypatch.setattr(nltk.data, "path", [str(tmp_path)])
    with pytest.raises(MissingExtra) as info:
        SynonymSubstitute()
    assert "`python -m nltk.downloader wordnet omw-1.4`" in str(info.value)
    assert "synonym file" in str(info.value)


def test_missing_nltk_says_how_to_install_it(monkeypatch):
    monkeypatch.setitem(sys.modules, "nltk", None)
    with pytest.raises(MissingExtra, match="WordNet synonyms needs nltk, which is not installed: "
                                           r"pip install 'transferkit\[text\]'"):
        SynonymInsert()
