"""Roles reach the optimizer however parameters are given; drop-in semantics are torch's.

* a structure-aware optimizer given tensors without structure says what is lost and how to pass
  the model; ``model=`` beside plain parameters (Hugging Face ``Trainer``) restores the roles;
* ``add_param_group`` with a module or names uses the partition;
* fused mixture-of-experts tensors are cut per expert and per neuron;
* the frozen preconditioner never divides by a frozen zero (an unseen embedding row);
* ``SGD`` decays as ``torch.optim.SGD`` does.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

from optarena.optim import SGD, AdamMini, Role, create
from optarena.optim.blocks import adam_mini_layout
from optim_cases import TinyLM


def _roles(opt) -> dict[str, str]:
    return {
        opt.param_info(p).name: opt.param_info(p).role.value
        for g in opt.param_groups
        for p in g["params"]
    }


def test_plain_parameters_warn_what_is_lost_and_model_restores_it() -> None:
    model = TinyLM()
    with pytest.warns(
        UserWarning, match=r"roles are unknown.*norms and biases are not exempt.*model=model"
    ):
        AdamMini(model.parameters())
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        opt = AdamMini(model.parameters(), model=model)
        named = AdamMini(model)
    assert [opt.param_info(p).role for p in model.parameters()] == [
        named.param_info(p).role for p in model.parameters()
    ]
    assert opt.param_info(model.lm_head.weight).role is Role.OUTPUT
    # Hugging Face Trainer builds its optimizer as optimizer_cls(grouped_parameters, **kwargs)
    groups = [
        {"params": [model.lm_head.weight], "weight_decay": 0.1},
        {"params": [model.norm.weight], "weight_decay": 0.0},
    ]
    trainer_made = AdamMini(groups, model=model)
    assert trainer_made.param_info(model.norm.weight).role is Role.NORM


def test_add_param_group_with_a_module_or_names_uses_the_partition() -> None:
    model = TinyLM()
    body = [p for n, p in model.named_parameters() if not n.startswith("lm_head")]
    opt = AdamMini(body, model=model)
    opt.add_param_group({"params": model.lm_head})
    assert opt.param_info(model.lm_head.weight).role is Role.OUTPUT
    other = TinyLM()
    named = AdamMini(list(other.named_parameters())[:2])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        named.add_param_group({"params": list(other.named_parameters())[2:]})
    assert named.param_info(other.lm_head.weight).role is Role.OUTPUT
    assert named.param_info(other.layers[0].self_attn.q_proj.weight).role is Role.Q


def test_fused_experts_get_a_second_moment_per_expert_and_neuron() -> None:
    from transformers import MixtralConfig, MixtralForCausalLM

    config = MixtralConfig(
        vocab_size=32,
        hidden_size=16,
        intermediate_size=12,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_local_experts=3,
    )
    model = MixtralForCausalLM(config).double()
    experts = model.model.layers[0].mlp.experts
    opt = create("adam-mini", model, lr=1e-3)
    info = opt.param_info(experts.gate_up_proj)
    assert (info.role, info.experts, info.out_dim) == (Role.MLP, 3, 1)
    assert adam_mini_layout(info).num_blocks(info.shape) == 3 * 24
    g = torch.randn_like(experts.gate_up_proj)
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    experts.gate_up_proj.grad = g.clone()
    opt.step()
    v = opt.state[experts.gate_up_proj]["exp_avg_sq"]
    want = (1 - 0.999) * (g * g).mean(-1).reshape(-1)  # one value per (expert, output neuron)
    torch.testing.assert_close(v, want, rtol=1e-12, atol=0)
    adalayer = create("adalayer", model)
    adalayer.step()
    assert adalayer.state[experts.down_proj]["exp_avg_sq"].numel() == 3  # a layer per expert


def test_frozen_preconditioner_never_divides_by_a_frozen_zero() -> None:
    """An embedding row whose token never occurs while ``v`` is measured: once its token
    appears, it steps on the tensor's mean second moment, like its neighbours, not by
    ``lr·m/eps``; a tensor never seen at all is left where it is."""
    emb = nn.Parameter(torch.zeros(4, 3, dtype=torch.float64))
    unseen = nn.Parameter(torch.zeros(2, dtype=torch.float64))
    opt = create("adam-frozen", [emb, unseen], lr=1e-3, precondition_steps=3)
    for _ in range(3):  # rows 0-2 see gradients, row 3 never does; ``unseen`` sees none
        g = torch.ones(4, 3, dtype=torch.float64)
        g[3] = 0
        emb.grad, unseen.grad = g, torch.zeros(2, dtype=torch.float64)
        opt.step()
    assert torch.equal(emb.detach(), torch.zeros(4, 3, dtype=torch.float64))  # measuring: no move
    emb.grad = torch.ones(4, 3, dtype=torch.float64)
    unseen.grad = torch.ones(2, dtype=torch.float64)
    opt.step()
    v = opt.state[emb]["exp_avg_sq"]
    assert torch.equal(v[3], v[0])  # the unseen row took the mean of the seen ones (1 = g²)
    bc1 = 1 - 0.9**4
    seen = 1e-3 * (1 - 0.9**4) / bc1 / (1 + 1e-8)  # m = 1 - 0.9^4 after four unit gradients
    first = 1e-3 * 0.1 / bc1 / (1 + 1e-8)  # m = 0.1 after its first one
    torch.testing.assert_close(-emb.detach()[0], torch.full((3,), seen, dtype=torch.float64))
    torch.testing.assert_close(-emb.detach()[3], torch.full((3,), first, dtype=torch.float64))
    assert torch.equal(unseen.detach(), torch.zeros(2, dtype=torch.float64))


def test_sgd_decays_as_torch_sgd() -> None:
    """The drop-in default: coupled decay, λθ added to the gradient (0.621 vs the decoupled
    0.904 of the issue's example after 10 steps)."""
    ours = nn.Parameter(torch.ones(3, dtype=torch.float64))
    ref = nn.Parameter(torch.ones(3, dtype=torch.float64))
    opts = [
        SGD([ours], lr=0.1, momentum=0.9, weight_decay=0.1),
        torch.optim.SGD([ref], lr=0.1, momentum=0.9, weight_decay=0.1),
    ]
    for _ in range(10):
        for p, opt in zip((ours, ref), opts, strict=True):
            p.grad = torch.full((3,), 0.5, dtype=torch.float64)
            opt.step()
    torch.testing.assert_close(ours, ref, rtol=1e-14, atol=0)
