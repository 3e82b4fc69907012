"""Properties of every optimizer: validation, random shapes and dtypes, Hessian protocol, memory.

* bad hyperparameters raise a ``ValueError`` that names the value and the valid range; unknown
  optimizer names and hyperparameters are rejected by ``create``;
* hypothesis: random shapes (0-d and 1-element included), zero and ``None`` gradients, in float64,
  float32 and bfloat16, give finite parameters, leave ``grad=None`` parameters untouched, and
  an all-zero gradient moves nothing (``sign(0) = 0``, ``0 / (0 + ε) = 0``);
* ``hessian_interval`` / ``update_hessian``;
* Kron's balance step equalises its factors' norms and leaves its preconditioner unchanged;
* optimizer state bytes per parameter on a GPT-shaped model equal the theoretical value.
"""

from __future__ import annotations

import math
import re
from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn
from torch.optim import optimizer as torch_optimizer

from optarena.optim import (
    SGD,
    AdafactorClassic,
    AdamW,
    Hybrid,
    Lion,
    ParamInfo,
    Role,
    Signum,
    SophiaG,
    available,
    create,
    state_bytes,
)
from optarena.optim.blocks import Rows
from optarena.optim.registry import REGISTRY
from optarena.optim.transforms import KronPrecondition, Slot, Update
from optim_cases import llama_partition, llama_shapes, make_params, set_grads

pytestmark = pytest.mark.usefixtures("single_thread")

NAMES = list(available())

# --------------------------------------------------------------------------- validation

BAD = [
    ("adamw", {"lr": -1e-3}, "lr", ">= 0"),
    ("adamw", {"lr": float("nan")}, "lr", ">= 0"),
    ("adamw", {"lr": float("inf")}, "lr", ">= 0"),
    ("adamw", {"betas": (1.0, 0.999)}, "betas", "[0, 1)"),
    ("adamw", {"betas": (0.9, -0.1)}, "betas", "[0, 1)"),
    ("adamw", {"betas": (0.9,)}, "betas", "pair"),
    ("adamw", {"betas": 0.9}, "betas", "pair"),  # not a bare TypeError from tuple(0.9)
    ("adafactor", {"betas": 0.9}, "betas", "pair"),
    ("adamw", {"eps": -1e-8}, "eps", ">= 0"),
    ("adamw", {"weight_decay": -0.1}, "weight_decay", ">= 0"),
    ("adam-mini", {"betas": (0.9, 1.5)}, "betas", "[0, 1)"),
    ("adalayer", {"lr": "1e-3"}, "lr", ">= 0"),
    ("adafactor", {"eps": -1.0}, "eps", ">= 0"),
    ("sgd", {"momentum": -0.5}, "momentum", "[0, 1)"),
    ("sgd", {"momentum": 1.0}, "momentum", "[0, 1)"),
    ("sgd", {"dampening": 1.5}, "dampening", "[0, 1)"),
    ("sgd", {"lr": -0.1}, "lr", ">= 0"),
    ("sgd-ema", {"momentum": 1.0}, "momentum", "[0, 1)"),
    ("lion", {"betas": (0.9, 1.0)}, "betas", "[0, 1)"),
    ("lion", {"weight_decay": -1.0}, "weight_decay", ">= 0"),
    ("signum", {"momentum": 2.0}, "momentum", "[0, 1)"),
    ("sophia", {"rho": -0.04}, "rho", ">= 0"),
    ("sophia", {"bs": 0}, "bs", "> 0"),
    ("sophia", {"hessian_interval": 0}, "hessian_interval", "int > 0"),
    ("sophia", {"hessian_interval": 2.5}, "hessian_interval", "int > 0"),
    ("adafactor-classic", {"clip_threshold": 0.0}, "clip_threshold", "> 0"),
    ("adafactor-classic", {"decay_rate": 0.8}, "decay_rate", "< 0"),
    ("adafactor-classic", {"beta1": 1.0}, "beta1", "[0, 1)"),
    ("adafactor-classic", {"eps": (1e-30,)}, "eps", "pair"),
    ("adam-frozen", {"precondition_steps": -1}, "precondition_steps", ">= 0"),
    ("hybrid-adalayer-last-ln", {"adaptive_lr": -1.0}, "lr", ">= 0"),
    ("hybrid-adafactor-last", {"momentum": 1.0}, "momentum", "[0, 1)"),
]


