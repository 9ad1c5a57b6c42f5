"""Synonyms from WordNet or a file, and the ops that use them: substitution and insertion (EDA)."""
from __future__ import annotations


import functools
import logging
import random
from collections.abc import Callable, Sequence
from pathlib import Path

from transferkit.errors import ConfigError, MissingExtra

log = logging.getLogger(__name__)

from transferkit.augment.text.ops import TextOp, _NlpaugOp, _OwnRandom, _check_amount, _amount, _require, WORDNET_INSTALL

log = logging.getLogger(__name__)


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


