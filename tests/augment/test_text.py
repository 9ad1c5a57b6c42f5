"""Text augmentation: word ops, synonyms, back-translation through a tiny local MarianMT."""
from __future__ import annotations

import json
import random
import sqlite3
import sys

import numpy as np
import pytest

from transferkit.augment import text as tx
from transferkit.augment.text import synonyms as _synonyms  # noqa: F401 - tx.synonyms
from transferkit.augment.text import (
    BackTranslate,
    RandomCrop,
    RandomDelete,
    RandomSwap,
    SynonymInsert,
    SynonymSubstitute,
    SynonymTable,
    WordNetSynonyms,
    augment_texts,
    augment_texts_with_ops,
    parse_ops,
)
from transferkit.errors import ConfigError, MissingExtra

WORDS = "alpha bravo charlie delta echo foxtrot golf hotel india juliet".split()
SENTENCE = " ".join(WORDS)
SEEDS = range(8)


def _is_subsequence(short: list[str], long: list[str]) -> bool:
    remaining = iter(long)
    return all(word in remaining for word in short)


@pytest.fixture
def synonym_file(tmp_path):
    path = tmp_path / "synonyms.txt"
    path.write_text("# groups of synonyms\nalpha, first\nBravo\tsecond\tdeuxieme\n\nlonely\n", encoding="utf-8")
    return path


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
        assert _is_subsequence(out, WORDS)
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
        assert _is_subsequence(WORDS, out)
        extra = list(out)
        for word in WORDS:
            extra.remove(word)
        assert set(extra) <= {"first", "second", "deuxieme"}


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
    monkeypatch.setattr(tx.synonyms, "_load_wordnet", lambda lang: _FakeWordNet())
    text = "the car is fast"
    outs = {SynonymSubstitute(aug_p=0.25)(text, seed) for seed in range(12)}
    assert outs == {"the auto is fast", "the motor car is fast", "the railcar is fast", "the car is quick"}
    inserted = SynonymInsert(aug_p=0.25)(text, 0).split()
    assert len(inserted) == 5 and _is_subsequence(text.split(), inserted)


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


@pytest.mark.parametrize("module", ["transformers", "sentencepiece"])
def test_missing_text_extra_for_backtranslation(monkeypatch, tmp_path, module):
    monkeypatch.setitem(sys.modules, module, None)
    with pytest.raises(MissingExtra) as info:
        augment_texts([SENTENCE], "backtranslate", cache_path=tmp_path / "cache.sqlite")
    assert str(info.value) == (
        f"back-translation needs {module}, which is not installed: pip install 'transferkit[text]'"
    )


# --------------------------------------------------------------------------- back-translation

CORPUS = ["the cat sat on the mat", "a dog runs in the park", "free entry to win a prize now",
          "call me later tonight please"]


@pytest.fixture(scope="module")
def tiny_marian(tmp_path_factory):
    """A MarianMT model and tokenizer with random weights, saved locally: garbage, but real."""
    pytest.importorskip("transformers")
    spm = pytest.importorskip("sentencepiece")
    import shutil

    import torch
    from transformers import MarianConfig, MarianMTModel, MarianTokenizer

    root = tmp_path_factory.mktemp("marian")
    spm.SentencePieceTrainer.train(sentence_iterator=iter(CORPUS * 4), model_prefix=str(root / "sp"),
                                   vocab_size=40, hard_vocab_limit=False, minloglevel=2)
    processor = spm.SentencePieceProcessor(model_file=str(root / "sp.model"))
    pieces = [processor.id_to_piece(i) for i in range(processor.get_piece_size())]
    vocab = {piece: i for i, piece in enumerate(
        ["</s>", "<unk>"] + [p for p in pieces if p not in ("<unk>", "<s>", "</s>")] + ["<pad>"])}
    (root / "vocab.json").write_text(json.dumps(vocab))
    for name in ("source.spm", "target.spm"):
        shutil.copy(root / "sp.model", root / name)
    folder = root / "opus-mt-tiny"
    MarianTokenizer(str(root / "source.spm"), str(root / "target.spm"), str(root / "vocab.json")
                    ).save_pretrained(folder)
    config = MarianConfig(
        vocab_size=len(vocab), d_model=16, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2,
        decoder_attention_heads=2, encoder_ffn_dim=32, decoder_ffn_dim=32, max_position_embeddings=64,
        pad_token_id=vocab["<pad>"], eos_token_id=vocab["</s>"], decoder_start_token_id=vocab["<pad>"],
    )
    torch.manual_seed(0)
    MarianMTModel(config).save_pretrained(folder)
    return folder


