"""The compiled path: ``torch.compile``\\ d steps over the parameters of a group.

An optimizer step is memory-bound: it should read and write parameters, gradients and state
once. The eager path runs each transform tensor by tensor, so it reads the same memory several
times and pays Python overhead per tensor. Here the parameters of one param group are bucketed
by (device, dtype), and a bucket's tensors are stepped by calls of compiled functions, each
running the group's chain on every tensor of the call (:func:`~optarena.optim.engine.step_slot`,
the eager code itself), traced and compiled with ``torch.compile(fullgraph=True,
dynamic=False)``: inductor fuses each tensor's transforms, block statistics included, into a few
loops over memory. A bucket is one call unless it is deep: tracing and code generation take
time in proportion to the tensors a function holds, so a bucket where one kind of tensor (a
:class:`Spec`: shape, strides, dtype, role, state entries) repeats layer after layer is cut
into calls of one shared function, each with an equal share of every kind, and one call for
what is left (:func:`split`). Compilation then grows with the model's width, not its depth, at
the cost of a call (tens of microseconds on the host) per share.

The step's numbers (lr, betas, bias corrections, phase flags) are computed on the host by the
transforms' ``scalars`` and passed as one small tensor, a row per parameter: a new learning
rate, beta (OneCycleLR cycles ``betas``/``momentum``) or step never recompiles. A transform's
host scalars (``Transform.host``: phase flags its code branches on in Python) are no columns:
the function is traced with them at 0, and a step where one of them is set for any tensor of a
call (SOAP's first step and refreshes, Kron's fits, the frozen preconditioner's fill) runs the
eager chain for that call instead. The compiled functions are keyed by the call's structure
(chain, options, the specs of its tensors) and shared by every optimizer of the process;
inductor's own caches keep them across processes (``TORCHINDUCTOR_CACHE_DIR``).

``fused=None`` decides per param group (:func:`wanted`): compiled on CUDA, and on CPU for groups
of at least :data:`CPU_MIN_NUMEL` entries (a CPU compile costs seconds), when torch.compile works
here; ``OPTARENA_FUSED=0/1`` overrides that choice.
"""

from __future__ import annotations

import functools
import os
import shutil
import time
import types
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import Tensor

from optarena.optim.blocks import Rows
from optarena.optim.engine import Chain, ScalarCache, real, step_slot
from optarena.optim.roles import ParamInfo
from optarena.optim.transforms import Slot

if TYPE_CHECKING:
    from optarena.optim.optimizer import ChainOptimizer, Plan

CPU_MIN_NUMEL = 4_000_000
# a bucket whose most frequent spec has at least twice this many tensors is cut into calls of
# one shared function (:func:`split`): compile time grows with it, calls per step fall. At 16 a
# transformer with two norms a layer (2L + 1 of them) stays one call up to 15 layers, and a
# deeper one is cut into calls of about 8 layers each
MAX_REPEATS = 16

# inductor checks every input's sizes and strides before each call; dynamo's guards already did
COMPILE_OPTIONS: dict[str, Any] = {"size_asserts": False}


@dataclass
class CompileStats:
    """Wall time of first calls of compiled steps in this process (compilation or cache load)."""

    seconds: float = 0.0
    functions: int = 0
    keys: list[str] = field(default_factory=list)


COMPILE_STATS = CompileStats()
_FUNCTIONS: dict[tuple, Callable[..., None]] = {}
_FAILED: set[tuple] = set()


# --------------------------------------------------------------------------- policy


@functools.cache
def compile_available(device_type: str) -> bool:
    """Whether ``torch.compile`` can build kernels for this device type here."""
    try:
        import torch._dynamo

        if not torch._dynamo.is_dynamo_supported():
            return False
    except Exception:  # pragma: no cover - stripped builds
        return False
    if device_type == "cuda":
        try:
            from torch.utils._triton import has_triton

            return has_triton()
        except Exception:  # pragma: no cover
            return False
    if device_type == "cpu":
        return any(shutil.which(c) for c in (os.environ.get("CXX", "g++"), "g++", "clang++", "c++"))
    return False


