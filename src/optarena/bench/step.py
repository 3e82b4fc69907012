"""``optarena bench step``: each optimizer's step time against the memory-bandwidth bound and
against the reference implementations, measured in one process.

An optimizer step streams parameters, gradients and state through memory once; its floor is
``bytes moved / bandwidth``. The bandwidth comes from a probe (in-place add ``θ += g`` over a
copy of the model's tensors, 12 bytes per element) timed in the same rounds as the optimizers.
Every candidate of one optimizer (our fast path, our eager path, each reference) is timed
alternately, one step each per round, with the probe right after each (A P B P C P A P ...), so
that the drift of a shared machine (±40% between back-to-back runs on the project's 2-core CPU)
hits all alike; times are medians over the rounds after warm-up steps, ratios medians of the
ratios within a round (a step over the probe right after it, ours over a reference).
"""

from __future__ import annotations

import gc
import math
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from optarena.bench.shapes import Shape, llama_layout, llama_params
from optarena.optim import REGISTRY, create, state_bytes
from optarena.optim.compiled import COMPILE_STATS
from optarena.optim.optimizer import ChainOptimizer

# Hyperparameters for the benchmark: the studies' settings where the default is a no-op
# (SGD without momentum would move less memory than anyone uses).
BENCH_HP: dict[str, dict[str, Any]] = {
    "sgd": {"lr": 1e-2, "momentum": 0.9},
    "adam-frozen": {"precondition_steps": 2},
}

# optimizer -> reference implementations it replaces (timed in the same rounds)
REFERENCES: dict[str, tuple[str, ...]] = {
    "adamw": ("torch-adamw-fused", "torch-adamw-foreach"),
    "adam-mini": ("adam-mini",),
    "adafactor": ("torch-adafactor",),
    "adafactor-classic": ("torch-adafactor",),
    "sgd": ("torch-sgd-fused", "torch-sgd"),
    "lion": ("lion-pytorch",),
    "signum": ("pytorch-optimizer-signsgd",),
    "sophia": ("sophia-opt",),
    "muon": ("torch-muon+adamw", "torch-muon+adamw-foreach"),
    "normuon": ("pytorch-optimizer-normuon",),
    "soap": ("pytorch-optimizer-soap",),
    "kron": ("pytorch-optimizer-kron",),
    "mars": ("pytorch-optimizer-mars",),
    "ademamix": ("pytorch-optimizer-ademamix",),
    "adopt": ("pytorch-optimizer-adopt",),
    "nadamw": ("torch-nadamw",),
    "schedule-free": ("schedulefree-adamw",),
}

# Tokens of the training step an optimizer step is compared with (a 0.5M-token batch, the
# GPT-3 small / Chinchilla scale of a language-model step).
TOKENS_PER_STEP = 2**19


class _Pair:
    """Two optimizers stepped as one (torch's Muon takes matrices only: AdamW the rest)."""

    def __init__(self, *optimizers: torch.optim.Optimizer) -> None:
        self.optimizers = optimizers
        self.state = {k: v for o in optimizers for k, v in o.state.items()}

    def step(self) -> None:
        for o in self.optimizers:
            o.step()
        self.state = {k: v for o in self.optimizers for k, v in o.state.items()}


