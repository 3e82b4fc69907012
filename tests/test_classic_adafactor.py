"""Classic Adafactor's one-kernel step on CPU (``optarena.optim.classic_adafactor``) against
the eager rule (itself tested against ``transformers``' Adafactor in test_parity.py)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from optarena.optim import classic_adafactor, numba_kernels, numba_support
from optarena.optim.blocks import ROW_CHUNK
from optarena.optim.rules import RULES

RULE = RULES["adafactor-classic"]
# vectors; matrices below, at and across chunk boundaries, a single entry, a wide one
SHAPES = [(7,), (200,), (1, 1), (5, 3), (63, 17), (64, 64), (65, 8), (3 * ROW_CHUNK + 5, 12)]
SHAPES += [(130, 700)]
DECAY = [0.0, 0.1, 0.0, 0.1, 0.1, 0.0, 0.1, 0.1, 0.1]  # λ per tensor (roles without decay: 0)


def _group(**hp) -> dict:
    group = {**RULE.defaults, "lr": None, "weight_decay": 0.0, **hp}
    RULE.validate(group, "test")
    return group


def _eager_step(p, g, state, group, step, decay) -> None:
    """One step as ``RuleOptimizer`` takes it on the eager path."""
    u, size = RULE.direction(g, p, state, group, step, None)
    p.mul_(1.0 - decay * RULE.decay_lr(p, state, group))
    p.add_(u, alpha=-size)


def _scalars(group: dict, step: int) -> np.ndarray:
    sc = RULE.fused_scalars(group, step)
    return np.array([[sc["size"], sc["beta2t"], 1.0 - d] for d in DECAY])


def _copy_state(state: dict, dtype: torch.dtype) -> dict:
    return {k: v.clone() if k == "lr" else v.to(dtype, copy=True) for k, v in state.items()}


CASES = [
    pytest.param({}, id="relative-scaled"),
    pytest.param({"beta1": 0.9}, id="relative-scaled-momentum"),
    pytest.param({"lr": 1e-2, "relative_step": False, "scale_parameter": False}, id="lr"),
    pytest.param({"warmup_init": True, "clip_threshold": 0.05, "beta1": 0.5}, id="clipped"),
]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("hp", CASES)
def test_kernel_matches_the_eager_rule_over_steps(dtype: torch.dtype, hp: dict) -> None:
    gen = torch.Generator().manual_seed(0)
    group = _group(**hp)
    ps = [torch.randn(s, generator=gen, dtype=torch.float64) for s in SHAPES]
    states = [RULE.init(p, None, group, torch.float64) for p in ps]
    ours = [p.to(dtype, copy=True) for p in ps]
    our_states = [_copy_state(st, dtype) for st in states]
    bucket = classic_adafactor.Bucket(ours, our_states)
    for step in range(1, 7):
        gs = [torch.randn(s, generator=gen, dtype=torch.float64) * step for s in SHAPES]
        gs[3].zero_()  # a zero gradient: ε1 keeps its factors positive, the update finite
        for p, g, st, decay in zip(ps, gs, states, DECAY, strict=True):
            _eager_step(p, g, st, group, step, decay)
        bucket([g.to(dtype) for g in gs], _scalars(group, step), group)
    tol = {"rtol": 1e-12, "atol": 1e-14} if dtype == torch.float64 else {"rtol": 2e-5, "atol": 1e-6}
    for p, got, st, our in zip(ps, ours, states, our_states, strict=True):
        torch.testing.assert_close(got.double(), p, **tol)
        assert st.keys() == our.keys()
        for key in st:
            torch.testing.assert_close(our[key].double(), st[key], **tol, msg=key)
    assert all(torch.isfinite(p).all() for p in ours)


def test_result_does_not_depend_on_the_threads() -> None:
    """One thread takes every tensor whole; two share the large one (130x700 of the bucket's
    ~104k elements): the same bits."""
    gen = torch.Generator().manual_seed(4)
    group = _group(beta1=0.9)
    start = [torch.randn(s, generator=gen) for s in SHAPES]
    gs = [torch.randn(s, generator=gen) for s in SHAPES]
    results = []
    threads = torch.get_num_threads()
    try:
        for count in (1, 2):
            torch.set_num_threads(count)
            ps = [p.clone() for p in start]
            states = [RULE.init(p, None, group, torch.float32) for p in ps]
            bucket = classic_adafactor.Bucket(ps, states)
            for step in range(1, 4):
                bucket(gs, _scalars(group, step), group)
            results.append(ps + [t for st in states for t in st.values()])
    finally:
        torch.set_num_threads(threads)
    sizes = np.array([int(np.prod(s)) for s in SHAPES])
    owner = numba_kernels.owners(sizes, 2)
    assert (owner < 0).any() and (owner >= 0).any()
    for a, b in zip(*results, strict=True):
        assert torch.equal(a, b)


def test_applies_only_where_the_kernel_runs(monkeypatch: pytest.MonkeyPatch) -> None:
    group = _group(beta1=0.9)
    p, g = torch.randn(8, 4), torch.randn(8, 4)
    state = RULE.init(p, None, group, torch.float32)
    assert classic_adafactor.applies(p, g, state)
    vector = torch.randn(5)
    assert classic_adafactor.applies(vector, vector, RULE.init(vector, None, group, torch.float32))
    assert not classic_adafactor.applies(p, g.double(), state)
    assert not classic_adafactor.applies(p, g.t().contiguous().t(), state)  # not contiguous
    assert not classic_adafactor.applies(p, g, {**state, "lr": torch.tensor(0.0)})  # float32
    assert not classic_adafactor.applies(p, g, {k: v for k, v in state.items() if k != "lr"})
    bf16 = p.bfloat16()
    assert not classic_adafactor.applies(bf16, bf16, RULE.init(bf16, None, group, torch.float32))
    three = torch.randn(2, 3, 4)
    assert not classic_adafactor.applies(three, three, RULE.init(three, None, group, torch.float32))
    monkeypatch.setattr(numba_support, "HAVE_NUMBA", False)
    assert not classic_adafactor.applies(p, g, state)
