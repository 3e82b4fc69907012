"""The structure-aware partition on tiny random-weight models of each family (no downloads)."""

from __future__ import annotations

import warnings
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from optarena.optim.blocks import adalayer_layout, adam_mini_layout, block_mean_square
from optarena.optim.partition import Partition, partition, print_partition, role_from_name
from optarena.optim.roles import FusedPart, Role

transformers = pytest.importorskip("transformers")

D, HEADS, KV_HEADS, VOCAB, FFN = 32, 4, 2, 100, 64


# --------------------------------------------------------------------------- models


class TinyAttention(nn.Module):
    """Stand-in for optarena's attention: HF-Llama names and head attributes."""

    def __init__(self, d: int, n_heads: int, n_kv_heads: int) -> None:
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = n_heads, n_kv_heads, d // n_heads
        kv = n_kv_heads * self.head_dim
        self.q_proj = nn.Linear(d, d, bias=False)
        self.k_proj = nn.Linear(d, kv, bias=False)
        self.v_proj = nn.Linear(d, kv, bias=False)
        self.o_proj = nn.Linear(d, d, bias=False)
        self.q_norm = nn.LayerNorm(d, bias=False)
        self.k_norm = nn.LayerNorm(kv, bias=False)


class TinyMLP(nn.Module):
    def __init__(self, d: int, hidden: int) -> None:
        super().__init__()
        self.up_proj = nn.Linear(d, hidden, bias=False)
        self.gate_proj = nn.Linear(d, hidden, bias=False)
        self.down_proj = nn.Linear(hidden, d, bias=False)


class TinyBlock(nn.Module):
    def __init__(self, d: int, n_heads: int, n_kv_heads: int) -> None:
        super().__init__()
        self.attn_norm = nn.LayerNorm(d, bias=False)
        self.attn = TinyAttention(d, n_heads, n_kv_heads)
        self.mlp_norm = nn.LayerNorm(d, bias=False)
        self.mlp = TinyMLP(d, FFN)


class TinyGPT(nn.Module):
    """Stand-in for ``optarena.model.GPT`` with the naming fixed in docs/architecture.md."""

    def __init__(self, n_layers: int = 2, tie: bool = False) -> None:
        super().__init__()
        self.tok_emb = nn.Embedding(VOCAB, D)
        self.blocks = nn.ModuleList(TinyBlock(D, HEADS, KV_HEADS) for _ in range(n_layers))
        self.final_norm = nn.LayerNorm(D, bias=False)
        self.lm_head = nn.Linear(D, VOCAB, bias=False)
        if tie:
            self.lm_head.weight = self.tok_emb.weight


def _quiet_config(cls: type, **kw: object) -> object:
    return cls(bos_token_id=0, eos_token_id=0, pad_token_id=0, **kw)


@pytest.fixture(scope="module")
def llama() -> nn.Module:
    cfg = _quiet_config(
        transformers.LlamaConfig,
        hidden_size=D,
        intermediate_size=FFN,
        num_hidden_layers=2,
        num_attention_heads=HEADS,
        num_key_value_heads=KV_HEADS,
        vocab_size=VOCAB,
    )
    return transformers.LlamaForCausalLM(cfg)


@pytest.fixture(scope="module")
def gpt2() -> nn.Module:
    cfg = _quiet_config(
        transformers.GPT2Config, n_embd=D, n_layer=2, n_head=HEADS, vocab_size=VOCAB, n_positions=64
    )
    return transformers.GPT2LMHeadModel(cfg)


@pytest.fixture(scope="module")
def bert() -> nn.Module:
    cfg = _quiet_config(
        transformers.BertConfig,
        hidden_size=D,
        num_hidden_layers=2,
        num_attention_heads=HEADS,
        intermediate_size=FFN,
        vocab_size=VOCAB,
        max_position_embeddings=64,
    )
    return transformers.BertModel(cfg)


def _silent(model: nn.Module, **kw: object) -> Partition:
    """Partition ``model``, failing on any warning."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        return partition(model, **kw)


def _blocks(p: Partition, name: str, policy=adam_mini_layout) -> int:
    info = p[name]
    return policy(info).num_blocks(info.shape)


def _check_layouts_cut_real_tensors(p: Partition) -> None:
    """Every layout the partition leads to cuts a gradient of the parameter's shape."""
    for info in p.values():
        for policy in (adam_mini_layout, adalayer_layout):
            layout = policy(info)
            stat = block_mean_square(torch.randn(info.shape), layout)
            assert stat.numel() == layout.num_blocks(info.shape), info.name


