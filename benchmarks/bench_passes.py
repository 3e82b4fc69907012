"""What one pass over memory costs, by kind: why block-statistic steps sit above the bound.

``optarena bench step`` prices a step at ``bytes / bandwidth`` with the bandwidth of an in-place
add (``θ += g``: two reads, one write). An optimizer with block statistics (Adam-mini, Adalayer,
Adafactor) makes one more pass than that model counts: it reads g once to reduce ``g²`` per
block before the update can start. This script times, over the Llama shape's own tensors and
alternately in one process (drift hits all alike):

* ``probe``: ``torch._foreach_add_(θ, g)``, the bench's bandwidth probe (12 B per entry);
* ``update``: a compiled Adam-mini-like elementwise update with a given per-row scale (20 B);
* ``row sums (inductor)`` / ``row sums (ATen)``: ``g²`` summed per row (4 B read);
* ``column sums``: ``g²`` and ``g²/r`` summed per column over runs of 16 rows, as classic
  Adafactor's statistics run them (``transforms._sum_keep``; 4 B read);
* ``sum of θ²``: one sum per tensor (classic Adafactor's RMS(θ); 4 B read);
* ``sum of θ², 8 runs``: the same sums over 8 equal runs of each tensor read side by side
  (``blocks.long_block_sums``, how the compiled step sums a block of 8192 entries or more);
* ``reduce + update``: the two together in one compiled function, as the fast path runs them.

and prints each one's time, its bytes per entry and its rate as a fraction of the probe's. On
the project's 2-core VM a read-only reduction moves bytes at well under the probe's rate, so the
extra pass costs more than its 4 bytes suggest.

    PYTHONPATH=src python benchmarks/bench_passes.py --steps 25
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
from torch import Tensor

from optarena.bench.allocator import steady
from optarena.bench.shapes import Shape, llama_params
from optarena.optim import blocks
from optarena.optim.transforms import _sum_keep, computed_once


def update(ps: list[Tensor], gs: list[Tensor], ms: list[Tensor], scales: list[Tensor]) -> None:
    """Momentum and a per-row scaled step: the Adam-mini update with ``v`` already known."""
    for p, g, m, s in zip(ps, gs, ms, scales, strict=True):
        new_m = m + (g - m) * 0.1
        p.copy_(p * 0.9999 - new_m * s)
        m.copy_(new_m)


def row_sums(gs: list[Tensor]) -> list[Tensor]:
    return [(g * g).sum(-1, keepdim=True) for g in gs]


def column_sums(gs: list[Tensor], rs: list[Tensor]) -> list[Tensor]:
    """Per column: the sum of g² and of g²/r (classic Adafactor's column statistics)."""
    out = []
    for g, r in zip(gs, rs, strict=True):
        inv = computed_once(r.reciprocal())
        out.append(_sum_keep(g * g, [0]))
        out.append(_sum_keep(g * g * inv, [0]))
    return out


def squares(ps: list[Tensor]) -> list[Tensor]:
    return [(p * p).sum() for p in ps]


def squares_runs(ps: list[Tensor]) -> list[Tensor]:
    """The sums of ``squares`` as the compiled step takes a whole-tensor sum
    (``blocks.entry_sum``: 8 equal runs added entry by entry first, one loop reading 8 places
    at a time)."""
    return [blocks.entry_sum(p * p) for p in ps]


def reduce_update(ps: list[Tensor], gs: list[Tensor], ms: list[Tensor], vs: list[Tensor]) -> None:
    """Both passes: per-row mean of g², second moment, update (Adam-mini without bias terms)."""
    for p, g, m, v in zip(ps, gs, ms, vs, strict=True):
        new_v = v * 0.999 + (g * g).mean(-1, keepdim=True) * 0.001
        new_m = m + (g - m) * 0.1
        p.copy_(p * 0.9999 - new_m / (new_v.sqrt() + 1e-8) * 1e-3)
        m.copy_(new_m)
        v.copy_(new_v)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=25, help="timed rounds (median reported)")
    parser.add_argument("--warmup", type=int, default=3)
    args = parser.parse_args()
    steady()
    named, _ = llama_params(Shape(), dtype=torch.float32, device="cpu", grads=True)
    mats = [p for _, p in named if p.dim() == 2]  # every matrix: rows are blocks (Adam-mini)
    ps = [p.detach().clone() for p in mats]
    gs = [p.grad for p in mats]
    ms = [torch.zeros_like(p) for p in mats]
    vs = [torch.rand(p.shape[0], 1) for p in mats]
    scales = [torch.full((p.shape[0], 1), 1e-3) for p in mats]
    numel = sum(p.numel() for p in mats)
    compiled = {
        f.__name__: torch.compile(f, fullgraph=True, dynamic=False)
        for f in (update, row_sums, column_sums, squares, squares_runs, reduce_update)
    }
    # name -> (run, bytes moved per entry)
    cases: dict[str, tuple[Callable[[], object], int]] = {
        "probe (θ += g)": (lambda: torch._foreach_add_(ps, gs), 12),
        "update (compiled)": (lambda: compiled["update"](ps, gs, ms, scales), 20),
        "row sums of g² (inductor)": (lambda: compiled["row_sums"](gs), 4),
        "row sums of g² (ATen)": (lambda: [torch.linalg.vector_norm(g, dim=-1) for g in gs], 4),
        "column sums of g², g²/r": (lambda: compiled["column_sums"](gs, vs), 4),
        "sum of θ² (inductor)": (lambda: compiled["squares"](ps), 4),
        "sum of θ², 8 runs": (lambda: compiled["squares_runs"](ps), 4),
        "reduce + update (compiled)": (lambda: compiled["reduce_update"](ps, gs, ms, vs), 20),
    }
    for run, _ in cases.values():
        for _ in range(args.warmup):
            run()
    times: dict[str, list[float]] = {name: [] for name in cases}
    for _ in range(args.steps):
        for name, (run, _) in cases.items():
            start = time.perf_counter()
            run()
            times[name].append(time.perf_counter() - start)
    probe_s = statistics.median(times["probe (θ += g)"])
    probe_rate = 12 * numel / probe_s
    threads = torch.get_num_threads()
    print(f"{numel / 1e6:.1f}M entries (the Llama shape's matrices), {threads} threads")
    print(f"{'pass':28s} {'ms':>7s} {'B/entry':>8s} {'GB/s':>7s} {'rate/probe':>10s}")
    for name, (_, moved) in cases.items():
        sec = statistics.median(times[name])
        rate = moved * numel / sec
        print(f"{name:28s} {sec * 1e3:7.2f} {moved:8d} {rate / 1e9:7.1f} {rate / probe_rate:10.2f}")


if __name__ == "__main__":
    main()