def _hidden(name: str, p: Tensor) -> bool:
    """A hidden matrix of the Llama shape (what Muon takes; embeddings and the head are not)."""
    return p.dim() == 2 and "embed_tokens" not in name and "lm_head" not in name


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _reference(name: str, named: list[tuple[str, Tensor]], shape: Shape) -> torch.optim.Optimizer:
    """Build one reference optimizer (imported lazily: they are optional dependencies)."""
    params = [p for _, p in named]
    if name == "torch-adamw-fused":
        return torch.optim.AdamW(params, lr=1e-3, weight_decay=0.01, fused=True)
    if name == "torch-adamw-foreach":
        return torch.optim.AdamW(params, lr=1e-3, weight_decay=0.01, foreach=True)
    if name == "torch-sgd-fused":
        return torch.optim.SGD(params, lr=1e-2, momentum=0.9, fused=True)
    if name == "torch-sgd":
        return torch.optim.SGD(params, lr=1e-2, momentum=0.9)
    if name == "torch-adafactor":
        return torch.optim.Adafactor(params, lr=1e-2)
    if name == "adam-mini":
        from adam_mini import Adam_mini

        return Adam_mini(
            named,
            lr=1e-3,
            dim=shape.d_model,
            n_heads=shape.n_heads,
            n_kv_heads=shape.n_kv_heads,
            verbose=False,
        )
    if name == "lion-pytorch":
        from lion_pytorch import Lion

        return Lion(params, lr=1e-4)
    if name == "sophia-opt":
        from sophia_opt import SophiaG

        return SophiaG(params, lr=1e-4)
    if name == "pytorch-optimizer-signsgd":
        from pytorch_optimizer import SignSGD

        return SignSGD(params, lr=1e-3, momentum=0.9)
    if name.startswith("torch-muon+adamw"):  # AdamW's fused kernel, or its foreach loop
        hidden = [p for n, p in named if _hidden(n, p)]
        rest = [p for n, p in named if not _hidden(n, p)]
        muon = torch.optim.Muon(hidden, lr=1e-3, weight_decay=0.1)
        kernel = {"foreach": True} if name.endswith("-foreach") else {"fused": True}
        adamw = torch.optim.AdamW(rest, lr=3e-4, betas=(0.9, 0.95), **kernel)
        return _Pair(muon, adamw)  # type: ignore[return-value]
    if name == "pytorch-optimizer-normuon":  # its own AdamW groups take the rest
        from pytorch_optimizer import NorMuon

        hidden = [p for n, p in named if _hidden(n, p)]
        rest = [p for n, p in named if not _hidden(n, p)]
        groups = [{"params": hidden, "use_muon": True}, {"params": rest, "use_muon": False}]
        return NorMuon(groups, adamw_eps=1e-8)
    if name == "torch-nadamw":
        return torch.optim.NAdam(
            params, lr=2e-3, weight_decay=1e-2, decoupled_weight_decay=True, foreach=True
        )  # our NAdamW's defaults
    if name == "schedulefree-adamw":
        from schedulefree import AdamWScheduleFree

        opt = AdamWScheduleFree(params, lr=2.5e-3)
        opt.train()
        return opt
    if name.startswith("pytorch-optimizer-"):
        import pytorch_optimizer

        cls = {
            "soap": pytorch_optimizer.SOAP,
            "kron": pytorch_optimizer.Kron,
            "mars": pytorch_optimizer.MARS,
            "ademamix": pytorch_optimizer.AdEMAMix,
            "adopt": pytorch_optimizer.ADOPT,
        }[name.removeprefix("pytorch-optimizer-")]
        return cls(params, lr=1e-3)
    raise ValueError(f"unknown reference {name!r}")


def matrix_flops(name: str, shape: Shape) -> float | None:
    """Leading-order FLOPs per step of a matrix method's orthogonalisation or preconditioner
    (defaults: Muon's and NorMuon's 5 Newton-Schulz steps on each hidden matrix; SOAP's
    statistics and three projections per axis of up to 10000, its power-iteration and QR
    refresh amortised over 10 steps; Kron's preconditioning and, at the fit rate of the first
    500 steps (every step), its fit, each triangular factor up to 8192 long); ``None`` for the
    other optimizers."""
    total = 0.0
    for pname, dims, _ in llama_layout(shape):
        numel = math.prod(dims)
        hidden = len(dims) == 2 and "embed" not in pname and "lm_head" not in pname
        if name in ("muon", "normuon") and hidden:
            m, n = sorted(dims)
            total += 5 * (4 * m * m * n + 2 * m**3)
        elif name == "soap" and len(dims) > 1:
            for k in (k for k in dims if k <= 10000):
                total += 8 * k * numel + (2 * k**3 + 4 / 3 * k**3) / 10
        elif name == "kron" and len(dims) > 1:
            for k in (k for k in dims if k <= 8192):
                total += 4 * k * numel + 7 * k * numel + k**3
        elif name not in ("muon", "normuon", "soap", "kron"):
            return None
    return total