def tiny_named() -> list[tuple[str, nn.Parameter]]:
    return [("w", nn.Parameter(torch.randn(3, 4))), ("b", nn.Parameter(torch.randn(4)))]


@pytest.mark.parametrize(
    ("name", "hp", "key", "expected"), BAD, ids=[f"{n}-{k}" for n, _, k, _ in BAD]
)
def test_bad_hyperparameter_is_rejected_with_value_and_range(
    name: str, hp: dict[str, Any], key: str, expected: str
) -> None:
    with pytest.raises(ValueError) as info:
        create(name, tiny_named(), partition={}, **hp)
    message = str(info.value)
    value = next(iter(hp.values()))
    assert f"{key}=" in message, message
    assert repr(value) in message or repr(tuple(value)) in message, message
    assert expected in message, message


@pytest.mark.parametrize(
    "build",
    [
        lambda ps: SGD(ps, lr=0.1, nesterov=True),  # nesterov needs momentum
        lambda ps: SGD(ps, lr=0.1, momentum=0.9, dampening=0.1, nesterov=True),
        lambda ps: AdafactorClassic(ps, lr=None, relative_step=False),  # no lr at all
        lambda ps: AdafactorClassic(ps, lr=1e-3, relative_step=False, warmup_init=True),
        # transformers rejects an lr that the relative step would silently ignore
        lambda ps: AdafactorClassic(ps, lr=1e-3, relative_step=True),
        lambda ps: AdamW(ps, state_dtype="float32"),
    ],
    ids=[
        "nesterov-no-momentum",
        "nesterov-dampening",
        "no-lr",
        "warmup-no-relative",
        "lr-with-relative-step",
        "state-dtype",
    ],
)
def test_inconsistent_options_are_rejected(build) -> None:
    with pytest.raises(ValueError, match="="):
        build(tiny_named())


TORCH_DEFAULTS = {"maximize": False, "capturable": False, "differentiable": False}


