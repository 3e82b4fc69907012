"""The one-read kernel for Adafactor's statistics (``optarena.optim.square_sums``) against torch."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from optarena.optim import numba_support, square_sums
from optarena.optim.blocks import ROW_CHUNK
from optarena.optim.transforms import FactoredSecondMoment, mean_over

SRC = Path(__file__).resolve().parents[1] / "src"

# rows below, at and across chunk boundaries; a single column; a wide matrix
SHAPES = [(1, 1), (5, 3), (63, 17), (64, 64), (65, 8), (200, 33), (130, 1376), (2, 700)]


def _reference(g: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Row sums and per-chunk column sums of g², in float64."""
    sq = g.double().square()
    chunks = torch.stack([c.sum(0) for c in sq.split(ROW_CHUNK)])
    return sq.sum(1), chunks


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("with_momentum", [False, True])
def test_sums_and_momentum_match_torch(dtype: torch.dtype, with_momentum: bool) -> None:
    gen = torch.Generator().manual_seed(0)
    gs = [torch.randn(s, generator=gen, dtype=dtype) * 3 for s in SHAPES]
    ms = [torch.randn(s, generator=gen, dtype=dtype) for s in SHAPES] if with_momentum else None
    before = [m.clone() for m in ms] if ms else None
    out = square_sums.square_sums(gs, ms, 0.1)
    # float64 sums in another order differ in the last bits; float32 ones by its rounding
    tol = {"rtol": 1e-12, "atol": 0.0} if dtype == torch.float64 else {"rtol": 2e-6, "atol": 0.0}
    for i, (g, (rows, chunks)) in enumerate(zip(gs, out, strict=True)):
        ref_rows, ref_chunks = _reference(g)
        assert rows.dtype == chunks.dtype == dtype
        torch.testing.assert_close(rows.double(), ref_rows, **tol)
        torch.testing.assert_close(chunks.double(), ref_chunks, **tol)
        if ms is not None:
            expected = before[i].lerp(g, 0.1)
            torch.testing.assert_close(ms[i], expected, rtol=tol["rtol"] * 4, atol=1e-15)


def test_zero_gradient_gives_zero_sums() -> None:
    ((rows, chunks),) = square_sums.square_sums([torch.zeros(70, 9)])
    assert rows.abs().sum() == 0 and chunks.abs().sum() == 0


def test_statistics_equal_the_torch_expression() -> None:
    """The factors' statistics from the kernel's sums are the ones ``mean_over`` gives."""
    g = torch.randn(150, 40, dtype=torch.float64)
    ((rows, chunks),) = square_sums.square_sums([g])
    stats = FactoredSecondMoment.stats_from_sums(rows, chunks, g.shape)
    sq = g * g
    torch.testing.assert_close(stats["exp_avg_sq_0"], mean_over(sq, [1]), rtol=1e-13, atol=0)
    torch.testing.assert_close(stats["exp_avg_sq_1"], mean_over(sq, [0]), rtol=1e-13, atol=0)


def test_compiled_call_updates_momentum_in_place() -> None:
    """Inside a compiled graph the op writes the caller's momentum (no copy of it left behind)
    and returns the eager op's sums."""
    gen = torch.Generator().manual_seed(1)
    gs = [torch.randn(130, 24, generator=gen), torch.randn(64, 7, generator=gen)]
    ms = [torch.randn(g.shape, generator=gen) for g in gs]
    ms_eager = [m.clone() for m in ms]
    eager = square_sums.square_sums(gs, ms_eager, 0.25)

    def f(gs, ms):
        return [rows.sum() + chunks.sum() for rows, chunks in square_sums.square_sums(gs, ms, 0.25)]

    totals = torch.compile(f, fullgraph=True, dynamic=False)(gs, ms)
    for m, m_eager in zip(ms, ms_eager, strict=True):
        torch.testing.assert_close(m, m_eager, rtol=0, atol=0)
    for total, (rows, chunks) in zip(totals, eager, strict=True):
        torch.testing.assert_close(total, rows.sum() + chunks.sum())


def test_applies_only_where_the_kernel_runs(monkeypatch: pytest.MonkeyPatch) -> None:
    g = torch.randn(8, 4)
    assert square_sums.applies(g) and square_sums.applies(g, torch.zeros(8, 4))
    assert not square_sums.applies(g.bfloat16())
    assert not square_sums.applies(g.t())  # not contiguous
    assert not square_sums.applies(torch.randn(8))
    assert not square_sums.applies(torch.randn(2, 3, 4))
    assert not square_sums.applies(torch.randn(0, 4))
    assert not square_sums.applies(g, torch.zeros(8, 4, dtype=torch.float64))
    assert not square_sums.applies(g, torch.zeros(4, 8).t())
    monkeypatch.setattr(numba_support, "HAVE_NUMBA", False)
    assert not square_sums.applies(g)


def test_torch_keeps_its_thread_count() -> None:
    """Starting numba's OpenMP pool (it may share the runtime with torch, and sizes it to the
    cores) must not change torch's thread count: a compiled step guards on it and would
    recompile. In a fresh process, where the pool is not started yet."""
    threads = (os.cpu_count() or 1) + 2
    code = (
        "import torch; from optarena.optim import square_sums as s\n"
        f"torch.set_num_threads({threads})\n"
        "s.square_sums([torch.randn(130, 9)], [torch.zeros(130, 9)], 0.1)\n"
        "print(torch.get_num_threads())"
    )
    env = {**os.environ, "PYTHONPATH": str(SRC)}
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True
    )
    assert out.stdout.split()[-1] == str(threads)
