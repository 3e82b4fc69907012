"""Parity of every optimizer with its reference, in float64.

Drop-in classes are compared with the package they replace (torch, lion-pytorch,
pytorch-optimizer, sophia-opt, adam-mini 1.1.1, transformers); the study's own variants
(Adafactor, Adalayer, the frozen preconditioner, EMA-momentum SGD) with a literal transcription
of the formulas in ``optimizers-and-protocol.md`` written below. Every run: 1-D, 2-D and 3-D
tensors in two param groups with different hyperparameters, 32 steps, a learning-rate change at
step 16, seeded gradients with exact zeros (one tensor entirely zero at step 3) and one
parameter whose grad stays ``None``. Parameters and state are compared.

Tolerance: rtol 1e-10 / atol 1e-12. The references update their EMAs as ``β m + (1-β) g``
where we use ``lerp`` and divide in a different order (``addcdiv`` vs ``m / denom``), which are
the same formula in another rounding order: they differ by a few ulps per step.
"""

from __future__ import annotations

import copy
import functools
import math
import types
from collections.abc import Callable, Mapping
from typing import Any

import adam_mini
import lion_pytorch
import numpy as np
import pytest
import pytorch_optimizer
import pytorch_optimizer.optimizer.muon.normuon as normuon_reference
import pytorch_optimizer.optimizer.psgd as kron_reference
import pytorch_optimizer.optimizer.soap as soap_reference
import schedulefree
import sophia_opt
import torch
import transformers.optimization as hf_optim
from torch import Tensor, nn

from optarena.optim import (
    ADOPT,
    EMASGD,
    MARS,
    SGD,
    SOAP,
    Adafactor,
    AdafactorClassic,
    Adalayer,
    AdamMini,
    AdamW,
    AdamWScheduleFree,
    AdEMAMix,
    FusedPart,
    Kron,
    Lion,
    Muon,
    NAdamW,
    ParamInfo,
    Role,
    Signum,
    SophiaG,
    create,
    transforms,
)
from optim_cases import (
    GROUP_A,
    GROUP_B,
    NO_GRAD,
    TinyLM,
    assert_close,
    clone_params,
    count_kernel_calls,
    llama_partition,
    llama_shapes,
    make_params,
    set_grads,
)

pytestmark = pytest.mark.usefixtures("single_thread")

STEPS = 32
LR_CHANGE = 16  # from step 17 on, group 0's lr is x0.3 and group 1's x2
LR_FACTORS = (0.3, 2.0)
SHAPES = {**GROUP_A, **GROUP_B, NO_GRAD: (3, 2)}

Groups = list[dict[str, Any]]


def split_groups(params: Mapping[str, Tensor], named: bool, group_b: Mapping[str, Any]) -> Groups:
    """Group 0: ``GROUP_A`` with the optimizer defaults; group 1: the rest, with ``group_b``."""

    def entry(n: str) -> Any:
        return (n, params[n]) if named else params[n]

    a = [entry(n) for n in params if n in GROUP_A]
    b = [entry(n) for n in params if n not in GROUP_A]
    return [{"params": a}, {"params": b, **group_b}]


def change_lr(opt: torch.optim.Optimizer) -> None:
    for group, factor in zip(opt.param_groups, LR_FACTORS, strict=True):
        group["lr"] *= factor


def run_pair(
    ours: torch.optim.Optimizer,
    ref: torch.optim.Optimizer,
    p_ours: Mapping[str, Tensor],
    p_ref: Mapping[str, Tensor],
    *,
    n_steps: int = STEPS,
    step_ours: Callable[[], Any] | None = None,
    step_ref: Callable[[], Any] | None = None,
    skip: tuple[str, ...] = (NO_GRAD,),
    before_ref_step: Callable[[int], None] | None = None,
) -> None:
    for t in range(1, n_steps + 1):
        if t == LR_CHANGE + 1:
            change_lr(ours)
            change_lr(ref)
        set_grads(p_ours, t, skip=skip)
        set_grads(p_ref, t, skip=skip)
        if before_ref_step is not None:
            before_ref_step(t)
        (step_ours or ours.step)()
        (step_ref or ref.step)()


def compare(
    ours: torch.optim.Optimizer,
    ref: torch.optim.Optimizer,
    p_ours: Mapping[str, Tensor],
    p_ref: Mapping[str, Tensor],
    keys: Mapping[str, str],
    init: Mapping[str, Tensor],
    skip: tuple[str, ...] = (NO_GRAD,),
) -> None:
    """Parameters equal, the state entries ``keys`` (ours -> reference) equal, the parameters
    actually moved, and a parameter without gradients untouched and stateless."""
    for name, p in p_ours.items():
        assert_close(p, p_ref[name], f"param {name}")
        if name in skip:
            assert torch.equal(p, init[name]), f"{name} has no grad but was changed"
            assert not ours.state.get(p), f"{name} has no grad but got state"
            continue
        assert (p - init[name]).abs().max() > 1e-7, f"{name} did not move"
        for ours_key, ref_key in keys.items():
            a, b = ours.state[p][ours_key], ref.state[p_ref[name]][ref_key]
            assert_close(a.reshape(b.shape), b, f"state {ours_key} of {name}")


# tensors whose column factors are summed over runs of 16 rows first (leading extents > 16)
TALL = {"b.tall": (48, 3), "b.tall3": (2, 32, 3)}


def fresh(shapes: Mapping[str, tuple[int, ...]] = SHAPES) -> tuple[dict, dict, dict]:
    p_ours = make_params(shapes)
    return p_ours, clone_params(p_ours), {n: p.detach().clone() for n, p in p_ours.items()}


# --------------------------------------------------------------------------- torch AdamW, SGD
# AdamW and SGD run torch's fused kernels (``optarena.optim.torch_kernels``) unless fused=False;
# both that path and the chain's own per-tensor path are pinned to the reference.

KERNEL_PATHS = [pytest.param(True, id="torch-kernel"), pytest.param(False, id="chain")]


def use_path(
    opt: torch.optim.Optimizer, kernel: bool, name: str, monkeypatch: pytest.MonkeyPatch
) -> list[int]:
    """Run ``opt`` on torch's kernel ``name`` or on its chain; the list counts kernel calls."""
    for group in opt.param_groups:
        group["fused"] = None if kernel else False
    return count_kernel_calls(monkeypatch, name)