@pytest.mark.parametrize("cls", [AdamW, SGD, Lion, AdafactorClassic])
@pytest.mark.parametrize("foreach", [None, True, False])
def test_torch_flags_at_their_defaults_change_nothing(cls, foreach) -> None:
    """Code written for torch.optim passes its flags; at torch's defaults (``foreach`` at any
    value, ``amsgrad=False`` where torch's class has it) the optimizer takes them and steps
    exactly as without them."""
    runs = []
    flags = {**TORCH_DEFAULTS, "foreach": foreach}
    if cls is AdamW:
        flags["amsgrad"] = False
    for passed in ({}, flags):
        torch.manual_seed(0)
        named = tiny_named()
        opt = cls(named, **passed)
        for _ in range(3):
            for _, p in named:
                p.grad = torch.randn_like(p)
            opt.step()
        runs.append([p.detach().clone() for _, p in named])
    for a, b in zip(*runs, strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize(
    ("flag", "value", "fix"),
    [
        ("capturable", True, "leave it False"),
        ("differentiable", True, "leave it False"),
        ("foreach", "yes", "None"),
    ],
)
def test_torch_flags_that_change_the_update_are_rejected(flag, value, fix) -> None:
    with pytest.raises(ValueError, match=rf"AdamW: {flag}={value!r} is not supported; .*{fix}"):
        AdamW(tiny_named(), **{flag: value})
    with pytest.raises(TypeError, match="unexpected keyword argument 'forech'"):
        AdamW(tiny_named(), forech=True)
    with pytest.raises(ValueError, match="amsgrad=True has no meaning for a factored"):
        create("adafactor", tiny_named(), amsgrad=True)


def test_bad_param_group_is_rejected_when_added() -> None:
    opt = Lion(tiny_named())
    with pytest.raises(ValueError, match=re.escape("invalid lr=-0.1")):
        opt.add_param_group({"params": [("extra", nn.Parameter(torch.zeros(2)))], "lr": -0.1})


@pytest.mark.parametrize(
    ("name", "options"),
    [
        ("adamw", {"fused": None}),  # torch's fused kernel (torch_kernels.py)
        ("adamw", {"fused": False}),  # the chain, eagerly
        ("adam-mini", {"fused": True}),  # the compiled chain (compiled.py)
        ("lion", {"fused": False}),
    ],
)
def test_each_param_group_has_its_own_decay_exemptions(name, options) -> None:
    """A group's ``no_decay_roles`` decides on every path: after a first step with zero
    gradients (no update, only the decay), the exempt group is untouched and the other shrank
    by ``1 - lr·λ``; an unknown role is refused with the list of roles."""
    a, b = (nn.Parameter(torch.randn(8, 16, dtype=torch.float64)) for _ in range(2))
    start = [a.detach().clone(), b.detach().clone()]
    opt = create(
        name,
        [{"params": [a], "no_decay_roles": ["other"]}, {"params": [b]}],
        lr=0.01,
        weight_decay=0.5,
        **options,
    )
    assert opt.param_groups[0]["no_decay_roles"] == ("other",)
    assert "other" not in opt.param_groups[1]["no_decay_roles"]  # the optimizer's default
    a.grad, b.grad = torch.zeros_like(a), torch.zeros_like(b)
    opt.step()
    assert torch.equal(a.detach(), start[0])
    torch.testing.assert_close(b.detach(), start[1] * (1 - 0.01 * 0.5), rtol=1e-15, atol=0)
    with pytest.raises(ValueError, match=r"invalid no_decay_roles=\['norms'\]; expected role"):
        opt.add_param_group({"params": [nn.Parameter(torch.zeros(2))], "no_decay_roles": ["norms"]})


def test_state_dicts_saved_before_groups_had_exemptions_still_load() -> None:
    opt = AdamW(tiny_named(), weight_decay=0.1, no_decay_roles=("norm",))
    saved = opt.state_dict()
    for group in saved["param_groups"]:
        del group["no_decay_roles"]
    opt.load_state_dict(saved)
    assert [g["no_decay_roles"] for g in opt.param_groups] == [("norm",)]


def test_sophia_step_bs_is_validated() -> None:
    params = tiny_named()
    opt = SophiaG(params)
    for _, p in params:
        p.grad = torch.ones_like(p)
    with pytest.raises(ValueError, match=r"bs=-5.*> 0"):
        opt.step(bs=-5)
    assert not opt.state, "a rejected step must not change anything"


def test_unknown_optimizer_name() -> None:
    with pytest.raises(ValueError, match=r"unknown optimizer 'adamv'.*did you mean 'adamw'"):
        create("adamv", tiny_named())
    with pytest.raises(ValueError, match=r"unknown optimizer 'rmsprop'.*adamw.*adam-mini"):
        create("rmsprop", tiny_named())


def test_names_are_normalised() -> None:
    opt = create("Adam_Mini", tiny_named(), partition={})
    assert opt.param_groups[0]["optimizer"] == "adam-mini"


@pytest.mark.parametrize("name", NAMES)
def test_unknown_hyperparameter(name: str) -> None:
    with pytest.raises(ValueError, match=r"unknown hyperparameter\(s\) 'lrr'.*valid: .*"):
        create(name, tiny_named(), lrr=1e-3)


def test_hybrid_route_errors() -> None:
    named = tiny_named()
    with pytest.raises(ValueError, match="'default'"):
        Hybrid(named, {"output": "adamw"})
    with pytest.raises(ValueError, match=r"unknown role 'head'.*output"):
        Hybrid(named, {"default": "adamw", "head": "lion"})
    with pytest.raises(ValueError, match=r"unknown hyperparameter\(s\) 'momentum'.*betas"):
        Hybrid(named, {"default": ("adamw", {"momentum": 0.9})}, partition={})
    with pytest.raises(ValueError, match="not a single optimizer"):
        Hybrid(named, {"default": "hybrid-adalayer-last"}, partition={})
    with pytest.raises(ValueError, match=r"invalid lr=-1"):
        Hybrid(named, {"default": ("lion", {"lr": -1})}, partition={})


# --------------------------------------------------------------------------- hypothesis

ROLES = [Role.MLP, Role.OUTPUT, Role.NORM, Role.EMBEDDING, Role.V, Role.O, Role.BIAS, Role.OTHER]
DTYPES = [torch.float64, torch.float32, torch.bfloat16]
# every registry entry with weight decay off (defaults differ: AdamW 1e-2, Sophia 0.1)
NO_DECAY: dict[str, dict[str, Any]] = {n: {"weight_decay": 0.0} for n in NAMES}
NO_DECAY["adam-frozen"] = {"precondition_steps": 1}
NO_DECAY["hybrid"] = {
    "routes": {
        "default": ("signum", {"weight_decay": 0.0}),
        "output": ("sophia", {"weight_decay": 0.0}),
        "norm": ("adafactor-classic", {"beta1": 0.9}),
        "embedding": ("adam-mini", {}),
    }
}

tensor_spec = st.tuples(
    st.lists(st.integers(1, 4), min_size=0, max_size=3).map(tuple),  # () is a 0-d tensor
    st.sampled_from(ROLES),
    st.sampled_from(["normal", "tiny", "huge", "zero", "none"]),
)


def build_case(
    name: str, specs: list, dtype: torch.dtype, seed: int
) -> tuple[torch.optim.Optimizer, dict[str, nn.Parameter], dict[str, str]]:
    shapes = {f"p{i}": shape for i, (shape, _, _) in enumerate(specs)}
    params = make_params(shapes, dtype, seed)
    infos = {f"p{i}": ParamInfo(f"p{i}", shape, role) for i, (shape, role, _) in enumerate(specs)}
    kinds = {f"p{i}": kind for i, (_, _, kind) in enumerate(specs)}
    opt = create(name, list(params.items()), partition=infos, **NO_DECAY[name])
    return opt, params, kinds


def give_grads(params: dict[str, nn.Parameter], kinds: dict[str, str], step: int) -> None:
    gen = torch.Generator().manual_seed(step)
    scale = {"normal": 1.0, "tiny": 1e-20, "huge": 1e15, "zero": 0.0}
    for name, p in params.items():
        if kinds[name] == "none":
            p.grad = None
            continue
        g = torch.randn(p.shape, generator=gen, dtype=torch.float64) * scale[kinds[name]]
        p.grad = g.to(p.dtype)


@pytest.mark.parametrize("name", NAMES)
@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    specs=st.lists(tensor_spec, min_size=1, max_size=4),
    dtype=st.sampled_from(DTYPES),
    seed=st.integers(0, 2**16),
)
def test_random_tensors_give_finite_updates(name: str, specs: list, dtype, seed: int) -> None:
    opt, params, kinds = build_case(name, specs, dtype, seed)
    init = {n: p.detach().clone() for n, p in params.items()}
    for t in range(1, 4):
        give_grads(params, kinds, t)
        opt.step()
        if getattr(opt, "hessian_interval", None):
            opt.update_hessian()
    for n, p in params.items():
        assert p.dtype == dtype
        assert torch.isfinite(p).all(), f"{n} ({kinds[n]}, {tuple(p.shape)}): {p}"
        if kinds[n] in ("none", "zero"):
            assert torch.equal(p, init[n]), f"{n} has a {kinds[n]} gradient but moved"
        if kinds[n] == "none":
            assert not opt.state.get(p), f"{n} has no gradient but got state"
        else:
            for key, value in opt.state[p].items():
                if isinstance(value, torch.Tensor) and value.is_floating_point():
                    assert torch.isfinite(value).all(), f"state {key} of {n}"
                    if key != "step":
                        expected = torch.float32 if dtype == torch.bfloat16 else dtype
                        assert value.dtype == expected, f"{key} of {n}: {value.dtype}"


