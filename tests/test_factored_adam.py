"""Adafactor's one-kernel step on CPU (``optarena.optim.factored_adam``) against torch."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from optarena.optim import factored_adam, numba_kernels, numba_support
from optarena.optim.blocks import ROW_CHUNK
from optarena.optim.transforms import FactoredSecondMoment, ema_

SRC = Path(__file__).resolve().parents[1] / "src"

# rows below, at and across chunk boundaries; a single row and column; a wide matrix
SHAPES = [(1, 1), (5, 3), (63, 17), (64, 64), (65, 8), (3 * ROW_CHUNK + 5, 12), (130, 700)]
MOMENT = FactoredSecondMoment()


def _reference(p, g, m, state, beta1, beta2, size, bc2, keep, eps) -> None:
    """One step in torch, as the eager path composes it (transforms.py)."""
    x = ema_(m, g, beta1) if m is not None else g
    MOMENT.update_(state, g, beta2)
    u = MOMENT.precondition_by_roots(x, MOMENT.roots(state, 2, bc2), eps)
    p.mul_(keep).sub_(u * size)


def _copies(tensors, dtype):
    return [t.to(dtype, copy=True) for t in tensors]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("beta1", [0.9, 0.0])
def test_kernel_matches_the_formula_over_steps(dtype: torch.dtype, beta1: float) -> None:
    gen = torch.Generator().manual_seed(0)
    beta2 = 0.95
    ps = [torch.randn(s, generator=gen, dtype=torch.float64) for s in SHAPES]
    ms = [torch.zeros(s, dtype=torch.float64) for s in SHAPES]
    states = [MOMENT.init(p, torch.float64) for p in ps]
    rows = [s["exp_avg_sq_0"] for s in states]
    cols = [s["exp_avg_sq_1"] for s in states]
    ours = [_copies(ts, dtype) for ts in (ps, ms, rows, cols)]
    for step in range(1, 7):
        gs = [torch.randn(s, generator=gen, dtype=torch.float64) * step for s in SHAPES]
        gs[1].zero_()  # a zero gradient: its row factor decays, and the update stays finite
        size, bc2, keep, eps = 1e-2 / step, 1 - beta2**step, 1 - 1e-3, 1e-8 * step
        for p, g, m, state in zip(ps, gs, ms, states, strict=True):
            _reference(p, g, m if beta1 else None, state, beta1, beta2, size, bc2, keep, eps)
        scalars = np.array([[size, bc2, keep]] * len(SHAPES))
        momenta = ours[1] if beta1 else None
        factored_adam.step_(
            ours[0], _copies(gs, dtype), momenta, ours[2], ours[3], scalars, beta1, beta2, eps
        )
    tol = {"rtol": 1e-12, "atol": 1e-14} if dtype == torch.float64 else {"rtol": 2e-5, "atol": 1e-6}
    for ref, got in zip(ps + ms + rows + cols, [t for ts in ours for t in ts], strict=True):
        torch.testing.assert_close(got.double(), ref, **tol)
    assert all(torch.isfinite(p).all() for p in ours[0])


def test_parameters_that_require_grad() -> None:
    """A parameter requires grad: the kernel still writes its memory in place."""
    p = torch.nn.Parameter(torch.ones(70, 3))
    g, m = torch.full((70, 3), 2.0), torch.zeros(70, 3)
    rows, cols = torch.zeros(70, 1), torch.zeros(1, 3)
    scalars = np.array([[0.1, 1.0, 1.0]])
    factored_adam.step_([p], [g], [m], [rows], [cols], scalars, 0.5, 0.5, 0.0)
    # m = 1; both factors 0.5·4 = 2, their mean 2: V = 2·(2/2) = 2; θ = 1 - 0.1·1/√2
    torch.testing.assert_close(m, torch.ones(70, 3))
    torch.testing.assert_close(rows, torch.full((70, 1), 2.0))
    torch.testing.assert_close(cols, torch.full((1, 3), 2.0))
    torch.testing.assert_close(p.detach(), torch.full((70, 3), 1 - 0.1 / 2**0.5))


def test_applies_only_where_the_kernel_runs(monkeypatch: pytest.MonkeyPatch) -> None:
    p, g, m = torch.randn(8, 4), torch.randn(8, 4), torch.zeros(8, 4)
    rows, cols = torch.zeros(8, 1), torch.zeros(1, 4)
    assert factored_adam.applies(p, g, m, rows, cols)
    assert factored_adam.applies(p, g, None, rows, cols)
    assert not factored_adam.applies(p.bfloat16(), g, m, rows, cols)
    assert not factored_adam.applies(p, g.double(), m, rows, cols)
    assert not factored_adam.applies(p, g.t().contiguous().t(), m, rows, cols)  # not contiguous
    assert not factored_adam.applies(p, torch.randn(4, 8), m, rows, cols)
    assert not factored_adam.applies(torch.randn(8), torch.randn(8), None, rows, cols)
    three = torch.randn(2, 3, 4)
    assert not factored_adam.applies(three, three, None, rows, cols)
    empty = torch.randn(0, 4)
    assert not factored_adam.applies(empty, empty, None, torch.zeros(0, 1), cols)
    monkeypatch.setattr(numba_support, "HAVE_NUMBA", False)
    assert not factored_adam.applies(p, g, m, rows, cols)


def test_torch_keeps_its_thread_count() -> None:
    """Starting numba's OpenMP pool (it may share the runtime with torch, and sizes it to the
    cores) must not change torch's thread count: a compiled step guards on it and would
    recompile. In a fresh process, where the pool is not started yet."""
    threads = (os.cpu_count() or 1) + 2
    code = (
        "import torch; from optarena.optim import factored_adam as f\n"
        f"torch.set_num_threads({threads})\n"
        "t = lambda *s: torch.zeros(s)\n"
        "f.step_([t(130, 9)], [t(130, 9)], None, [t(130, 1)], [t(1, 9)],"
        " [[1.0, 1.0, 1.0]], 0.0, 0.9, 1e-8)\n"
        "print(torch.get_num_threads())"
    )
    env = {**os.environ, "PYTHONPATH": str(SRC)}
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True
    )
    assert out.stdout.split()[-1] == str(threads)


def test_kernels_are_cached_on_disk(tmp_path: Path) -> None:
    """The CPU kernels compile once and load from numba's disk cache afterwards (a kernel that
    numba cannot cache, e.g. one calling ``numba.get_num_threads()``, recompiles for seconds in
    every process). A fresh cache directory, a fresh process, twice."""
    code = (
        "import warnings, torch, numpy as np\n"
        "from optarena.optim import block_adam, blocks, classic_adafactor, factored_adam\n"
        "from optarena.optim.rules import RULES\n"
        "warnings.simplefilter('error')\n"
        "t = lambda *s: torch.zeros(s)\n"
        "rows = block_adam.row_blocks(blocks.tensor_layout((130, 8)), (130, 8))\n"
        "block_adam.step_([t(130, 8)], [t(130, 8)], [t(130, 8)], [t(1)], np.ones((1, 3)),"
        " [rows], 0.9, 0.95)\n"
        "factored_adam.step_([t(130, 9)], [t(130, 9)], None, [t(130, 1)], [t(1, 9)],"
        " np.ones((1, 3)), 0.0, 0.9, 1e-8)\n"
        "rule = RULES['adafactor-classic']; group = {**rule.defaults, 'lr': None}\n"
        "state = rule.init(t(130, 9), None, group, torch.float32)\n"
        "classic_adafactor.Bucket([t(130, 9)], [state])([t(130, 9)], np.ones((1, 3)), group)\n"
        "kernels = (block_adam, factored_adam, classic_adafactor)\n"
        "print(*(sum(m._kernel().stats.cache_hits.values()) for m in kernels))"
    )
    env = {**os.environ, "PYTHONPATH": str(SRC), "NUMBA_CACHE_DIR": str(tmp_path)}
    runs = [
        subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
        for _ in range(2)
    ]
    for run in runs:
        assert run.returncode == 0, run.stderr[-2000:]
    assert runs[0].stdout.split() == ["0", "0", "0"]
    assert [int(x) > 0 for x in runs[1].stdout.split()] == [True, True, True]


@pytest.mark.parametrize("beta1", [0.9, 0.0])
def test_result_does_not_depend_on_the_threads(beta1: float) -> None:
    """One thread takes every matrix whole; two share the large one (130x700 of the bucket's
    ~103k elements): the same bits."""
    gen = torch.Generator().manual_seed(4)
    start = [
        [torch.randn(s, generator=gen) for s in SHAPES],
        [torch.randn(s, generator=gen) for s in SHAPES],
        [torch.rand(s[0], 1, generator=gen) for s in SHAPES],
        [torch.rand(1, s[1], generator=gen) for s in SHAPES],
    ]
    gs = [torch.randn(s, generator=gen) for s in SHAPES]
    scalars = np.array([[1e-2, 0.5, 1 - 1e-3]] * len(SHAPES))
    results = []
    threads = torch.get_num_threads()
    try:
        for count in (1, 2):
            torch.set_num_threads(count)
            ps, ms, rows, cols = ([t.clone() for t in ts] for ts in start)
            for _ in range(3):
                moments = ms if beta1 else None
                factored_adam.step_(ps, gs, moments, rows, cols, scalars, beta1, 0.95, 1e-8)
            results.append(ps + ms + rows + cols)
    finally:
        torch.set_num_threads(threads)
    owner = numba_kernels.owners(np.array([r * c for r, c in SHAPES]), 2)
    assert (owner < 0).any() and (owner >= 0).any()
    for a, b in zip(*results, strict=True):
        assert torch.equal(a, b)
