"""Does our Adam-mini partition follow the paper's rules on Hugging Face models?

The expected blocks are written out here by hand, per architecture, from the rules of Adam-mini
v1.1.1 (``docs/reproduction.md``): biases elementwise; query and key one block per head (GQA: per
key/value head for k); embedding and output one block per token; value, attention output and MLP
matrices one block per output neuron (GPT-2's ``Conv1D`` stores (in, out): its neurons are
columns); anything else (norm gains, other tables) one block. Position tables are ambiguous
(the official code cuts BERT's per row and GPT-2's whole, by accident of naming), so both are
accepted there. These expectations never call the partition code, so a disagreement is a finding.
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

Expect = Callable[[str, tuple[int, ...]], tuple[set[int], str]]


@dataclass(frozen=True)
class Row:
    model: str
    name: str
    shape: tuple[int, ...]
    expected: tuple[int, ...]  # accepted block counts
    rule: str
    ours: int
    ours_layout: str

    @property
    def ok(self) -> bool:
        return self.ours in self.expected


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def _llama(heads: int, kv_heads: int) -> Expect:
    def expect(name: str, shape: tuple[int, ...]) -> tuple[set[int], str]:
        if name.endswith("q_proj.weight"):
            return {heads}, "q: one block per head"
        if name.endswith("k_proj.weight"):
            return {kv_heads}, "k: one block per key/value head (GQA)"
        if re.search(r"(v_proj|o_proj|gate_proj|up_proj|down_proj)\.weight$", name):
            return {shape[0]}, "v / o / MLP: one block per output neuron"
        if name.endswith(("embed_tokens.weight", "lm_head.weight")):
            return {shape[0]}, "embedding / output: one block per token"
        if "norm" in name:
            return {1}, "norm gain: one block"
        return {1}, "other: one block"

    return expect


def _gpt2(heads: int, width: int) -> Expect:
    def expect(name: str, shape: tuple[int, ...]) -> tuple[set[int], str]:
        if name.endswith(".bias"):
            return {_numel(shape)}, "bias: elementwise"
        if name.endswith("c_attn.weight"):
            return {2 * heads + width}, "fused QKV (in, out): q, k per head, v per output neuron"
        if re.search(r"(attn\.c_proj|mlp\.c_fc|mlp\.c_proj)\.weight$", name):
            return {shape[1]}, "o / MLP Conv1D (in, out): one block per output neuron (column)"
        if name.endswith("wte.weight"):
            return {shape[0]}, "token embedding (tied output): one block per token"
        if name.endswith("wpe.weight"):
            return {1, shape[0]}, "position table: one block (v1.1.1 naming) or per row"
        if re.search(r"ln_\w+\.weight$", name):
            return {1}, "norm gain: one block"
        return {1}, "other: one block"

    return expect


def _bert(heads: int) -> Expect:
    def expect(name: str, shape: tuple[int, ...]) -> tuple[set[int], str]:
        if name.endswith(".bias"):
            return {_numel(shape)}, "bias: elementwise"
        if re.search(r"self\.(query|key)\.weight$", name):
            return {heads}, "q / k: one block per head"
        if re.search(
            r"(self\.value|attention\.output\.dense|intermediate\.dense|\d\.output\.dense)\.weight$",
            name,
        ):
            return {shape[0]}, "v / o / MLP: one block per output neuron"
        if name.endswith("word_embeddings.weight"):
            return {shape[0]}, "token embedding (tied output): one block per token"
        if name.endswith(("position_embeddings.weight", "token_type_embeddings.weight")):
            return {1, shape[0]}, "position / type table: per row (v1.1.1 naming) or one block"
        if "LayerNorm" in name:
            return {1}, "norm gain: one block (v1.1.1 crashes on attention.output.LayerNorm)"
        return {1}, "other (MLM head transform): one block"

    return expect


def _models() -> list[tuple[str, Any, Expect]]:
    from transformers import (
        BertConfig,
        BertForMaskedLM,
        GPT2Config,
        GPT2LMHeadModel,
        LlamaConfig,
        LlamaForCausalLM,
    )

    llama = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=96,
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=32,
        )
    )
    gpt2 = GPT2LMHeadModel(
        GPT2Config(
            vocab_size=96,
            n_embd=64,
            n_layer=2,
            n_head=4,
            n_positions=32,
            bos_token_id=0,
            eos_token_id=0,
        )
    )
    bert = BertForMaskedLM(
        BertConfig(
            vocab_size=96,
            hidden_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            intermediate_size=128,
            max_position_embeddings=32,
        )
    )
    return [
        ("Llama (GQA: 4 heads, 2 kv heads)", llama, _llama(4, 2)),
        ("GPT-2 (fused Conv1D QKV, tied)", gpt2, _gpt2(4, 64)),
        ("BERT (masked LM, tied)", bert, _bert(4)),
    ]


def check() -> list[Row] | None:
    """One row per parameter of each model; None when ``transformers`` is not installed."""
    try:
        models = _models()
    except ImportError:
        return None
    from optarena.optim.blocks import adam_mini_layout
    from optarena.optim.partition import partition

    rows = []
    for label, model, expect in models:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            parts = partition(model)
        for name, info in parts.items():
            layout = adam_mini_layout(info)
            expected, rule = expect(name, info.shape)
            rows.append(
                Row(
                    label,
                    name,
                    info.shape,
                    tuple(sorted(expected)),
                    rule,
                    layout.num_blocks(info.shape),
                    layout.describe(info.shape),
                )
            )
    return rows
