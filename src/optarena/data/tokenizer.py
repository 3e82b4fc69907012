"""Tokenizers: a byte-level BPE trained on the corpus, a ``tokenizer.json`` file, a Hugging Face
hub name (the study's ``t5-base``), or a SentencePiece model.

Every kind is wrapped as a :class:`TextTokenizer` with a fingerprint (a hash of its full
definition), which keys the token cache together with the corpus fingerprint.
"""

from __future__ import annotations

import hashlib
import itertools
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from optarena import atomic
from optarena.data.corpus import Corpus
from optarena.errors import UserError

EOS = "<|endoftext|>"
_EOS_CANDIDATES = (EOS, "</s>", "<eos>", "<|end_of_text|>", "[SEP]")
BPE_SAMPLE_BYTES = 3_000_000  # BPE training reads at most this much training text
BPE_VERSION = 1  # bump when the BPE recipe changes


@dataclass
class TextTokenizer:
    """What the harness needs from a tokenizer: batch encoding, vocabulary size, end-of-text."""

    name: str
    fingerprint: str
    vocab_size: int
    eos_id: int | None
    encode_batch: Callable[[list[str]], list[list[int]]]
    definition: str | None = None  # the full tokenizer.json, for a Hugging Face tokenizers one


def _sha(text: str | bytes) -> str:
    return hashlib.sha256(text.encode("utf-8") if isinstance(text, str) else text).hexdigest()


def _wrap_hf(tok, name: str) -> TextTokenizer:  # tok: tokenizers.Tokenizer
    vocab = tok.get_vocab(with_added_tokens=True)
    eos = next((vocab[t] for t in _EOS_CANDIDATES if t in vocab), None)

    def encode_batch(texts: list[str]) -> list[list[int]]:
        return [e.ids for e in tok.encode_batch(texts, add_special_tokens=False)]

    size = max(tok.get_vocab_size(with_added_tokens=True), max(vocab.values(), default=0) + 1)
    definition = tok.to_str()
    return TextTokenizer(name, _sha(definition), size, eos, encode_batch, definition)


def _sample(corpus: Corpus, max_bytes: int) -> Iterator[str]:
    total = 0
    for doc in corpus.documents("train"):
        yield doc
        total += len(doc)
        if total >= max_bytes:
            return


def train_bpe(corpus: Corpus, vocab_size: int, cache_dir: Path, progress: bool = False):
    """A byte-level BPE trained with Hugging Face ``tokenizers`` on (a capped sample of) the
    training split, cached by the corpus fingerprint and vocabulary size."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    path = (
        cache_dir / "tokenizers" / f"bpe{BPE_VERSION}-{vocab_size}-{corpus.fingerprint[:24]}.json"
    )
    if path.is_file():
        try:
            return Tokenizer.from_file(str(path))
        except Exception:  # a torn or corrupt cache file: retrain below
            pass
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=[EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=progress,
    )
    docs = _sample(corpus, BPE_SAMPLE_BYTES)
    first = list(itertools.islice(docs, 1))
    if not first:
        raise UserError(f"the corpus {corpus.name} is empty: no training documents")
    tok.train_from_iterator(itertools.chain(first, docs), trainer=trainer)
    with atomic.storage_errors(path):
        path.parent.mkdir(parents=True, exist_ok=True)
    atomic.write_text(path, tok.to_str(pretty=True))
    return tok


def _sentencepiece(path: Path) -> TextTokenizer:
    try:
        import sentencepiece as spm
    except ImportError:
        raise UserError(
            "a .model tokenizer needs sentencepiece: pip install sentencepiece"
        ) from None
    try:
        sp = spm.SentencePieceProcessor(model_file=str(path))
    except Exception as err:  # sentencepiece raises RuntimeError/OSError variants
        raise UserError(f"cannot load SentencePiece model {path}: {err}") from None
    eos = sp.eos_id()

    def encode_batch(texts: list[str]) -> list[list[int]]:
        return sp.encode(texts)

    return TextTokenizer(
        path.name,
        _sha(path.read_bytes()),
        sp.get_piece_size(),
        eos if eos >= 0 else None,
        encode_batch,
    )


def _hub(name: str) -> TextTokenizer:
    try:
        from transformers import AutoTokenizer
    except ImportError:
        raise UserError(f"tokenizer {name!r} from the hub needs transformers") from None
    try:
        tok = AutoTokenizer.from_pretrained(name)
    except Exception as err:  # offline, unknown repo, gated repo...
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise UserError(
            f"cannot load tokenizer {name!r} (not a file, 'bpe', or a reachable Hugging Face "
            f"hub name): {first}"
        ) from None
    if getattr(tok, "is_fast", False):
        wrapped = _wrap_hf(tok.backend_tokenizer, name)
        wrapped.vocab_size = max(wrapped.vocab_size, len(tok))
        if tok.eos_token_id is not None:
            wrapped.eos_id = tok.eos_token_id
        return wrapped

    def encode_batch(texts: list[str]) -> list[list[int]]:
        return [tok.encode(t, add_special_tokens=False) for t in texts]

    return TextTokenizer(
        name, _sha(name + repr(tok.get_vocab())), len(tok), tok.eos_token_id, encode_batch
    )


def load_tokenizer(
    spec: str, corpus: Corpus, vocab_size: int, cache_dir: Path, progress: bool = False
) -> TextTokenizer:
    """``bpe`` (trained on the corpus), a ``tokenizer.json`` file, a SentencePiece ``.model``
    file, or a Hugging Face hub name."""
    if spec == "bpe":
        if vocab_size < 257:
            raise UserError(f"a byte-level BPE needs vocab_size > 256, not {vocab_size}")
        return _wrap_hf(train_bpe(corpus, vocab_size, cache_dir, progress), f"bpe-{vocab_size}")
    path = Path(spec).expanduser()
    if path.is_file():
        if path.suffix == ".model":
            return _sentencepiece(path)
        from tokenizers import Tokenizer

        try:
            tok = Tokenizer.from_file(str(path))
        except Exception as err:
            raise UserError(f"cannot load tokenizer file {path}: {err}") from None
        return _wrap_hf(tok, path.name)
    if path.suffix in (".json", ".model") or os.sep in spec:
        raise UserError(f"tokenizer file {spec} does not exist")
    return _hub(spec)


__all__ = ["EOS", "TextTokenizer", "load_tokenizer", "train_bpe"]
