"""Every execution mode of every registered optimizer equals the eager float64 chain.

The modes: torch's fused kernels (AdamW, SGD), the compiled chain (``fused=True``), and the
staged chain on row shards (``optarena.optim.sharding``), here on simulated ranks: one thread per
rank, each holding its own copy of the parameters and optimizer, the statistics added over the
threads as ``all_reduce`` would, on cuts that split heads, fused parts and rows of every kind.
Everything runs in float64, so that any difference beyond the order of additions (~1e-16) shows.
The real 2-process FSDP2 run is ``test_sharding.py``.

The compiled mode runs under OneCycleLR with cycled momentum (the learning rate and beta1 change
every step) with recompilation made an error: a schedule compiles once. Its phase steps (SOAP's
first step and refreshes, Kron's fits and balances, adam-frozen's fill: the chains' host scalars)
run the eager chain, every other step the compiled one, and the run equals the eager chain across
both.
"""

from __future__ import annotations

import math
import threading
import warnings
from contextlib import contextmanager
from typing import Any

import pytest
import torch
from torch import nn

from optarena.optim import REGISTRY, available, compiled, create, sharding
from optarena.optim.blocks import Rows
from optarena.optim.compiled import compile_available
from optarena.optim.engine import Chain
from optarena.optim.optimizer import ChainOptimizer
from optarena.optim.registry import CLASSES, Entry, make_class
from optarena.optim.transforms import (
    EMA,
    DecoupledDecay,
    ScaleByLR,
    Transform,
    Update,
    kron_schedule,
)
from optim_cases import count_kernel_calls, make_params, set_grads
from sharded_worker import partition as toy_partition

pytestmark = pytest.mark.usefixtures("single_thread")

INFOS = toy_partition()
SHAPES = {n: i.shape for n, i in INFOS.items()}
SKIP = ("qkv_out.weight",)  # never has a gradient
STEPS = 8
NAMES = list(available())

# Hyperparameters that make each transform do its work within STEPS.
HYPER: dict[str, dict[str, Any]] = {
    "adamw": {"lr": 1e-2, "weight_decay": 0.1},
    "adam-mini": {"lr": 1e-2, "weight_decay": 0.1},
    "adalayer": {"lr": 1e-2},
    "adafactor": {"lr": 1e-2, "weight_decay": 0.1},
    "adafactor-classic": {"lr": None, "beta1": 0.9, "weight_decay": 0.1},
    "sgd": {"lr": 0.1, "momentum": 0.9, "weight_decay": 0.1, "dampening": 0.1},
    "sgd-ema": {"lr": 0.1},
    "lion": {"lr": 1e-3, "weight_decay": 0.1},
    "signum": {"lr": 1e-3},
    "sophia": {"lr": 1e-3, "bs": 20, "hessian_interval": 3},
    "adam-frozen": {"lr": 1e-2, "precondition_steps": 3, "unfrozen_roles": ["output", "norm"]},
    "soap": {"lr": 1e-2, "weight_decay": 0.1, "precondition_frequency": 3},
    "kron": {"lr": 1e-2, "weight_decay": 0.1, "pre_conditioner_update_probability": 0.5},
    "hybrid": {
        "routes": {
            "default": ("signum", {}),
            "output": ("sophia", {"hessian_interval": 3}),
            "norm": ("adafactor-classic", {"beta1": 0.9}),
            "embedding": ("adam-mini", {}),
        }
    },
    "hybrid-adalayer-last-ln": {"lr": 0.1},
    "hybrid-adafactor-last-ln": {"lr": 0.1},
    # Newton-Schulz in float64: inductor computes bfloat16 matmuls with other roundings than
    # eager (torch's own bfloat16 is checked against torch.optim.Muon in test_parity.py); two
    # iterations, which inductor unrolls per matrix, exercise the same code as five
    "muon": {"lr": 2e-2, "ns_dtype": "float64", "per_head": True, "adamw_lr": 1e-2, "ns_steps": 2},
    "normuon": {
        "lr": 2e-2,
        "ns_dtype": "float64",
        "per_head": True,
        "adamw_lr": 1e-2,
        "ns_steps": 2,
    },
}