# --------------------------------------------------------------------------- optarena's model


def test_optarena_model_roles_heads_and_blocks():
    model = TinyGPT()
    p = _silent(model)
    assert list(p) == [n for n, _ in model.named_parameters()]
    assert all(p.params[n] is q for n, q in model.named_parameters())
    expected = {"tok_emb.weight": Role.EMBEDDING, "final_norm.weight": Role.NORM}
    expected["lm_head.weight"] = Role.OUTPUT
    for i in range(2):
        b = f"blocks.{i}"
        expected |= {f"{b}.attn_norm.weight": Role.NORM, f"{b}.mlp_norm.weight": Role.NORM}
        for proj, role in [("q", Role.Q), ("k", Role.K), ("v", Role.V), ("o", Role.O)]:
            expected[f"{b}.attn.{proj}_proj.weight"] = role
        expected |= {f"{b}.attn.q_norm.weight": Role.NORM, f"{b}.attn.k_norm.weight": Role.NORM}
        for proj in ("up", "gate", "down"):
            expected[f"{b}.mlp.{proj}_proj.weight"] = Role.MLP
    assert {n: i.role for n, i in p.items()} == expected
    assert all(i.source == "structure" and i.out_dim == 0 and not i.tied for i in p.values())

    a = "blocks.1.attn"
    assert (p[f"{a}.q_proj.weight"].heads, p[f"{a}.k_proj.weight"].heads) == (HEADS, KV_HEADS)
    assert _blocks(p, f"{a}.q_proj.weight") == HEADS
    assert _blocks(p, f"{a}.k_proj.weight") == KV_HEADS
    assert _blocks(p, f"{a}.v_proj.weight") == KV_HEADS * (D // HEADS)  # per row
    assert _blocks(p, f"{a}.o_proj.weight") == D
    assert _blocks(p, "blocks.0.mlp.up_proj.weight") == FFN
    assert _blocks(p, "lm_head.weight") == VOCAB
    assert _blocks(p, "tok_emb.weight") == VOCAB
    assert _blocks(p, f"{a}.k_norm.weight") == 1
    assert _blocks(p, "lm_head.weight", adalayer_layout) == VOCAB
    assert _blocks(p, "tok_emb.weight", adalayer_layout) == 1
    _check_layouts_cut_real_tensors(p)


def test_tied_embedding_is_one_embedding_marked_tied():
    model = TinyGPT(tie=True)
    p = _silent(model)
    assert "lm_head.weight" not in p
    assert p.aliases == {"lm_head.weight": "tok_emb.weight"}
    info = p["tok_emb.weight"]
    assert (info.role, info.tied) == (Role.EMBEDDING, True)
    # the tied table is the last layer too: per row under both policies
    assert _blocks(p, "tok_emb.weight") == VOCAB
    assert _blocks(p, "tok_emb.weight", adalayer_layout) == VOCAB
    assert "tied with lm_head.weight" in p.table()
    # an override may name the alias
    q = partition(model, {"lm_head.weight": "output"})
    assert (q["tok_emb.weight"].role, q["tok_emb.weight"].source) == (Role.OUTPUT, "override")


# --------------------------------------------------------------------------- Hugging Face families


def test_llama_gqa_heads_from_config(llama):
    p = _silent(llama)
    a = "model.layers.0.self_attn"
    roles = {n.rsplit(".", 2)[-2]: i.role for n, i in p.items()}
    assert roles == {
        "embed_tokens": Role.EMBEDDING,
        "q_proj": Role.Q,
        "k_proj": Role.K,
        "v_proj": Role.V,
        "o_proj": Role.O,
        "gate_proj": Role.MLP,
        "up_proj": Role.MLP,
        "down_proj": Role.MLP,
        "input_layernorm": Role.NORM,
        "post_attention_layernorm": Role.NORM,
        "norm": Role.NORM,
        "lm_head": Role.OUTPUT,
    }
    assert p[f"{a}.k_proj.weight"].heads == llama.config.num_key_value_heads == KV_HEADS
    assert _blocks(p, f"{a}.q_proj.weight") == HEADS
    assert _blocks(p, f"{a}.k_proj.weight") == KV_HEADS
    assert _blocks(p, f"{a}.v_proj.weight") == KV_HEADS * (D // HEADS)
    assert _blocks(p, "lm_head.weight") == VOCAB
    assert _blocks(p, "model.norm.weight") == 1
    _check_layouts_cut_real_tensors(p)


def test_gpt2_fused_conv1d_and_tied_head(gpt2):
    p = _silent(gpt2)
    a = "transformer.h.0.attn"
    qkv = p[f"{a}.c_attn.weight"]
    assert (qkv.role, qkv.out_dim, qkv.shape) == (Role.QKV, 1, (D, 3 * D))
    assert qkv.parts == tuple(FusedPart(r, D, HEADS) for r in (Role.Q, Role.K, Role.V))
    assert _blocks(p, f"{a}.c_attn.weight") == HEADS + HEADS + D
    assert _blocks(p, f"{a}.c_attn.weight", adalayer_layout) == 3
    assert (p[f"{a}.c_proj.weight"].role, p[f"{a}.c_proj.weight"].out_dim) == (Role.O, 1)
    mlp = "transformer.h.0.mlp"
    assert (p[f"{mlp}.c_fc.weight"].role, p[f"{mlp}.c_proj.weight"].role) == (Role.MLP, Role.MLP)
    assert _blocks(p, f"{mlp}.c_fc.weight") == 4 * D  # one per output neuron, not per input
    assert _blocks(p, f"{mlp}.c_proj.weight") == D
    assert p["transformer.h.0.ln_1.weight"].role is Role.NORM
    assert p["transformer.h.0.ln_1.bias"].role is Role.BIAS
    assert p[f"{a}.c_attn.bias"].role is Role.BIAS
    assert adam_mini_layout(p[f"{a}.c_attn.bias"]).elementwise
    wte = p["transformer.wte.weight"]
    assert (wte.role, wte.tied) == (Role.EMBEDDING, True)
    assert p.aliases == {"lm_head.weight": "transformer.wte.weight"}
    assert p["transformer.wpe.weight"].role is Role.EMBEDDING
    assert not p["transformer.wpe.weight"].tied
    _check_layouts_cut_real_tensors(p)


def test_gpt2_conv1d_rows_are_output_columns(gpt2):
    """Per-row blocks of a Conv1D weight (in, out) average over its input axis."""
    info = partition(gpt2)["transformer.h.0.mlp.c_fc.weight"]
    g = torch.randn(info.shape)
    stat = block_mean_square(g, adam_mini_layout(info))
    torch.testing.assert_close(stat, g.square().mean(0))


def test_bert_layernorm_under_output_is_norm(bert):
    with pytest.warns(UserWarning, match=r"pooler\.dense\.weight -> other") as record:
        p = partition(bert)
    assert len(record) == 1
    e = "encoder.layer.1"
    ln = p[f"{e}.attention.output.LayerNorm.weight"]
    assert (ln.role, ln.source) == (Role.NORM, "structure")
    assert _blocks(p, ln.name) == 1
    assert p[f"{e}.attention.output.LayerNorm.bias"].role is Role.BIAS
    o = p[f"{e}.attention.output.dense.weight"]  # BERT's out projection is the attention's sibling
    assert (o.role, o.source) == (Role.O, "structure")
    assert p[f"{e}.attention.output.dense.bias"].role is Role.BIAS
    assert p[f"{e}.intermediate.dense.weight"].role is Role.MLP
    assert p[f"{e}.output.dense.weight"].role is Role.MLP
    assert p[f"{e}.output.LayerNorm.weight"].role is Role.NORM
    for proj, role in [("query", Role.Q), ("key", Role.K), ("value", Role.V)]:
        info = p[f"{e}.attention.self.{proj}.weight"]
        assert (info.role, info.heads) == (role, HEADS)
    assert _blocks(p, f"{e}.attention.self.key.weight") == HEADS
    assert p["embeddings.word_embeddings.weight"].role is Role.EMBEDDING
    assert (p["pooler.dense.weight"].role, p["pooler.dense.weight"].source) == (Role.OTHER, "name")
    assert Role.OUTPUT not in p.by_role()
    _check_layouts_cut_real_tensors(p)


def test_multihead_attention_in_proj_is_fused_qkv():
    layer = nn.TransformerEncoderLayer(D, HEADS, FFN)
    p = _silent(layer)
    info = p["self_attn.in_proj_weight"]
    assert (info.role, info.out_dim) == (Role.QKV, 0)
    assert [(x.role, x.size, x.heads) for x in info.parts] == [
        (r, D, HEADS) for r in (Role.Q, Role.K, Role.V)
    ]
    assert _blocks(p, info.name) == HEADS + HEADS + D
    assert p["self_attn.in_proj_bias"].role is Role.BIAS
    assert p["self_attn.out_proj.weight"].role is Role.O
    assert (p["linear1.weight"].role, p["linear2.weight"].role) == (Role.MLP, Role.MLP)
    assert p["norm1.weight"].role is Role.NORM
    _check_layouts_cut_real_tensors(p)


def test_multihead_attention_separate_kdim_vdim():
    mha = nn.MultiheadAttention(D, HEADS, kdim=16, vdim=24, add_bias_kv=True)
    p = _silent(mha)
    assert {n: i.role for n, i in p.items() if i.role is not Role.BIAS} == {
        "q_proj_weight": Role.Q,
        "k_proj_weight": Role.K,
        "v_proj_weight": Role.V,
        "out_proj.weight": Role.O,
    }
    assert _blocks(p, "k_proj_weight") == HEADS
    assert p["bias_k"].role is Role.BIAS


class _T5Attention(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.n_heads = HEADS
        self.q, self.k, self.v, self.o = (nn.Linear(D, D, bias=False) for _ in range(4))


class _T5FF(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.wi = nn.Linear(D, FFN, bias=False)
        self.wo = nn.Linear(FFN, D, bias=False)  # "wo" is an attention name elsewhere


def test_dense_layers_of_nested_sublayer_lists_are_mlp():
    """T5 nests a ModuleList of sub-layers in each block: the block is the outer item."""
    sub = nn.ModuleDict({"SelfAttention": _T5Attention()})
    ff = nn.ModuleDict({"DenseReluDense": _T5FF()})
    model = nn.ModuleDict(
        {"block": nn.ModuleList([nn.ModuleDict({"layer": nn.ModuleList([sub, ff])})])}
    )
    p = _silent(model)
    assert p["block.0.layer.0.SelfAttention.o.weight"].role is Role.O
    assert p["block.0.layer.1.DenseReluDense.wo.weight"].role is Role.MLP
    assert p["block.0.layer.1.DenseReluDense.wi.weight"].role is Role.MLP


# --------------------------------------------------------------------------- heads


class _NoHeadAttrs(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.query = nn.Linear(D, D)
        self.key = nn.Linear(D, D // 2)
        self.value = nn.Linear(D, D // 2)
        self.out_proj = nn.Linear(D, D)


def test_heads_from_model_config_when_module_has_none():
    model = nn.Sequential(_NoHeadAttrs())
    model.config = SimpleNamespace(num_attention_heads=8, num_key_value_heads=4)
    p = _silent(model)
    assert (p["0.query.weight"].heads, p["0.key.weight"].heads) == (8, 4)
    assert _blocks(p, "0.key.weight") == 4


def test_unknown_heads_warns_and_falls_back_to_names():
    with pytest.warns(UserWarning, match="head count not found"):
        p = partition(nn.Sequential(_NoHeadAttrs()))
    assert (p["0.query.weight"].role, p["0.query.weight"].source) == (Role.Q, "name")
    assert p["0.out_proj.weight"].source == "structure"


def test_heads_not_dividing_query_width_raise():
    model = TinyGPT()
    model.blocks[1].attn.n_heads = 3
    with pytest.raises(ValueError, match=r"blocks\.1\.attn.*not divisible by 3 heads"):
        partition(model)


def test_fused_width_not_matching_heads_raises(gpt2):
    attn = gpt2.transformer.h[0].attn
    old = attn.num_heads
    attn.num_heads = 5
    try:
        with pytest.raises(ValueError, match=r"transformer\.h\.0\.attn.*width 96"):
            partition(gpt2)
    finally:
        attn.num_heads = old


# --------------------------------------------------------------------------- overrides, fallback


def test_overrides_exact_glob_and_errors():
    model = TinyGPT()
    p = _silent(
        model, overrides={"blocks.*.mlp.gate_proj.weight": "other", "lm_head.weight": Role.MLP}
    )
    assert [n for n, i in p.items() if i.source == "override"] == [
        "blocks.0.mlp.gate_proj.weight",
        "blocks.1.mlp.gate_proj.weight",
        "lm_head.weight",
    ]
    assert p["blocks.1.mlp.gate_proj.weight"].role is Role.OTHER
    assert p["lm_head.weight"].role is Role.MLP
    assert p["blocks.1.mlp.up_proj.weight"].role is Role.MLP  # untouched
    with pytest.raises(ValueError, match=r"'blocks\.9\.\*'.*'nope'"):
        partition(model, {"blocks.9.*": "mlp", "nope": "mlp", "tok_emb.weight": "embedding"})
    with pytest.raises(ValueError, match="unknown role 'attention'"):
        partition(model, {"lm_head.weight": "attention"})


def test_override_of_a_guessed_name_silences_its_warning(bert):
    p = _silent(bert, overrides={"pooler.dense.weight": "mlp"})
    assert (p["pooler.dense.weight"].role, p["pooler.dense.weight"].source) == (
        Role.MLP,
        "override",
    )


def test_unrecognised_parameter_warns_once_unless_asked_not_to():
    model = TinyGPT()
    model.logit_scale = nn.Parameter(torch.ones(()))
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        p = partition(model)
    assert len(record) == 1 and "logit_scale -> other" in str(record[0].message)
    assert (p["logit_scale"].role, p["logit_scale"].source) == (Role.OTHER, "name")
    _silent(model, warn=False)


def test_named_parameters_use_name_rules_with_one_warning(llama, gpt2):
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        p = partition(llama.named_parameters())
    assert len(record) == 1 and "guessed from their names" in str(record[0].message)
    assert all(i.source == "name" and i.heads is None for i in p.values())
    a = "model.layers.1.self_attn"
    assert p[f"{a}.k_proj.weight"].role is Role.K
    assert p["lm_head.weight"].role is Role.OUTPUT
    assert p["model.layers.1.input_layernorm.weight"].role is Role.NORM
    # named_parameters() already dedups; a tied tensor listed twice becomes one entry + alias
    wte = gpt2.transformer.wte.weight
    q = partition([("wte.weight", wte), ("lm_head.weight", wte)], warn=False)
    assert list(q) == ["wte.weight"] and q.aliases == {"lm_head.weight": "wte.weight"}
    with pytest.raises(TypeError, match="name, parameter"):
        partition([wte])


@pytest.mark.parametrize(
    ("name", "shape", "role"),
    [
        ("encoder.layer.0.attention.output.LayerNorm.weight", (32,), Role.NORM),
        ("encoder.layer.0.attention.output.LayerNorm.bias", (32,), Role.BIAS),
        ("encoder.layer.0.attention.output.dense.weight", (32, 32), Role.O),
        ("decoder.output_scale", (32,), Role.OTHER),  # 1-D never per-row
        ("output.weight", (100, 32), Role.OUTPUT),
        ("transformer.h.0.attn.c_attn.weight", (32, 96), Role.QKV),
        ("transformer.h.0.attn.c_proj.weight", (32, 32), Role.O),
        ("transformer.h.0.mlp.c_proj.weight", (128, 32), Role.MLP),
        ("transformer.ln_f.weight", (32,), Role.NORM),
        ("transformer.wpe.weight", (64, 32), Role.EMBEDDING),
        ("layers.0.feed_forward.w1.weight", (64, 32), Role.MLP),
        ("layers.0.attention.wk.weight", (16, 32), Role.K),
        ("pooler.dense.weight", (32, 32), Role.OTHER),
    ],
)
def test_role_from_name(name, shape, role):
    assert role_from_name(name, shape) is role


# --------------------------------------------------------------------------- table


def test_table_lists_every_parameter(gpt2):
    p = _silent(gpt2)
    lines = p.table(adam_mini_layout).splitlines()
    rows = lines[2:-1]
    assert [r.split()[0] for r in rows] == list(p)
    row = next(r for r in rows if r.startswith("transformer.h.0.attn.c_attn.weight "))
    assert "32x96" in row and "qkv" in row and "mixed (40)" in row and "out_dim=1" in row
    total = sum(_blocks(p, n) for n in p)
    assert lines[-1] == f"{len(p)} tensors, {sum(i.numel for i in p.values()):,} parameters, " + (
        f"{total:,} blocks"
    )
    assert "blocks" not in p.table().splitlines()[0]


def test_by_role_and_print_partition(capsys):
    model = TinyGPT(n_layers=1)
    groups = _silent(model).by_role()
    order = [Role.EMBEDDING, Role.OUTPUT, Role.Q, Role.K, Role.V, Role.O, Role.MLP, Role.NORM]
    assert list(groups) == order
    assert groups[Role.MLP] == [f"blocks.0.mlp.{x}_proj.weight" for x in ("up", "gate", "down")]
    print_partition(model, adalayer_layout)
    out = capsys.readouterr().out
    assert all(n in out for n, _ in model.named_parameters())
    assert "rows (100)" in out