def _gemm_rate(shape: Shape, device: torch.device, dtype: torch.dtype, rounds: int = 5) -> float:
    """FLOP/s of the model's MLP matrix product on this device (a training step's bulk)."""
    x = torch.randn(2048, shape.d_model, device=device, dtype=dtype)
    w = torch.randn(shape.d_model, shape.d_ff, device=device, dtype=dtype)
    times = []
    for _ in range(rounds + 1):
        _sync(device)
        t = time.perf_counter()
        x @ w
        _sync(device)
        times.append(time.perf_counter() - t)
    return 2 * 2048 * shape.d_model * shape.d_ff / statistics.median(times[1:])


@dataclass
class Candidate:
    """One timed thing: an optimizer over its own copy of the parameters, or the probe."""

    name: str
    kind: str  # "fused", "eager", "reference", "probe"
    run: Callable[[], Any]
    optimizer: torch.optim.Optimizer | None = None
    times: list[float] = field(default_factory=list)
    probe_times: list[float] = field(default_factory=list)  # the probe's, right after each
    first_s: float = 0.0
    compile_s: float = 0.0
    error: str = ""

    @property
    def median_ms(self) -> float:
        return statistics.median(self.times) * 1e3 if self.times else float("nan")


def _probe(shape: Shape, device: torch.device, dtype: torch.dtype) -> tuple[Candidate, int]:
    """``θ += g`` over a copy of the model's own tensors, in one multi-tensor call.

    The same tensors as the optimizers (sizes, allocations, one kernel per tensor) rather than
    one big array: on the project's VM a fresh 135 MB pair of arrays sometimes streamed at
    85 GB/s where the parameters never exceed 55 GB/s, which made the bound unreachable."""
    named, _ = llama_params(shape, dtype=dtype, device=device, grads=True)
    params = [p.detach() for _, p in named]
    grads = [p.grad for _, p in named]

    def run() -> None:
        torch._foreach_add_(params, grads)

    moved = sum(3 * p.element_size() * p.numel() for p in params)
    return Candidate("bandwidth probe (θ += g)", "probe", run), moved


def _candidates(
    name: str,
    shape: Shape,
    grads: list[Tensor],
    device: torch.device,
    dtype: torch.dtype,
    modes: Sequence[str],
    references: bool,
) -> list[Candidate]:
    out: list[Candidate] = []

    def fresh() -> tuple[list[tuple[str, torch.nn.Parameter]], dict]:
        named, infos = llama_params(shape, dtype=dtype, device=device, grads=False)
        for (_, p), g in zip(named, grads, strict=True):
            p.grad = g
        return named, infos

    hp = BENCH_HP.get(name, {})
    for mode in modes:
        named, infos = fresh()
        opt = create(name, named, partition=infos, fused=(mode == "fused"), **hp)
        out.append(Candidate(f"{name} ({mode})", mode, opt.step, opt))
    if references:
        for ref in REFERENCES.get(name, ()):
            named, _ = fresh()
            try:
                opt = _reference(ref, named, shape)
            except Exception as err:  # a missing optional package: report, keep going
                cand = Candidate(ref, "reference", lambda: None)
                cand.error = f"{type(err).__name__}: {err}"
                out.append(cand)
                continue
            run = (lambda o=opt: o.step(bs=5120)) if ref == "sophia-opt" else opt.step
            out.append(Candidate(ref, "reference", run, opt))
    return out


def bytes_per_param(optimizer: torch.optim.Optimizer) -> float:
    """Compulsory memory traffic of one step, in bytes per parameter (the bandwidth model).

    Each parameter is read and written once, its gradient read once, each state tensor read and
    written once (read only where the chain only reads it, e.g. Sophia's Hessian): the tensors
    a step streams through memory, nothing else. Any torch optimizer whose state exists (run one
    step first)."""
    total = 0.0
    count = 0
    for group in optimizer.param_groups:
        read_only: tuple[str, ...] = ()
        if isinstance(optimizer, ChainOptimizer):
            read_only = optimizer._plan(group).chain.read_only
        for p in group["params"]:
            count += p.numel()
            grad_size = p.grad.element_size() if p.grad is not None else p.element_size()
            total += p.numel() * (2 * p.element_size() + grad_size)
            for key, value in optimizer.state.get(p, {}).items():
                if not isinstance(value, Tensor) or key == "step" or value.dim() == 0:
                    continue
                passes = 1 if key in read_only else 2
                total += passes * value.numel() * value.element_size()
    return total / max(count, 1)


