"""Optimizers on FSDP2 DTensor shards compute what one process computes.

Two levels: the shard arithmetic on simulated uneven shards (no processes, every cut), and a real
2-process ``fully_shard`` run under gloo of every registered optimizer, compared with the
single-process run of the same model and batches, and its DCP checkpoint read back in one process.
"""

from __future__ import annotations

import copy
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from optarena.optim import FusedPart, ParamInfo, Role
from optarena.optim.blocks import (
    adalayer_layout,
    adam_mini_layout,
    block_mean_square,
    blockwise,
    heads_layout,
    rows_layout,
    tensor_layout,
)
from optarena.optim.sharding import LocalShard, reduce_requests

SRC = Path(__file__).resolve().parents[1] / "src"
pytestmark = pytest.mark.filterwarnings("ignore:torch.distributed is disabled")
TESTS = Path(__file__).resolve().parent

# --------------------------------------------------------------------------- simulated shards


def chunk_cuts(n: int, world: int) -> list[tuple[int, int]]:
    """``(offset, rows)`` per rank as FSDP2 (``torch.chunk``) cuts ``n`` rows."""
    size = math.ceil(n / world) if n else 0
    return [(min(r * size, n), max(0, min(size, n - r * size))) for r in range(world)]


def all_cuts(n: int) -> list[list[tuple[int, int]]]:
    """FSDP2 cuts for 1..4 ranks plus two arbitrary uneven 3-way cuts."""
    cuts = [chunk_cuts(n, w) for w in (1, 2, 3, 4)]
    if n >= 3:
        a, b = 1, n - 1
        cuts.append([(0, a), (a, b - a), (b, n - b)])
        cuts.append([(0, 0), (0, n - 1), (n - 1, 1)])
    return cuts


def simulate(shape, cuts, request) -> list[LocalShard]:
    """Each simulated rank calls ``request(shard, rows)``; the partial buffers are summed as an
    all-reduce would and every rank receives the means."""
    shards = [LocalShard(tuple(shape), off, n) for off, n in cuts]
    for s in shards:
        request(s)
    pending = [list(s._requests) for s in shards]
    buffers: list[torch.Tensor] = []
    for s in shards:
        reduce_requests([s], all_reduce=lambda buf, group: buffers.append(buf.clone()))
    total = torch.stack(buffers).sum(0)
    for s, reqs in zip(shards, pending, strict=True):
        s._requests = reqs
        assert reduce_requests([s], all_reduce=lambda buf, group: buf.copy_(total)) == 1
    return shards


LAYOUTS = {
    "tensor 1-D": ((7,), tensor_layout((7,))),
    "tensor 3-D": ((5, 3, 2), tensor_layout((5, 3, 2))),
    "rows": ((9, 4), rows_layout((9, 4))),
    "heads 3 of 2 rows": ((6, 5), heads_layout((6, 5), 3)),
    "heads 3 of 4 rows": ((12, 3), heads_layout((12, 3), 3)),
    "columns (Conv1D)": ((5, 6), rows_layout((5, 6), out_dim=1)),
    "heads on dim 1": ((3, 8), heads_layout((3, 8), 2, out_dim=1)),
    "fused qkv (mini)": (
        (18, 4),
        adam_mini_layout(
            ParamInfo(
                "qkv",
                (18, 4),
                Role.QKV,
                parts=(FusedPart(Role.Q, 6, 3), FusedPart(Role.K, 6, 3), FusedPart(Role.V, 6, 3)),
            )
        ),
    ),
    "fused qkv (adalayer)": (
        (10, 3),
        adalayer_layout(
            ParamInfo(
                "qkv",
                (10, 3),
                Role.QKV,
                parts=(FusedPart(Role.Q, 4, 2), FusedPart(Role.K, 2, 1), FusedPart(Role.V, 4, 2)),
            )
        ),
    ),
}


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_block_statistic_on_any_cut_equals_the_whole_tensor(name):
    """float32 and bitwise: per-row sums in float32, float64 across rows, whatever the cut."""
    shape, layout = LAYOUTS[name]
    g = torch.randn(shape)
    want = block_mean_square(g, layout)
    torch.testing.assert_close(  # and it is the plain mean of each block
        want.double(), block_mean_square(g.double(), layout), rtol=1e-6, atol=0
    )
    m = torch.randn(shape)
    want_pre = blockwise(lambda x, v: x / (v.sqrt() + 0.1), m, want, layout)
    for cuts in all_cuts(shape[0]):
        shards = simulate(
            shape,
            cuts,
            lambda s: s.request_blocks("b", g.narrow(0, s.offset, s.length).square(), layout),
        )
        for s in shards:
            assert torch.equal(s.mean("b"), want), (cuts, s.mean("b") - want)
            got = s.blockwise(
                lambda x, v: x / (v.sqrt() + 0.1), m.narrow(0, s.offset, s.length), want, layout
            )
            torch.testing.assert_close(got, want_pre.narrow(0, s.offset, s.length), rtol=0, atol=0)


