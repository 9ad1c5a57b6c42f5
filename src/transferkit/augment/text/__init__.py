"""Text augmentation: EDA-style word operations, synonyms and back-translation.

Each operation turns one text into a variant: ``swap`` (adjacent words), ``delete``
(random words), ``crop`` (a contiguous run of words), ``synonym`` (replace words by a
synonym), ``insert`` (insert a synonym of a random word at a random position) and
``backtranslate`` (source -> pivot language -> source through two MarianMT models).

Randomness: a variant's seed is derived from ``(seed, op, text index, variant index)``, so
a fixed seed reproduces the output whatever else runs. nlpaug draws from python's global
``random`` and numpy's global generator; here its draws are routed to a ``random.Random``
per call instead (see :class:`_OwnRandom`), so the global generators are neither used nor
changed. An op object holds its current generator: do not share one between threads.

Heavy dependencies load lazily: nlpaug when a word operation is built, nltk's WordNet when
synonyms come from it, transformers and sentencepiece (the ``text`` extra) for
back-translation.
"""
from __future__ import annotations


import inspect
import logging
from collections.abc import Sequence

from transferkit.errors import ConfigError

__all__ = ["BackTranslate", "DEFAULT_CACHE", "OPS", "RandomCrop", "RandomDelete", "RandomSwap", "SynonymInsert",
           "SynonymSubstitute", "SynonymTable", "TEXT_EXTRA_INSTALL", "TextOp", "TranslationCache", "WORDNET_INSTALL",
           "WordNetSynonyms", "augment_texts", "augment_texts_with_ops", "build_ops", "op_options", "parse_ops"]

log = logging.getLogger(__name__)

from transferkit.augment.text.backtranslate import BackTranslate, TranslationCache
from transferkit.augment.text.ops import DEFAULT_CACHE, TEXT_EXTRA_INSTALL, WORDNET_INSTALL, RandomCrop, RandomDelete, RandomSwap, TextOp
from transferkit.augment.text.synonyms import SynonymInsert, SynonymSubstitute, SynonymTable, WordNetSynonyms

log = logging.getLogger(__name__)

# --------------------------------------------------------------------------- registry

OPS: dict[str, type[TextOp]] = {
    op.name: op
    for op in (RandomSwap, RandomDelete, RandomCrop, SynonymSubstitute, SynonymInsert, BackTranslate)
}


def parse_ops(ops: str | Sequence[str]) -> list[str]:
    """``"swap,delete"`` or ``["swap", "delete"]`` -> validated op names, in order."""
    parts = [ops] if isinstance(ops, str) else list(ops)
    names = [name.strip().lower() for part in parts for name in part.split(",") if name.strip()]
    unknown = [name for name in names if name not in OPS]
    if unknown or not names:
        raise ConfigError(
            f"unknown text augmentation op(s) {', '.join(unknown) or repr(ops)}: "
            f"choose from {', '.join(OPS)} (comma-separated)"
        )
    return names


def op_options(name: str) -> list[str]:
    """The options op ``name`` accepts (its constructor's keywords)."""
    return [p for p in inspect.signature(OPS[name].__init__).parameters if p != "self"]


def build_ops(ops: str | Sequence[str], **options) -> list[TextOp]:
    """Build the named ops, giving each the options it accepts.

    An option no op knows is a ConfigError; one meant for an op that is not chosen (say
    ``synonyms`` with ``ops="swap"``) is logged and ignored, and None stands for the op's
    default, so a command line may pass all of its options as they are.
    """
    names = parse_ops(ops)
    options = {k: v for k, v in options.items() if v is not None}  # None means "the default"
    known = {option for name in OPS for option in op_options(name)}
    unknown = sorted(set(options) - known)
    if unknown:
        raise ConfigError(
            f"unknown text augmentation option(s) {', '.join(unknown)}: valid options are "
            f"{', '.join(sorted(known))}"
        )
    chosen = {option for name in names for option in op_options(name)}
    if ignored := sorted(k for k in options if k not in chosen):
        log.warning("options %s are not used by ops %s", ", ".join(ignored), ", ".join(names))
    built: dict[str, TextOp] = {}
    for name in dict.fromkeys(names):
        accepted = set(op_options(name))
        built[name] = OPS[name](**{k: v for k, v in options.items() if k in accepted})
    return [built[name] for name in names]


def augment_texts_with_ops(texts: Sequence[str], ops: str | Sequence[str], n: int = 1, seed: int = 0,
                           **op_options) -> list[list[tuple[str, str]]]:
    """Like :func:`augment_texts`, each variant paired with the name of the op that made it."""
    if n < 1:
        raise ConfigError(f"n={n} augmented variants per text cannot work: use n >= 1")
    built = build_ops(ops, **op_options)
    m = len(built)
    # variant j of text i uses op (i*n + j) mod m: every op gets an even share even when n < m
    plan = [[(i * n + j) % m for j in range(n)] for i in range(len(texts))]
    out: list[list[tuple[str, str] | None]] = [[None] * n for _ in texts]
    try:
        for k, op in enumerate(built):
            slots = [[j for j, choice in enumerate(row) if choice == k] for row in plan]
            if not any(slots):
                continue
            variants = op.augment_many(texts, [len(s) for s in slots], seed)
            for i, (row_slots, row_variants) in enumerate(zip(slots, variants)):
                for j, variant in zip(row_slots, row_variants):
                    out[i][j] = (op.name, variant)
    finally:
        for op in built:
            op.close()
    return out  # type: ignore[return-value]


def augment_texts(texts: list[str], ops: list[str] | str, n: int = 1, seed: int = 0,
                  **op_options) -> list[list[str]]:
    """``n`` augmented variants of each text.

    ``ops`` names the operations (``"swap,delete,synonym"``; see :data:`OPS`); the variants of
    all texts take the ops in turn, so each op makes about the same share. ``op_options`` go
    to the ops that accept them: ``aug_p``, ``aug_min``, ``aug_max``, ``stopwords`` (word
    ops), ``synonyms`` (a synonym file; WordNet when absent) and ``lang`` (synonym ops),
    ``pivot``, ``forward_model``, ``backward_model``, ``cache_path``, ``batch_size``,
    ``num_beams``, ``sampling``, ``max_length``, ``device`` (backtranslate).
    """
    return [[text for _, text in row] for row in augment_texts_with_ops(texts, ops, n, seed, **op_options)]