def bench_optimizer(
    name: str,
    shape: Shape,
    *,
    steps: int = 15,
    warmup: int = 3,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    modes: Sequence[str] = ("fused", "eager"),
    references: bool = True,
    clock: str = "wall",
    log: Callable[[str], None] = lambda s: None,
) -> dict[str, Any]:
    """Time one optimizer's candidates alternately; return its row of the report."""
    now = CLOCKS[clock]
    device = torch.device(device)
    named, _ = llama_params(shape, dtype=dtype, device=device, grads=True)
    grads = [p.grad for _, p in named]
    numel = sum(p.numel() for _, p in named)
    del named
    cands = _candidates(name, shape, grads, device, dtype, modes, references)
    probe, probe_bytes = _probe(shape, device, dtype)
    cands.append(probe)
    live = [c for c in cands if not c.error]
    for c in list(live):  # warm-up: the fast path compiles here
        before = COMPILE_STATS.seconds
        try:
            for i in range(warmup):
                _sync(device)
                t = time.perf_counter()
                c.run()
                _sync(device)
                if i == 0:
                    c.first_s = time.perf_counter() - t
        except Exception as err:  # a reference that cannot step this shape is reported so
            if c.kind != "reference":
                raise
            c.error = f"{type(err).__name__}: {str(err).splitlines()[0][:200]}"
            live.remove(c)
            log(f"  {c.name} failed: {c.error}")
            continue
        c.compile_s = COMPILE_STATS.seconds - before
        log(f"  warmed {c.name} (first step {c.first_s:.2f} s)")

    def timed(c: Candidate) -> float:
        _sync(device)
        t = now()
        c.run()
        _sync(device)
        c.times.append(now() - t)
        return c.times[-1]

    others = [c for c in live if c is not probe]
    for _ in range(steps):
        for c in others:
            timed(c)
            c.probe_times.append(timed(probe))
        if not others:
            timed(probe)
    bandwidth = probe_bytes / (probe.median_ms / 1e3)
    row: dict[str, Any] = {
        "optimizer": name,
        "params": numel,
        "bandwidth_gbps": bandwidth / 1e9,
        "probe_ms": probe.median_ms,
    }
    ours = [c for c in live if c.kind in ("fused", "eager")]
    model_opt = ours[0].optimizer if ours else None
    bpp = bytes_per_param(model_opt) if model_opt is not None else float("nan")
    bound_ms = bpp * numel / bandwidth * 1e3
    row.update(
        bytes_per_param=bpp,
        bound_ms=bound_ms,
        state_bytes_per_param=state_bytes(model_opt) / numel if model_opt else float("nan"),
    )
    for c in ours:
        row[f"{c.kind}_ms"] = c.median_ms
        # the bound of a step: the model's bytes at the rate of the probe right after it; every
        # round's ratio is kept, so that a row's spread (the VM's noise) can be read off
        scale = probe_bytes / (bpp * numel)
        rounds = [a / b * scale for a, b in zip(c.times, c.probe_times, strict=True)]
        row[f"{c.kind}_vs_bound"] = statistics.median(rounds)
        row[f"{c.kind}_vs_bound_rounds"] = [round(r, 4) for r in rounds]
        if c.kind == "fused":
            row["compile_s"] = c.compile_s
            row["first_step_s"] = c.first_s
    refs = []
    for c in cands:
        if c.kind != "reference":
            continue
        ref: dict[str, Any] = {"name": c.name}
        if c.error:
            ref["error"] = c.error
        else:
            ref["ms"] = c.median_ms
            ref["state_bytes_per_param"] = state_bytes(c.optimizer) / numel
            for o in ours:
                ref[f"{o.kind}_ratio"] = median_ratio(o.times, c.times)
        refs.append(ref)
    row["references"] = refs
    flops = matrix_flops(name, shape)
    if flops is not None and ours:
        fastest = min(c.median_ms for c in ours) / 1e3
        train_s = 6 * numel * TOKENS_PER_STEP / _gemm_rate(shape, device, dtype)
        row.update(
            matrix_gflop=flops / 1e9,
            matrix_gflops_per_s=flops / 1e9 / fastest,
            share_of_training_step=fastest / (fastest + train_s),
        )
    del cands, live, probe
    gc.collect()
    return row