# --------------------------------------------------------------------------- Hessian protocol


def test_hessian_interval() -> None:
    named = tiny_named()
    assert SophiaG(named).hessian_interval == 10
    assert SophiaG(named, hessian_interval=3).hessian_interval == 3
    assert create("sophia", named, hessian_interval=4).hessian_interval == 4
    assert AdamW(named).hessian_interval is None
    assert create("lion", named).hessian_interval is None
    infos = {"w": ParamInfo("w", (3, 4), Role.OUTPUT), "b": ParamInfo("b", (4,), Role.NORM)}
    hybrid = Hybrid(
        named,
        {"default": "adamw", "output": ("sophia", {"hessian_interval": 7})},
        partition=infos,
    )
    assert hybrid.hessian_interval == 7
    # update_hessian touches only the Sophia groups
    for _, p in named:
        p.grad = torch.ones_like(p)
    hybrid.update_hessian()
    w, b = named[0][1], named[1][1]
    assert hybrid.state[w]["hessian"].abs().sum() > 0
    assert not hybrid.state.get(b)


def test_sophia_hessian_clips_the_update() -> None:
    # h = 0: the update is sign(m) (EMA Signum); a huge h makes it m / (ρ bs h), tiny.
    p = nn.Parameter(torch.zeros(5, dtype=torch.float64))
    opt = SophiaG([p], lr=1.0, betas=(0.5, 0.5), rho=1.0, weight_decay=0.0, bs=1)
    p.grad = torch.tensor([1.0, -2.0, 0.0, 3.0, -4.0], dtype=torch.float64)
    opt.step()
    assert torch.equal(p.detach(), -p.grad.sign())
    p.grad = torch.full((5,), 1e3, dtype=torch.float64)
    opt.update_hessian()  # h = 0.5 * 1e6
    before = p.detach().clone()
    p.grad = torch.ones(5, dtype=torch.float64)
    opt.step()
    m = 0.25 * torch.tensor([1.0, -2.0, 0.0, 3.0, -4.0], dtype=torch.float64) + 0.5  # m_2
    torch.testing.assert_close(before - p.detach(), m / (0.5e6 + 1e-15), rtol=1e-9, atol=1e-15)


