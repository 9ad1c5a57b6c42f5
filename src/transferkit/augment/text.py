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

import abc

import functools
import importlib
import inspect
import json
import logging
import math
import random
import sqlite3
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import ClassVar

from transferkit.errors import ConfigError, MissingExtra

log = logging.getLogger(__name__)

TEXT_EXTRA_INSTALL = "pip install 'transferkit[text]'"
WORDNET_INSTALL = "python -m nltk.downloader wordnet omw-1.4"
DEFAULT_CACHE = Path("~/.cache/transferkit/backtranslation.sqlite")


def _require(module: str, what: str):
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise MissingExtra(
            f"{what} needs {module}, which is not installed: {TEXT_EXTRA_INSTALL}"
        ) from exc


class _OwnRandom:
    """Mixin for nlpaug augmenters: their draws come from ``self.rng``, not global generators.

    nlpaug 1.1.11 draws every random number through ``Augmenter.sample`` and ``prob``, which
    use python's global ``random`` and numpy's global generator; overriding the two makes
    a seed reproduce the output without touching the caller's global state.
    """

    rng: random.Random

    def sample(self, x, num=None):
        if isinstance(x, list):
            return self.rng.sample(x, num)
        return self.rng.randint(1, x - 2)  # as np.random.randint(1, x - 1): high excluded

    def prob(self):
        return self.rng.random()


@functools.lru_cache(maxsize=None)
def _own_random(aug_class: type) -> type:
    return type(aug_class.__name__, (_OwnRandom, aug_class), {})


# --------------------------------------------------------------------------- synonyms

class SynonymTable:
    """Synonyms from a text file: one group of mutual synonyms per line.

    Words in a group are separated by tabs, or by commas when the line has no tab; blank
    lines and lines starting with ``#`` are ignored; matching is case-insensitive and a word
    may belong to several groups. Example::

        happy, glad, cheerful
        big\tlarge\thuge
    """

    def __init__(self, groups: Sequence[Sequence[str]]):
        table: dict[str, dict[str, None]] = {}
        for group in groups:
            words = [w.strip().lower() for w in group if w.strip()]
            for word in words:
                # dicts, not sets: candidate order must not depend on PYTHONHASHSEED
                table.setdefault(word, {}).update(dict.fromkeys(w for w in words if w != word))
        self._table = {word: list(others) for word, others in table.items() if others}

    @classmethod
    def from_file(cls, path: str | Path) -> SynonymTable:
        path = Path(path).expanduser()
        try:
            lines = path.read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(
                f"cannot read synonym file {path} ({exc.__class__.__name__}): pass a UTF-8 text "
                "file with one comma- or tab-separated group of synonyms per line"
            ) from exc
        groups = [
            line.split("\t") if "\t" in line else line.split(",")
            for line in lines
            if line.strip() and not line.lstrip().startswith("#")
        ]
        table = cls(groups)
        if not table._table:
            raise ConfigError(
                f"synonym file {path} holds no group of two or more words: write one "
                "comma- or tab-separated group of synonyms per line"
            )
        log.info("read %d words with synonyms from %s", len(table._table), path)
        return table

    def __call__(self, word: str) -> list[str]:
        return list(self._table.get(word.lower(), ()))


class WordNetSynonyms:
    """Synonyms from NLTK's WordNet (English, or another OMW language with ``lang``)."""

    def __init__(self, lang: str = "eng", reader=None):
        self.lang = lang
        self._wordnet = reader if reader is not None else _load_wordnet(lang)
        self._seen: dict[str, list[str]] = {}  # lookups repeat for every variant of a text

    def __call__(self, word: str) -> list[str]:
        if word not in self._seen:
            names: dict[str, None] = {}
            for synset in self._wordnet.synsets(word, lang=self.lang):
                for name in synset.lemma_names(self.lang):
                    names[name.replace("_", " ")] = None
            self._seen[word] = [name for name in names if name.lower() != word.lower()]
        return list(self._seen[word])


def _load_wordnet(lang: str):
    nltk = _require("nltk", "WordNet synonyms")
    needed = ["corpora/wordnet"] + (["corpora/omw-1.4"] if lang != "eng" else [])
    for resource in needed:
        try:
            nltk.data.find(resource)  # checks only: nltk would otherwise try to download
        except LookupError:
            raise MissingExtra(
                f"NLTK's WordNet data ({resource}) is not installed: run `{WORDNET_INSTALL}`, "
                "or pass a synonym file (synonyms=PATH, one comma-separated group per line)"
            ) from None
    from nltk.corpus import wordnet

    return wordnet


