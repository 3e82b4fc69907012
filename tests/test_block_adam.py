"""Adalayer's one-kernel step on CPU (``optarena.optim.block_adam``) against the torch formula."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from optarena.optim import block_adam, blocks, numba_kernels
from optarena.optim.blocks import ROW_CHUNK

# (shape, layout): blocks of one row, of a few rows, one block per tensor in and beyond one
# chunk of rows, and two segments with different block sizes (a fused projection); the last
# three have blocks of at most ROW_CHUNK rows that change size from one block to the next
# (each block's update runs beside the next block's first pass, row by row), one of them large
# enough to be shared by the threads
CASES = [
    ((40, 24), blocks.rows_layout((40, 24))),
    ((48, 16), blocks.heads_layout((48, 16), 3)),
    ((50, 8), blocks.tensor_layout((50, 8))),
    ((3 * ROW_CHUNK + 5, 12), blocks.tensor_layout((3 * ROW_CHUNK + 5, 12))),
    ((144, 8), blocks.split_layout((144, 8), 0, [(2 * ROW_CHUNK, 1), (16, 16)])),
    ((37,), blocks.tensor_layout((37,))),  # a vector with one block (a LayerNorm weight)
    ((40, 8), blocks.split_layout((40, 8), 0, [(24, 3), (16, 16)])),  # 8 rows, then 1
    ((20, 8), blocks.split_layout((20, 8), 0, [(4, 4), (16, 2)])),  # 1 row, then 8
    ((72, 40), blocks.split_layout((72, 40), 0, [(48, 6), (24, 24)])),
]


def _reference(p, g, m, v, layout, beta1, beta2, size, eps, keep):
    """The update in float64 torch: m, block means of g², v, θ."""
    m.lerp_(g, 1 - beta1)
    stat = blocks.block_mean_square(g, layout)
    v.mul_(beta2).add_(stat, alpha=1 - beta2)
    u = blocks.blockwise(lambda x, s: x / (s.sqrt() + eps), m, v, layout)
    p.mul_(keep).sub_(u * size)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_kernel_matches_the_formula_over_steps(dtype: torch.dtype) -> None:
    gen = torch.Generator().manual_seed(0)
    beta1, beta2 = 0.9, 0.95
    shapes = [shape for shape, _ in CASES]
    layouts = [layout for _, layout in CASES]
    ps = [torch.randn(s, generator=gen, dtype=torch.float64) for s in shapes]
    ms = [torch.zeros(s, dtype=torch.float64) for s in shapes]
    vs = [torch.zeros(layout.num_blocks(s), dtype=torch.float64) for s, layout in CASES]
    ours = [[t.to(dtype, copy=True) for t in ts] for ts in (ps, ms, vs)]
    row_blocks = [block_adam.row_blocks(layout, s) for s, layout in CASES]
    assert all(b is not None for b in row_blocks)
    for step in range(1, 7):
        gs = [torch.randn(s, generator=gen, dtype=torch.float64) * step for s in shapes]
        size, eps, keep = 1e-2 / step, 1e-8 * step, 1 - 1e-3
        for p, g, m, v, layout in zip(ps, gs, ms, vs, layouts, strict=True):
            _reference(p, g, m, v, layout, beta1, beta2, size, eps, keep)
        scalars = np.array([[size, eps, keep]] * len(shapes))
        ours_g = [g.to(dtype) for g in gs]
        block_adam.step_(*ours[:1], ours_g, *ours[1:], scalars, row_blocks, beta1, beta2)
    tol = {"rtol": 1e-12, "atol": 1e-14} if dtype == torch.float64 else {"rtol": 2e-5, "atol": 1e-6}
    for ref, got in zip(ps + ms + vs, ours[0] + ours[1] + ours[2], strict=True):
        torch.testing.assert_close(got.double(), ref, **tol)


def test_row_blocks_only_for_runs_of_rows() -> None:
    assert block_adam.row_blocks(blocks.rows_layout((6, 4)), (6, 4)) == (0, 1, 6)
    assert block_adam.row_blocks(blocks.heads_layout((6, 4), 2), (6, 4)) == (0, 3, 2)
    assert block_adam.row_blocks(blocks.tensor_layout((6, 4)), (6, 4)) == (0, 6, 1)
    split = blocks.split_layout((6, 4), 0, [(4, 2), (2, 1)])
    assert block_adam.row_blocks(split, (6, 4)) == (0, 2, 2, 4, 2, 1)
    # a Conv1D weight's neurons are columns; per-element moments are not blocks
    assert block_adam.row_blocks(blocks.rows_layout((6, 4), out_dim=1), (6, 4)) is None
    assert block_adam.row_blocks(blocks.tensor_layout((6,)), (6,)) == block_adam.VECTOR
    assert block_adam.row_blocks(blocks.element_layout(), (6, 4)) is None


def test_tensors_that_require_grad() -> None:
    """Parameters (and a gradient built with ``create_graph``) require grad: the kernel still
    takes their memory, and updates the parameter in place."""
    layout = blocks.rows_layout((8, 4))
    p = torch.nn.Parameter(torch.ones(8, 4))
    g = torch.full((8, 4), 2.0, requires_grad=True)
    m, v = torch.zeros(8, 4), torch.zeros(8)
    scalars = np.array([[0.1, 0.0, 1.0]])
    block_adam.step_([p], [g], [m], [v], scalars, [block_adam.row_blocks(layout, (8, 4))], 0.5, 0.5)
    # m = 0.5·2 = 1, v = 0.5·4 = 2, θ = 1 - 0.1·1/√2
    torch.testing.assert_close(m, torch.ones(8, 4))
    torch.testing.assert_close(v, torch.full((8,), 2.0))
    torch.testing.assert_close(p.detach(), torch.full((8, 4), 1 - 0.1 / 2**0.5))


def test_threads_take_whole_tensors_unless_too_large() -> None:
    # 1100 elements on 2 threads: the 1000 is shared, the rest largest first to the least loaded
    sizes = np.array([1000, 10, 20, 30, 40], dtype=np.int64)
    assert numba_kernels.owners(sizes, 2).tolist() == [-1, 0, 1, 1, 0]
    assert numba_kernels.owners(sizes, 1).tolist() == [0] * 5


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_result_does_not_depend_on_the_threads(dtype: torch.dtype) -> None:
    """One thread takes every tensor whole; two share the large ones: the same bits."""
    gen = torch.Generator().manual_seed(3)
    shapes = [shape for shape, _ in CASES]
    row_blocks = [block_adam.row_blocks(layout, s) for s, layout in CASES]
    start = [
        [torch.randn(s, generator=gen, dtype=dtype) for s in shapes],
        [torch.randn(s, generator=gen, dtype=dtype) for s in shapes],
        [torch.rand(layout.num_blocks(s), generator=gen, dtype=dtype) for s, layout in CASES],
    ]
    gs = [torch.randn(s, generator=gen, dtype=dtype) for s in shapes]
    scalars = np.array([[1e-2, 1e-8, 1 - 1e-3]] * len(shapes))
    results = []
    threads = torch.get_num_threads()
    try:
        for count in (1, 2):
            torch.set_num_threads(count)
            ps, ms, vs = ([t.clone() for t in ts] for ts in start)
            for _ in range(3):
                block_adam.step_(ps, gs, ms, vs, scalars, row_blocks, 0.9, 0.95)
            results.append(ps + ms + vs)
    finally:
        torch.set_num_threads(threads)
    sizes = np.array([int(np.prod(s)) for s in shapes])
    assert (numba_kernels.owners(sizes, 2) < 0).any()  # some tensors shared, some whole
    assert (numba_kernels.owners(sizes, 2) >= 0).any()
    for a, b in zip(*results, strict=True):
        assert torch.equal(a, b)
