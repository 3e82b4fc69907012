"""Data for training: corpus -> tokenizer -> cached token ids -> batches.

``prepare_data`` is the one call the training loop makes; the submodules are usable on their own.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from optarena.data.batches import RandomWindows, validation_windows
from optarena.data.cache import default_cache_dir, load_tokens
from optarena.data.corpus import Corpus, load_corpus
from optarena.data.tokenizer import TextTokenizer, load_tokenizer
from optarena.errors import UserError


@dataclass
class PreparedData:
    corpus: Corpus
    tokenizer: TextTokenizer
    train: np.ndarray
    val: np.ndarray


def prepare_data(
    data: str = "builtin",
    tokenizer: str = "bpe",
    vocab_size: int = 2048,
    cache_dir: Path | str | None = None,
    val_fraction: float = 0.05,
    max_documents: int = 200_000,
    progress: bool = False,
) -> PreparedData:
    """Load (or build and cache) the token ids of ``data`` under ``tokenizer``."""
    cache = Path(cache_dir) if cache_dir else default_cache_dir()
    corpus = load_corpus(data, cache, val_fraction, max_documents)
    tok = load_tokenizer(tokenizer, corpus, vocab_size, cache, progress)
    tokens = load_tokens(corpus, tok, cache, progress)
    if len(tokens["train"]) == 0:
        raise UserError(f"the corpus {corpus.name} is empty: no training tokens")
    return PreparedData(corpus, tok, tokens["train"], tokens["val"])


__all__ = [
    "Corpus",
    "PreparedData",
    "RandomWindows",
    "TextTokenizer",
    "default_cache_dir",
    "load_corpus",
    "load_tokenizer",
    "load_tokens",
    "prepare_data",
    "validation_windows",
]