@pytest.mark.parametrize("shape", [(7,), (6, 5), (5, 3, 4)])
def test_axis_means_on_any_cut_equal_the_whole_tensor(shape):
    """Adafactor's factors: the mean of g² over every axis but one, on rows held by any rank;
    float32 and bitwise equal to one process (``mean_over``), close to the plain mean."""
    from optarena.optim.transforms import mean_over

    g = torch.randn(shape)
    sq = g * g
    for cuts in all_cuts(shape[0]):

        def request(s: LocalShard) -> None:
            local = sq.narrow(0, s.offset, s.length)
            s.request_sum("all", local)
            for i in range(len(shape)):
                s.request_sum(f"keep{i}", local, keep=(i,))
            s.request_sum("last", local, keep=range(len(shape) - 1))

        for s in simulate(shape, cuts, request):
            assert torch.equal(s.mean("all"), mean_over(sq, range(len(shape))))
            torch.testing.assert_close(s.mean("all").reshape(()), sq.mean(), rtol=1e-6, atol=0)
            for i in range(len(shape)):
                others = [d for d in range(len(shape)) if d != i]
                assert torch.equal(s.mean(f"keep{i}"), mean_over(sq, others))
                want = sq.mean(others, keepdim=True) if others else sq
                torch.testing.assert_close(s.mean(f"keep{i}"), want, rtol=1e-6, atol=0)
            assert torch.equal(s.mean("last"), mean_over(sq, [-1]))


def test_one_collective_per_process_group_whatever_the_requests():
    calls = []
    shards = [LocalShard((4, 2), 0, 2, group="g1"), LocalShard((3,), 0, 0, group="g1")]
    shards.append(LocalShard((5, 2), 0, 3, group="g2"))
    for s in shards:
        s.request_sum("a", torch.ones(s.length, *s.shape[1:]))
        s.request_sum("b", torch.ones(s.length, *s.shape[1:]), keep=(0,))
    n = reduce_requests(shards, all_reduce=lambda buf, group: calls.append((group, buf.numel())))
    assert n == 2
    # g1: (1 + 4) + (1 + 3) entries, in parameter order; g2: 1 + 5
    assert calls == [("g1", 9), ("g2", 6)]


@pytest.mark.slow
def test_flattened_fsdp1_parameters_are_refused(fsdp_run):
    """Real FSDP1 (gloo, 2 ranks), with and without ``use_orig_params``: every rank refuses to
    build the optimizer, with the explanation, instead of cutting blocks out of 1-D slices."""
    refused = json.loads((fsdp_run / "fsdp1" / "refused.json").read_text())
    assert set(refused) == {"flat", "orig"}
    assert all("FSDP1 / ZeRO flattened shards" in message for message in refused.values())


# --------------------------------------------------------------------------- real FSDP2 runs


@pytest.fixture(scope="module")
def fsdp_run(tmp_path_factory) -> Path:
    """Every optimizer on the toy model under ``torchrun --nproc_per_node=2`` + fully_shard."""
    out = tmp_path_factory.mktemp("fsdp")
    env = {**os.environ, "PYTHONPATH": f"{SRC}{os.pathsep}{TESTS}", "OMP_NUM_THREADS": "1"}
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=2",
        str(TESTS / "sharded_worker.py"),
        "fsdp,hsdp,fsdp1",
        str(out),
    ]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return out


@pytest.fixture(scope="module")
def single_runs():
    import sharded_worker

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return {name: sharded_worker.run(name) for name in sharded_worker.OPTIMIZERS}
    finally:
        torch.set_num_threads(threads)


def _worker_names() -> list[str]:
    import sharded_worker

    return list(sharded_worker.OPTIMIZERS)


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["fsdp", "hsdp"])
@pytest.mark.parametrize("name", _worker_names())
def test_fsdp2_two_ranks_match_one_process(name, mode, fsdp_run, single_runs):
    """float64, so that the only differences left are the order of additions (~1e-16): any
    wrong block, missing rank or double count shows up as a difference of order 1. ``hsdp``
    replicates over the 2 ranks and shards within groups of one: statistics reduced over the
    world instead of the shard group would be counted twice."""
    model, _ = single_runs[name]
    got = torch.load(fsdp_run / mode / f"{name}.pt")
    for key, p in model.named_parameters():
        torch.testing.assert_close(
            got[key], p.detach(), rtol=1e-12, atol=1e-14, msg=lambda m, key=key: f"{key}: {m}"
        )
        assert not torch.equal(got[key], sharded_worker_initial()[key]), f"{key} never moved"


@pytest.mark.slow
@pytest.mark.parametrize("name", _worker_names())
def test_fsdp2_state_checkpoint_reshards_to_one_process(name, fsdp_run, single_runs):
    """The 2-rank DCP checkpoint of the optimizer, read in one process, is the single-process
    state: sharded moments reassembled, block and factored moments replicated and exact."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    model, opt = single_runs[name]
    want = get_optimizer_state_dict(model, opt)
    loaded = copy.deepcopy(want)
    for state in loaded["state"].values():
        for value in state.values():
            if isinstance(value, torch.Tensor):
                value.fill_(float("nan"))
    dcp.load({"optim": loaded}, checkpoint_id=fsdp_run / "dcp" / name)
    assert loaded["state"].keys() == want["state"].keys()
    for key, state in want["state"].items():
        for entry, value in state.items():
            torch.testing.assert_close(
                loaded["state"][key][entry],
                value,
                rtol=1e-12,
                atol=1e-14,
                msg=lambda m, k=f"{key}.{entry}": f"{k}: {m}",
            )


@pytest.mark.slow
def test_fsdp2_keeps_elementwise_state_sharded_and_block_state_replicated(fsdp_run):
    keys = json.loads((fsdp_run / "fsdp" / "sharded_state_keys.json").read_text())
    assert keys["adam-mini"] == ["exp_avg"] * 14 + ["exp_avg_sq"]  # the bias is elementwise
    assert "exp_avg_sq" not in keys["adalayer"] and "exp_avg_sq" not in keys["adafactor"]
    assert keys["adamw"].count("exp_avg_sq") == 14


def sharded_worker_initial() -> dict[str, torch.Tensor]:
    import sharded_worker

    return dict(sharded_worker.new_model(torch.float64).named_parameters())