# What a timed step is measured with. ``cpu``: the CPU time of the calling thread, which a
# one-thread CPU step runs on entirely (torch's and inductor's kernels run inline at one thread):
# time the thread spends descheduled while other processes load the machine is left out.
CLOCKS: dict[str, Callable[[], float]] = {"wall": time.perf_counter, "cpu": time.thread_time}


def check_clock(clock: str, device: torch.device) -> None:
    """``clock`` is one of :data:`CLOCKS` and measures this step: the ``cpu`` clock counts one
    thread's CPU time, so it needs a CPU device at one torch thread."""
    if clock not in CLOCKS:
        raise ValueError(f"unknown clock {clock!r}; choose one of: {', '.join(CLOCKS)}")
    if clock == "cpu" and (device.type != "cpu" or torch.get_num_threads() != 1):
        raise ValueError(
            "the cpu clock times one thread: use it with --device cpu --threads 1, or use "
            "--clock wall"
        )


def median_ratio(a: Sequence[float], b: Sequence[float]) -> float:
    """The median over rounds of ``a``'s time over ``b``'s in the same round: the two ran
    close together, so the VM's drift (up to 2x within a run) hits both alike; a ratio of the
    two medians could pair a fast moment of one with a slow moment of the other."""
    return statistics.median(x / y for x, y in zip(a, b, strict=True))


def default_optimizers() -> list[str]:
    """Every registry optimizer that needs no routes of its own."""
    return [n for n in REGISTRY if n != "hybrid"]


def bench_step(
    shape: Shape,
    optimizers: Sequence[str] | None = None,
    *,
    steps: int = 15,
    warmup: int = 3,
    device: torch.device | str | None = None,
    modes: Sequence[str] = ("fused", "eager"),
    references: bool = True,
    clock: str = "wall",
    log: Callable[[str], None] = lambda s: None,
) -> dict[str, Any]:
    """The whole report: environment, one row per optimizer."""
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    check_clock(clock, device)
    names = list(optimizers or default_optimizers())
    rows = []
    for name in names:
        log(f"{name}")
        rows.append(
            bench_optimizer(
                name,
                shape,
                steps=steps,
                warmup=warmup,
                device=device,
                modes=modes,
                references=references,
                clock=clock,
                log=log,
            )
        )
    return {
        "benchmark": "step",
        "clock": clock,
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "shape": shape.as_dict(),
        "params": rows[0]["params"] if rows else 0,
        "steps": steps,
        "warmup": warmup,
        "compile_seconds_total": COMPILE_STATS.seconds,
        "rows": rows,
    }


def format_step_table(report: dict[str, Any]) -> list[list[str]]:
    """Rows of the printed table (header first)."""

    def f(x: Any, spec: str = ".1f") -> str:
        return "-" if x is None or (isinstance(x, float) and x != x) else format(x, spec)

    header = [
        "optimizer",
        "fused ms",
        "eager ms",
        "B/param",
        "bound ms",
        "fused/bound",
        "eager/bound",
        "state B/param",
        "compile s",
        "references: ms (fused/ref, eager/ref)",
        "matrix GFLOP",
        "share of train step",
    ]
    table = [header]
    for r in report["rows"]:
        refs = []
        for ref in r["references"]:
            if "error" in ref:
                refs.append(f"{ref['name']}: unavailable")
            else:
                refs.append(
                    f"{ref['name']} {f(ref['ms'])} "
                    f"({f(ref.get('fused_ratio'), '.2f')}, {f(ref.get('eager_ratio'), '.2f')})"
                )
        table.append(
            [
                r["optimizer"],
                f(r.get("fused_ms")),
                f(r.get("eager_ms")),
                f(r["bytes_per_param"]),
                f(r["bound_ms"]),
                f(r.get("fused_vs_bound"), ".2f"),
                f(r.get("eager_vs_bound"), ".2f"),
                f(r["state_bytes_per_param"], ".2f"),
                f(r.get("compile_s")),
                "; ".join(refs),
                f(r.get("matrix_gflop"), ".2f"),
                f(r.get("share_of_training_step"), ".1%"),
            ]
        )
    return table
