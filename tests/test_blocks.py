"""Block layouts: block counts per policy, and the vectorised statistics against naive loops."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from torch import Tensor

from optarena.optim import FusedPart, ParamInfo, Role
from optarena.optim import blocks as B

pytestmark = pytest.mark.usefixtures("single_thread")


def naive_blocks(shape: tuple[int, ...], kind: str, **kw) -> list[tuple[slice, ...]]:
    """The index region of each block, written out one block at a time."""
    full = [slice(None)] * len(shape)

    def along(dim: int, start: int, stop: int) -> tuple[slice, ...]:
        region = list(full)
        region[dim] = slice(start, stop)
        return tuple(region)

    if kind == "tensor":
        return [tuple(full)]
    if kind == "rows":
        d = kw.get("out_dim", 0)
        return [along(d, i, i + 1) for i in range(shape[d])]
    if kind == "heads":
        d, h = kw.get("out_dim", 0), kw["heads"]
        size = shape[d] // h
        return [along(d, i * size, (i + 1) * size) for i in range(h)]
    if kind == "split":
        d, regions, start = kw["out_dim"], [], 0
        for size, groups in kw["parts"]:
            step = size // groups
            regions += [along(d, start + j * step, start + (j + 1) * step) for j in range(groups)]
            start += size
        return regions
    raise ValueError(kind)


CASES: list[tuple[tuple[int, ...], Callable[[], B.BlockLayout], str, dict]] = [
    ((6, 5), lambda: B.tensor_layout((6, 5)), "tensor", {}),
    ((2, 3, 4), lambda: B.tensor_layout((2, 3, 4)), "tensor", {}),
    ((6, 5), lambda: B.rows_layout((6, 5)), "rows", {}),
    ((4, 7), lambda: B.rows_layout((4, 7), out_dim=1), "rows", {"out_dim": 1}),  # Conv1D
    ((3, 4, 5), lambda: B.rows_layout((3, 4, 5), out_dim=1), "rows", {"out_dim": 1}),
    ((8, 5), lambda: B.heads_layout((8, 5), 4), "heads", {"heads": 4}),
    ((5, 12), lambda: B.heads_layout((5, 12), 3, out_dim=1), "heads", {"out_dim": 1, "heads": 3}),
    (
        (12, 5),
        lambda: B.split_layout((12, 5), 0, [(4, 2), (4, 1), (4, 4)]),
        "split",
        {"out_dim": 0, "parts": [(4, 2), (4, 1), (4, 4)]},
    ),
    (
        (5, 9),
        lambda: B.split_layout((5, 9), 1, [(3, 3), (6, 2)]),
        "split",
        {"out_dim": 1, "parts": [(3, 3), (6, 2)]},
    ),
]


@pytest.mark.parametrize(("shape", "make", "kind", "kw"), CASES)
def test_statistics_equal_naive_loops(shape, make, kind, kw) -> None:
    layout = make()
    regions = naive_blocks(shape, kind, **kw)
    assert layout.num_blocks(shape) == len(regions)
    g = torch.randn(shape, dtype=torch.float64)
    stat = B.block_mean_square(g, layout)
    naive_stat = torch.stack([(g[r] ** 2).mean() for r in regions])
    torch.testing.assert_close(stat, naive_stat, rtol=1e-12, atol=0)

    def fn(x: Tensor, v: Tensor) -> Tensor:
        return x / (v.sqrt() + 0.1)

    out = B.blockwise(fn, g, stat, layout)
    expected = torch.empty_like(g)
    for r, v in zip(regions, naive_stat, strict=True):
        expected[r] = g[r] / (v.sqrt() + 0.1)
    assert out.shape == g.shape
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=0)


def test_element_layout_is_adam() -> None:
    layout = B.element_layout()
    g = torch.randn(3, 4, dtype=torch.float64)
    assert layout.elementwise and layout.num_blocks((3, 4)) == 12
    assert torch.equal(B.block_mean_square(g, layout), g * g)


@pytest.mark.parametrize("shape", [(), (1,), (5,), (1, 1)])
def test_small_tensors(shape: tuple[int, ...]) -> None:
    g = torch.randn(shape, dtype=torch.float64)
    for layout in (B.tensor_layout(shape), B.rows_layout(shape), B.heads_layout(shape, 1)):
        stat = B.block_mean_square(g, layout)
        if len(shape) < 2:
            assert layout.kind == "tensor"
        assert stat.numel() == layout.num_blocks(shape)
        torch.testing.assert_close(stat.sum(), (g * g).mean())  # one block in each case
        out = B.blockwise(lambda x, v: x * v, g, stat, layout)
        assert out.shape == g.shape


def test_uneven_splits_are_rejected() -> None:
    with pytest.raises(ValueError, match="cannot split extent 10 of axis 0 into 4"):
        B.heads_layout((10, 3), 4)
    with pytest.raises(ValueError, match="cover 8 of 12"):
        B.split_layout((12, 3), 0, [(4, 1), (4, 1)])


def info(role: Role, shape: tuple[int, ...], **kw) -> ParamInfo:
    return ParamInfo("x", shape, role, **kw)


QKV = info(
    Role.QKV,
    (48, 16),
    parts=(FusedPart(Role.Q, 16, 4), FusedPart(Role.K, 16, 2), FusedPart(Role.V, 16, 2)),
)


@pytest.mark.parametrize(
    ("param", "blocks", "blocks_single_v"),
    [
        (info(Role.Q, (32, 16), heads=4), 4, 4),
        (info(Role.K, (16, 16), heads=2), 2, 2),  # GQA: one block per kv head
        (info(Role.V, (16, 16), heads=2), 16, 1),
        (info(Role.O, (16, 32)), 16, 16),
        (info(Role.MLP, (64, 16)), 64, 64),
        (info(Role.EMBEDDING, (50, 16)), 50, 50),
        (info(Role.OUTPUT, (50, 16)), 50, 50),
        (info(Role.OUTPUT, (16, 50), out_dim=1), 50, 50),  # Conv1D-style (in, out)
        (info(Role.NORM, (16,)), 1, 1),
        (info(Role.OTHER, (7, 16)), 1, 1),
        (info(Role.BIAS, (16,)), 16, 16),  # elementwise Adam
        (QKV, 4 + 2 + 16, 4 + 2 + 1),
    ],
)
def test_adam_mini_block_counts(param: ParamInfo, blocks: int, blocks_single_v: int) -> None:
    assert B.adam_mini_layout(param).num_blocks(param.shape) == blocks
    layout = B.adam_mini_layout(param, single_block_value=True)
    assert layout.num_blocks(param.shape) == blocks_single_v


@pytest.mark.parametrize(
    ("param", "blocks", "plain"),
    [
        (info(Role.OUTPUT, (50, 16)), 50, 1),  # per row of the last layer
        (QKV, 3, 1),  # Q, K and V blocks
        (info(Role.MLP, (64, 16)), 1, 1),
        (info(Role.Q, (32, 16), heads=4), 1, 1),
        (info(Role.NORM, (16,)), 1, 1),
        (info(Role.EMBEDDING, (50, 16)), 1, 1),
        (info(Role.OUTPUT, (16,)), 1, 1),
    ],
)
def test_adalayer_block_counts(param: ParamInfo, blocks: int, plain: int) -> None:
    assert B.adalayer_layout(param).num_blocks(param.shape) == blocks
    layout = B.adalayer_layout(param, split_qkv=False, per_row_output=False)
    assert layout.num_blocks(param.shape) == plain


def test_fused_qkv_statistics_follow_the_parts() -> None:
    g = torch.randn(QKV.shape, dtype=torch.float64)
    stat = B.block_mean_square(g, B.adalayer_layout(QKV))
    expected = torch.stack([(g[i : i + 16] ** 2).mean() for i in (0, 16, 32)])
    torch.testing.assert_close(stat, expected, rtol=1e-12, atol=0)
    mini = B.block_mean_square(g, B.adam_mini_layout(QKV))
    q_heads = [(g[i : i + 4] ** 2).mean() for i in range(0, 16, 4)]
    k_heads = [(g[16 + i : 16 + i + 8] ** 2).mean() for i in (0, 8)]
    v_rows = list((g[32:] ** 2).mean(dim=1))
    torch.testing.assert_close(mini, torch.stack(q_heads + k_heads + v_rows), rtol=1e-12, atol=0)