def _synonym_source(synonyms: str | None, lang: str) -> Callable[[str], list[str]]:
    return SynonymTable.from_file(synonyms) if synonyms else WordNetSynonyms(lang)


# --------------------------------------------------------------------------- word ops

class TextOp(abc.ABC):
    """One augmentation operation; ``op(text, rng)`` returns one variant of ``text``."""

    name: ClassVar[str]

    def __call__(self, text: str, rng: random.Random | int = 0) -> str:
        rng = rng if isinstance(rng, random.Random) else random.Random(rng)
        return self._augment_one(text, rng)

    @abc.abstractmethod
    def _augment_one(self, text: str, rng: random.Random) -> str:
        """One variant of `text`, drawing all randomness from `rng`."""

    def close(self) -> None:
        """Release files the op holds open."""

    def augment_many(self, texts: Sequence[str], counts: Sequence[int], seed: int) -> list[list[str]]:
        """``counts[i]`` variants of ``texts[i]``, seeded by (seed, op, i, variant)."""
        from tqdm.auto import tqdm

        return [
            [self._augment_one(text, random.Random(f"{seed}/{self.name}/{i}/{j}")) for j in range(count)]
            for i, (text, count) in enumerate(
                tqdm(list(zip(texts, counts)), desc=self.name, unit="text", disable=None)
            )
        ]


def _amount(n_tokens: int, aug_p: float, aug_min: int, aug_max: int) -> int:
    """How many tokens an op changes: nlpaug's rule, ceil(aug_p * tokens) within aug_min..aug_max."""
    return min(max(math.ceil(aug_p * n_tokens), aug_min), aug_max)


def _check_amount(aug_p: float, aug_min: int, aug_max: int) -> None:
    if not 0 < aug_p <= 1 or aug_min < 0 or aug_max < max(aug_min, 1):
        raise ConfigError(
            f"aug_p={aug_p}, aug_min={aug_min}, aug_max={aug_max} cannot work: use "
            "0 < aug_p <= 1 and 0 <= aug_min <= aug_max, aug_max >= 1"
        )


class _NlpaugOp(TextOp):
    """Runs an nlpaug augmenter drawing from ``rng``."""

    def _augment_one(self, text: str, rng: random.Random) -> str:
        self._aug.rng = rng
        out = self._aug.augment(text)
        # nlpaug answers [] for blank input
        return out[0] if out else text


class _RandomWordOp(_NlpaugOp):
    action: ClassVar[str]

    def __init__(self, aug_p: float = 0.1, aug_min: int = 1, aug_max: int = 10,
                 stopwords: Sequence[str] | None = None):
        _check_amount(aug_p, aug_min, aug_max)
        from nlpaug.augmenter.word import RandomWordAug

        self._aug = _own_random(RandomWordAug)(action=self.action, aug_p=aug_p, aug_min=aug_min,
                                               aug_max=aug_max, stopwords=list(stopwords or []) or None)


class RandomSwap(_RandomWordOp):
    """Swap randomly chosen words with a neighbour (nlpaug ``RandomWordAug(action='swap')``)."""

    name = action = "swap"


class RandomDelete(_RandomWordOp):
    """Delete randomly chosen words, keeping the order of the rest."""

    name = action = "delete"


class RandomCrop(TextOp):
    """Delete one contiguous run of words: aug_p of the tokens, within aug_min..aug_max.

    nlpaug's ``RandomWordAug(action='crop')`` was the first choice, but in 1.1.11 it raises
    ValueError half of the time when the run is one word long (an empty slice of start
    positions), which aug_p=0.1 gives on every text under 11 words; so it is written here,
    on nlpaug's tokenizer. At least one token is kept.
    """

    name = "crop"

    def __init__(self, aug_p: float = 0.1, aug_min: int = 1, aug_max: int = 10):
        _check_amount(aug_p, aug_min, aug_max)
        from nlpaug.util.text.tokenizer import Tokenizer

        self._tokenizer = Tokenizer
        self.aug_p, self.aug_min, self.aug_max = aug_p, aug_min, aug_max

    def _augment_one(self, text: str, rng: random.Random) -> str:
        tokens = self._tokenizer.tokenizer(text)
        count = min(_amount(len(tokens), self.aug_p, self.aug_min, self.aug_max), len(tokens) - 1)
        if count < 1:
            return text
        start = rng.randint(0, len(tokens) - count)
        kept = tokens[:start] + tokens[start + count:]
        if start == 0 and tokens[0][:1].isupper() and kept[0].islower():
            kept[0] = kept[0].capitalize()  # the text still starts like a sentence
        return self._tokenizer.reverse_tokenizer(kept)