def wanted(fused: bool | None, params: Sequence[Tensor], owner: str) -> bool:
    """Whether a group's tensors take the compiled path this step (``fused`` resolved)."""
    if fused is False:
        return False
    device = params[0].device
    if fused is True:
        if not compile_available(device.type):
            raise RuntimeError(
                f"{owner}: fused=True needs torch.compile for {device.type} (a C++ compiler on "
                "CPU, triton on CUDA); use fused=None or False"
            )
        return True
    env = os.environ.get("OPTARENA_FUSED", "").strip().lower()
    if env in ("0", "false", "no", "off"):
        return False
    if not compile_available(device.type):
        return False
    if env in ("1", "true", "yes", "on") or device.type == "cuda":
        return True
    least = int(os.environ.get("OPTARENA_FUSED_MIN_NUMEL", CPU_MIN_NUMEL))
    return sum(p.numel() for p in params) >= least


# --------------------------------------------------------------------------- calls


@dataclass(frozen=True)
class Spec:
    """What a compiled function is specialised on, per tensor: everything dynamo's guards check
    of the tensors passed (so calls that share a function never recompile it) and what the chain
    reads of the parameter's structure."""

    shape: tuple[int, ...]
    param_dtype: torch.dtype
    grad_dtype: torch.dtype
    keys: tuple[str, ...]  # state entries, in the order their tensors are passed
    info: ParamInfo
    decays: bool
    # the type and strides of the parameter (its real view), its gradient and its state tensors
    layout: tuple


def spec_of(p: Tensor, state: Mapping[str, Tensor], info: ParamInfo, decays: bool) -> Spec:
    """``p``'s spec (``info`` without its name: the structure, not what it is called)."""
    keys = tuple(sorted(k for k in state if k != "step"))
    view, grad = real(p), real(p.grad)
    layout = (type(view), view.stride(), grad.stride(), *(real(state[k]).stride() for k in keys))
    info = replace(info, name="", source="")
    return Spec(tuple(view.shape), view.dtype, grad.dtype, keys, info, decays, layout)


def _make_step(
    chain: Chain,
    const: Mapping[str, Any],
    specs: Sequence[Spec],
    columns: Sequence[Sequence[tuple[str, int]]],
    dtype: torch.dtype,
    maximize: bool,
    tag: int,
) -> Callable[..., None]:
    """A call's step: the eager chain over every tensor, with its scalars read from the table
    and its host scalars at 0. Each function gets code objects of its own, so dynamo never
    counts one as a recompilation of another."""
    regular = [{name: 0.0 for name in t.host} for t in chain]

    def step(params: list[Tensor], grads: list[Tensor], states: list[list[Tensor]], table: Tensor):
        for i in range(len(params)):
            p, spec = params[i], specs[i]
            g = grads[i] if grads[i].dtype == dtype else grads[i].to(dtype)
            if maximize:
                g = -g
            target = p if p.dtype == dtype else p.to(dtype)
            state = dict(zip(spec.keys, states[i], strict=True))
            slot = Slot(target, g, state, spec.info, Rows.whole(spec.shape), const, spec.decays)
            scalars = [
                {**fixed, **{name: table[i, j] for name, j in cols}}
                for cols, fixed in zip(columns, regular, strict=True)
            ]
            step_slot(chain, slot, scalars, p)

    code = step.__code__.replace(co_name=f"optarena_compiled_step_{tag}")
    return types.FunctionType(code, step.__globals__, code.co_name, None, step.__closure__)


