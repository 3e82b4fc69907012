"""``state_dict`` round trips of every registered optimizer.

Train N steps, save, load into a fresh optimizer on a copy of the parameters, continue: the result
must be bit-identical to the uninterrupted run, for an in-memory copy and through
``torch.save`` / ``torch.load(weights_only=True)``; bfloat16 parameters keep float32 state.
"""

from __future__ import annotations

import copy
import io
from collections.abc import Callable, Mapping
from typing import Any

import pytest
import torch
from torch import Tensor, nn

from optarena.optim import available, create
from optim_cases import llama_partition, llama_shapes, make_params, set_grads

pytestmark = pytest.mark.usefixtures("single_thread")

N_HEADS, N_KV = 4, 2
SHAPES = llama_shapes(dim=16, n_heads=N_HEADS, n_kv_heads=N_KV, ffn=24, vocab=12, layers=1)
INFOS = llama_partition(SHAPES, N_HEADS, N_KV)
SKIP = ("model.layers.0.mlp.up_proj.weight",)  # never gets a gradient
N, M = 5, 4  # steps before and after the checkpoint

# Hyperparameters for entries that need some (or whose interesting phase starts late).
HYPER: dict[str, dict[str, Any]] = {
    "hybrid": {"routes": {"default": ("lion", {"lr": 1e-3}), "output": ("adamw", {"lr": 1e-2})}},
    "adam-frozen": {"precondition_steps": 3, "unfrozen_roles": ("norm",)},
    "sophia": {"hessian_interval": 2, "lr": 1e-2},
    "adafactor-classic": {"beta1": 0.9, "weight_decay": 0.1},
    "sgd": {"momentum": 0.9, "weight_decay": 0.1},
    "adamw": {"weight_decay": 0.1},
}


def build(name: str, params: Mapping[str, Tensor]) -> torch.optim.Optimizer:
    return create(name, list(params.items()), partition=INFOS, **HYPER.get(name, {}))


def train(opt: torch.optim.Optimizer, params: Mapping[str, Tensor], first: int, last: int) -> None:
    for t in range(first, last + 1):
        set_grads(params, t, skip=SKIP)
        opt.step()
        interval = getattr(opt, "hessian_interval", None)
        if interval and t % interval == 0:
            set_grads(params, t, seed=2, skip=SKIP)
            opt.update_hessian()


def copy_params(params: Mapping[str, Tensor]) -> dict[str, nn.Parameter]:
    return {n: nn.Parameter(p.detach().clone()) for n, p in params.items()}


def assert_same(a: torch.optim.Optimizer, pa: Mapping, b: torch.optim.Optimizer, pb: Mapping):
    for name in pa:
        assert torch.equal(pa[name], pb[name]), f"param {name} differs"
        sa, sb = a.state.get(pa[name], {}), b.state.get(pb[name], {})
        assert sa.keys() == sb.keys(), f"state keys of {name}: {sa.keys()} vs {sb.keys()}"
        for key, value in sa.items():
            other = sb[key]
            if isinstance(value, Tensor):
                assert value.dtype == other.dtype, f"{key} of {name}: {value.dtype} {other.dtype}"
                assert torch.equal(value, other), f"state {key} of {name} differs"
            else:
                assert value == other, f"state {key} of {name} differs"
    for ga, gb in zip(a.param_groups, b.param_groups, strict=True):
        assert {k: v for k, v in ga.items() if k != "params"} == {
            k: v for k, v in gb.items() if k != "params"
        }


def via_torch_save(sd: dict) -> dict:
    buffer = io.BytesIO()
    torch.save(sd, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


TRANSPORTS: dict[str, Callable[[dict], dict]] = {
    "deepcopy": copy.deepcopy,
    "torch.save": via_torch_save,
}


@pytest.mark.parametrize("transport", list(TRANSPORTS))
@pytest.mark.parametrize("name", list(available()))
def test_round_trip_is_bit_identical(name: str, transport: str) -> None:
    init = make_params(SHAPES, torch.float32)
    straight = copy_params(init)
    opt = build(name, straight)
    train(opt, straight, 1, N + M)

    first = copy_params(init)
    opt1 = build(name, first)
    train(opt1, first, 1, N)
    saved = TRANSPORTS[transport](opt1.state_dict())
    resumed = copy_params(first)
    opt2 = build(name, resumed)
    opt2.load_state_dict(saved)
    train(opt2, resumed, N + 1, N + M)

    assert_same(opt, straight, opt2, resumed)
    moved = [n for n in SHAPES if not torch.equal(straight[n], init[n])]
    assert set(moved) == set(SHAPES) - set(SKIP)


@pytest.mark.parametrize("name", ["adamw", "adam-mini", "sophia", "hybrid", "adafactor-classic"])
def test_loading_a_live_state_dict_shares_nothing(name: str) -> None:
    """``opt2.load_state_dict(opt1.state_dict())``, then both continue: each equals an
    uninterrupted run (no state tensor, the step count included, is shared between them)."""
    init = make_params(SHAPES, torch.float32)
    straight = copy_params(init)
    opt = build(name, straight)
    train(opt, straight, 1, N + M)

    first = copy_params(init)
    opt1 = build(name, first)
    train(opt1, first, 1, N)
    resumed = copy_params(first)
    opt2 = build(name, resumed)
    opt2.load_state_dict(opt1.state_dict())
    train(opt1, first, N + 1, N + M)
    train(opt2, resumed, N + 1, N + M)
    assert_same(opt, straight, opt1, first)
    assert_same(opt, straight, opt2, resumed)


@pytest.mark.parametrize("name", list(available()))
def test_bfloat16_params_keep_float32_state(name: str) -> None:
    init = make_params(SHAPES, torch.bfloat16)
    straight = copy_params(init)
    opt = build(name, straight)
    train(opt, straight, 1, N + M)

    first = copy_params(init)
    opt1 = build(name, first)
    train(opt1, first, 1, N)
    saved = via_torch_save(opt1.state_dict())
    resumed = copy_params(first)
    opt2 = build(name, resumed)
    opt2.load_state_dict(saved)
    floating = [
        v
        for s in opt2.state.values()
        for k, v in s.items()
        if isinstance(v, Tensor) and v.is_floating_point() and k not in ("step", "lr")
    ]
    assert floating, "no state to check"
    assert all(v.dtype == torch.float32 for v in floating), {v.dtype for v in floating}
    train(opt2, resumed, N + 1, N + M)
    assert_same(opt, straight, opt2, resumed)
    assert all(p.dtype == torch.bfloat16 for p in resumed.values())
