"""Back-translation through a MarianMT pair, batched, with an on-disk cache so no sentence is translated twice."""
from __future__ import annotations


import json
import logging
import random
import sqlite3
from collections.abc import Sequence
from pathlib import Path

from transferkit.errors import ConfigError

log = logging.getLogger(__name__)

from transferkit.augment.text.ops import TextOp, _require, DEFAULT_CACHE

log = logging.getLogger(__name__)


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