def build(name: str, params: dict[str, nn.Parameter], **extra: Any) -> torch.optim.Optimizer:
    hp = {**HYPER.get(name, {}), **extra}
    return create(name, list(params.items()), partition=INFOS, **hp)


def step_all(opt, params, t: int, step=None) -> None:
    set_grads(params, t, skip=SKIP)
    (step or opt.step)()
    interval = opt.hessian_interval
    if interval and t % interval == 0:
        set_grads(params, t, seed=2, skip=SKIP)
        opt.update_hessian()


def reference(
    name: str, schedule: bool = False, shapes=SHAPES, dtype=torch.float64, **extra: Any
) -> dict[str, nn.Parameter]:
    params = make_params(shapes, dtype)
    opt = build(name, params, fused=False, **extra)
    sched = one_cycle(opt) if schedule else None
    for t in range(1, STEPS + 1):
        step_all(opt, params, t)
        if sched is not None:
            sched.step()
    return params


def one_cycle(opt: torch.optim.Optimizer):
    """OneCycleLR, cycling beta1 or momentum where the optimizer has one (None: an optimizer
    that sets its own step size, classic Adafactor's relative step)."""
    peaks = [g["lr"] for g in opt.param_groups]
    if any(lr is None for lr in peaks):
        return None
    cycle = "momentum" in opt.defaults or "betas" in opt.defaults
    return torch.optim.lr_scheduler.OneCycleLR(
        opt, max_lr=peaks, total_steps=STEPS + 1, cycle_momentum=cycle, base_momentum=0.8
    )


def assert_close(got: dict, want: dict) -> None:
    for n in want:
        torch.testing.assert_close(
            got[n], want[n], rtol=1e-10, atol=1e-12, msg=lambda m, n=n: f"{n}: {m}"
        )


# --------------------------------------------------------------------------- torch's kernels


