"""Data: the built-in corpus, text files, C4 shards, tokenizers, the token cache, batches."""

from __future__ import annotations

import gzip
import json
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from optarena.data import RandomWindows, load_corpus, prepare_data, validation_windows
from optarena.data.cache import cache_path, load_tokens, verify
from optarena.data.corpus import build_builtin_documents, split_documents
from optarena.data.tokenizer import load_tokenizer
from optarena.errors import UserError


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One cache for the whole test session (every test module points at the same folder)."""
    return tmp_path_factory.getbasetemp() / "optarena-cache"


@pytest.fixture(scope="session")
def builtin(cache_dir: Path):
    return prepare_data("builtin", "bpe", 2048, cache_dir)


@pytest.fixture(scope="module")
def fresh_docs() -> list[str]:
    """The built-in documents built again from scratch (no cache)."""
    return build_builtin_documents()


# --------------------------------------------------------------------------- builtin corpus


def test_builtin_corpus_is_large_split_by_document_and_deterministic(
    builtin, cache_dir: Path, fresh_docs: list[str]
) -> None:
    corpus = load_corpus("builtin", cache_dir)
    train, val = list(corpus.documents("train")), list(corpus.documents("val"))
    assert sum(map(len, train)) + sum(map(len, val)) > 2_000_000
    assert len(val) >= 10 and len(train) > 10 * len(val) // 2
    assert not set(train) & set(val)
    # a fresh build (no cache) gives exactly the cached documents, in the same order
    fresh = fresh_docs
    assert fresh == [json.loads(line) for line in next(cache_dir.glob("corpus/*.jsonl")).open()]
    assert sorted(fresh) == sorted(train + val)


def test_builtin_corpus_has_docs_and_no_tests_or_gui_modules(fresh_docs: list[str]) -> None:
    docs = fresh_docs
    heads = [d.split("\n", 1)[0] for d in docs]
    assert "json" in heads  # the docstrings of the json module
    assert "assert" in heads and "with" in heads  # pydoc help topics
    assert any(d.startswith("# ") for d in docs)  # some source text
    for bad in ("test.", "tkinter", "idlelib", "antigravity", "this"):
        assert not any(h == bad or h.startswith(bad) or h == f"# {bad}" for h in heads), bad


def test_builtin_tokens_cover_the_vocabulary(builtin) -> None:
    assert builtin.tokenizer.vocab_size == 2048
    assert builtin.train.dtype == np.uint16
    assert len(builtin.train) > 500_000 and len(builtin.val) > 10_000
    assert builtin.train.max() < 2048
    assert len(np.unique(builtin.train[:200_000])) > 1500


# --------------------------------------------------------------------------- files and C4


def test_tiny_shakespeare_loads_and_splits(shared_data: Path, cache_dir: Path) -> None:
    data = prepare_data(str(shared_data / "tinyshakespeare.txt"), "bpe", 1024, cache_dir)
    assert data.tokenizer.vocab_size == 1024
    total = len(data.train) + len(data.val)
    assert 200_000 < total < 600_000
    assert 0.01 < len(data.val) / total < 0.15


def test_c4_shards_with_the_pretrained_tokenizer(shared_data: Path, cache_dir: Path) -> None:
    from tokenizers import Tokenizer

    shard_dir = shared_data / "c4-sample"
    texts = []
    for shard in sorted(shard_dir.glob("*.json.gz")):
        with gzip.open(shard, "rt") as f:
            texts += [json.loads(line)["text"] for line in f if line.strip()]
    assert len(texts) == 30

    tok_file = shared_data / "tokenizers" / "gpt-neox-20b.json"
    data = prepare_data(str(shard_dir), str(tok_file), 0, cache_dir)
    assert data.tokenizer.vocab_size > 50_000
    assert data.train.dtype == np.uint16 and len(data.val) > 0
    raw = Tokenizer.from_file(str(tok_file))
    eos = data.tokenizer.eos_id
    train = data.train.tolist()
    first_doc = raw.decode(train[: train.index(eos)])
    assert first_doc in texts
    # every document lands in exactly one split
    n_docs = sum(1 for t in (train + data.val.tolist()) if t == eos)
    assert n_docs == 30


def test_glob_of_shards(shared_data: Path, cache_dir: Path) -> None:
    corpus = load_corpus(str(shared_data / "c4-sample" / "*.json.gz"), cache_dir)
    assert len(list(corpus.documents("train"))) + len(list(corpus.documents("val"))) == 30


def test_bad_data_inputs_are_user_errors(tmp_path: Path, cache_dir: Path) -> None:
    with pytest.raises(UserError, match="does not exist"):
        load_corpus(str(tmp_path / "missing.txt"), cache_dir)
    with pytest.raises(UserError, match="no files match"):
        load_corpus(str(tmp_path / "*.txt"), cache_dir)
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n\n  \n")
    with pytest.raises(UserError, match="empty"):
        load_corpus(str(empty), cache_dir)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\nnot json\n')
    with pytest.raises(UserError, match=r"bad\.jsonl:2"):
        list(load_corpus(str(bad), cache_dir).documents("train"))


def test_split_documents_never_leaves_a_split_empty() -> None:
    out = split_documents(["a", "b"], 0.001)
    assert len(out["train"]) == 1 and len(out["val"]) == 1
    many = split_documents([f"doc {i}" for i in range(2000)], 0.05)
    assert 50 < len(many["val"]) < 150


# --------------------------------------------------------------------------- tokenizers


def _small_corpus(tmp_path: Path, shared_data: Path) -> Path:
    path = tmp_path / "small.txt"
    path.write_text((shared_data / "tinyshakespeare.txt").read_text()[:200_000])
    return path


def test_bpe_is_cached_by_content(tmp_path: Path, shared_data: Path) -> None:
    cache = tmp_path / "cache"
    corpus = load_corpus(str(_small_corpus(tmp_path, shared_data)), cache)
    a = load_tokenizer("bpe", corpus, 512, cache)
    files = list((cache / "tokenizers").glob("*.json"))
    assert len(files) == 1
    mtime = files[0].stat().st_mtime_ns
    b = load_tokenizer("bpe", corpus, 512, cache)
    assert a.fingerprint == b.fingerprint and files[0].stat().st_mtime_ns == mtime
    assert a.vocab_size == 512 and a.eos_id is not None
    ids = a.encode_batch(["To be, or not to be"])[0]
    assert 0 < len(ids) < 19 and max(ids) < 512
    # another vocabulary is another tokenizer
    assert load_tokenizer("bpe", corpus, 600, cache).fingerprint != a.fingerprint


def test_sentencepiece_model_file(tmp_path: Path, shared_data: Path) -> None:
    import sentencepiece as spm

    text = _small_corpus(tmp_path, shared_data)
    spm.SentencePieceTrainer.train(
        input=str(text),
        model_prefix=str(tmp_path / "sp"),
        vocab_size=300,
        model_type="bpe",
        minloglevel=2,
    )
    corpus = load_corpus(str(text), tmp_path)
    tok = load_tokenizer(str(tmp_path / "sp.model"), corpus, 0, tmp_path)
    assert tok.vocab_size == 300 and max(tok.encode_batch(["Romeo and Juliet"])[0]) < 300


def test_missing_tokenizer_file_is_a_user_error(tmp_path: Path, cache_dir: Path) -> None:
    corpus = load_corpus("builtin", cache_dir)
    with pytest.raises(UserError, match="does not exist"):
        load_tokenizer(str(tmp_path / "tok.json"), corpus, 0, cache_dir)


# --------------------------------------------------------------------------- token cache


def test_corrupt_or_truncated_cache_is_rebuilt(tmp_path: Path, shared_data: Path) -> None:
    cache = tmp_path / "cache"
    corpus = load_corpus(str(_small_corpus(tmp_path, shared_data)), cache)
    tok = load_tokenizer("bpe", corpus, 512, cache)
    good = {k: np.array(v) for k, v in load_tokens(corpus, tok, cache).items()}
    folder = cache_path(cache, corpus, tok)
    assert isinstance(verify(folder), dict)

    train_bin = folder / "train.bin"
    raw = bytearray(train_bin.read_bytes())
    raw[1000] ^= 0xFF
    train_bin.write_bytes(bytes(raw))
    assert "checksum" in verify(folder)
    with pytest.warns(UserWarning, match="rebuilding"):
        rebuilt = load_tokens(corpus, tok, cache)
    np.testing.assert_array_equal(rebuilt["train"], good["train"])

    with (folder / "val.bin").open("r+b") as f:
        f.truncate(10)
    assert "truncated" in verify(folder)
    with pytest.warns(UserWarning, match="rebuilding"):
        rebuilt = load_tokens(corpus, tok, cache)
    np.testing.assert_array_equal(rebuilt["val"], good["val"])

    (folder / "meta.json").unlink()  # a build cut short before its metadata
    with pytest.warns(UserWarning, match="rebuilding"):
        load_tokens(corpus, tok, cache)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        load_tokens(corpus, tok, cache)  # valid again: no warning


# --------------------------------------------------------------------------- batches


def test_random_windows_are_seeded_shifted_and_resumable() -> None:
    tokens = np.arange(10_000, dtype=np.uint16)
    a, b = RandomWindows(tokens, 4, 16, seed=1), RandomWindows(tokens, 4, 16, seed=1)
    x, y = a.next()
    assert x.shape == (4, 16) and x.dtype == torch.int64
    torch.testing.assert_close(y[:, :-1], x[:, 1:])
    torch.testing.assert_close(b.next()[0], x)
    state = a.state_dict()
    ahead = [a.next()[0] for _ in range(3)]
    b.load_state_dict(state)
    for expected in ahead:
        torch.testing.assert_close(b.next()[0], expected)
    other = RandomWindows(tokens, 4, 16, seed=2).next()[0]
    assert not torch.equal(other, x)


def test_validation_windows_are_fixed_and_span_the_split() -> None:
    tokens = np.arange(1000, dtype=np.uint16)
    x, y = validation_windows(tokens, 8, 32)
    x2, _ = validation_windows(tokens, 8, 32)
    torch.testing.assert_close(x, x2)
    assert x[0, 0] == 0 and y[-1, -1] == 999
    with pytest.raises(UserError, match="validation split"):
        validation_windows(tokens[:10], 8, 32)


def test_hub_tokenizer_offline_is_a_user_error(
    cache_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pytest.importorskip("transformers")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    # huggingface_hub reads the variable once, at import: set its constant too, so the test
    # does not wait on network time-outs when the hub was imported earlier in the session.
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
    corpus = load_corpus("builtin", cache_dir)
    with pytest.raises(UserError, match="cannot load tokenizer 't5-base'"):
        load_tokenizer("t5-base", corpus, 0, cache_dir)