# --------------------------------------------------------------------------- memory

GPT = llama_shapes(dim=128, n_heads=4, n_kv_heads=4, ffn=512, vocab=512, layers=2)
GPT_INFOS = llama_partition(GPT, 4, 4)

MEMORY: list[tuple[str, dict[str, Any], float, float]] = [
    # name, hyperparameters, lowest and highest bytes of state per parameter (float32)
    ("adamw", {}, 8.0, 8.001),
    ("adam-mini", {}, 4.0, 4.05),
    ("adalayer", {}, 4.0, 4.05),
    ("adafactor", {}, 4.0, 4.05),  # momentum + row and column factors
    ("adafactor", {"betas": (0.0, 0.999)}, 0.0, 0.05),
    ("adafactor-classic", {}, 0.0, 0.05),
    ("adafactor-classic", {"beta1": 0.9}, 4.0, 4.05),
    ("sgd", {"momentum": 0.9}, 4.0, 4.001),
    ("sgd", {}, 0.0, 0.001),
    ("sgd-ema", {}, 4.0, 4.001),
    ("lion", {}, 4.0, 4.001),
    ("signum", {}, 4.0, 4.001),
    ("sophia", {}, 8.0, 8.001),
    ("adam-frozen", {"precondition_steps": 1}, 8.0, 8.001),
    ("hybrid-adalayer-last-ln", {}, 4.0, 4.05),
    ("hybrid-adafactor-last", {}, 4.0, 4.05),
]


@pytest.fixture(scope="module")
def gpt_params() -> dict[str, nn.Parameter]:
    params = make_params(GPT, torch.float32)
    set_grads(params, 1, skip=())
    return params


@pytest.mark.parametrize(("name", "hp", "low", "high"), MEMORY, ids=[m[0] for m in MEMORY])
def test_state_bytes_per_parameter(name, hp, low, high, gpt_params) -> None:
    opt = create(name, list(gpt_params.items()), partition=GPT_INFOS, **hp)
    opt.step()
    n = sum(p.numel() for p in gpt_params.values())
    per_param = state_bytes(opt) / n
    assert low <= per_param <= high, f"{name}: {per_param:.4f} bytes per parameter"
    if name in ("adamw", "adam-mini"):
        # cross-check the accounting on torch's own AdamW: 2 float32 tensors per parameter
        ref = torch.optim.AdamW(list(gpt_params.values()))
        ref.step()
        assert math.isclose(state_bytes(ref) / n, 8.0, rel_tol=1e-4)
        assert opt.state_bytes() == state_bytes(opt)


def test_state_bytes_walks_nested_state_and_counts_a_shared_tensor_once() -> None:
    p = nn.Parameter(torch.zeros(3))
    opt = torch.optim.SGD([p], lr=0.1)
    shared, other = torch.zeros(5), torch.zeros(2, dtype=torch.float64)
    opt.state[p] = {"a": shared, "b": [shared, {"c": other}], "n": 3}
    assert state_bytes(opt) == 5 * 4 + 2 * 8


def test_adam_mini_saves_half_of_adamw(gpt_params) -> None:
    adamw = create("adamw", list(gpt_params.items()), partition=GPT_INFOS)
    mini = create("adam-mini", list(gpt_params.items()), partition=GPT_INFOS)
    adamw.step()
    mini.step()
    assert 0.49 <= state_bytes(mini) / state_bytes(adamw) <= 0.51


