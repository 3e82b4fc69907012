"""The fast path (``fused=True``) against the eager path, for every registry optimizer.

Compilation is slow on small machines, so every test uses the same few small shapes (compiled
functions are shared per process through ``optarena.optim.fused``'s cache) and one run of each
optimizer serves parity, the no-recompilation check and the state round trip.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torch._dynamo.utils import counters

from optarena.optim import (
    REGISTRY,
    AdamW,
    block_adam,
    classic_adafactor,
    create,
    factored_adam,
    numba_support,
)
from optarena.optim import fused as fused_module
from optarena.optim.fused import CPU_MIN_NUMEL, bytes_per_param, compile_available, should_fuse
from optarena.optim.roles import FusedPart, ParamInfo, Role
from optarena.optim.rules import RULES

pytestmark = pytest.mark.skipif(
    not compile_available(torch.device("cpu")), reason="torch.compile unavailable (no C++ compiler)"
)

STEPS = 8
LR_CHANGE = 4  # the learning rate halves before this step
HESSIAN_STEPS = (2, 5)  # Sophia's update_hessian before these steps

# name, shape, role, extra ParamInfo fields
LAYOUT: list[tuple[str, tuple[int, ...], Role, dict]] = [
    ("emb", (32, 16), Role.EMBEDDING, {}),
    ("q", (16, 16), Role.Q, {"heads": 2}),
    ("k", (8, 16), Role.K, {"heads": 1}),
    ("v", (8, 16), Role.V, {"heads": 1}),
    ("o", (16, 16), Role.O, {}),
    (
        "qkv",
        (32, 16),
        Role.QKV,
        {
            "parts": (
                FusedPart(Role.Q, 16, 2),
                FusedPart(Role.K, 8, 1),
                FusedPart(Role.V, 8, 1),
            )
        },
    ),
    ("up", (24, 16), Role.MLP, {}),
    ("down", (16, 24), Role.MLP, {}),
    ("norm", (16,), Role.NORM, {}),
    ("bias", (24,), Role.BIAS, {}),
    ("conv", (4, 3, 5), Role.OTHER, {}),
    ("frozen", (8, 8), Role.OTHER, {}),  # never gets a gradient
    ("out", (32, 16), Role.OUTPUT, {}),
]
NO_GRAD = "frozen"

# per registry name: hyperparameters that exercise its options
HP: dict[str, dict] = {
    "adamw": {"weight_decay": 0.1},
    "adam-mini": {"weight_decay": 0.1},
    "adalayer": {"weight_decay": 0.1},
    "adafactor": {"weight_decay": 0.1},
    "sgd": {
        "lr": 1e-2,
        "momentum": 0.9,
        "nesterov": True,
        "weight_decay": 0.01,
        "decoupled_weight_decay": False,
    },
    "sgd-ema": {"lr": 1e-2, "weight_decay": 0.01},
    "lion": {"weight_decay": 0.1},
    "signum": {"weight_decay": 0.1},
    "sophia": {"lr": 1e-3, "bs": 64, "rho": 0.05, "weight_decay": 0.1},
    "adam-frozen": {"precondition_steps": 3, "unfrozen_roles": ("output", "norm")},
    "hybrid": {"routes": {"default": "lion", "output": ("adam-mini", {"lr": 3e-3}), "norm": "sgd"}},
    "adafactor-classic": {"beta1": 0.9, "weight_decay": 0.1},
}
FUSABLE = list(REGISTRY)


def _named(dtype: torch.dtype = torch.float32, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    named, infos = [], {}
    for name, shape, role, extra in LAYOUT:
        p = nn.Parameter(torch.randn(shape, generator=gen).to(dtype))
        named.append((name, p))
        infos[name] = ParamInfo(name, shape, role, **extra)
    return named, infos


def _grads(step: int, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(1000 + step)
    out = {}
    for name, shape, _, _ in LAYOUT:
        g = torch.randn(shape, generator=gen)
        if name == "o" and step == 3:
            g.zero_()  # sign(0) = 0 and zero statistics
        out[name] = g.to(dtype)
    return out


def _run(opt, named, start: int, stop: int, dtype: torch.dtype) -> None:
    for step in range(start, stop):
        grads = _grads(step, dtype)
        if step == LR_CHANGE:
            for group in opt.param_groups:
                if group.get("lr"):
                    group["lr"] *= 0.5
        if step in HESSIAN_STEPS and opt.hessian_interval is not None:
            for name, p in named:
                p.grad = None if name == NO_GRAD else grads[name].square()
            opt.update_hessian()
        for name, p in named:
            p.grad = None if name == NO_GRAD else grads[name]
        opt.step()


def _build(name: str, fused: bool, dtype: torch.dtype = torch.float32):
    """``fused=True``: the compiled path, for AdamW and SGD too (not torch's kernels)."""
    named, infos = _named(dtype)
    opt = create(name, named, partition=infos, fused=fused, **HP.get(name, {}))
    opt.fast_eager = not fused
    return named, opt


def _assert_close(named_a, opt_a, named_b, opt_b, rtol: float, atol: float) -> None:
    for (name, a), (_, b) in zip(named_a, named_b, strict=True):
        torch.testing.assert_close(a, b, rtol=rtol, atol=atol, msg=lambda m, n=name: f"{n}: {m}")
        sa, sb = opt_a.state.get(a, {}), opt_b.state.get(b, {})
        assert sa.keys() == sb.keys(), name
        for key in sa:
            torch.testing.assert_close(
                sa[key], sb[key], rtol=rtol, atol=atol, msg=lambda m, n=name, k=key: f"{n}.{k}: {m}"
            )


@pytest.mark.parametrize("name", FUSABLE)
def test_fused_matches_eager(name: str) -> None:
    """Parameters and state agree in float32 after steps with an LR change, zero gradients, a
    parameter without gradient, Hessian updates and the frozen-preconditioner phases; and the LR
    change and new steps compile nothing new."""
    named_e, eager = _build(name, fused=False)
    named_f, fused = _build(name, fused=True)
    _run(eager, named_e, 1, STEPS + 1, torch.float32)
    _run(fused, named_f, 1, 2, torch.float32)
    graphs = counters["stats"]["unique_graphs"]
    _run(fused, named_f, 2, STEPS + 1, torch.float32)
    assert counters["stats"]["unique_graphs"] == graphs, "fast path recompiled"
    assert fused._fused is not None and eager._fused is None
    assert fused.state.get(dict(named_f)[NO_GRAD], {}) == {}
    _assert_close(named_e, eager, named_f, fused, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    "hp",
    [
        pytest.param({}, id="relative-scaled"),
        pytest.param({"lr": 1e-2, "relative_step": False, "weight_decay": 0.1}, id="lr-scaled-wd"),
        pytest.param(
            {"scale_parameter": False, "warmup_init": True, "clip_threshold": 0.5},
            id="warmup-clipped",
        ),
    ],
)
def test_classic_adafactor_fused_matches_eager(hp: dict) -> None:
    """Classic Adafactor's fast path (step size from RMS(θ), clipping by RMS(u), weight decay
    scaled by that step size, all in the graph) in the settings the parametrized test above
    leaves out: no momentum, an external lr, warm-up, a tighter clip."""
    built = []
    for fused in (False, True):
        named, infos = _named()
        built.append(
            (named, create("adafactor-classic", named, partition=infos, fused=fused, **hp))
        )
    (named_e, eager), (named_f, fused) = built
    _run(eager, named_e, 1, STEPS + 1, torch.float32)
    _run(fused, named_f, 1, STEPS + 1, torch.float32)
    assert fused._fused is not None and eager._fused is None
    _assert_close(named_e, eager, named_f, fused, rtol=1e-5, atol=1e-6)


def test_classic_adafactor_fused_bfloat16() -> None:
    """bfloat16 parameters (float32 state): numba declines them, the compiled expression
    takes the whole step, the same as eager to bfloat16 rounding."""
    built = []
    for fused in (False, True):
        named, infos = _named(torch.bfloat16)
        hp = {"beta1": 0.9, "weight_decay": 0.1}
        built.append(
            (named, create("adafactor-classic", named, partition=infos, fused=fused, **hp))
        )
    (named_e, eager), (named_f, fused) = built
    _run(eager, named_e, 1, STEPS + 1, torch.bfloat16)
    _run(fused, named_f, 1, STEPS + 1, torch.bfloat16)
    assert all(not plan.kernel for plan in fused._fused.plans.values())
    start, _ = _named(torch.bfloat16)
    for (name, a), (_, b), (_, p0) in zip(named_e, named_f, start, strict=True):
        torch.testing.assert_close(a.float(), b.float(), rtol=0, atol=0.02, msg=name)
        assert name == NO_GRAD or not torch.equal(b, p0), f"{name} never moved"


@pytest.mark.parametrize("have_numba", [True, False])
@pytest.mark.parametrize(
    ("name", "module"),
    [
        ("adafactor", factored_adam),
        ("adalayer", block_adam),
        ("adam-mini", block_adam),
        ("adafactor-classic", classic_adafactor),
    ],
)
def test_cpu_kernels_and_their_fallback(
    name: str, module, have_numba: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Adafactor's, Adalayer's, Adam-mini's and classic Adafactor's matrices are updated by
    numba kernels on the fast path where numba is installed, by the compiled torch expression
    where it is not; both match eager."""
    calls = []
    kernel = module._kernel

    def counted():
        calls.append(1)
        return kernel()

    monkeypatch.setattr(module, "_kernel", counted)
    monkeypatch.setattr(numba_support, "HAVE_NUMBA", have_numba)
    named_e, eager = _build(name, fused=False)
    named_f, fused = _build(name, fused=True)
    _run(eager, named_e, 1, STEPS + 1, torch.float32)
    _run(fused, named_f, 1, STEPS + 1, torch.float32)
    assert bool(calls) == have_numba
    _assert_close(named_e, eager, named_f, fused, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("contiguous", [True, False])
@pytest.mark.parametrize("name", ["adafactor", "adalayer", "adam-mini", "adafactor-classic"])
def test_kernel_parameters_given_new_storage(name: str, contiguous: bool) -> None:
    """A kernel call is prepared when the bucket is planned, but ``p.data`` may be replaced
    later: a new contiguous tensor is updated where it now lives, a non-contiguous one goes to
    the eager path; both as eager."""
    named_e, eager = _build(name, fused=False)
    named_f, fused = _build(name, fused=True)
    for opt, named in ((eager, named_e), (fused, named_f)):
        _run(opt, named, 1, 3, torch.float32)
        p = dict(named)["up"]
        with torch.no_grad():
            p.data = p.data.clone() if contiguous else p.data.t().contiguous().t()
        _run(opt, named, 3, STEPS + 1, torch.float32)
    assert dict(named_f)["up"].is_contiguous() is contiguous
    _assert_close(named_e, eager, named_f, fused, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("compiled_first", [True, False])
def test_kernels_run_when_the_compiled_part_failed(
    monkeypatch: pytest.MonkeyPatch, compiled_first: bool
) -> None:
    """``fused=None``: a bucket whose compiled function failed steps those tensors eagerly from
    then on, and its kernel tensors (Adafactor's matrices) still by their kernel, whichever
    part runs first."""
    plan_of = fused_module.FusedStepper._plan

    def plan_in_order(self, *args):
        plan = plan_of(self, *args)
        plan.compiled_first = compiled_first
        return plan

    def broken(fn, **options):
        def raises(*args, **kwargs):
            raise RuntimeError("no compiler today")

        return raises

    monkeypatch.setenv("OPTARENA_FUSED", "1")
    monkeypatch.setattr(fused_module, "_COMPILED", {})
    monkeypatch.setattr(fused_module, "_FAILED", set())
    monkeypatch.setattr(fused_module.torch, "compile", broken)
    monkeypatch.setattr(fused_module.FusedStepper, "_plan", plan_in_order)
    named_e, eager = _build("adafactor", fused=False)
    named_f, fused = _build("adafactor", fused=None)
    _run(eager, named_e, 1, STEPS + 1, torch.float32)
    with pytest.warns(RuntimeWarning, match="no compiler today"):
        _run(fused, named_f, 1, STEPS + 1, torch.float32)
    assert fused_module._FAILED
    _assert_close(named_e, eager, named_f, fused, rtol=1e-5, atol=1e-6)


def test_fused_two_groups_and_bfloat16() -> None:
    """Two param groups with their own lr and decay, bfloat16 parameters (float32 state)."""

    def build(fused: bool):
        named, _ = _named(torch.bfloat16)
        params = [p for _, p in named]
        groups = [
            {"params": params[:6], "lr": 1e-2, "weight_decay": 0.0},
            {"params": params[6:], "lr": 3e-3},
        ]
        return named, AdamW(groups, weight_decay=0.1, fused=fused)

    named_e, eager = build(False)
    named_f, fused = build(True)
    _run(eager, named_e, 1, 5, torch.bfloat16)
    _run(fused, named_f, 1, 5, torch.bfloat16)
    for (_, a), (_, b) in zip(named_e, named_f, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0.02)
        for key, value in eager.state.get(a, {}).items():
            assert fused.state[b][key].dtype == value.dtype == torch.float32
            torch.testing.assert_close(fused.state[b][key], value, rtol=1e-3, atol=1e-5)


def test_gradient_strides_change() -> None:
    """The compiled step skips inductor's size asserts and relies on dynamo's guards: a gradient
    that arrives transposed in memory (same shape, other strides) must recompile, not be read
    with the old strides."""

    def build(fused: bool):
        torch.manual_seed(0)
        p = nn.Parameter(torch.randn(24, 16))
        return p, create("adam-mini", [("mlp.weight", p)], fused=fused)

    pe, eager = build(False)
    pf, fused = build(True)
    gen = torch.Generator().manual_seed(1)
    for step in range(4):
        g = torch.randn(24, 16, generator=gen)
        if step >= 2:
            g = g.t().contiguous().t()  # the same values, column-major
        pe.grad, pf.grad = g.clone(), g
        eager.step()
        fused.step()
        assert pf.grad.stride() == g.stride()
        torch.testing.assert_close(pf, pe, rtol=1e-5, atol=1e-6)


def test_step_counts_set_by_hand() -> None:
    """The fast path keeps a bucket's step counts in one tensor (each state's ``step`` a view
    of it); a count the user sets is honoured, as on the eager path."""
    named_e, eager = _build("adam-mini", fused=False)
    named_f, fused = _build("adam-mini", fused=True)
    for opt, named in ((eager, named_e), (fused, named_f)):
        _run(opt, named, 1, 3, torch.float32)
        for _, p in named:
            if p in opt.state:
                opt.state[p]["step"] = torch.tensor(10.0)
        _run(opt, named, 3, 5, torch.float32)
        assert {float(s["step"]) for s in opt.state.values()} == {12.0}
    _assert_close(named_e, eager, named_f, fused, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", ["adam-mini", "lion"])
def test_gradients_that_come_and_go_in_turn(name: str) -> None:
    """A model whose parameters take turns having a gradient (conditional compute, experts):
    each pattern's bucket is planned once and then kept, every state counts the steps it took
    part in, and the fast path matches the eager one."""
    named_e, eager = _build(name, fused=False)
    named_f, fused = _build(name, fused=True)
    turns = {"up": 1, "down": 0}  # "up" on odd steps only, "down" on even ones

    def run(opt, named, start: int, stop: int) -> None:
        for step in range(start, stop):
            grads = _grads(step, torch.float32)
            for n, p in named:
                p.grad = None if turns.get(n, step % 2) != step % 2 else grads[n]
            opt.step()

    for opt, named in ((eager, named_e), (fused, named_f)):
        run(opt, named, 1, 5)
    plans = dict(fused._fused.plans)
    assert len(plans) == 2
    for opt, named in ((eager, named_e), (fused, named_f)):
        run(opt, named, 5, 11)
    assert fused._fused.plans.keys() == plans.keys()
    assert all(fused._fused.plans[k] is plan for k, plan in plans.items()), "planned again"
    counts = {n: float(fused.state[p]["step"]) for n, p in named_f}
    assert counts == {n: 5.0 if n in turns else 10.0 for n, _ in named_f}
    _assert_close(named_e, eager, named_f, fused, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("direction", ["fused-to-eager", "eager-to-fused"])
def test_state_dict_round_trip(direction: str) -> None:
    """A checkpoint from either path resumes exactly in the other; ``fused`` stays the
    receiver's own choice."""
    source_fused = direction == "fused-to-eager"
    named_ref, ref = _build("adamw", fused=False)
    _run(ref, named_ref, 1, STEPS + 1, torch.float32)

    named_a, a = _build("adamw", fused=source_fused)
    _run(a, named_a, 1, LR_CHANGE + 1, torch.float32)
    saved = copy.deepcopy(a.state_dict())
    named_b, b = _build("adamw", fused=not source_fused)
    with torch.no_grad():
        for (_, pa), (_, pb) in zip(named_a, named_b, strict=True):
            pb.copy_(pa)
    b.load_state_dict(saved)
    assert all(g["fused"] is (not source_fused) for g in b.param_groups)
    _run(b, named_b, LR_CHANGE + 1, STEPS + 1, torch.float32)
    _assert_close(named_ref, ref, named_b, b, rtol=1e-5, atol=1e-6)


def test_flag_validation_and_policy(monkeypatch: pytest.MonkeyPatch) -> None:
    named, infos = _named()
    with pytest.raises(ValueError, match="fused"):
        create("adamw", named, partition=infos, fused="yes")
    with monkeypatch.context() as patch:  # every registered rule has a fast path; a new one may not
        patch.setattr(RULES["adafactor-classic"], "fusable", False)
        with pytest.raises(ValueError, match="no fused path"):
            create("adafactor-classic", named, partition=infos, fused=True)
    # fused=None under the suite's OPTARENA_FUSED=0 runs eagerly, classic Adafactor too
    for name in ("adamw", "adafactor-classic"):
        named, infos = _named()
        opt = create(name, named, partition=infos)
        for _, p in named:
            p.grad = torch.ones_like(p)
        opt.step()
        assert opt._fused is None
    cpu = torch.device("cpu")
    assert should_fuse(None, cpu, 10**9) is False  # the suite's OPTARENA_FUSED=0
    monkeypatch.delenv("OPTARENA_FUSED")
    assert should_fuse(None, cpu, 10**9) is compile_available(cpu)  # large CPU bucket
    assert should_fuse(None, cpu, CPU_MIN_NUMEL - 1) is False  # small: not worth compiling
    monkeypatch.setenv("OPTARENA_FUSED_MIN_NUMEL", "10")
    assert should_fuse(None, cpu, 10) is compile_available(cpu)
    monkeypatch.setenv("OPTARENA_FUSED", "1")
    assert should_fuse(None, cpu, 10) is True
    monkeypatch.setenv("OPTARENA_FUSED", "0")
    assert should_fuse(None, cpu, 10**9) is False
    assert should_fuse(True, cpu, 10) is True and should_fuse(False, cpu, 10**9) is False


def test_bytes_per_param_model() -> None:
    """The bandwidth model: AdamW 28 B, Lion 20 B, Sophia 24 B per float32 parameter."""
    expected = {"adamw": 28.0, "lion": 20.0, "sophia": 24.0}
    for name, value in expected.items():
        named, infos = _named()
        named = [(n, p) for n, p in named if n != NO_GRAD]
        opt = create(name, named, partition=infos, fused=False)
        for _, p in named:
            p.grad = torch.ones_like(p)
        opt.step()
        assert bytes_per_param(opt) == pytest.approx(value)