@functools.lru_cache(maxsize=1)
def _synonym_aug_class():
    from nlpaug.augmenter.word import SynonymAug

    class _SourceSynonymAug(_OwnRandom, SynonymAug):
        # nlpaug's WordNet model POS-tags with nltk and downloads missing data at run time;
        # here the lookup is ours and POS tags are not used (as in EDA).
        def __init__(self, source, **kwargs):
            self._source = source
            super().__init__(aug_src="wordnet", **kwargs)

        def get_model(self, *args, **kwargs):
            return self

        def pos_tag(self, tokens):
            return [(token, "") for token in tokens]

        def predict(self, word, pos=None):
            return self._source(word)

        def skip_aug(self, token_idxes, tokens):
            # choose only among words that have a synonym, as EDA does
            return [i for i in token_idxes if self._source(tokens[i][0])]

    return _SourceSynonymAug


class SynonymSubstitute(_NlpaugOp):
    """Replace randomly chosen words that have synonyms by one of them (nlpaug ``SynonymAug``).

    ``synonyms`` is a synonym file (see :class:`SynonymTable`); without it WordNet is used.
    """

    name = "synonym"

    def __init__(self, synonyms: str | Path | None = None, lang: str = "eng", aug_p: float = 0.1,
                 aug_min: int = 1, aug_max: int = 10, stopwords: Sequence[str] | None = None):
        _check_amount(aug_p, aug_min, aug_max)
        source = _synonym_source(str(synonyms) if synonyms else None, lang)
        self._aug = _synonym_aug_class()(source, aug_p=aug_p, aug_min=aug_min, aug_max=aug_max,
                                         stopwords=list(stopwords or []) or None)


class SynonymInsert(TextOp):
    """Insert a synonym of a random word at a random position, repeated aug_p x words times.

    nlpaug inserts words only from language models (ContextualWordEmbsAug), so EDA's random
    insertion is written here, on nlpaug's tokenizer.
    """

    name = "insert"

    def __init__(self, synonyms: str | Path | None = None, lang: str = "eng", aug_p: float = 0.1,
                 aug_min: int = 1, aug_max: int = 10, stopwords: Sequence[str] | None = None):
        _check_amount(aug_p, aug_min, aug_max)
        from nlpaug.util.text.tokenizer import Tokenizer

        self._tokenizer = Tokenizer
        self._source = _synonym_source(str(synonyms) if synonyms else None, lang)
        self.aug_p, self.aug_min, self.aug_max = aug_p, aug_min, aug_max
        self.stopwords = {w.lower() for w in stopwords or ()}

    def _augment_one(self, text: str, rng: random.Random) -> str:
        tokens = self._tokenizer.tokenizer(text)
        choices = [
            (token, synonyms)
            for token in tokens
            if token.lower() not in self.stopwords and (synonyms := self._source(token))
        ]
        if not choices:
            return text
        count = _amount(len(tokens), self.aug_p, self.aug_min, self.aug_max)
        for _ in range(count):
            _, synonyms = rng.choice(choices)
            tokens.insert(rng.randint(0, len(tokens)), rng.choice(synonyms))
        return self._tokenizer.reverse_tokenizer(tokens)


# --------------------------------------------------------------------------- back-translation

