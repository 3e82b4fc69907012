"""Shared fixtures: the real data in ../shared/data and small helpers."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"

# ``fused=None`` runs eagerly in the tests (and in the CLI processes they start): compiling
# takes seconds to minutes on a small machine; the fast-path tests opt in with ``fused=True``.
os.environ.setdefault("OPTARENA_FUSED", "0")


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """``../shared/data`` beside the clone; skipped on a user's clone, a failure in CI."""
    if not SHARED_DATA.is_dir():
        reason = f"needs the project's shared test data at {SHARED_DATA} (not part of a clone)"
        if os.environ.get("OPTARENA_REQUIRE_SHARED"):
            pytest.fail(reason)
        pytest.skip(reason)
    return SHARED_DATA


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)
    yield


@pytest.fixture
def single_thread():
    """One intra-op thread for tests of many tiny tensor ops: they gain nothing from threads,
    and on a loaded 2-core machine two threads made a tiny model's step ~70x slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def pretrained_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real ``optarena train`` output folder of a tiny model (one layer, width 32, a 300-token
    BPE) trained for a few steps on text made of the built-in fine-tuning task's prompts: what
    the post-training tests start from. Session-scoped: built once, never modified (copy it)."""
    from optarena.posttrain import builtin
    from optarena.train import train

    root = tmp_path_factory.mktemp("pretrained")
    corpus = root / "corpus.txt"
    prompts = [e.messages[-1][1] + " " + e.response for e in builtin.examples("train")[:600]]
    corpus.write_text("\n\n".join(prompts), encoding="utf-8")
    out = root / "run"
    threads = torch.get_num_threads()
    train(
        {
            "optimizer": "adamw",
            "lr": 1e-2,
            "model": "micro",
            "model_overrides": {"d_model": 32, "n_layer": 1},
            "vocab_size": 300,
            "data": str(corpus),
            "steps": 20,
            "batch_size": 8,
            "seq_len": 48,
            "eval_windows": 2,
            "progress": False,
            "threads": 1,
            "out": str(out),
            "cache_dir": str(root / "cache"),
        }
    )
    torch.set_num_threads(threads)
    return out


@pytest.fixture(scope="session")
def hf_pretrained(tmp_path_factory: pytest.TempPathFactory, pretrained_run: Path) -> Path:
    """A randomly initialised GPT-2 with a real fast tokenizer, saved like a hub download."""
    transformers = pytest.importorskip("transformers")
    from tokenizers import Tokenizer

    folder = tmp_path_factory.mktemp("hf") / "gpt2-tiny"
    backend = Tokenizer.from_file(str(pretrained_run / "tokenizer.json"))
    tok = transformers.PreTrainedTokenizerFast(
        tokenizer_object=backend, eos_token="<|endoftext|>", pad_token="<|endoftext|>"
    )
    config = transformers.GPT2Config(
        vocab_size=len(tok), n_positions=64, n_embd=32, n_layer=2, n_head=4
    )
    torch.manual_seed(0)
    transformers.GPT2LMHeadModel(config).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder
