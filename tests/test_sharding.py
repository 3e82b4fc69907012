"""Optimizers on FSDP2 DTensor shards compute what one process computes.

Two levels: the shard arithmetic of block statistics on every cut (no processes; whole optimizer
steps on simulated ranks are ``test_modes.py``), and a real 2-process ``fully_shard`` run under
gloo of every registered optimizer, compared with the single-process run of the same model and
batches, and its DCP checkpoint read back in one process.
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
    Rows,
    adalayer_layout,
    adam_mini_layout,
    block_mean_square,
    blockwise,
    heads_layout,
    rows_layout,
    tensor_layout,
)

SRC = Path(__file__).resolve().parents[1] / "src"
pytestmark = pytest.mark.filterwarnings("ignore:torch.distributed is disabled")
TESTS = Path(__file__).resolve().parent

# --------------------------------------------------------------------------- shard arithmetic


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


def _qkv(shape, parts) -> ParamInfo:
    return ParamInfo("qkv", shape, Role.QKV, parts=tuple(FusedPart(r, n, h) for r, n, h in parts))


LAYOUTS = {
    "tensor 1-D": ((7,), tensor_layout((7,))),
    "tensor 3-D": ((5, 3, 2), tensor_layout((5, 3, 2))),
    "rows": ((9, 4), rows_layout((9, 4))),
    "heads 3 of 2 rows": ((6, 5), heads_layout((6, 5), 3)),
    "heads 3 of 4 rows": ((12, 3), heads_layout((12, 3), 3)),
    "columns (Conv1D)": ((5, 6), rows_layout((5, 6), out_dim=1)),
    "heads on dim 1": ((3, 8), heads_layout((3, 8), 2, out_dim=1)),
    "experts x rows": ((3, 4, 5), rows_layout((3, 4, 5), out_dim=1, experts=True)),
    "experts x tensors": ((3, 4, 5), tensor_layout((3, 4, 5), experts=True)),
    "fused qkv (mini)": (
        (18, 4),
        adam_mini_layout(_qkv((18, 4), [(Role.Q, 6, 3), (Role.K, 6, 3), (Role.V, 6, 3)])),
    ),
    "fused qkv (adalayer)": (
        (10, 3),
        adalayer_layout(_qkv((10, 3), [(Role.Q, 4, 2), (Role.K, 2, 1), (Role.V, 4, 2)])),
    ),
}


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_block_sums_of_the_shards_add_up_to_the_whole_tensor(name):
    """On every cut, the shards' block sums add up to the whole tensor's (they are the plain
    block means of g² once divided), and each shard's broadcast of the block values is its rows
    of the whole tensor's."""
    shape, layout = LAYOUTS[name]
    g = torch.randn(shape, dtype=torch.float64)
    whole = Rows.whole(shape)
    want = block_mean_square(g, layout)
    m = torch.randn(shape, dtype=torch.float64)
    want_pre = blockwise(lambda x, v: x / (v.sqrt() + 0.1), m, want, layout)
    for cuts in all_cuts(shape[0]):
        shards = [Rows(shape, off, n) for off, n in cuts]
        total = sum(s.block_sums((g * g).narrow(0, s.offset, s.length), layout) for s in shards)
        torch.testing.assert_close(whole.block_means(total, layout), want, rtol=1e-12, atol=0)
        for s in shards:
            local = m.narrow(0, s.offset, s.length)
            x, v = s.per_block(local, want, layout)
            got = (x / (v.sqrt() + 0.1)).reshape(local.shape)
            torch.testing.assert_close(got, want_pre.narrow(0, s.offset, s.length), rtol=0, atol=0)


def test_one_collective_per_process_group_whatever_the_statistics():
    from optarena.optim.sharding import Staged, reduce_stats

    calls = []

    class Count:
        def all_reduce(self, buf, group):
            calls.append((group, buf.numel()))

    items = [Staged(None, None, None, g, None) for g in ("g1", "g1", None, "g2")]
    stats = [
        {"a": torch.ones(4), "b": torch.ones(())},
        {"a": torch.ones(3)},
        {"a": torch.ones(5)},  # whole here: not reduced
        {"a": torch.ones(2, 3)},
    ]
    assert reduce_stats(items, stats, Count()) == 2
    assert calls == [("g1", 8), ("g2", 6)]  # in parameter order


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