class TranslationCache:
    """Translations on disk (sqlite), keyed by model, generation settings and source text."""

    def __init__(self, path: str | Path):
        self.path = Path(path).expanduser()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            self._db = sqlite3.connect(self.path)
            with self._db:
                self._db.execute(
                    "CREATE TABLE IF NOT EXISTS translations (model TEXT, settings TEXT, "
                    "source TEXT, outputs TEXT, PRIMARY KEY (model, settings, source))"
                )
        except sqlite3.DatabaseError as exc:
            raise ConfigError(
                f"{self.path} is not a translation cache ({exc}): delete it or pass another cache_path"
            ) from exc

    def get_many(self, model: str, settings: str, sources: Sequence[str]) -> dict[str, list[str]]:
        found: dict[str, list[str]] = {}
        for start in range(0, len(sources), 500):  # stay under sqlite's parameter limit
            chunk = list(sources[start:start + 500])
            rows = self._db.execute(
                "SELECT source, outputs FROM translations WHERE model = ? AND settings = ? "
                f"AND source IN ({','.join('?' * len(chunk))})",
                [model, settings, *chunk],
            )
            found.update((source, json.loads(outputs)) for source, outputs in rows)
        return found

    def put_many(self, model: str, settings: str, items: dict[str, list[str]]) -> None:
        with self._db:
            self._db.executemany(
                "INSERT OR REPLACE INTO translations VALUES (?, ?, ?, ?)",
                [(model, settings, source, json.dumps(out)) for source, out in items.items()],
            )

    def close(self) -> None:
        self._db.close()