@pytest.mark.parametrize("kernel", KERNEL_PATHS)
def test_adamw_matches_torch(kernel: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    p_ours, p_ref, init = fresh()
    group_b = {"lr": 3e-3, "betas": (0.8, 0.99), "weight_decay": 0.0, "eps": 1e-6}
    hp = dict(lr=1e-2, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
    ours = AdamW(split_groups(p_ours, True, group_b), **hp)
    ref = torch.optim.AdamW(split_groups(p_ref, False, group_b), **hp, foreach=False)
    calls = use_path(ours, kernel, "_fused_adamw_", monkeypatch)
    run_pair(ours, ref, p_ours, p_ref)
    compare(ours, ref, p_ours, p_ref, {"exp_avg": "exp_avg", "exp_avg_sq": "exp_avg_sq"}, init)
    # every parameter with a gradient went through the kernel, or none did
    assert sum(calls) == (STEPS * (len(SHAPES) - 1) if kernel else 0)


SGD_CASES = [
    pytest.param(dict(momentum=0.0), id="plain"),
    pytest.param(dict(momentum=0.9, weight_decay=1e-2), id="heavy-ball-coupled-wd"),
    pytest.param(dict(momentum=0.9, dampening=0.3), id="dampening"),
    pytest.param(dict(momentum=0.9, nesterov=True, weight_decay=1e-2), id="nesterov"),
]


@pytest.mark.parametrize("kernel", KERNEL_PATHS)
@pytest.mark.parametrize("hp", SGD_CASES)
def test_sgd_matches_torch(
    hp: dict[str, Any], kernel: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    # torch.optim.SGD adds λθ to the gradient: pin ours to the same (coupled) decay.
    p_ours, p_ref, init = fresh()
    group_b = {"lr": 0.05, "momentum": hp["momentum"] / 2}
    if hp.get("nesterov"):
        group_b["momentum"] = 0.5
    ours = SGD(split_groups(p_ours, True, group_b), lr=0.1, decoupled_weight_decay=False, **hp)
    ref = torch.optim.SGD(split_groups(p_ref, False, group_b), lr=0.1, foreach=False, **hp)
    calls = use_path(ours, kernel, "_fused_sgd_", monkeypatch)
    run_pair(ours, ref, p_ours, p_ref)
    keys = {"momentum_buffer": "momentum_buffer"} if hp["momentum"] else {}
    compare(ours, ref, p_ours, p_ref, keys, init)
    assert sum(calls) == (STEPS * (len(SHAPES) - 1) if kernel else 0)


@pytest.mark.parametrize("kernel", KERNEL_PATHS)
def test_sgd_decoupled_decay_matches_torch_plus_manual_decay(
    kernel: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The study's SGD: θ *= 1 - η_t λ, then torch's heavy ball on the undecayed gradient.
    p_ours, p_ref, init = fresh()
    wd = 0.05
    ours = SGD(
        split_groups(p_ours, True, {"lr": 0.05}),
        lr=0.1,
        momentum=0.9,
        weight_decay=wd,
        decoupled_weight_decay=True,
    )
    ref = torch.optim.SGD(split_groups(p_ref, False, {"lr": 0.05}), lr=0.1, momentum=0.9)
    calls = use_path(ours, kernel, "_fused_sgd_", monkeypatch)

    def decay(_: int) -> None:
        with torch.no_grad():
            for group in ref.param_groups:
                for p in group["params"]:
                    if p.grad is not None:
                        p.mul_(1 - group["lr"] * wd)

    run_pair(ours, ref, p_ours, p_ref, before_ref_step=decay)
    compare(ours, ref, p_ours, p_ref, {"momentum_buffer": "momentum_buffer"}, init)
    assert sum(calls) == (STEPS * (len(SHAPES) - 1) if kernel else 0)


# --------------------------------------------------------------------------- sign family


def test_lion_matches_lion_pytorch() -> None:
    # lion-pytorch's default decay is θ *= 1 - η_t λ (decoupled_weight_decay=False pins it;
    # True would divide λ by the initial lr).
    p_ours, p_ref, init = fresh()
    group_b = {"lr": 3e-3, "betas": (0.95, 0.98), "weight_decay": 0.0}
    hp = dict(lr=1e-2, betas=(0.9, 0.99), weight_decay=0.5)
    ours = Lion(split_groups(p_ours, True, group_b), **hp)
    ref = lion_pytorch.Lion(split_groups(p_ref, False, group_b), **hp, decoupled_weight_decay=False)
    run_pair(ours, ref, p_ours, p_ref)
    compare(ours, ref, p_ours, p_ref, {"exp_avg": "exp_avg"}, init)


@pytest.mark.parametrize("momentum", [0.9, 0.0])
def test_signum_matches_pytorch_optimizer_signsgd(momentum: float) -> None:
    # SignSGD(weight_decouple=True): θ *= 1 - η_t λ; EMA momentum (lerp), sign; no bias correction.
    p_ours, p_ref, init = fresh()
    group_b = {"lr": 3e-3, "momentum": momentum / 2, "weight_decay": 0.0}
    hp = dict(lr=1e-2, momentum=momentum, weight_decay=0.5)
    ours = Signum(split_groups(p_ours, True, group_b), **hp)
    ref = pytorch_optimizer.SignSGD(split_groups(p_ref, False, group_b), **hp, weight_decouple=True)
    run_pair(ours, ref, p_ours, p_ref)
    keys = {"exp_avg": "momentum_buffer"} if momentum else {}
    compare(ours, ref, p_ours, p_ref, keys, init)


@pytest.mark.parametrize("bs_in", ["step", "group"])
def test_sophia_matches_sophia_opt(bs_in: str) -> None:
    # Pinned: ρ = 0.05, bs = 37 tokens, Hessian every k = 5 steps, λ = 0.2 (θ *= 1 - η_t λ).
    # ``bs`` is given either to every ``step(bs=...)`` (as sophia-opt takes it) or once to the
    # constructor; the reference always gets it in ``step``.
    p_ours, p_ref, init = fresh()
    bs, k = 37, 5
    group_b = {"lr": 3e-3, "betas": (0.9, 0.95), "rho": 0.02, "weight_decay": 0.0}
    hp = dict(lr=1e-2, betas=(0.965, 0.99), rho=0.05, weight_decay=0.2)
    extra = {"bs": bs} if bs_in == "group" else {}
    ours = SophiaG(split_groups(p_ours, True, group_b), **hp, hessian_interval=k, **extra)
    ref = sophia_opt.SophiaG(split_groups(p_ref, False, group_b), **hp)
    assert ours.hessian_interval == k
    for t in range(1, STEPS + 1):
        if t == LR_CHANGE + 1:
            change_lr(ours)
            change_lr(ref)
        set_grads(p_ours, t)
        set_grads(p_ref, t)
        ours.step(bs=bs) if bs_in == "step" else ours.step()
        ref.step(bs=bs)
        if t % ours.hessian_interval == 0:
            # synthetic "hessian gradients": other seed, larger scale so that |m| / (ρ bs h)
            # is below 1 for part of the entries (the unclipped branch is exercised)
            set_grads(p_ours, t, seed=2, scale=2.0)
            set_grads(p_ref, t, seed=2, scale=2.0)
            ours.update_hessian()
            ref.update_hessian()
    compare(ours, ref, p_ours, p_ref, {"exp_avg": "exp_avg", "hessian": "hessian"}, init)
    ratios = [
        (s["exp_avg"].abs() / (0.05 * bs * s["hessian"])).flatten()
        for p, s in ours.state.items()
        if any(p is q for q in list(p_ours.values())[:3])
    ]
    unclipped = (torch.cat(ratios) < 1).double().mean()
    assert 0.05 < unclipped < 0.95, f"only {unclipped:.2f} of the entries are unclipped"


# --------------------------------------------------------------------------- Adam-mini


def test_adam_mini_matches_official_1_1_1() -> None:
    # A Llama-named model (GQA: 2 kv heads for 4 query heads) with one attention bias, which the
    # official code updates with elementwise Adam. The official code keeps one group per
    # parameter; we give its groups the lr of the group each parameter is in on our side.
    dim, n_heads, n_kv = 32, 4, 2
    shapes = llama_shapes(dim=dim, n_heads=n_heads, n_kv_heads=n_kv)
    shapes["model.layers.0.self_attn.q_proj.bias"] = (dim,)
    infos = llama_partition(shapes, n_heads, n_kv)
    assert infos["model.layers.0.self_attn.q_proj.bias"].role is Role.BIAS
    p_ours = make_params(shapes)
    p_ref = clone_params(p_ours)
    init = {n: p.detach().clone() for n, p in p_ours.items()}
    skip = ("model.layers.1.self_attn.v_proj.weight", "model.layers.1.input_layernorm.weight")
    in_a = [n for n in shapes if ".layers.0." in n or "embed" in n]
    in_b = [n for n in shapes if n not in in_a]
    lrs = (1e-2, 4e-3)
    hp = dict(betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
    ours = AdamMini(
        [
            {"params": [(n, p_ours[n]) for n in in_a], "lr": lrs[0]},
            {"params": [(n, p_ours[n]) for n in in_b], "lr": lrs[1]},
        ],
        **hp,
        partition=infos,
    )
    ref = adam_mini.Adam_mini(
        list(p_ref.items()),
        lr=lrs[0],
        **hp,
        dim=dim,
        n_heads=n_heads,
        n_kv_heads=n_kv,
        verbose=False,
    )
    for group in ref.param_groups:
        group["lr"] = lrs[0] if group["name"] in in_a else lrs[1]
    for t in range(1, STEPS + 1):
        if t == LR_CHANGE + 1:
            change_lr(ours)
            for group in ref.param_groups:
                group["lr"] *= LR_FACTORS[0] if group["name"] in in_a else LR_FACTORS[1]
        set_grads(p_ours, t, skip=skip)
        set_grads(p_ref, t, skip=skip)
        ours.step()
        ref.step()
    for name, p in p_ours.items():
        assert_close(p, p_ref[name], f"param {name}")
        if name in skip:
            assert torch.equal(p, init[name])
            continue
        assert (p - init[name]).abs().max() > 1e-4, f"{name} did not move"
        mine, theirs = ours.state[p], ref.state[p_ref[name]]
        assert_close(mine["exp_avg"], theirs["m"].reshape(p.shape), f"m of {name}")
        v_ref = theirs["v"] if "bias" in name else theirs["vmean"]
        assert mine["exp_avg_sq"].numel() == v_ref.numel(), f"block count of {name}"
        assert_close(mine["exp_avg_sq"].reshape(v_ref.shape), v_ref, f"v of {name}")
    # the GQA key projection has one block per kv head, the query one per query head
    assert ours.state[p_ours["model.layers.0.self_attn.k_proj.weight"]]["exp_avg_sq"].numel() == 2
    assert ours.state[p_ours["model.layers.0.self_attn.q_proj.weight"]]["exp_avg_sq"].numel() == 4


# --------------------------------------------------------------------------- classic Adafactor

ADAFACTOR_CASES = [
    pytest.param(dict(lr=None, relative_step=True, scale_parameter=True), id="relative-scaled"),
    pytest.param(
        dict(lr=None, relative_step=True, scale_parameter=True, beta1=0.9, weight_decay=0.1),
        id="relative-scaled-beta1-wd",
    ),
    pytest.param(
        dict(lr=None, relative_step=True, scale_parameter=False, warmup_init=True),
        id="relative-warmup",
    ),
    pytest.param(
        dict(lr=1e-2, relative_step=False, scale_parameter=False, beta1=0.9, weight_decay=0.1),
        id="external-lr-beta1-wd",
    ),
    pytest.param(
        dict(lr=1e-2, relative_step=False, scale_parameter=True, weight_decay=0.05),
        id="external-lr-scaled-wd",
    ),
]


@pytest.mark.parametrize("hp", ADAFACTOR_CASES)
def test_adafactor_classic_matches_transformers(hp: dict[str, Any]) -> None:
    # Pinned: decay_rate -0.8 (β2_t = 1 - t^-0.8), clip_threshold 1, eps (1e-30, 1e-3),
    # factored over the last two axes; momentum (beta1) on the lr-scaled update.
    p_ours, p_ref, init = fresh({**SHAPES, **TALL})
    group_b = {"clip_threshold": 0.5}
    if hp["lr"] is not None:
        group_b["lr"] = 3e-3
    ours = AdafactorClassic(split_groups(p_ours, True, group_b), **hp)
    ref = hf_optim.Adafactor(split_groups(p_ref, False, group_b), **hp)
    if hp["lr"] is None:  # nothing to change: the step size is relative
        run = dict(n_steps=STEPS)
        for opt in (ours, ref):
            for group in opt.param_groups:
                assert group["lr"] is None
        for t in range(1, run["n_steps"] + 1):
            set_grads(p_ours, t)
            set_grads(p_ref, t)
            ours.step()
            ref.step()
    else:
        run_pair(ours, ref, p_ours, p_ref)
    keys = {"exp_avg": "exp_avg"} if hp.get("beta1") is not None else {}
    for name, p in p_ours.items():
        if name == NO_GRAD:
            continue
        if p.dim() >= 2:
            keys_p = {
                **keys,
                "exp_avg_sq_row": "exp_avg_sq_row",
                "exp_avg_sq_col": "exp_avg_sq_col",
            }
        else:
            keys_p = {**keys, "exp_avg_sq": "exp_avg_sq"}
        for k_ours, k_ref in keys_p.items():
            assert_close(
                ours.state[p][k_ours], ref.state[p_ref[name]][k_ref], f"{k_ours} of {name}"
            )
    compare(ours, ref, p_ours, p_ref, {}, init)


# --------------------------------------------------------------------------- study variants
# Literal transcriptions of optimizers-and-protocol.md, one parameter at a time, in float64.


def study_loop(
    opt: torch.optim.Optimizer,
    params: Mapping[str, Tensor],
    ref_params: Mapping[str, Tensor],
    group_of: Mapping[str, int],
    hps: list[dict[str, Any]],
    update: Callable[[str, Tensor, Tensor, dict, int, dict[str, Any]], None],
    *,
    n_steps: int = STEPS,
) -> dict[str, dict]:
    """Run ``opt`` on ``params`` and ``update(name, p, g, state, t, hp)`` on ``ref_params``."""
    states: dict[str, dict] = {n: {} for n in params}
    lrs = [h["lr"] for h in hps]
    for t in range(1, n_steps + 1):
        if t == LR_CHANGE + 1:
            change_lr(opt)
            lrs = [lr * f for lr, f in zip(lrs, LR_FACTORS, strict=True)]
        set_grads(params, t)
        set_grads(ref_params, t)
        opt.step()
        with torch.no_grad():
            for name, p in ref_params.items():
                if p.grad is None:
                    continue
                st = states[name]
                st["t"] = st.get("t", 0) + 1
                hp = {**hps[group_of[name]], "lr": lrs[group_of[name]]}
                update(name, p, p.grad, st, st["t"], hp)
    return states


def check_study(opt, p_ours, p_ref, init) -> None:
    for name, p in p_ours.items():
        assert_close(p, p_ref[name], f"param {name}")
        if name == NO_GRAD:
            assert torch.equal(p, init[name]) and not opt.state.get(p)
        else:
            assert (p - init[name]).abs().max() > 1e-4, f"{name} did not move"


def ema(st: dict, key: str, x: Tensor, beta: float) -> Tensor:
    st[key] = beta * st.get(key, torch.zeros_like(x)) + (1 - beta) * x
    return st[key]


def adam_like_step(p: Tensor, m: Tensor, v: Tensor, t: int, hp: dict[str, Any]) -> None:
    """``θ *= 1 - ηλ``; ``θ -= (η / (1-β1^t)) m / (sqrt(v / (1-β2^t)) + ε)``."""
    b1, b2 = hp["betas"]
    p.mul_(1 - hp["lr"] * hp["weight_decay"])
    p.sub_((hp["lr"] / (1 - b1**t)) * m / ((v / (1 - b2**t)).sqrt() + hp["eps"]))


@pytest.mark.parametrize("beta1", [0.9, 0.0])
def test_adafactor_study_matches_transcription(beta1: float) -> None:
    # Study's Adafactor: r_i = EMA_β2(mean of g² over all other axes) for every axis;
    # matrix V = r cᵀ / mean(r) (written as an outer product); N axes: Π_i r_i / mean^(N-1);
    # 1-D: one scalar, the EMA of mean(g²). Adam's bias corrections, constant β2.
    shapes = {**SHAPES, **TALL, "a.scalar": ()}
    p_ours = make_params(shapes)
    p_ref = clone_params(p_ours)
    init = {n: p.detach().clone() for n, p in p_ours.items()}
    hps = [
        dict(lr=1e-2, betas=(beta1, 0.95), eps=1e-8, weight_decay=0.1),
        dict(lr=3e-3, betas=(beta1 / 2, 0.99), eps=1e-6, weight_decay=0.0),
    ]
    group_of = {n: 0 if n in GROUP_A or n == "a.scalar" else 1 for n in shapes}
    groups = [
        {"params": [(n, p) for n, p in p_ours.items() if group_of[n] == i], **hps[i]}
        for i in range(2)
    ]
    opt = Adafactor(groups)

    def update(name, p, g, st, t, hp):
        b1, b2 = hp["betas"]
        m = ema(st, "m", g, b1) if b1 > 0 else g
        if g.dim() < 2:
            v = ema(st, "v", (g * g).mean(), b2)
        else:
            axes = range(g.dim())
            r = [
                ema(st, f"r{i}", (g * g).mean(dim=[d for d in axes if d != i], keepdim=True), b2)
                for i in axes
            ]
            if g.dim() == 2:
                v = (r[0].reshape(-1, 1) @ r[1].reshape(1, -1)) / r[0].mean()
            else:
                v = math.prod(r[1:], start=r[0]) / r[0].mean() ** (g.dim() - 1)
        adam_like_step(p, m, v, t, hp)

    states = study_loop(opt, p_ours, p_ref, group_of, hps, update)
    check_study(opt, p_ours, p_ref, init)
    mat = p_ours["a.mat"]
    assert_close(opt.state[mat]["exp_avg_sq_0"].flatten(), states["a.mat"]["r0"].flatten(), "r")
    assert_close(opt.state[mat]["exp_avg_sq_1"].flatten(), states["a.mat"]["r1"].flatten(), "c")
    if beta1:
        assert_close(opt.state[mat]["exp_avg"], states["a.mat"]["m"], "m")


ADALAYER_SHAPES = {
    "attn.qkv.weight": (12, 5),
    "lm_head.weight": (6, 5),
    "ln.weight": (5,),
    "mlp.weight": (3, 4, 5),
    "pos": (7,),
    "b.mlp.weight": (4, 6),
    NO_GRAD: (3, 2),
}
ADALAYER_INFOS = {
    "attn.qkv.weight": ParamInfo(
        "attn.qkv.weight",
        (12, 5),
        Role.QKV,
        heads=2,
        parts=(FusedPart(Role.Q, 4, 2), FusedPart(Role.K, 4, 2), FusedPart(Role.V, 4, 2)),
    ),
    "lm_head.weight": ParamInfo("lm_head.weight", (6, 5), Role.OUTPUT),
    "ln.weight": ParamInfo("ln.weight", (5,), Role.NORM),
    "mlp.weight": ParamInfo("mlp.weight", (3, 4, 5), Role.MLP),
    "b.mlp.weight": ParamInfo("b.mlp.weight", (4, 6), Role.MLP),
}


def test_adalayer_matches_transcription() -> None:
    # Adalayer: v_b = β2 v_b + (1-β2) mean_{i∈b} g_i²; a block is a tensor, except: the fused
    # QKV matrix is three blocks (its Q, K and V rows), the last layer one block per row.
    p_ours = make_params(ADALAYER_SHAPES)
    p_ref = clone_params(p_ours)
    init = {n: p.detach().clone() for n, p in p_ours.items()}
    hps = [
        dict(lr=1e-2, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1),
        dict(lr=3e-3, betas=(0.8, 0.99), eps=1e-6, weight_decay=0.0),
    ]
    group_of = {n: 1 if n.startswith("b.") else 0 for n in ADALAYER_SHAPES}
    groups = [
        {"params": [(n, p) for n, p in p_ours.items() if group_of[n] == i], **hps[i]}
        for i in range(2)
    ]
    opt = Adalayer(groups, partition=ADALAYER_INFOS)

    def block_mean_sq(name: str, g: Tensor) -> Tensor:
        if name == "lm_head.weight":
            return torch.stack([(row * row).mean() for row in g]).reshape(-1, 1)
        if name == "attn.qkv.weight":
            means = [(g[i : i + 4] ** 2).mean() for i in (0, 4, 8)]
            return torch.stack([means[i // 4] for i in range(12)]).reshape(-1, 1)
        return (g * g).mean()

    def update(name, p, g, st, t, hp):
        b1, b2 = hp["betas"]
        m = ema(st, "m", g, b1)
        v = ema(st, "v", block_mean_sq(name, g), b2)
        adam_like_step(p, m, v, t, hp)

    states = study_loop(opt, p_ours, p_ref, group_of, hps, update)
    check_study(opt, p_ours, p_ref, init)
    qkv = opt.state[p_ours["attn.qkv.weight"]]["exp_avg_sq"]
    assert qkv.numel() == 3
    assert_close(qkv, states["attn.qkv.weight"]["v"].flatten()[::4], "qkv blocks")
    head = opt.state[p_ours["lm_head.weight"]]["exp_avg_sq"]
    assert_close(head, states["lm_head.weight"]["v"].flatten(), "per-row output")
    assert opt.state[p_ours["mlp.weight"]]["exp_avg_sq"].numel() == 1


def test_sgd_ema_matches_transcription() -> None:
    # The hybrids' body: m = β m + (1-β) g; θ *= 1 - ηλ; θ -= (η / (1-β^t)) m.
    p_ours = make_params(SHAPES)
    p_ref = clone_params(p_ours)
    init = {n: p.detach().clone() for n, p in p_ours.items()}
    hps = [dict(lr=0.1, momentum=0.9, weight_decay=0.1), dict(lr=0.3, momentum=0.5, weight_decay=0)]
    group_of = {n: 0 if n in GROUP_A else 1 for n in SHAPES}
    groups = [
        {"params": [(n, p) for n, p in p_ours.items() if group_of[n] == i], **hps[i]}
        for i in range(2)
    ]
    opt = EMASGD(groups)

    def update(name, p, g, st, t, hp):
        m = ema(st, "m", g, hp["momentum"])
        p.mul_(1 - hp["lr"] * hp["weight_decay"])
        p.sub_(hp["lr"] / (1 - hp["momentum"] ** t) * m)

    study_loop(opt, p_ours, p_ref, group_of, hps, update)
    check_study(opt, p_ours, p_ref, init)


@pytest.mark.parametrize("unfrozen", [(), ("output",)])
def test_adam_frozen_matches_transcription(unfrozen: tuple[str, ...]) -> None:
    # Frozen preconditioner: for the first K steps no update while v is the uniform average of
    # g² (sum / t, unbiased: no bias correction later); then v is fixed, except on the unfrozen
    # roles where it continues as an EMA. m is Adam's EMA throughout, corrected with the global t.
    k, lr, betas, eps = 8, 1e-2, (0.9, 0.95), 1e-8
    infos = {n: ParamInfo(n, s, Role.MLP) for n, s in SHAPES.items()}
    infos["b.mat"] = ParamInfo("b.mat", SHAPES["b.mat"], Role.OUTPUT)
    p_ours = make_params(SHAPES)
    p_ref = clone_params(p_ours)
    init = {n: p.detach().clone() for n, p in p_ours.items()}
    opt = create(
        "adam-frozen",
        list(p_ours.items()),
        lr=lr,
        betas=betas,
        eps=eps,
        precondition_steps=k,
        unfrozen_roles=unfrozen,
        partition=infos,
    )
    states: dict[str, dict] = {n: {} for n in SHAPES}
    for t in range(1, STEPS + 1):
        set_grads(p_ours, t)
        set_grads(p_ref, t)
        if t == k:
            snapshot = {n: p.detach().clone() for n, p in p_ours.items()}
        opt.step()
        with torch.no_grad():
            for name, p in p_ref.items():
                if p.grad is None:
                    continue
                g, st = p.grad, states[name]
                m = ema(st, "m", g, betas[0])
                if t <= k:
                    st["sum"] = st.get("sum", torch.zeros_like(g)) + g * g
                    st["v"] = st["sum"] / t
                    continue
                if infos[name].role.value in unfrozen:
                    st["v"] = betas[1] * st["v"] + (1 - betas[1]) * g * g
                p.sub_(lr / (1 - betas[0] ** t) * m / (st["v"].sqrt() + eps))
    for name in SHAPES:
        assert torch.equal(snapshot[name], init[name]), f"{name} moved while preconditioning"
    check_study(opt, p_ours, p_ref, init)
    out = p_ours["b.mat"]
    assert_close(opt.state[out]["exp_avg_sq"], states["b.mat"]["v"], "v of the output layer")


# --------------------------------------------------------------------------- Muon
# torch.optim.Muon takes plain 2-D parameters; ours, given the same, runs the same bfloat16
# Newton-Schulz and must equal it. Tall, wide and square matrices in two groups.

MUON_SHAPES = {"a.tall": (12, 5), "a.wide": (4, 10), "b.square": (6, 6), NO_GRAD: (3, 2)}
MUON_A = ("a.tall", "a.wide")


@pytest.mark.parametrize(
    "hp",
    [
        {"lr": 2e-2},
        {"lr": 1e-2, "nesterov": False, "momentum": 0.9, "adjust_lr_fn": "match_rms_adamw"},
        {"lr": 1e-2, "ns_coefficients": (3.0, -3.2, 1.2), "ns_steps": 3, "eps": 1e-5},
    ],
    ids=["defaults", "no-nesterov-moonshot", "coefficients"],
)
def test_muon_matches_torch(hp: dict[str, Any]) -> None:
    p_ours = make_params(MUON_SHAPES)
    p_ref, init = clone_params(p_ours), {n: p.detach().clone() for n, p in p_ours.items()}
    b = {"weight_decay": 0.3, "momentum": 0.8}

    def groups(params: Mapping[str, Tensor]) -> Groups:
        a = [p for n, p in params.items() if n in MUON_A]
        return [{"params": a}, {"params": [p for n, p in params.items() if n not in MUON_A], **b}]

    ours = Muon(groups(p_ours), **hp, fused=False)
    ref = torch.optim.Muon(groups(p_ref), **hp)
    run_pair(ours, ref, p_ours, p_ref)
    compare(ours, ref, p_ours, p_ref, {"momentum_buffer": "momentum_buffer"}, init)


@pytest.mark.parametrize("name", ["muon", "normuon"])
def test_muon_orthogonalises_each_part_expert_and_head_alone(name: str) -> None:
    """A fused QKV is three matrices (per head with ``per_head``), a stacked MoE tensor one per
    expert, a Conv1D weight (in, out) its transpose: each equals torch.optim.Muon (NorMuon:
    pytorch-optimizer's, its neurons the piece's rows) on that piece as an (out, in) parameter of
    its own (its own ``adjust_lr_fn`` ratio too)."""
    parts = (FusedPart(Role.Q, 8, 2), FusedPart(Role.K, 4, 1), FusedPart(Role.V, 4, 1))
    infos = {
        "qkv": ParamInfo("qkv", (16, 6), Role.QKV, parts=parts),
        "experts": ParamInfo("experts", (3, 5, 7), Role.MLP, out_dim=1, experts=3),
        "conv1d": ParamInfo("conv1d", (4, 9), Role.MLP, out_dim=1),
    }
    heads = [(slice(4 * h, 4 * h + 4),) for h in range(4)]  # q's two heads, k, v
    pieces: dict[str, list[Callable[[Tensor], Tensor]]] = {
        "qkv": [lambda x, i=i: x[i] for i in heads],
        "experts": [lambda x, e=e: x[e] for e in range(3)],
        "conv1d": [lambda x: x.T],
    }
    params = make_params({n: i.shape for n, i in infos.items()})
    refs = [nn.Parameter(cut(params[n].detach()).clone()) for n in infos for cut in pieces[n]]
    ours = create(name, list(params.items()), partition=infos, per_head=True, lr=2e-2)
    if name == "muon":
        ref = torch.optim.Muon(refs, lr=2e-2)
    else:
        groups = [{"params": refs, "use_muon": True}]  # foreach would batch the experts' NS
        ref = pytorch_optimizer.NorMuon(groups, lr=2e-2, foreach=False)
    assert [g["optimizer"] for g in ours.param_groups] == [name]
    for t in range(1, 9):
        set_grads(params, t, skip=())
        grads = [cut(params[n].grad) for n in infos for cut in pieces[n]]
        for r, g in zip(refs, grads, strict=True):
            r.grad = g.clone()
        ours.step()
        ref.step()
    got = [cut(params[n].detach()) for n in infos for cut in pieces[n]]
    for k, (a, b) in enumerate(zip(got, refs, strict=True)):
        assert_close(a, b.detach(), f"piece {k}")


@pytest.mark.parametrize("name", ["muon", "normuon"])
def test_muon_on_a_model_routes_the_rest_to_adamw(name: str) -> None:
    """create("muon", model): hidden matrices to Muon, embeddings, the head and norms to AdamW
    with its own lr, which then equals torch.optim.AdamW on those parameters."""
    model = TinyLM().double()
    ref_model = copy.deepcopy(model)
    opt = create(name, model, partition=model.partition(), lr=2e-2, adamw_lr=3e-3)
    by = {g["optimizer"]: {n for n in g["param_names"]} for g in opt.param_groups}
    hidden = {n for n, p in model.named_parameters() if p.dim() == 2} - {
        "embed_tokens.weight",
        "lm_head.weight",
    }
    assert by[name] == hidden
    named = dict(ref_model.named_parameters())
    rest = [named[n] for n in named if n not in hidden]
    ref = torch.optim.AdamW(rest, lr=3e-3, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.0)
    for t in range(1, 6):
        set_grads(dict(model.named_parameters()), t, skip=())
        set_grads(named, t, skip=())
        opt.step()
        ref.step()
    mine = dict(model.named_parameters())
    for n in named:
        if n not in hidden:
            assert_close(mine[n].detach(), named[n].detach(), n)


@pytest.mark.parametrize(
    "bad, message",
    [
        ({"ns_steps": 0}, "ns_steps"),
        ({"adjust_lr_fn": "rms"}, "adjust_lr_fn"),
        ({"ns_coefficients": (1.0, 2.0)}, "ns_coefficients"),
        ({"ns_dtype": "float16"}, "ns_dtype"),
        ({"momentum": 1.0}, "momentum"),
    ],
)
def test_muon_refuses_bad_hyperparameters_in_one_line(bad: dict, message: str) -> None:
    with pytest.raises(ValueError, match=f"invalid {message}=") as caught:
        Muon([nn.Parameter(torch.zeros(3, 2))], **bad)
    assert "\n" not in str(caught.value)


def test_muon_refuses_a_vector_and_names_the_route() -> None:
    opt = Muon([nn.Parameter(torch.zeros(3))])
    opt.param_groups[0]["params"][0].grad = torch.ones(3)
    with pytest.raises(ValueError, match=r"not a matrix.*create\('muon', model\)"):
        opt.step()


# --------------------------------------------------------------------------- NorMuon
# pytorch-optimizer's NorMuon runs its Newton-Schulz in bfloat16 (no flag); ours with
# ns_dtype="bfloat16" computes the same bits (the defaults' case). To compare the rest in float64
# the reference's Newton-Schulz is given float64 and ours ns_dtype="float64". Its
# ``use_adjusted_lr`` is our adjust_lr_fn ("match_rms_adamw" / None), its ``eps`` our row_eps.

NORMUON_CASES = {
    "defaults": ({}, {}),
    "moonshot-ratio": ({"adjust_lr_fn": "match_rms_adamw"}, {"use_adjusted_lr": True}),
    "match-rms": ({"update_scale": "match_rms", "nesterov": False}, {"update_scale": "match_rms"}),
    "row-eps": ({"row_eps": 1e-3, "beta2": 0.8, "momentum": 0.9}, {"eps": 1e-3}),
}


@pytest.mark.parametrize("case", list(NORMUON_CASES))
def test_normuon_matches_pytorch_optimizer(case: str, monkeypatch: pytest.MonkeyPatch) -> None:
    ours_hp, ref_hp = NORMUON_CASES[case]
    if case != "defaults":
        float64 = {"dtype": torch.float64}
        ns = functools.partial(normuon_reference.zero_power_via_newton_schulz_5, **float64)
        monkeypatch.setattr(normuon_reference, "zero_power_via_newton_schulz_5", ns)
        ours_hp = {**ours_hp, "ns_dtype": "float64"}
    shared = {k: v for k, v in ours_hp.items() if k in ("nesterov", "beta2", "momentum")}
    p_ours = make_params(MUON_SHAPES)
    p_ref, init = clone_params(p_ours), {n: p.detach().clone() for n, p in p_ours.items()}
    b = {"weight_decay": 0.3, "momentum": 0.8, "lr": 1e-2}

    def groups(params: Mapping[str, Tensor], **flag: Any) -> Groups:
        a = [p for n, p in params.items() if n in MUON_A]
        rest = [p for n, p in params.items() if n not in MUON_A]
        return [{"params": a, **flag}, {"params": rest, **b, **flag}]

    ours = create("normuon", groups(p_ours), weight_decay=0.1, **ours_hp)
    ref = pytorch_optimizer.NorMuon(
        groups(p_ref, use_muon=True), weight_decay=0.1, **shared, **ref_hp, foreach=False
    )
    run_pair(ours, ref, p_ours, p_ref)
    keys = {k: k for k in ("momentum_buffer", "second_momentum_buffer")}
    compare(ours, ref, p_ours, p_ref, keys, init)


def test_normuon_keeps_each_matrix_norm_and_equalises_its_neurons() -> None:
    """The property: with ``beta2 = 0`` every row of the update has the same norm, and the
    whole has the orthogonalised momentum's norm (Muon's update, before its lr)."""
    p = make_params({"w": (8, 5)})
    q = clone_params(p)
    ours = create("normuon", [p["w"]], lr=1.0, beta2=0.0, row_eps=0.0, ns_dtype="float64")
    muon = create("muon", [q["w"]], lr=1.0, weight_decay=0.0, ns_dtype="float64")
    set_grads(p, 1, skip=())
    set_grads(q, 1, skip=())
    before = p["w"].detach().clone()
    ours.step()
    muon.step()
    step, muon_step = before - p["w"].detach(), before - q["w"].detach()
    rows = step.norm(dim=1)
    assert_close(rows, rows.mean().expand_as(rows), "row norms")
    assert_close(step.norm(), muon_step.norm(), "the update's norm")
    assert not torch.allclose(step, muon_step)


def test_normuon_refuses_bad_hyperparameters_in_one_line() -> None:
    for bad, key in (({"update_scale": "rms"}, "update_scale"), ({"beta2": 1.0}, "beta2")):
        with pytest.raises(ValueError, match=f"invalid {key}=") as caught:
            create("normuon", [nn.Parameter(torch.zeros(3, 2))], **bad)
        assert "\n" not in str(caught.value)


# --------------------------------------------------------------------------- NAdamW
# torch keeps NAdam's running product of μ_t in a 0-d tensor of the default dtype (float32
# unless it is float64); ours is computed on the host in float64, so the reference runs with
# float64 as the default dtype, where the two are the same numbers.


def test_nadamw_matches_torch_nadam_decoupled(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch, "get_default_dtype", lambda: torch.float64)
    p_ours, p_ref, init = fresh()
    b = {"betas": (0.8, 0.99), "weight_decay": 0.2, "momentum_decay": 1e-2}
    hp = {"lr": 1e-2, "weight_decay": 0.1}
    ours = NAdamW(split_groups(p_ours, True, b), **hp, fused=False)
    ref = torch.optim.NAdam(split_groups(p_ref, False, b), **hp, decoupled_weight_decay=True)
    run_pair(ours, ref, p_ours, p_ref)
    compare(ours, ref, p_ours, p_ref, {"exp_avg": "exp_avg", "exp_avg_sq": "exp_avg_sq"}, init)
    mu = next(iter(ref.state.values()))["mu_product"]
    assert mu.dtype == torch.float64  # the reference really ran in float64


# --------------------------------------------------------------------------- ADOPT


@pytest.mark.parametrize("clip", [0.25, None], ids=["clipped", "unclipped"])
def test_adopt_matches_pytorch_optimizer(clip: float | None) -> None:
    p_ours, p_ref, init = fresh()
    b = {"betas": (0.8, 0.99), "weight_decay": 0.2}
    hp = {"lr": 1e-2, "weight_decay": 0.1, "eps": 1e-6}
    ours = ADOPT(split_groups(p_ours, True, b), **hp, clip_exponent=clip, fused=False)
    lam = None if clip is None else (lambda t: t**clip)
    ref = pytorch_optimizer.ADOPT(
        split_groups(p_ref, False, b), **hp, weight_decouple=True, clip_lambda=lam, foreach=False
    )
    run_pair(ours, ref, p_ours, p_ref)
    compare(ours, ref, p_ours, p_ref, {"exp_avg": "exp_avg", "exp_avg_sq": "exp_avg_sq"}, init)


# --------------------------------------------------------------------------- AdEMAMix


@pytest.mark.parametrize("horizon", [None, 20], ids=["constant", "warmup"])
def test_ademamix_matches_pytorch_optimizer(horizon: int | None) -> None:
    p_ours, p_ref, init = fresh()
    b = {"betas": (0.8, 0.99, 0.999), "weight_decay": 0.2, "alpha": 2.0}
    hp = {"lr": 1e-2, "weight_decay": 0.1, "t_alpha_beta3": horizon}
    ours = AdEMAMix(split_groups(p_ours, True, b), **hp, fused=False)
    ref = pytorch_optimizer.AdEMAMix(
        split_groups(p_ref, False, b), **hp, weight_decouple=True, foreach=False
    )
    run_pair(ours, ref, p_ours, p_ref)
    keys = {k: k for k in ("exp_avg", "exp_avg_sq", "exp_avg_slow")}
    compare(ours, ref, p_ours, p_ref, keys, init)


# --------------------------------------------------------------------------- MARS
# The reference gives 1-D tensors plain AdamW unless optimize_1d=True (ours: a route, see
# docs). It adds 1e-15 to v under the root (ours: nothing), which moves an entry whose v is
# tiny by ~1e-10: the reference runs with that constant at 0.


def test_mars_matches_pytorch_optimizer(monkeypatch: pytest.MonkeyPatch) -> None:
    base = pytorch_optimizer.base.optimizer.BaseOptimizer
    bound = base.apply_ams_bound
    monkeypatch.setattr(
        base, "apply_ams_bound", staticmethod(lambda *a, **k: bound(*a, **k, exp_avg_sq_eps=0.0))
    )
    p_ours, p_ref, init = fresh()
    b = {"betas": (0.9, 0.95), "weight_decay": 0.2, "gamma": 0.05}
    hp = {"lr": 1e-2, "weight_decay": 0.1}
    ours = MARS(split_groups(p_ours, True, b), **hp, fused=False)
    ref = pytorch_optimizer.MARS(
        split_groups(p_ref, False, b), **hp, mars_type="adamw", optimize_1d=True, foreach=False
    )
    run_pair(ours, ref, p_ours, p_ref)
    keys = {k: k for k in ("exp_avg", "exp_avg_sq", "last_grad")}
    compare(ours, ref, p_ours, p_ref, keys, init)


# --------------------------------------------------------------------------- cautious


@pytest.mark.parametrize("name", ["ademamix", "adopt"])
def test_cautious_matches_pytorch_optimizer(name: str) -> None:
    """``cautious=True``: pytorch-optimizer's ``apply_cautious`` on the momentum."""
    p_ours, p_ref, init = fresh()
    hp = {"lr": 1e-2, "weight_decay": 0.1, "cautious": True}
    reference = {"ademamix": pytorch_optimizer.AdEMAMix, "adopt": pytorch_optimizer.ADOPT}[name]
    ours = create(name, split_groups(p_ours, True, {}), **hp, fused=False)
    ref = reference(split_groups(p_ref, False, {}), **hp, weight_decouple=True, foreach=False)
    run_pair(ours, ref, p_ours, p_ref)
    compare(ours, ref, p_ours, p_ref, {"exp_avg": "exp_avg"}, init)
    plain = create(name, split_groups(p_ref, True, {}), lr=1e-2, weight_decay=0.1)
    assert any(type(t).__name__ == "Cautious" for t in ours._plan(ours.param_groups[0]).chain)
    assert not any(type(t).__name__ == "Cautious" for t in plain._plan(plain.param_groups[0]).chain)


def test_cautious_zeroes_entries_against_the_gradient() -> None:
    """The property itself: no entry moves against its gradient's descent direction."""
    p = make_params({"w": (6, 5)})
    opt = create("sgd", list(p.items()), lr=0.1, momentum=0.9, cautious=True)
    for t in range(1, 6):
        set_grads(p, t, skip=())
        before = p["w"].detach().clone()
        opt.step()
        moved = p["w"].detach() - before
        assert (moved * p["w"].grad <= 0).all()


@pytest.mark.parametrize("name", ["soap", "kron", "muon", "normuon"])
def test_cautious_masks_the_preconditioned_update(name: str) -> None:
    """SOAP, Kron, Muon and NorMuon (no reference has a cautious variant of the same algorithm:
    pytorch-optimizer's SOAP and Kron have none, its Muon masks against the Nesterov look-ahead
    it writes into the gradient; heavyball's SOAP and PSGD are other variants, with another mask
    scale): each step is the plain optimizer's step from the same state, its entries against the
    gradient zeroed and the rest scaled by ``numel / (kept + 1)``, as ``Cautious`` does."""
    matrix = name in ("muon", "normuon")  # plain parameters: 2-D only, as torch's Muon
    params = make_params({"w": (6, 5)} if matrix else {"w": (6, 5), "t": (2, 3, 4)})
    hp = {"lr": 1e-2, "weight_decay": 0.0, "cautious": True}
    hp |= {"precondition_frequency": 3} if name == "soap" else {}
    opt = create(name, list(params.values()), **hp)
    assert any(type(t).__name__ == "Cautious" for t in opt._plan(opt.param_groups[0]).chain)
    zeroed = 0
    for t in range(1, 13):
        set_grads(params, t, skip=())
        plain = copy.deepcopy(opt)
        plain.param_groups[0]["cautious"] = False
        for p, q in zip(params.values(), plain.param_groups[0]["params"], strict=True):
            q.grad = p.grad.clone()
        before = {n: p.detach().clone() for n, p in params.items()}
        opt.step()
        plain.step()
        for (n, p), q in zip(params.items(), plain.param_groups[0]["params"], strict=True):
            step, g = q.detach() - before[n], p.grad  # the plain step, -lr·u
            keep = step * g < 0
            zeroed += int((~keep & (step != 0)).sum())
            scale = keep.numel() / (int(keep.sum()) + 1)
            assert_close(p.detach() - before[n], step * keep * scale, f"{n} at step {t}")
            for key, value in plain.state[q].items():  # the mask leaves the state alone
                assert_close(opt.state[p][key], value, f"{key} of {n} at step {t}")
    assert zeroed > 0  # some entries did disagree, so the mask was tested


# --------------------------------------------------------------------------- SOAP
# The reference runs its QR refresh in float32 whatever the dtype (its comment: bfloat16 has no
# QR); ours in the state's dtype (float32 at least). To compare the algorithms in float64 the
# reference's module sees a ``torch`` whose float32 is float64 (the QR cast is its only use).
# With its own float32 QR the two agree to the float32 rounding of the bases. Where a statistic
# is rank-deficient (one gradient of a tall matrix; a QR of a rank-deficient power iteration),
# LAPACK's basis of its null space is arbitrary; ours is ``transforms.settle``'s, which the
# reference's ``eigh`` and ``qr`` are given here too, so that the rest is compared.


class _SettledLinalg(types.ModuleType):
    @staticmethod
    def eigh(a: Tensor) -> tuple[Tensor, Tensor]:
        values, vectors = torch.linalg.eigh(a)
        return values, transforms.settle(vectors, values)

    @staticmethod
    def qr(a: Tensor) -> tuple[Tensor, Tensor]:
        q, r = torch.linalg.qr(a)
        return transforms.settle(q, r.diagonal().abs()), r

    def __getattr__(self, name: str) -> Any:
        return getattr(torch.linalg, name)


class _SettledTorch(types.ModuleType):
    linalg = _SettledLinalg("linalg")

    def __getattr__(self, name: str) -> Any:
        return getattr(torch, name)


class _Float64Torch(_SettledTorch):
    float32 = torch.float64


SOAP_CASES = {
    "defaults": {},
    "partial-bases": {"max_precondition_dim": 5, "precondition_1d": True, "shampoo_beta": 0.7},
    "no-bias-correction": {"correct_bias": False, "normalize_gradient": True},
}


@pytest.mark.parametrize("case", list(SOAP_CASES))
def test_soap_matches_pytorch_optimizer(case: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(soap_reference, "torch", _Float64Torch("torch"))
    p_ours, p_ref, init = fresh()
    b = {"betas": (0.8, 0.9), "weight_decay": 0.2, "precondition_frequency": 3}
    hp = {"lr": 1e-2, "weight_decay": 0.1, "precondition_frequency": 5, **SOAP_CASES[case]}
    ours = SOAP(split_groups(p_ours, True, b), **hp)
    ref = pytorch_optimizer.SOAP(split_groups(p_ref, False, b), **hp)
    run_pair(ours, ref, p_ours, p_ref)
    compare(ours, ref, p_ours, p_ref, {"exp_avg_sq": "exp_avg_sq"}, init)
    for name, p in p_ours.items():  # the bases axis by axis, and m in the parameter's basis
        if name == NO_GRAD:
            continue
        state, bases = ours.state[p], ref.state[p_ref[name]]["Q"]
        for i, q in enumerate(bases):
            assert (f"Q{i}" in state) == (len(q) > 0), f"{name}: axis {i}"
            if len(q):
                assert_close(state[f"Q{i}"][0], q, f"basis {i} of {name}")
        ours_bases = [state[f"Q{i}"][0] if f"Q{i}" in state else None for i in range(p.dim())]
        m = transforms.per_axis(state["exp_avg_eigen"][0], ours_bases)
        assert_close(m, ref.state[p_ref[name]]["exp_avg"], f"m of {name}")


def test_soap_differs_from_the_float32_qr_reference_by_its_rounding(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(soap_reference, "torch", _SettledTorch("torch"))
    p_ours, p_ref, _ = fresh()
    hp = {"lr": 1e-2, "weight_decay": 0.1, "precondition_frequency": 5}
    ours = SOAP(split_groups(p_ours, True, {}), **hp)
    ref = pytorch_optimizer.SOAP(split_groups(p_ref, False, {}), **hp)
    run_pair(ours, ref, p_ours, p_ref)
    gap = max((p_ours[n] - p_ref[n]).abs().max().item() for n in p_ours)
    assert 1e-12 < gap < 1e-6


def _soap_gap(monkeypatch: pytest.MonkeyPatch, settled: bool) -> float:
    """The largest relative parameter difference of two SOAPs after 12 steps whose gradients
    differ by a relative 1e-13 (a compiled backward's, another reduction order's rounding)."""
    if not settled:
        monkeypatch.setattr(transforms, "settle", lambda q, sizes: q)
    shapes = {"tall": (12, 4), "wide": (3, 9)}  # one gradient: a factor of rank 4 (of 3) only
    a = make_params(shapes)
    b = clone_params(a)
    opts = [SOAP(list(p.values()), lr=1e-2, precondition_frequency=4) for p in (a, b)]
    gen = torch.Generator().manual_seed(0)
    for _ in range(12):
        for n, shape in shapes.items():
            g = torch.randn(shape, generator=gen, dtype=torch.float64)
            a[n].grad = g.clone()
            b[n].grad = g * (1 + 1e-13 * torch.randn(shape, generator=gen, dtype=torch.float64))
        for opt in opts:
            opt.step()
    return max(((a[n] - b[n]).norm() / a[n].norm()).item() for n in shapes)


def test_soap_is_stable_under_a_rounding_of_rank_deficient_statistics(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """With ``settle`` the update is a continuous function of the gradients; with LAPACK's
    null-space basis as it comes (the reference's) the same rounding moves it by 1e-2."""
    assert _soap_gap(monkeypatch, settled=True) < 1e-11
    assert _soap_gap(monkeypatch, settled=False) > 1e-4


# --------------------------------------------------------------------------- PSGD-Kron
# Kron fits its preconditioner to random probes. Both sides draw them from one keyed source
# here (the parameter's shape and its draw count: the test's shapes are distinct), so the
# deterministic rest is compared: the fit, the preconditioning, the RMS clamp, the schedule.
# The reference solves its triangular systems in float32 whatever the dtype: its solve is
# replaced by the same call in the input's dtype. It balances its factors at random (1% of fits);
# ours on every 100th fit: balancing scales the factors by numbers whose product is 1, which
# changes neither the preconditioner nor the fit, so the two agree at any balancing.


def _solve_in_dtype(x: Tensor, a: Tensor) -> Tensor:
    flat = torch.linalg.solve_triangular(a, x.reshape(-1, x.size(-1)), upper=True, left=False)
    return flat.reshape_as(x)


class _Probes:
    """Each side's probes: the ``n``-th draw for a shape is the same normal vector."""

    def __init__(self) -> None:
        self.drawn: dict[tuple[int, ...], int] = {}

    def __call__(self, like: Tensor, dtype: torch.dtype | None = None) -> Tensor:
        shape = tuple(like.shape)
        self.drawn[shape] = self.drawn.get(shape, 0) + 1
        gen = torch.Generator().manual_seed(hash((shape, self.drawn[shape])) % 2**31)
        return torch.randn(shape, generator=gen, dtype=dtype or like.dtype)


def _keyed_probes(monkeypatch: pytest.MonkeyPatch) -> None:
    ours = _Probes()
    monkeypatch.setattr(kron_reference.torch, "randn_like", _Probes())
    monkeypatch.setattr(kron_reference, "solve_triangular_right", _solve_in_dtype)
    monkeypatch.setattr(transforms, "kron_noise", lambda like, name, step: ours(like))


KRON_CASES = {
    "defaults": {},
    "every-third-step": {"pre_conditioner_update_probability": 0.3},
    "one-diagonal": {"memory_save_mode": "one_diag", "momentum_into_precondition_update": False},
    "all-diagonal": {"memory_save_mode": "all_diag", "max_size_triangular": 5},
}


@pytest.mark.parametrize("case", list(KRON_CASES))
def test_kron_matches_pytorch_optimizer(case: str, monkeypatch: pytest.MonkeyPatch) -> None:
    _keyed_probes(monkeypatch)
    np.random.seed(0)
    p_ours, p_ref, init = fresh()
    b = {"momentum": 0.8, "weight_decay": 0.2}
    hp = {"lr": 1e-2, "weight_decay": 0.1, **KRON_CASES[case]}
    ours = Kron(split_groups(p_ours, True, b), **hp)
    ref = pytorch_optimizer.Kron(
        split_groups(p_ref, False, b), **hp, precondition_dtype=torch.float64, balance_prob=0.3
    )
    run_pair(ours, ref, p_ours, p_ref)
    compare(ours, ref, p_ours, p_ref, {"momentum_buffer": "momentum_buffer"}, init)
    for name, p in p_ours.items():  # each factor up to the scale balancing moves
        if name == NO_GRAD:
            continue
        pairs = [(ours.state[p][f"Q{i}"][0], q) for i, q in enumerate(ref.state[p_ref[name]]["Q"])]
        for i, (a, q) in enumerate(pairs):
            assert_close(a / a.abs().max(), q / q.abs().max(), f"factor {i} of {name}")
        sizes = [(a.abs().max(), q.abs().max()) for a, q in pairs]
        assert_close(
            torch.stack([a for a, _ in sizes]).prod(), torch.stack([q for _, q in sizes]).prod()
        )


def test_kron_schedule_is_the_references() -> None:
    """The fit steps over the schedule's decay (1500 steps), against the reference's counter."""
    fits: list[int] = []
    p = nn.Parameter(torch.zeros(1, dtype=torch.float64))
    ref = pytorch_optimizer.Kron([p], lr=0.0, balance_prob=0.0)
    original = kron_reference.update_precondition

    def counted(*args: Any) -> None:
        fits.append(ref.param_groups[0]["step"])
        original(*args)

    kron_reference.update_precondition = counted
    try:
        for _ in range(1500):
            p.grad = torch.ones_like(p)
            ref.step()
    finally:
        kron_reference.update_precondition = original
    schedule = transforms.KronSchedule(None)
    ours = [t for t in range(1, 1501) if schedule(t)[0]]
    assert ours == fits and len(fits) < 1000  # it really thins out after step 500
    thirds = transforms.KronSchedule(0.3)
    assert [t for t in range(1, 13) if thirds(t)[0]] == [4, 8, 12]


def test_kron_probes_are_a_function_of_name_and_step() -> None:
    """A copy, a resumed run and every rank draw the same probe; torch's generator is left
    alone; the probes are standard normal."""
    like = torch.zeros(4000, dtype=torch.float64)
    torch.manual_seed(0)
    before = torch.get_rng_state()
    a = transforms.kron_noise(like, "h.0.attn.weight", 7)
    assert torch.equal(torch.get_rng_state(), before)
    assert torch.equal(a, transforms.kron_noise(like, "h.0.attn.weight", 7))
    assert not torch.equal(a, transforms.kron_noise(like, "h.0.attn.weight", 8))
    assert not torch.equal(a, transforms.kron_noise(like, "h.1.attn.weight", 7))
    assert abs(a.mean().item()) < 0.05 and abs(a.std().item() - 1.0) < 0.05


# --------------------------------------------------------------------------- Schedule-Free


@pytest.mark.parametrize("foreach", [False, True], ids=["per-tensor", "foreach"])
def test_schedule_free_matches_schedulefree(foreach: bool) -> None:
    """Both points: the train point after every step, the eval point every 8 steps (the
    parameters swapped to it and back, as a training loop that evaluates does)."""
    p_ours, p_ref, init = fresh()
    b = {"betas": (0.8, 0.99), "weight_decay": 0.2, "warmup_steps": 5, "r": 0.5}
    hp = {"lr": 1e-2, "weight_decay": 0.1, "warmup_steps": 3}
    ours = AdamWScheduleFree(split_groups(p_ours, True, b), **hp)
    ref = schedulefree.AdamWScheduleFree(split_groups(p_ref, False, b), **hp, foreach=foreach)
    ref.train()

    def evaluate(t: int) -> None:
        if t % 8 == 1 and t > 1:  # after step t - 1, before this step's gradients are used
            ours.eval()
            ref.eval()
            for name, p in p_ours.items():
                assert_close(p, p_ref[name], f"eval point of {name} after step {t - 1}")
            ours.train()
            ref.train()

    run_pair(ours, ref, p_ours, p_ref, before_ref_step=evaluate)
    compare(ours, ref, p_ours, p_ref, {"z": "z", "exp_avg_sq": "exp_avg_sq"}, init)


def test_schedule_free_refuses_a_step_at_the_eval_point() -> None:
    p = make_params({"w": (3, 2)})
    opt = AdamWScheduleFree(list(p.items()))
    set_grads(p, 1, skip=())
    opt.step()
    opt.eval()
    opt.eval()  # a second call changes nothing
    with pytest.raises(ValueError, match=r"call optimizer.train\(\)") as err:
        opt.step()
    assert "\n" not in str(err.value)
    opt.train()
    opt.step()
    plain = make_params({"w": (3, 2)})
    adamw = AdamW(list(plain.items()))
    set_grads(plain, 1, skip=())
    adamw.step()
    before = plain["w"].detach().clone()
    adamw.eval()  # no eval point: nothing moves, stepping stays allowed
    assert torch.equal(plain["w"], before)
    adamw.step()
