"""The text tokenizer and vocabulary (no downloads, no external tokenizer).

Tokenizer: lowercase the text, then take, left to right, the matches of :data:`TOKEN_RE`:
an apostrophe-led clitic (``'s``, ``'ve``), a run of letters/digits with optional internal
apostrophes (``don't``), or one punctuation character. Whitespace is dropped.

Vocabulary: built from the training split only. Tokens seen at least ``min_freq`` times
there, most frequent first (ties: first appearance in the corpus file), up to
``max_size`` ids *including* the two reserved ones: 0 = padding, 1 = unknown.

Encoding: each document becomes its first ``max_len`` token ids, right-padded with 0.
"""
from __future__ import annotations

import re
from typing import Dict, List, Sequence, Tuple

import numpy as np

TOKEN_RE = re.compile(r"'[^\W\d_]+|[^\W_]+(?:'[^\W_]+)*|[^\w\s]")
PAD, UNK = 0, 1


def tokenize(text: str) -> List[str]:
    """Split one document into tokens (see the module docstring)."""
    return TOKEN_RE.findall(text.lower().replace("\u2019", "'"))


def tokenize_corpus(texts: Sequence[str]) -> Tuple[List[str], np.ndarray, np.ndarray]:
    """Tokenize every document once: ``(words, ids int32 [total tokens], offsets int64 [D+1])``
    where ``words[ids[offsets[d]:offsets[d+1]]]`` are document ``d``'s tokens and ``words``
    is ordered by first appearance."""
    index: Dict[str, int] = {}
    ids: List[int] = []
    offsets = [0]
    for t in texts:
        for tok in tokenize(t):
            ids.append(index.setdefault(tok, len(index)))
        offsets.append(len(ids))
    return list(index), np.asarray(ids, dtype=np.int32), np.asarray(offsets, dtype=np.int64)


def build_vocab(ids: np.ndarray, offsets: np.ndarray, train_docs: np.ndarray, n_words: int,
                min_freq: int = 2, max_size: int = 20000) -> np.ndarray:
    """Return the corpus word ids kept in the vocabulary, in id order (vocabulary id =
    position + 2), counting only the documents ``train_docs``."""
    if min_freq < 1:
        raise ValueError(f"min_freq must be >= 1, got {min_freq}")
    if max_size < 3:
        raise ValueError(f"max_size must be >= 3 (two reserved ids and one token), got {max_size}")
    lengths = np.diff(offsets)
    doc_of_tok = np.repeat(np.arange(len(lengths)), lengths)
    in_train = np.zeros(len(lengths), dtype=bool)
    in_train[train_docs] = True
    counts = np.bincount(ids[in_train[doc_of_tok]], minlength=n_words)
    eligible = np.flatnonzero(counts >= min_freq)
    order = eligible[np.lexsort((eligible, -counts[eligible]))]
    return order[: max_size - 2]


def encode_docs(ids: np.ndarray, offsets: np.ndarray, docs: np.ndarray, kept: np.ndarray, n_words: int,
                max_len: int) -> np.ndarray:
    """Token-id matrix ``[len(docs), max_len]`` int64 for the documents ``docs``."""
    if max_len < 1:
        raise ValueError(f"max_len must be >= 1, got {max_len}")
    lut = np.full(n_words, UNK, dtype=np.int64)
    lut[kept] = np.arange(2, 2 + len(kept))
    starts, lengths = offsets[docs], np.minimum(np.diff(offsets)[docs], max_len)
    out = np.zeros((len(docs), max_len), dtype=np.int64)
    total = int(lengths.sum())
    row = np.repeat(np.arange(len(docs)), lengths)
    pos = np.arange(total) - np.repeat(np.cumsum(lengths) - lengths, lengths)
    out[row, pos] = lut[ids[np.repeat(starts, lengths) + pos]]
    return out
