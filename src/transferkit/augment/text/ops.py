"""The text op protocol and the word operations: random swap, deletion and crop (nlpaug underneath)."""
from __future__ import annotations

import abc

import functools
import importlib
import logging
import math
import random
from collections.abc import Sequence
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