def split(kinds: Sequence[list[int]]) -> list[list[int]]:
    """A bucket's tensors, listed by spec, cut into calls: ``n`` calls that each take the same
    share of every spec (``count // n``, so they run one compiled function) and one call for the
    remainders. ``n`` is at most ``m // MAX_REPEATS`` (``m``: the most frequent spec's count),
    and of those the smallest that traces the fewest tensors (one share plus the remainders, so
    kinds that appear once and twice a layer still split evenly): a model whose specs each
    repeat fewer than ``2·MAX_REPEATS`` times is one call."""
    counts = [len(members) for members in kinds]

    def traced(n: int) -> int:
        return sum(c // n + c % n for c in counts)

    calls = min(range(1, max(1, max(counts) // MAX_REPEATS) + 1), key=traced)
    parts: list[list[int]] = [[] for _ in range(calls + 1)]
    for members in kinds:
        share = len(members) // calls
        for c in range(calls):
            parts[c] += members[c * share : (c + 1) * share]
        parts[calls] += members[calls * share :]
    return [part for part in parts if part]


@dataclass
class Call:
    """A call of a compiled function less its gradients and scalars, prepared once."""

    key: tuple
    sources: list[Tensor]  # the parameters, as the group holds them
    params: list[Tensor]  # their real views
    states: list[dict[str, Any]]
    lists: list[list[Tensor]]  # state tensors in ``Spec.keys`` order
    columns: list[list[tuple[str, int]]]  # per transform: (scalar name, table column), not host


@dataclass
class Prepared:
    """A parameter set's calls, and the state they were prepared for."""

    states: list[dict[str, Any]]
    lists: list[list[Tensor]]
    calls: list[Call]

    def current(self, states: Sequence[dict[str, Any]]) -> bool:
        """Whether ``states`` are the same state dicts holding the same tensors."""
        return all(
            a is b and _same(t, a) for a, b, t in zip(states, self.states, self.lists, strict=True)
        )


class CompiledSteps:
    """The compiled path of one optimizer: the prepared calls of each parameter set."""

    def __init__(self) -> None:
        self.prepared: dict[tuple, Prepared] = {}

    def step(
        self,
        opt: ChainOptimizer,
        group: dict[str, Any],
        hp: Mapping[str, Any],
        plan: Plan,
        params: list[Tensor],
        explicit: bool,
    ) -> list[Tensor]:
        """Update ``params`` (all with gradients) of one group; return those it did not (a
        host step, or ``fused=None`` and the compilation failed: they take the eager path)."""
        leftover: list[Tensor] = []
        scalars = ScalarCache(plan.chain, hp)  # shared by the calls
        calls = self._prepare(opt, group, hp, plan, params).calls
        for call in calls:
            if not self._run(opt, group, plan, call, scalars, explicit):
                leftover += call.sources
                if call.key in _FAILED:  # the group's other calls would fail alike: one warning
                    _FAILED.update(c.key for c in calls)
        return leftover

    def _prepare(self, opt, group, hp, plan, params: list[Tensor]) -> Prepared:
        pid = (plan.key, group["no_decay_roles"], group["maximize"], *map(id, params))
        states = [opt.state_for(p, group, plan) for p in params]
        found = self.prepared.get(pid)
        if found is not None and found.current(states):
            return found
        kinds: dict[tuple, dict[Spec, list[int]]] = {}
        specs = []
        for i, (p, st) in enumerate(zip(params, states, strict=True)):
            info = opt.real_info(p)
            spec = spec_of(p, st, info, info.role.value not in group["no_decay_roles"])
            specs.append(spec)
            kinds.setdefault((p.device, spec.param_dtype), {}).setdefault(spec, []).append(i)
        lists = [[real(st[k]) for k in s.keys] for st, s in zip(states, specs, strict=True)]
        columns = _columns(plan.chain, hp)
        calls = [
            self._call(
                opt,
                group,
                plan,
                columns,
                [(params[i], states[i], lists[i], specs[i]) for i in chunk],
            )
            for by_spec in kinds.values()
            for chunk in split(list(by_spec.values()))
        ]
        self.prepared[pid] = Prepared(states, lists, calls)
        return self.prepared[pid]

    def _call(
        self,
        opt: ChainOptimizer,
        group: Mapping[str, Any],
        plan: Plan,
        columns: list[list[tuple[str, int]]],
        members: list[tuple[Tensor, dict[str, Any], list[Tensor], Spec]],
    ) -> Call:
        """The call over ``members`` (parameter, state, state tensors, spec), its function
        created if no call of its key has one (it compiles on its first call)."""
        params, states, lists, specs = map(list, zip(*members, strict=True))
        dtype = opt._dtype(params[0])
        key = (plan.key, params[0].device.type, dtype, bool(group["maximize"]), tuple(specs))
        if key not in _FUNCTIONS:
            raw = _make_step(
                plan.chain,
                plan.const,
                specs,
                columns,
                dtype,
                bool(group["maximize"]),
                len(_FUNCTIONS),
            )
            _FUNCTIONS[key] = torch.compile(
                raw, fullgraph=True, dynamic=False, options=COMPILE_OPTIONS
            )
        return Call(key, params, [real(p) for p in params], states, lists, columns)

    def _run(self, opt, group, plan, call: Call, scalars: ScalarCache, explicit: bool) -> bool:
        if call.key in _FAILED and not explicit:
            return False
        steps = opt._counter.peek(call.states)
        rows = {t: scalars(t) for t in set(steps)}
        if any(map(plan.chain.host_step, rows.values())):
            return False  # a phase step: the eager chain runs it (and counts it)
        opt._counter.advance(call.states)
        params = call.sources
        table = _table(rows, steps, call.columns, opt._dtype(params[0]))
        fn = _FUNCTIONS[call.key]
        first = not getattr(fn, "_optarena_ran", False)
        start = time.perf_counter()
        try:
            fn(
                call.params,
                [real(p.grad) for p in params],
                call.lists,
                table.to(params[0].device),
            )
        except Exception as err:
            if explicit:
                raise
            _FAILED.add(call.key)
            opt._counter.take_back(call.states)
            warnings.warn(
                f"optarena: the compiled step failed ({type(err).__name__}: {err}); these "
                "parameters take the eager path",
                RuntimeWarning,
                stacklevel=6,
            )
            return False
        if first:
            fn._optarena_ran = True  # type: ignore[attr-defined]
            COMPILE_STATS.seconds += time.perf_counter() - start
            COMPILE_STATS.functions += 1
            COMPILE_STATS.keys.append(f"{group['optimizer']}:{len(params)} tensors")
        return True


def _columns(chain: Chain, hp: Mapping[str, Any]) -> list[list[tuple[str, int]]]:
    """Per transform, its scalars that are not host scalars, with their column in the table."""
    columns, j = [], 0
    for t, sc in zip(chain, chain.scalars(hp, 1), strict=True):
        names = sorted(n for n in sc if n not in t.host)
        columns.append([(name, j + k) for k, name in enumerate(names)])
        j += len(names)
    return columns


def _same(tensors: list[Tensor], state: Mapping[str, Tensor]) -> bool:
    """Whether the prepared state tensors are still the state's (a load replaces them)."""
    values = [real(v) for k, v in sorted(state.items()) if k != "step"]
    return len(values) == len(tensors) and all(
        a.data_ptr() == b.data_ptr() and a.shape == b.shape
        for a, b in zip(values, tensors, strict=True)
    )


def _table(
    scalars: Mapping[int, Sequence[Mapping[str, float]]],
    steps: Sequence[int],
    columns: Sequence[Sequence[tuple[str, int]]],
    dtype: torch.dtype,
) -> Tensor:
    """Every tensor's scalars, a row each, from the chain's scalars per distinct step count."""
    width = sum(len(c) for c in columns)
    rows: dict[int, list[float]] = {}
    for t, chain_scalars in scalars.items():
        row = [0.0] * width
        for sc, cols in zip(chain_scalars, columns, strict=True):
            for name, j in cols:
                row[j] = sc[name]
        rows[t] = row
    table = np.array(
        [rows[t] for t in steps], dtype=np.float64 if dtype == torch.float64 else np.float32
    )
    return torch.from_numpy(table)


def reset_cache() -> None:
    """Forget this process's compiled functions (inductor's disk cache is kept)."""
    _FUNCTIONS.clear()
    _FAILED.clear()


__all__ = [
    "COMPILE_STATS",
    "CPU_MIN_NUMEL",
    "MAX_REPEATS",
    "CompiledSteps",
    "compile_available",
    "reset_cache",
    "wanted",
]