class BackTranslate(TextOp):
    """Paraphrase by translating source -> pivot -> source with two MarianMT models.

    Models are hub names (default ``Helsinki-NLP/opus-mt-{source_lang}-{pivot}`` and back)
    or local folders written by ``save_pretrained``. Texts go through the models in batches
    of ``batch_size``, sorted by length to limit padding; every translation is stored in
    the sqlite file ``cache_path`` (default ``~/.cache/transferkit/backtranslation.sqlite``),
    keyed by model, generation settings and sentence, so no sentence is translated twice and
    an interrupted run keeps what it did (a local folder is keyed by its path: delete the
    cache after replacing the model in it). Models load only when something is not cached.

    Generation: beam search with ``num_beams`` (deterministic); the k variants of a text
    come from the k best pivot translations, each translated back. ``sampling=True`` draws
    with ``temperature`` and nucleus ``top_p`` instead: reproducible for a given seed and
    batch, and the first draw is the one cached. Inputs are cut at ``max_length`` tokens
    (warned) and outputs stop there.

    nlpaug's BackTranslationAug was considered: it batches but keeps no cache, shows no
    progress, returns one paraphrase per text and tokenizes every text at once; so
    transformers is driven directly.
    """

    name = "backtranslate"

    def __init__(self, pivot: str = "de", source_lang: str = "en", forward_model: str | None = None,
                 backward_model: str | None = None, cache_path: str | Path | None = None,
                 batch_size: int = 16, num_beams: int = 4, sampling: bool = False,
                 temperature: float = 1.0, top_p: float = 0.95, max_length: int = 256,
                 device: str | None = None):
        if batch_size < 1 or num_beams < 1 or max_length < 1 or temperature <= 0 or not 0 < top_p <= 1:
            raise ConfigError(
                f"batch_size={batch_size}, num_beams={num_beams}, max_length={max_length}, "
                f"temperature={temperature}, top_p={top_p} cannot work: use positive values, top_p <= 1"
            )
        _require("transformers", "back-translation")
        _require("sentencepiece", "back-translation")
        self.forward_model = forward_model or f"Helsinki-NLP/opus-mt-{source_lang}-{pivot}"
        self.backward_model = backward_model or f"Helsinki-NLP/opus-mt-{pivot}-{source_lang}"
        self.batch_size, self.num_beams, self.sampling = batch_size, num_beams, sampling
        self.temperature, self.top_p, self.max_length = temperature, top_p, max_length
        self.device = device
        self.cache = TranslationCache(cache_path or DEFAULT_CACHE)
        self._loaded: dict[str, tuple] = {}

    def _augment_one(self, text: str, rng: random.Random) -> str:
        return self.augment_many([text], [1], rng.getrandbits(32))[0][0]

    def close(self) -> None:
        self.cache.close()

    def augment_many(self, texts: Sequence[str], counts: Sequence[int], seed: int) -> list[list[str]]:
        k = max(counts, default=0)
        if k == 0:
            return [[] for _ in texts]
        needed = [text for text, count in zip(texts, counts) if count]
        pivots = dict(zip(needed, self.translate(needed, self.forward_model, k, seed)))
        flat = list(dict.fromkeys(p for variants in pivots.values() for p in variants))
        back = dict(zip(flat, (out[0] for out in self.translate(flat, self.backward_model, 1, seed))))
        return [[back[p] for p in pivots[text][:count]] if count else [] for text, count in zip(texts, counts)]

    def translate(self, texts: Sequence[str], model: str, k: int = 1, seed: int = 0) -> list[list[str]]:
        """The ``k`` best (or sampled) translations of each text by ``model``, cached."""
        from tqdm.auto import tqdm

        key = self._model_key(model)
        settings = json.dumps(
            {"k": k, "max_length": self.max_length, "num_beams": max(self.num_beams, k)}
            if not self.sampling else
            {"k": k, "max_length": self.max_length, "sampling": True, "seed": seed,
             "temperature": self.temperature, "top_p": self.top_p},
            sort_keys=True,
        )
        unique = [t for t in dict.fromkeys(texts) if t.strip()]
        found = self.cache.get_many(key, settings, unique)
        todo = sorted((t for t in unique if t not in found), key=len)
        if todo:
            log.info("translating %d texts with %s (%d cached)", len(todo), model, len(found))
            tokenizer, net = self._load(model)
            with tqdm(total=len(todo), desc=f"translate {Path(model).name}", unit="text", disable=None) as bar:
                for start in range(0, len(todo), self.batch_size):
                    batch = todo[start:start + self.batch_size]
                    done = dict(zip(batch, self._generate(tokenizer, net, batch, k, seed)))
                    self.cache.put_many(key, settings, done)
                    found.update(done)
                    bar.update(len(batch))
        return [found[t] if t.strip() else [t] * k for t in texts]

    def _generate(self, tokenizer, net, batch: list[str], k: int, seed: int) -> list[list[str]]:
        import torch

        inputs = tokenizer(batch, return_tensors="pt", padding=True, truncation=True,
                           max_length=self.max_length).to(net.device)
        cut = int((inputs["attention_mask"].sum(dim=1) >= self.max_length).sum())
        if cut:
            log.warning("%d texts were cut at max_length=%d tokens before translation", cut, self.max_length)
        options = dict(max_new_tokens=self.max_length, num_return_sequences=k)
        if self.sampling:
            options.update(do_sample=True, num_beams=1, temperature=self.temperature, top_p=self.top_p)
        else:
            options.update(do_sample=False, num_beams=max(self.num_beams, k))
        cuda = [net.device.index or 0] if net.device.type == "cuda" else []
        with torch.inference_mode(), torch.random.fork_rng(devices=cuda):
            torch.manual_seed(seed)
            ids = net.generate(**inputs, **options)
        decoded = tokenizer.batch_decode(ids, skip_special_tokens=True)
        return [decoded[i * k:(i + 1) * k] for i in range(len(batch))]

    @staticmethod
    def _model_key(model: str) -> str:
        folder = Path(model).expanduser()
        return str(folder.resolve()) if folder.is_dir() else model

    def _load(self, model: str):
        if model in self._loaded:
            return self._loaded[model]
        import torch
        from transformers import AutoModelForSeq2SeqLM, AutoTokenizer

        folder = Path(model).expanduser()
        if not folder.is_dir() and (model.startswith((".", "/", "~", "\\")) or model.count("/") > 1):
            raise ConfigError(f"translation model folder {model} does not exist: pass a folder "
                              "written by save_pretrained, or a Hugging Face hub name")
        source = str(folder) if folder.is_dir() else model
        try:
            tokenizer = AutoTokenizer.from_pretrained(source)
            net = AutoModelForSeq2SeqLM.from_pretrained(source)
        except (OSError, ValueError) as exc:
            where = "the folder lacks model or tokenizer files" if folder.is_dir() else (
                "it is not in the local Hugging Face cache and cannot be downloaded here")
            raise ConfigError(
                f"cannot load translation model {model} ({where}): pass a local folder written "
                "by save_pretrained (forward_model=PATH / backward_model=PATH)"
            ) from exc
        device = self.device or ("cuda" if torch.cuda.is_available() else "cpu")
        self._loaded[model] = (tokenizer, net.to(device).eval())
        return self._loaded[model]


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
