"""Back-translation offline with a tiny MarianMT built here, and its cache."""
from __future__ import annotations

import json
import sqlite3
import sys

import pytest

from transferkit.augment.text import (
    BackTranslate,
    augment_texts,
)
from transferkit.errors import ConfigError, MissingExtra

from _texts import SENTENCE


@pytest.mark.parametrize("module", ["transformers", "sentencepiece"])
def test_missing_text_extra_for_backtranslation(monkeypatch, tmp_path, module):
    # transformers caches at its first import which backends exist: let it see the real ones first,
    # so that hiding one here does not leave MarianTokenizer broken for the tests after this one
    pytest.importorskip("transformers").utils.import_utils.is_sentencepiece_available()
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
