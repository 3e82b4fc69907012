"""The study's transformer: shapes, naming contract, causality, options, loss."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from optarena.model import (
    GPT,
    PRESETS,
    CrossEntropyWithZLoss,
    GPTConfig,
    apply_rotary,
    build_model,
    lm_loss,
)


def test_micro_is_well_under_a_million_parameters() -> None:
    model = build_model("micro")
    assert model.num_params() < 500_000
    assert set(PRESETS) >= {"micro", "tiny", "small", "150m", "300m", "600m", "1.2b"}


def test_study_presets_have_the_papers_shapes() -> None:
    shapes = {
        k: (PRESETS[k]["d_model"], PRESETS[k]["n_head"], PRESETS[k]["n_layer"])
        for k in ("150m", "300m", "600m", "1.2b")
    }
    assert shapes == {
        "150m": (1024, 16, 12),
        "300m": (1024, 16, 24),
        "600m": (1408, 22, 24),
        "1.2b": (2048, 32, 24),
    }
    # non-embedding parameters: 12 d^2 per layer, which is what the study's names count
    d, L = 1024, 12
    assert 140e6 < 12 * d * d * L < 160e6


def test_module_names_follow_the_contract() -> None:
    names = {n for n, _ in build_model("micro", mlp="swiglu").named_parameters()}
    expected = {"tok_emb.weight", "final_norm.weight", "lm_head.weight"}
    for i in range(2):
        expected |= {f"blocks.{i}.attn_norm.weight", f"blocks.{i}.mlp_norm.weight"}
        expected |= {
            f"blocks.{i}.attn.{p}.weight"
            for p in ("q_proj", "k_proj", "v_proj", "o_proj", "q_norm", "k_norm")
        }
        expected |= {f"blocks.{i}.mlp.{p}.weight" for p in ("up_proj", "gate_proj", "down_proj")}
    assert names == expected


def test_study_model_has_no_biases_gain_only_norms_and_untied_head() -> None:
    model = build_model("micro")
    assert not any(n.endswith("bias") for n, _ in model.named_parameters())
    norms = [m for m in model.modules() if isinstance(m, torch.nn.LayerNorm)]
    assert len(norms) == 2 * 4 + 1  # attn, mlp, q, k per block + final
    assert all(m.bias is None and m.weight is not None for m in norms)
    assert model.lm_head.weight is not model.tok_emb.weight
    assert model.blocks[0].mlp.up_proj.weight.shape == (4 * 64, 64)


def test_attention_exposes_heads_for_the_partition() -> None:
    model = build_model("micro", n_kv_head=2)
    attn = model.blocks[0].attn
    assert (attn.n_heads, attn.n_kv_heads, attn.head_dim) == (4, 2, 16)
    assert attn.k_proj.weight.shape == (2 * 16, 64)
    roles = model.param_roles()
    assert roles["blocks.0.attn.k_proj.weight"] == "k"
    assert roles["blocks.1.attn.q_norm.weight"] == "norm"
    assert roles["lm_head.weight"] == "output" and roles["tok_emb.weight"] == "embedding"
    assert roles["blocks.0.mlp.down_proj.weight"] == "mlp"


def test_llama_options() -> None:
    model = build_model(
        "micro", norm="rmsnorm", mlp="swiglu", n_kv_head=1, tie_embeddings=True, qk_norm=False
    )
    assert model.lm_head.weight is model.tok_emb.weight
    assert any(isinstance(m, torch.nn.RMSNorm) for m in model.modules())
    assert not any(isinstance(m, torch.nn.LayerNorm) for m in model.modules())
    assert "blocks.0.attn.q_norm.weight" not in dict(model.named_parameters())
    # tied weights count once
    assert model.num_params() == sum(p.numel() for p in set(model.parameters()))
    logits = model(torch.randint(0, 2048, (2, 9)))
    assert logits.shape == (2, 9, 2048) and torch.isfinite(logits).all()


@pytest.mark.parametrize("overrides", [{}, {"n_kv_head": 2}])
def test_causal_future_tokens_do_not_change_the_past(overrides: dict) -> None:
    model = build_model("micro", **overrides).eval()
    idx = torch.randint(0, 2048, (1, 12))
    other = idx.clone()
    other[0, 8:] = (other[0, 8:] + 7) % 2048
    a, b = model(idx), model(other)
    torch.testing.assert_close(a[:, :8], b[:, :8])
    assert not torch.allclose(a[:, 8:], b[:, 8:])


def test_rotary_preserves_norm_and_encodes_relative_position() -> None:
    from optarena.model import rotary_table

    cos, sin = rotary_table(8, 16, 10000.0)
    q, k = torch.randn(8), torch.randn(8)
    rq = apply_rotary(q.expand(16, 8), cos, sin)
    rk = apply_rotary(k.expand(16, 8), cos, sin)
    torch.testing.assert_close(rq.norm(dim=-1), q.norm().expand(16))
    # <R_m q, R_n k> depends only on m - n
    torch.testing.assert_close(rq[5] @ rk[3], rq[9] @ rk[7])


def test_sequences_longer_than_the_rotary_table_work() -> None:
    model = GPT(GPTConfig(max_seq_len=8))
    assert model(torch.randint(0, 2048, (1, 20))).shape == (1, 20, 2048)


def test_init_is_small_normal_and_initial_loss_near_uniform() -> None:
    model = build_model("micro")
    w = model.blocks[0].attn.q_proj.weight
    assert abs(w.std().item() - 0.02) < 0.003
    assert model.blocks[0].attn.o_proj.weight.std().item() < 0.015
    idx = torch.randint(0, 2048, (4, 32))
    _, ce = lm_loss(model(idx), idx)
    assert abs(ce.item() - math.log(2048)) < 0.3


def test_lm_loss_adds_z_loss() -> None:
    """Loss, cross-entropy and the gradient of any mix of them equal torch's cross-entropy
    plus a separate logsumexp term, in float64; gradcheck passes."""
    logits = (torch.randn(2, 5, 11, dtype=torch.float64) * 3).requires_grad_()
    targets = torch.randint(0, 11, (2, 5))
    loss, ce = lm_loss(logits, targets, z_loss=1e-2)
    ref_ce = F.cross_entropy(logits.view(-1, 11), targets.view(-1))
    reference = ref_ce + 1e-2 * torch.logsumexp(logits, -1).pow(2).mean()
    torch.testing.assert_close(ce, ref_ce, rtol=1e-14, atol=1e-14)
    torch.testing.assert_close(loss, reference, rtol=1e-14, atol=1e-14)
    grad = torch.autograd.grad(loss + 0.3 * ce, logits)[0]
    ref_grad = torch.autograd.grad(reference + 0.3 * ref_ce, logits)[0]
    torch.testing.assert_close(grad, ref_grad, rtol=1e-12, atol=1e-15)
    flat, flat_targets = logits.detach().view(-1, 11).requires_grad_(), targets.view(-1)
    assert torch.autograd.gradcheck(
        lambda x: CrossEntropyWithZLoss.apply(x, flat_targets, 0.5), (flat,)
    )
    loss0, ce0 = lm_loss(logits, targets, z_loss=0.0)
    assert loss0 is ce0
    low, _ = lm_loss(logits.detach().to(torch.bfloat16), targets, z_loss=1e-2)
    assert low.dtype == torch.float32  # autocast logits are promoted


def test_bad_config_is_rejected() -> None:
    with pytest.raises(ValueError, match="divisible"):
        GPTConfig(d_model=63)
    with pytest.raises(ValueError, match="norm"):
        GPTConfig(norm="batchnorm")