@pytest.mark.parametrize("name", [n for n, e in REGISTRY.items() if e.torch_kernel])
def test_torch_kernels_equal_the_chain(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    kernel = {"adamw": "_fused_adamw_", "sgd": "_fused_sgd_"}[name]
    calls = count_kernel_calls(monkeypatch, kernel)
    params = make_params(SHAPES)
    opt = build(name, params, fused=None)
    for t in range(1, STEPS + 1):
        step_all(opt, params, t)
    assert sum(calls) == STEPS * (len(SHAPES) - len(SKIP))
    assert_close(params, reference(name))


# --------------------------------------------------------------------------- compiled


@contextmanager
def no_recompilation():
    import torch._dynamo

    before = torch._dynamo.config.error_on_recompile
    torch._dynamo.config.error_on_recompile = True
    try:
        yield
    finally:
        torch._dynamo.config.error_on_recompile = before


# One tensor of every kind the compiled chain must cut right (rows, heads cut by GQA, fused
# parts, a vector, blocks along axis 1, a single entry); compiling all fourteen of the toy model
# costs three times as long and covers nothing more.
COMPILED_SHAPES = {
    n: SHAPES[n]
    for n in ("tok_emb.weight", "k_proj.weight", "qkv.weight", "norm", "conv1d", "gain")
}
# every chain once (the study's hybrids are groups of these), and one hybrid: two groups
COMPILED = [n for n, e in REGISTRY.items() if e.chain is not None]
COMPILED += ["hybrid-adalayer-last-ln"]
# The steps that set a host scalar under HYPER, from each schedule's definition: SOAP's first
# step (t = step - 1 = 0) and its refreshes (t a multiple of precondition_frequency = 3); Kron's
# fits (probability 1/2: every second step); adam-frozen's fill (precondition_steps + 1).
HOST_STEPS = {"soap": {1, 4, 7}, "kron": {2, 4, 6, 8}, "adam-frozen": {4}}
# Muon compiled with one matrix per tensor and per fused part (5 Newton-Schulz unrolls instead
# of 13, a third of the compile): its one-matrix path (the ratio in the scale: k_proj, conv1d)
# and its several-matrix path (qkv's parts) are both traced. The per-head cut, the same code on
# other slices, is compiled by NorMuon (HYPER's per_head), whose update is Muon's plus the row
# normalisation; per-head Muon stays checked eagerly (test_shards_equal_one_process).
COMPILED_EXTRA: dict[str, dict[str, Any]] = {"muon": {"per_head": False}}


@contextmanager
def paths_taken(monkeypatch: pytest.MonkeyPatch):
    """``{"eager": {...}, "compiled": {...}}``: the optimizer steps (1, 2, ...) at which each
    path ran (the compiled path builds its scalar table only for the steps it runs)."""
    taken: dict[str, set[int]] = {"eager": set(), "compiled": set()}
    steps = [0]
    step, step_eager, table = ChainOptimizer._step, ChainOptimizer._step_eager, compiled._table

    def counted(*args, **kw):
        steps[0] += 1
        return step(*args, **kw)

    def eager(*args, **kw):
        taken["eager"].add(steps[0])
        return step_eager(*args, **kw)

    def compiled_table(*args, **kw):
        taken["compiled"].add(steps[0])
        return table(*args, **kw)

    with monkeypatch.context() as m:
        m.setattr(ChainOptimizer, "_step", counted)
        m.setattr(ChainOptimizer, "_step_eager", eager)
        m.setattr(compiled, "_table", compiled_table)
        yield taken


@pytest.mark.slow
@pytest.mark.skipif(not compile_available("cpu"), reason="torch.compile needs a C++ compiler")
@pytest.mark.parametrize("name", COMPILED)
def test_compiled_equals_eager_and_a_schedule_compiles_once(
    name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    extra = COMPILED_EXTRA.get(name, {})
    params = make_params(COMPILED_SHAPES)
    opt = build(name, params, fused=True, **extra)
    sched = one_cycle(opt)
    with no_recompilation(), paths_taken(monkeypatch) as taken:
        for t in range(1, STEPS + 1):
            step_all(opt, params, t)
            if sched is not None:
                sched.step()
    host = HOST_STEPS.get(name, set())
    assert taken["eager"] == host  # a phase step runs the eager chain, and only a phase step
    if not REGISTRY[name].torch_kernel:
        # adam-frozen's group of unfrozen roles (freeze=False) has no fill step: compiled
        also = host if name == "adam-frozen" else set()
        assert taken["compiled"] == set(range(1, STEPS + 1)) - host | also
    assert_close(params, reference(name, schedule=True, shapes=COMPILED_SHAPES, **extra))


@pytest.mark.slow
@pytest.mark.skipif(not compile_available("cpu"), reason="torch.compile needs a C++ compiler")
def test_compiled_kron_across_a_balance_and_soap_across_many_refreshes(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Kron's 100th fit (step 200 at probability 1/2) also balances its factors; SOAP refreshes
    every third step. Both compiled (their regular steps) equal the eager chain throughout."""
    assert kron_schedule(0.5)(200) == (True, True) and not any(
        kron_schedule(0.5)(t)[1] for t in range(1, 200)
    )
    regular = {  # Kron: no fit at odd steps; SOAP: neither step 1 nor t = step - 1 in 3N
        "kron": set(range(1, 202, 2)),
        "soap": {s for s in range(2, 32) if (s - 1) % 3},
    }
    for name, steps in (("kron", 201), ("soap", 31)):
        runs = []
        for fused in (True, False):
            params = make_params(COMPILED_SHAPES)
            opt = build(name, params, fused=fused)
            with paths_taken(monkeypatch) as taken:
                for t in range(1, steps + 1):
                    set_grads(params, t, skip=())
                    opt.step()
            runs.append(params)
            compiled_steps = regular[name] if fused else set()
            assert taken["compiled"] == compiled_steps, name
            assert taken["eager"] == set(range(1, steps + 1)) - compiled_steps, name
        assert_close(runs[0], runs[1])


@pytest.mark.slow
@pytest.mark.skipif(not compile_available("cpu"), reason="torch.compile needs a C++ compiler")
@pytest.mark.parametrize(
    "name, shapes",
    [
        ("adafactor", {"tall": (48, 5), "stack": (2, 32, 5)}),
        (
            "adafactor-classic",
            {"tall": (48, 5), "stack": (2, 32, 5), "long": (64, 128), "vector": (8192,)},
        ),
        ("adalayer", {"long": (64, 128), "vector": (8192,)}),
        ("mars", {"long": (64, 128)}),
    ],
)
def test_compiled_factors_of_tall_tensors_equal_eager(
    name: str, shapes: dict[str, tuple[int, ...]]
) -> None:
    """Column factors of tensors with more than 16 rows are summed over runs of 16 rows first,
    and blocks and whole-tensor sums (classic Adafactor's RMS(θ) and RMS(u), MARS's norm) of
    8192 entries or more over 8 runs side by side (the other shapes here are smaller): the same
    sums on both paths."""
    runs = []
    for fused in (False, True):
        params = make_params(shapes)
        opt = create(name, list(params.items()), fused=fused, **HYPER.get(name, {}))
        for t in range(1, 4):
            set_grads(params, t, skip=())
            opt.step()
        runs.append(params)
    assert_close(runs[1], runs[0])


@pytest.mark.parametrize(
    "counts, calls",
    [
        ([1, 1, 3], [[0, 1, 2, 3, 4]]),  # every spec below 2·MAX_REPEATS (4 here): one call
        ([4, 5, 1], [[0, 1, 4, 5], [2, 3, 6, 7], [8, 9]]),  # 2 shares of 2 + 2, the rest
        ([7], [[0, 1], [2, 3], [4, 5], [6]]),
        # twice and once a layer: 4 shares trace 4 + 1 tensors; 6 (12 // 2) would leave all five
        # once-a-layer tensors to the remainder (2 + 5 traced)
        ([12, 5], [[0, 1, 2, 12], [3, 4, 5, 13], [6, 7, 8, 14], [9, 10, 11, 15], [16]]),
    ],
)
def test_split_gives_every_call_an_equal_share_of_each_spec(
    counts: list[int], calls: list[list[int]], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(compiled, "MAX_REPEATS", 2)
    starts = [sum(counts[:i]) for i in range(len(counts))]
    kinds = [list(range(start, start + n)) for start, n in zip(starts, counts, strict=True)]
    assert compiled.split(kinds) == calls


@pytest.mark.slow
@pytest.mark.skipif(not compile_available("cpu"), reason="torch.compile needs a C++ compiler")
def test_a_deep_model_compiles_one_function_for_its_repeated_layers(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Ten layers of the same two tensors and an embedding, one layer's matrix stored
    transposed: with ``MAX_REPEATS = 2`` the bucket is three calls of one function (three of
    each layer tensor) and one for the rest (the transposed matrix, whose strides are not the
    others', a vector, the embedding); the three run one function without recompiling it, and
    the result is the eager chain's."""
    monkeypatch.setattr(compiled, "MAX_REPEATS", 2)
    compiled.reset_cache()
    shapes = {"emb": (12, 4)} | {
        f"{i}.{k}": (4, 3) if k == "w" else (3,) for i in range(10) for k in ("w", "b")
    }
    runs = []
    for fused in (False, True):
        params = make_params(shapes)
        params["0.w"] = nn.Parameter(params["0.w"].detach().t().contiguous().t())
        opt = create("lion", list(params.items()), fused=fused)
        with no_recompilation():
            for t in range(1, 4):
                set_grads(params, t, skip=())
                opt.step()
        runs.append(params)
    assert runs[1]["0.w"].stride() == (1, 4)
    (prepared,) = opt._compiled.prepared.values()
    assert [len(c.params) for c in prepared.calls] == [6, 6, 6, 3]
    assert len({c.key for c in prepared.calls}) == 2
    assert len(compiled._FUNCTIONS) == 2
    assert_close(runs[1], runs[0])


@pytest.mark.skipif(not compile_available("cpu"), reason="torch.compile needs a C++ compiler")
def test_a_failed_compile_warns_once_and_the_bucket_steps_eagerly(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """``fused=None`` and every compile failing: a deep bucket's calls all fall back to the
    eager chain after one attempt and one warning, and the step is the eager one."""
    monkeypatch.setattr(compiled, "MAX_REPEATS", 2)
    monkeypatch.setenv("OPTARENA_FUSED", "1")
    compiled.reset_cache()
    attempts = []

    def failing_compile(fn, **kwargs):
        def fail(*args, **kw):
            attempts.append(fn.__name__)
            raise RuntimeError("no kernels today")

        return fail

    monkeypatch.setattr(compiled.torch, "compile", failing_compile)
    shapes = {"emb": (7, 3)} | {f"{i}.w": (4, 3) for i in range(10)}
    runs = []
    for fused in (False, None):
        params = make_params(shapes)
        opt = create("lion", list(params.items()), fused=fused)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            for t in range(1, 4):
                set_grads(params, t, skip=())
                opt.step()
        runs.append(params)
    assert len(opt._compiled.prepared.popitem()[1].calls) > 1
    assert len(attempts) == 1
    assert [str(w.message) for w in caught if w.category is RuntimeWarning] == [
        "optarena: the compiled step failed (RuntimeError: no kernels today); these parameters "
        "take the eager path"
    ]
    assert_close(runs[1], runs[0])


@pytest.mark.slow
@pytest.mark.skipif(not compile_available("cpu"), reason="torch.compile needs a C++ compiler")
def test_bfloat16_compiled_matches_eager_to_its_rounding() -> None:
    """Low-precision parameters: float32 state, the update computed in float32 and rounded
    once, on both paths (on the compiled test's tensors, one of every kind)."""
    runs = []
    for fused in (False, True):
        params = {
            n: nn.Parameter(p.detach().to(torch.bfloat16))
            for n, p in make_params(COMPILED_SHAPES).items()
        }
        opt = build("adam-mini", params, fused=fused)
        for t in range(1, 4):
            step_all(opt, params, t)
        assert all(
            v.dtype == torch.float32
            for st in opt.state.values()
            for k, v in st.items()
            if k != "step"
        )
        runs.append(params)
    for n in COMPILED_SHAPES:
        torch.testing.assert_close(runs[1][n].float(), runs[0][n].float(), rtol=1e-2, atol=1e-2)


# --------------------------------------------------------------------------- sharded (simulated)


def chunk_cuts(n: int, world: int) -> list[tuple[int, int]]:
    """``(offset, rows)`` per rank as FSDP2 (``torch.chunk``) cuts ``n`` rows."""
    size = math.ceil(n / world) if n else 0
    return [(min(r * size, n), max(0, min(size, n - r * size))) for r in range(world)]


class Hub:
    """The ranks' collectives, between threads: every rank deposits, all wait, each reads."""

    def __init__(self, world: int) -> None:
        self.world = world
        self.barrier = threading.Barrier(world)
        self.slots: list[Any] = [None] * world
        self.calls = [0] * world

    def rank(self, r: int) -> RankComm:
        return RankComm(self, r)


class RankComm:
    def __init__(self, hub: Hub, r: int) -> None:
        self.hub, self.r = hub, r

    def _exchange(self, value: torch.Tensor) -> list[torch.Tensor]:
        self.hub.slots[self.r] = value.clone()
        self.hub.barrier.wait()
        got = list(self.hub.slots)
        self.hub.barrier.wait()
        return got

    def all_reduce(self, buf: torch.Tensor, group: Any) -> None:
        self.hub.calls[self.r] += 1
        buf.copy_(torch.stack(self._exchange(buf)).sum(0))

    def gather(self, item: Any, rows: torch.Tensor) -> torch.Tensor:
        return torch.cat(self._exchange(rows))


class Simulated:
    """Rank ``r``'s rows of every parameter; its tensors are views of the full copies."""

    def __init__(self, cuts: dict[int, tuple[int, int]]) -> None:
        self.cuts = cuts

    def rows(self, p: torch.Tensor) -> Rows:
        offset, length = self.cuts[id(p)]
        return Rows(tuple(p.shape), offset, length)

    def group(self, p: torch.Tensor) -> str:
        return "ranks"

    def local(self, t: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
        if t.shape != p.shape:  # replicated state (blocks, factors)
            return t
        offset, length = self.cuts[id(p)]
        return t.narrow(0, offset, length)


def run_sharded(
    name: str, world: int, dtype: torch.dtype = torch.float64, **extra: Any
) -> tuple[dict[str, torch.Tensor], list[int]]:
    ranks = [make_params(SHAPES, dtype) for _ in range(world)]
    opts = [build(name, params, fused=False, **extra) for params in ranks]
    places = [
        Simulated(
            {id(p): chunk_cuts(p.shape[0] if p.dim() else 1, world)[r] for p in params.values()}
        )
        for r, params in enumerate(ranks)
    ]
    hub = Hub(world)

    def rank_step(r: int) -> None:
        sharding.step(opts[r], list(opts[r].jobs()), where=places[r], comm=hub.rank(r))

    errors: list[BaseException] = []

    def run(r: int, t: int) -> None:
        try:
            step_all(opts[r], ranks[r], t, step=lambda: rank_step(r))
        except BaseException as err:  # re-raised in the main thread
            errors.append(err)
            hub.barrier.abort()

    for t in range(1, STEPS + 1):
        threads = [threading.Thread(target=run, args=(r, t)) for r in range(world)]
        for th in threads:
            th.start()
        for th in threads:
            th.join()
        if errors:
            raise errors[0]
    merged = {}
    for n in SHAPES:
        pieces = []
        for r in range(world):
            offset, length = places[r].cuts[id(ranks[r][n])]
            pieces.append(ranks[r][n].detach().narrow(0, offset, length))
        merged[n] = torch.cat(pieces)
    return merged, hub.calls


@pytest.mark.parametrize("world", [2, 3])
@pytest.mark.parametrize("name", NAMES)
def test_shards_equal_one_process(name: str, world: int) -> None:
    merged, calls = run_sharded(name, world)
    assert_close(merged, reference(name))
    assert len(set(calls)) == 1  # every rank issued the same collectives


@pytest.mark.parametrize("name", ["muon", "normuon"])
def test_gathered_matrix_steps_round_as_one_process(name: str) -> None:
    """float32, one matrix per tensor, so Muon's ratio (``sqrt(12/8)`` for q_proj) is a factor
    of the step's scale: shards that gather the update keep it a factor, and their parameters
    equal one process's bit for bit."""
    hp = {"per_head": False, "ns_dtype": "float32"}
    merged, _ = run_sharded(name, 2, torch.float32, **hp)
    want = reference(name, dtype=torch.float32, **hp)
    for n in want:
        assert torch.equal(merged[n], want[n].detach()), n


class UnitFrobenius(Transform):
    """A transform that needs the whole matrix: ``u / ‖u‖_F`` (what a shard cannot compute)."""

    whole = True

    def update(self, x, slot, sc, stats):
        u = slot.direction(x)
        return Update(u / u.norm().clamp_min(1e-30), x.scale, None, x.decay)


@pytest.fixture
def whole_matrix_entry():
    def chain(o):
        return Chain((EMA(beta=("momentum", None)), UnitFrobenius(), DecoupledDecay(), ScaleByLR()))

    name = "test-whole-matrix"
    REGISTRY[name] = Entry(
        name, chain, {"lr": 1e-2, "momentum": 0.9, "weight_decay": 0.1}, "test", "test", "TestWhole"
    )
    CLASSES["TestWhole"] = make_class(REGISTRY[name])
    yield name
    del REGISTRY[name], CLASSES["TestWhole"]


@pytest.mark.parametrize("world", [2, 3])
def test_a_transform_that_needs_the_whole_matrix_is_given_it(whole_matrix_entry, world) -> None:
    """Shards gather the update before such a transform and keep their rows of its result."""
    name = whole_matrix_entry
    merged, _ = run_sharded(name, world)
    assert_close(merged, reference(name))
