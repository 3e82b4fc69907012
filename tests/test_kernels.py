"""The eager path's use of torch's fused kernels (``optarena.optim.kernels``).

Which tensors go to ``torch._fused_adamw_`` / ``torch._fused_sgd_`` and which stay on the rule's
own path, and that the result is the rule's either way: float64, mixed roles with exempt weight
decay, a non-contiguous parameter, an LR change, 24 steps. Parity of both paths with torch's
reference optimizers is in ``test_parity.py``.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch import Tensor, nn

from optarena.optim import SGD, AdamW, ParamInfo, Role, create
from optim_cases import assert_close, count_kernel_calls, synthetic_grad

pytestmark = pytest.mark.usefixtures("single_thread")

STEPS = 24
ROLES = {"emb": Role.EMBEDDING, "mlp": Role.MLP, "ln": Role.NORM, "bias": Role.BIAS}
SHAPES = {"emb": (9, 4), "mlp": (4, 6), "ln": (4,), "bias": (6,)}


def named_params(seed: int = 0) -> list[tuple[str, nn.Parameter]]:
    """Float64 parameters, plus one stored transposed (non-contiguous) and one float32."""
    gen = torch.Generator().manual_seed(seed)
    params = [
        (n, nn.Parameter(torch.randn(s, generator=gen, dtype=torch.float64)))
        for n, s in SHAPES.items()
    ]
    transposed = torch.randn(5, 3, generator=gen, dtype=torch.float64).t()
    params.append(("mlp_t", nn.Parameter(transposed)))
    params.append(("f32", nn.Parameter(torch.randn(3, 2, generator=gen))))
    return params


def partition(params: list[tuple[str, Tensor]]) -> dict[str, ParamInfo]:
    return {
        n: ParamInfo(n, tuple(p.shape), ROLES.get(n, Role.MLP), source="override")
        for n, p in params
    }


def run(
    make: Any, kernel: bool, monkeypatch: pytest.MonkeyPatch, name: str
) -> tuple[list[tuple[str, nn.Parameter]], torch.optim.Optimizer, list[int]]:
    params = named_params()
    opt = make(params)
    opt.fast_eager = kernel
    calls = count_kernel_calls(monkeypatch, name)
    for t in range(1, STEPS + 1):
        if t == STEPS // 2:
            for group in opt.param_groups:
                group["lr"] *= 0.5
        for i, (_, p) in enumerate(params):
            g = synthetic_grad(tuple(p.shape), i, t)
            p.grad = g.to(p.dtype).t().contiguous().t() if not p.is_contiguous() else g.to(p.dtype)
        opt.step()
    return params, opt, calls


def assert_same_run(a: Any, b: Any) -> None:
    (pa, oa, _), (pb, ob, _) = a, b
    for (name, x), (_, y) in zip(pa, pb, strict=True):
        if x.dtype == torch.float64:
            assert_close(x, y, name)
        else:  # float32: the kernel and the rule round in different orders
            torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-6, msg=name)
        for key, value in oa.state[x].items():
            torch.testing.assert_close(value, ob.state[y][key], rtol=1e-5, atol=1e-7)


def test_adamw_kernel_path_equals_rule_path(monkeypatch: pytest.MonkeyPatch) -> None:
    def make(params):
        return AdamW(
            params,
            lr=3e-2,
            betas=(0.9, 0.95),
            weight_decay=0.1,
            no_decay_roles=("norm", "bias"),
            partition=partition(params),
        )

    kernel = run(make, True, monkeypatch, "_fused_adamw_")
    rule = run(make, False, monkeypatch, "_fused_adamw_")
    assert_same_run(kernel, rule)
    # per step: float64 with decay (emb, mlp), float64 exempt (ln, bias), float32 (f32);
    # the transposed parameter always takes the rule
    calls = kernel[2]
    assert len(calls) == 3 * STEPS and sum(calls) == 5 * STEPS
    assert rule[2] == []


@pytest.mark.parametrize(
    "hp",
    [
        dict(momentum=0.9, weight_decay=0.05),
        dict(momentum=0.9, nesterov=True, weight_decay=0.05, decoupled_weight_decay=False),
        dict(momentum=0.8, dampening=0.2),
        dict(momentum=0.0, weight_decay=0.05),
    ],
    ids=["decoupled", "nesterov-coupled", "dampening", "plain"],
)
def test_sgd_kernel_path_equals_rule_path(
    hp: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    def make(params):
        return SGD(
            params, lr=0.05, no_decay_roles=("norm", "bias"), partition=partition(params), **hp
        )

    kernel = run(make, True, monkeypatch, "_fused_sgd_")
    rule = run(make, False, monkeypatch, "_fused_sgd_")
    assert_same_run(kernel, rule)
    assert sum(kernel[2]) == 5 * STEPS and rule[2] == []


@pytest.mark.parametrize(
    "name, options",
    [
        ("adam-mini", {}),
        ("adalayer", {}),
        ("adam-frozen", {"precondition_steps": 3}),
        ("adamw", {"betas": (0.0, 0.95)}),  # no first moment: nothing for the kernel to hold
        ("adamw", {"state_dtype": torch.float32}),  # float64 parameters, float32 state
    ],
)
@pytest.mark.filterwarnings("ignore:optarena partition")
def test_rules_torch_has_no_kernel_for_stay_on_the_rule(
    name: str, options: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    def refuse(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("torch._fused_adamw_ called for a rule it does not implement")

    monkeypatch.setattr(torch, "_fused_adamw_", refuse)
    model = nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4), nn.Linear(4, 3)).double()
    opt = create(name, model, lr=1e-2, **options)
    before = [p.detach().clone() for p in model.parameters()]
    for _ in range(5):
        model(torch.randn(2, 4, dtype=torch.float64)).square().sum().backward()
        opt.step()
    assert any(not torch.equal(a, p) for a, p in zip(before, model.parameters(), strict=True))


def test_fast_path_uses_torch_kernel_without_compiling(monkeypatch: pytest.MonkeyPatch) -> None:
    """``fused=True`` on plain CPU AdamW tensors: torch's kernel is the fast path (no compile);
    the one non-contiguous parameter is all that is left for the compiled path."""
    compiled: list[int] = []

    def step_group(self, group, hp, rule, params, explicit):
        compiled.append(len(params))
        return params  # leave them to the eager loop: this test compiles nothing

    monkeypatch.setattr("optarena.optim.base.FusedStepper.step_group", step_group)
    monkeypatch.setattr("optarena.optim.base.compile_available", lambda device: True)

    def make(params):
        return AdamW(params, lr=1e-2, fused=True, partition=partition(params))

    params, opt, calls = run(make, True, monkeypatch, "_fused_adamw_")
    assert sum(calls) == 5 * STEPS
    assert compiled == [1] * STEPS  # the transposed parameter
    moved = [n for n, p in params if opt.state[p]["step"].item() == STEPS]
    assert len(moved) == len(params)


def test_fast_eager_flag_is_validated_and_reaches_the_optimizer() -> None:
    params = named_params()
    assert create("adamw", params, fast_eager=False).fast_eager is False
    assert AdamW(params).fast_eager is True
    with pytest.raises(ValueError, match="fast_eager"):
        AdamW(params, fast_eager="no")


def test_step_counts_of_a_kernel_bucket(monkeypatch: pytest.MonkeyPatch) -> None:
    """A bucket's step counts live in one tensor (each state's ``step`` a view of it, one add
    a step), and a count set by hand is honoured as on the rule's path."""

    def make(params):
        return AdamW(params, lr=3e-2, weight_decay=0.1, partition=partition(params))

    def set_by_hand_and_step(params: list[tuple[str, nn.Parameter]], opt: AdamW) -> None:
        for state in opt.state.values():
            state["step"] = torch.tensor(100.0)
        for t in range(3):
            for i, (_, p) in enumerate(params):
                g = synthetic_grad(tuple(p.shape), i, STEPS + t).to(p.dtype)
                p.grad = g if p.is_contiguous() else g.t().contiguous().t()
            opt.step()

    kernel = run(make, True, monkeypatch, "_fused_adamw_")
    shared = {s["step"].untyped_storage().data_ptr() for s in kernel[1].state.values()}
    assert len(shared) < len(kernel[1].state)  # the float64 buckets share one tensor each
    rule = run(make, False, monkeypatch, "_fused_adamw_")
    set_by_hand_and_step(*kernel[:2])
    set_by_hand_and_step(*rule[:2])
    assert {float(s["step"]) for s in kernel[1].state.values()} == {103.0}
    assert_same_run(kernel, rule)