def test_signum_zero_gradient_is_sign_zero() -> None:
    p = nn.Parameter(torch.tensor([1.0, 2.0, 3.0]))
    opt = Signum([p], lr=0.5)
    p.grad = torch.tensor([0.0, 1.0, -1.0])
    opt.step()
    assert torch.equal(p.detach(), torch.tensor([1.0, 1.5, 3.5]))


# --------------------------------------------------------------------------- torch's step protocol


@pytest.mark.parametrize("name", ["adamw", "adafactor", "lion"])
def test_step_hooks_run_once_each_around_the_step(name: str) -> None:
    p = nn.Parameter(torch.ones(4, 3))
    p.grad = torch.full((4, 3), 0.5)
    opt = create(name, [p], lr=0.1)
    seen: list[tuple[str, torch.Tensor]] = []

    def record(tag: str):
        return lambda o, args, kwargs: seen.append((tag, p.detach().clone())) if o is opt else None

    handles = [
        torch_optimizer.register_optimizer_step_pre_hook(record("global-pre")),
        opt.register_step_pre_hook(record("pre")),
        opt.register_step_post_hook(record("post")),
        torch_optimizer.register_optimizer_step_post_hook(record("global-post")),
    ]
    try:
        opt.step()
    finally:
        for handle in handles:
            handle.remove()
    assert [tag for tag, _ in seen] == ["global-pre", "pre", "post", "global-post"]
    assert torch.equal(seen[1][1], torch.ones(4, 3))  # before the update
    assert (seen[2][1] < 1).all()  # after it
    opt.step()  # hooks removed: nothing more recorded
    assert len(seen) == 4


def test_a_pre_hook_may_replace_the_step_arguments() -> None:
    p = nn.Parameter(torch.ones(3))
    p.grad = torch.ones(3)
    opt = create("adamw", [p], lr=0.1)
    opt.register_step_pre_hook(lambda o, args, kwargs: (args, {"closure": lambda: 7.0}))
    assert opt.step() == 7.0


@pytest.mark.parametrize("name", ["adamw", "adam-mini"])
def test_the_profiler_sees_the_step(name: str) -> None:
    p = nn.Parameter(torch.ones(4, 3))
    p.grad = torch.ones(4, 3)
    opt = create(name, [p], lr=0.1)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        opt.step()
    events = {event.key for event in prof.key_averages()}
    assert f"Optimizer.step#{type(opt).__name__}.step" in events


def test_kron_balance_equalises_the_factors_and_keeps_the_preconditioner() -> None:
    """A balance step scales Kron's factors to one max-norm (their geometric mean) and leaves
    ``P = ⊗ QᵢᵀQᵢ``, so the update, unchanged."""
    hp = {**REGISTRY["kron"].defaults, "max_size_triangular": 4}  # axis 2 (5 long): diagonal
    gen = torch.Generator().manual_seed(0)
    p = torch.randn(3, 4, 5, generator=gen, dtype=torch.float64)
    info = ParamInfo("w", tuple(p.shape), Role.MLP)
    kron = KronPrecondition()
    state = kron.init(p, info, hp, torch.float64)
    for key, scale in zip(("Q0", "Q1", "Q2"), (7.0, 0.1, 3.0), strict=True):
        q = state[key][0]
        noise = torch.rand(q.shape, generator=gen, dtype=torch.float64)
        q.add_(noise.triu() if q.dim() == 2 else noise).mul_(scale)
    assert state["Q2"].dim() == 2  # a vector behind the leading axis of replicated state

    def step(balance: float) -> torch.Tensor:
        sc = {"fit": 0.0, "balance": balance, "lr": 0.1, "step": 1.0}
        slot = Slot(p, p.clone(), state, info, Rows.whole(p.shape), hp)
        return slot.value(kron.update(Update(p.clone()), slot, sc, {}))

    before = step(0.0)
    norms = [state[k].abs().max().item() for k in ("Q0", "Q1", "Q2")]
    balanced = step(1.0)
    after = [state[k].abs().max().item() for k in ("Q0", "Q1", "Q2")]
    assert after == pytest.approx([math.prod(norms) ** (1 / 3)] * 3, rel=1e-12)
    torch.testing.assert_close(balanced, before, rtol=1e-12, atol=0.0)