@pytest.fixture
def count_generate(monkeypatch):
    from transformers import MarianMTModel

    calls: list[int] = []
    original = MarianMTModel.generate

    def counting(self, *args, **kwargs):
        calls.append(len(kwargs["input_ids"]))
        return original(self, *args, **kwargs)

    monkeypatch.setattr(MarianMTModel, "generate", counting)
    return calls


def test_backtranslation_runs_offline_and_second_call_is_served_from_cache(
        tiny_marian, tmp_path, count_generate, monkeypatch):
    cache = tmp_path / "bt.sqlite"
    options = dict(forward_model=str(tiny_marian), backward_model=str(tiny_marian), cache_path=cache,
                   max_length=8, batch_size=2)
    texts = [CORPUS[0], CORPUS[1], CORPUS[0], ""]
    first = augment_texts(texts, "backtranslate", n=2, **options)

    assert [len(row) for row in first] == [2, 2, 2, 2]
    assert all(isinstance(t, str) for row in first for t in row)
    assert first[0] == first[2]  # a repeated sentence is translated once
    assert first[3] == ["", ""]
    assert sum(count_generate) >= 2  # two distinct sentences went forward
    rows = sqlite3.connect(cache).execute("SELECT COUNT(*) FROM translations").fetchone()[0]
    assert rows >= 3  # 2 forward entries + their distinct pivots backward

    count_generate.clear()
    # a full cache hit neither loads the models nor generates
    from transformers import AutoModelForSeq2SeqLM

    def no_loading(*args, **kwargs):
        raise AssertionError("model loaded although every translation is cached")

    monkeypatch.setattr(AutoModelForSeq2SeqLM, "from_pretrained", no_loading)
    assert augment_texts(texts, "backtranslate", n=2, **options) == first
    assert count_generate == []


def test_backtranslation_translates_only_new_sentences(tiny_marian, tmp_path, count_generate):
    op = BackTranslate(forward_model=str(tiny_marian), backward_model=str(tiny_marian),
                       cache_path=tmp_path / "bt.sqlite", max_length=8)
    op.translate([CORPUS[0], CORPUS[1]], op.forward_model)
    assert count_generate == [2]
    op.translate([CORPUS[1], CORPUS[2], CORPUS[2]], op.forward_model)
    assert count_generate == [2, 1]
    op.close()


def test_backtranslation_sampling_is_seeded(tiny_marian, tmp_path):
    options = dict(forward_model=str(tiny_marian), backward_model=str(tiny_marian), max_length=8,
                   sampling=True)
    a = augment_texts(CORPUS, "backtranslate", n=2, seed=3, cache_path=tmp_path / "a.sqlite", **options)
    b = augment_texts(CORPUS, "backtranslate", n=2, seed=3, cache_path=tmp_path / "b.sqlite", **options)
    assert a == b


def test_unavailable_translation_models_name_the_model(tmp_path, monkeypatch):
    pytest.importorskip("transformers")
    missing = tmp_path / "no-such-model"
    with pytest.raises(ConfigError, match=f"translation model folder {missing} does not exist"):
        augment_texts([SENTENCE], "backtranslate", forward_model=str(missing), cache_path=tmp_path / "c.sqlite")

    from transformers import AutoTokenizer

    def offline(name, *args, **kwargs):
        raise OSError("We couldn't connect to 'https://huggingface.co'")

    monkeypatch.setattr(AutoTokenizer, "from_pretrained", offline)
    with pytest.raises(ConfigError) as info:
        augment_texts([SENTENCE], "backtranslate", pivot="fr", cache_path=tmp_path / "c.sqlite")
    assert str(info.value).startswith(
        "cannot load translation model Helsinki-NLP/opus-mt-en-fr (it is not in the local Hugging Face "
        "cache and cannot be downloaded here): pass a local folder"
    )


def test_a_file_that_is_not_a_cache_is_a_config_error(tmp_path):
    pytest.importorskip("transformers")
    bad = tmp_path / "cache.sqlite"
    bad.write_bytes(b"not a database, just bytes" * 100)
    with pytest.raises(ConfigError, match="is not a translation cache"):
        BackTranslate(cache_path=bad)
