"""The fast path: one ``torch.compile``\\ d step function per bucket of parameters.

An optimizer step is memory-bound: it should read and write parameters, gradients and state
once. The eager path (:meth:`RuleOptimizer.step`) runs each rule tensor by tensor with several
kernels per tensor, so it reads the same memory several times and pays Python overhead per
tensor. Here the parameters of one param group are bucketed by (device, dtype) and each bucket
gets a single function, traced through the rule's :meth:`~optarena.optim.rules.Rule.
fused_direction` (the same transforms as the eager path) and compiled with
``torch.compile(fullgraph=True, dynamic=False)``: inductor fuses every tensor's update, block
statistics included (Adam-mini rows and heads, Adalayer tensors, Adafactor factors), into one or
two loops over memory. A rule with ``fused_phases() == 2`` (Adafactor) gets two compiled functions
per bucket: ``fused_prepare`` (its small statistics) and then the update, which reads them.
Groups that torch's own fused kernels implement exactly (AdamW, SGD on plain CPU tensors) never
reach this module (``kernels.py``). Tensors that a rule's own CPU kernel updates better than
inductor would (``Rule.kernel_picks``: Adam-mini, Adalayer and Adafactor, whose statistics made
inductor read g twice; ``block_adam.py``, ``factored_adam.py``) are stepped by that kernel,
outside the compiled function (``Rule.kernel_plan``); the compiled function takes the rest.

Everything that changes between steps (lr, bias corrections, Sophia's ``rho·bs``, first-step and
phase flags) is computed on the host, as the eager path computes it, and passed as one small
tensor of per-parameter scalars: changing the learning rate or the step never recompiles.

Compiled functions are kept per process (keyed by the bucket's structure, so two optimizers
over the same shapes share them) and across processes by torch's inductor caches (the FX graph
cache and AOT autograd cache, on by default; ``TORCHINDUCTOR_CACHE_DIR`` moves them).

``fused=None`` (the default) decides per bucket, see :func:`should_fuse`.
"""

from __future__ import annotations

import functools
import os
import time
import types
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor

from optarena.optim.rules import KernelCall, Rule
from optarena.optim.step_counts import StepCounts

# Below this many elements in a bucket the CPU fast path is not worth its compile time (seconds)
# under ``fused=None``; override with OPTARENA_FUSED_MIN_NUMEL.
CPU_MIN_NUMEL = 4_000_000

# Inductor checks every input's sizes and strides before each call (~2 µs per tensor); dynamo's
# guards, which run first, already check the same, so the compiled step skips the repeat.
COMPILE_OPTIONS: dict[str, Any] = {"size_asserts": False}

# A compile key describes every tensor of a bucket (hashing it costs ~0.1 ms for 75 tensors), so
# it is hashed once and its integer id keys the caches below.
_KEY_IDS: dict[tuple, int] = {}
_COMPILED: dict[int, Callable[..., None]] = {}
_FAILED: set[int] = set()

# the dtype of a compiled call's scalar table: float64 for float64 buckets, else float32
_SCALAR_DTYPES = (np.float32, np.float64)


@dataclass
class CompileStats:
    """Wall time spent compiling fast-path functions in this process (first call of each)."""

    seconds: float = 0.0
    functions: int = 0
    keys: list[str] = field(default_factory=list)


COMPILE_STATS = CompileStats()


# --------------------------------------------------------------------------- policy


def compile_available(device: torch.device) -> bool:
    """Whether ``torch.compile`` can build kernels for ``device`` here (cached per type)."""
    return _compile_available(device.type)


@functools.cache
def _compile_available(device_type: str) -> bool:
    try:
        import torch._dynamo

        if not torch._dynamo.is_dynamo_supported():
            return False
    except Exception:  # pragma: no cover - very old or stripped torch
        return False
    if device_type == "cuda":
        try:
            from torch.utils._triton import has_triton

            return has_triton()
        except Exception:  # pragma: no cover
            return False
    if device_type == "cpu":
        from shutil import which

        return any(which(cc) for cc in (os.environ.get("CXX", "g++"), "g++", "clang++", "c++"))
    return False


def should_fuse(fused: bool | None, device: torch.device, numel: int) -> bool:
    """The ``fused`` flag of a group resolved for one bucket.

    ``True``/``False`` are obeyed (``True`` raises later if compilation is impossible).
    ``None``: the environment variable ``OPTARENA_FUSED`` (``1``/``0``) wins if set (the test
    suite sets ``0`` and opts in with ``fused=True``); otherwise fused when ``torch.compile``
    works for the device and either the device is CUDA or the bucket holds at least
    ``CPU_MIN_NUMEL`` elements (on CPU a compile costs 10-60 s cold, a few seconds from the
    cache, and saves 10-100 ms per step on a 30M-parameter model).
    """
    if fused is not None:
        return bool(fused)
    env = os.environ.get("OPTARENA_FUSED", "").strip().lower()
    if env in ("1", "true", "yes", "on"):
        return compile_available(device)
    if env in ("0", "false", "no", "off"):
        return False
    if not compile_available(device):
        return False
    if device.type == "cuda":
        return True
    min_numel = int(os.environ.get("OPTARENA_FUSED_MIN_NUMEL", CPU_MIN_NUMEL))
    return numel >= min_numel


# --------------------------------------------------------------------------- buckets


def _ctx_key(ctx: Any) -> Any:
    """A hashable description of a rule's per-parameter context (its block layout)."""
    if ctx is None:
        return None
    layout = getattr(ctx, "layout", None)
    return (type(ctx).__name__, layout)


def _constants(rule: Rule, group: dict[str, Any]) -> dict[str, Any]:
    """The group options baked into the compiled function (everything but host scalars)."""
    keys = set(rule.checks) | set(rule.defaults)
    return {
        k: group[k]
        for k in sorted(keys)
        if k in group and k not in rule.host_options and k != "weight_decay"
    } | {"weight_decay": group.get("weight_decay", 0.0) if _coupled_decay(rule, group) else 0.0}


def _coupled_decay(rule: Rule, group: dict[str, Any]) -> bool:
    return group.get("decoupled_weight_decay") is False


def _freeze(value: Any) -> Any:
    if isinstance(value, list):
        return tuple(value)
    return value


@dataclass(frozen=True)
class _Spec:
    """What the compiled function of a bucket is specialised on, per parameter."""

    shape: tuple[int, ...]
    param_dtype: torch.dtype
    grad_dtype: torch.dtype
    state_keys: tuple[str, ...]
    ctx: Any


@dataclass
class _Plan:
    """A bucket's call, less its gradients and scalars, prepared once: constants, per-tensor
    specs and states, which tensors the rule's kernel updates (the others: the compiled
    function), and the step counts."""

    constants: dict[str, Any]
    specs: list[_Spec]
    states: list[dict[str, Any]]
    decays: np.ndarray  # 1.0 where the tensor's role takes weight decay, else 0.0
    exempt: tuple[str, ...]  # the group's no_decay_roles that ``decays`` reflects
    kernel: list[int]  # indices updated by ``kernel_call``
    kernel_call: KernelCall | None  # ``Rule.kernel_plan``
    compiled: list[int]  # indices updated by the compiled function
    compiled_params: list[Tensor]
    compiled_lists: list[list[Tensor]]  # their state tensors, in ``specs``' key order
    counts: StepCounts
    # the smaller part runs first: the larger one streams through memory and leaves the host's
    # objects out of the caches for whatever runs after it
    compiled_first: bool
    keys: dict[tuple[str, ...], int] = field(default_factory=dict)  # scalar names -> key id
    timed: bool = False  # its first call (compilations) is counted in COMPILE_STATS


def _scalar_table(
    rule: Rule, hp: dict[str, Any], steps: np.ndarray, decays: np.ndarray, decay_lr: float
) -> tuple[tuple[str, ...], np.ndarray]:
    """Every tensor's host scalars, a row each (float64, columns ``names``): exactly the numbers
    the eager path computes, asked of the rule once per distinct step (usually one a bucket).
    ``decays``: 1.0 where the tensor's role takes weight decay."""
    first = steps[0]
    values = [first] if (steps == first).all() else np.unique(steps)
    table = np.empty(0)
    names: tuple[str, ...] = ()
    for value in values:
        sc = rule.fused_scalars(hp, int(value))
        if not names:
            names = tuple(sorted({*sc, "keep"}))
            table = np.empty((len(steps), len(names)))
        row = [sc.get(n, 0.0) for n in names]
        if len(values) == 1:
            table[:] = row
        else:
            table[steps == value] = row
    table[:, names.index("keep")] = 1.0 - decays * (hp["weight_decay"] * decay_lr)
    return names, table


def _make_steps(
    rule: Rule,
    constants: dict[str, Any],
    ctxs: Sequence[Any],
    keys: Sequence[tuple[str, ...]],
    names: tuple[str, ...],
    dtype: torch.dtype,
    tag: int,
) -> tuple[Callable[..., None], Callable[..., list] | None]:
    """The bucket's step function, and its prepare function for two-phase rules.

    Dynamo caches compiled frames per code object; giving each bucket its own code objects keeps
    buckets from counting as recompilations of each other (and hitting the recompile limit).
    """
    has_apply = "apply" in names
    two_phase = rule.fused_phases(constants) == 2

    def unpack(i: int, grads: list[Tensor], states: list[list[Tensor]], sc: Tensor):
        g = grads[i] if grads[i].dtype == dtype else grads[i].to(dtype)
        state = dict(zip(keys[i], states[i], strict=True))
        row = {name: sc[i, j] for j, name in enumerate(names)}
        return g, state, row

    def prepare(params: list[Tensor], grads: list[Tensor], states: list[list[Tensor]], sc: Tensor):
        unpacked = [unpack(i, grads, states, sc) for i in range(len(params))]
        return [
            rule.fused_prepare(g, params[i], state, constants, row, ctxs[i])
            for i, (g, state, row) in enumerate(unpacked)
        ]

    def step(
        params: list[Tensor],
        grads: list[Tensor],
        states: list[list[Tensor]],
        sc: Tensor,
        prepared: list | None = None,
    ):
        for i in range(len(params)):
            p = params[i]
            g, state, row = unpack(i, grads, states, sc)
            if prepared is None:
                u, size = rule.fused_direction(g, p, state, constants, row, ctxs[i])
            else:
                u, size = rule.fused_direction(g, p, state, constants, row, ctxs[i], prepared[i])
            target = p if p.dtype == dtype else p.to(dtype)
            new = target * row["keep"] - u * size
            if has_apply:
                new = torch.where(row["apply"] > 0, new, target)
            p.copy_(new)

    def own_code(fn: Callable, name: str) -> Callable:
        code = fn.__code__.replace(co_name=f"optarena_fused_{name}_{tag}")
        defaults, closure = fn.__defaults__, fn.__closure__
        return types.FunctionType(code, fn.__globals__, code.co_name, defaults, closure)

    return own_code(step, "step"), own_code(prepare, "prepare") if two_phase else None


def _compiled(
    key: int,
    rule: Rule,
    constants: dict[str, Any],
    specs: Sequence[_Spec],
    names: tuple[str, ...],
    dtype: torch.dtype,
) -> Callable[..., None]:
    fn = _COMPILED.get(key)
    if fn is None:
        raw_step, raw_prepare = _make_steps(
            rule,
            constants,
            [s.ctx for s in specs],
            [s.state_keys for s in specs],
            names,
            dtype,
            len(_COMPILED),
        )
        step = torch.compile(raw_step, fullgraph=True, dynamic=False, options=COMPILE_OPTIONS)
        if raw_prepare is None:
            fn = step
        else:
            prepare = torch.compile(
                raw_prepare, fullgraph=True, dynamic=False, options=COMPILE_OPTIONS
            )

            unprepared: list[list] = []

            def fn(params, grads, states, sc):
                # a prepare that returned only None did nothing, and will do nothing for these
                # tensors (they are updated unprepared): later steps skip its call
                if unprepared:
                    step(params, grads, states, sc, unprepared[0])
                    return
                prepared = prepare(params, grads, states, sc)
                if all(x is None for x in prepared):
                    unprepared.append(prepared)
                step(params, grads, states, sc, prepared)

        _COMPILED[key] = fn
    return fn


class FusedStepper:
    """Runs the fast path of one :class:`RuleOptimizer`, group by group."""

    def __init__(self, optimizer: Any):
        self.optimizer = optimizer
        # per bucket (param ids); dropped on load_state_dict
        self.plans: dict[tuple, _Plan] = {}

    def _plan(
        self, group: dict[str, Any], hp: dict[str, Any], rule: Rule, params: list[Tensor]
    ) -> _Plan:
        """What a bucket's call needs besides gradients and scalars; rebuilt only when
        something changed (the group's constants, a state or a step count replaced)."""
        opt = self.optimizer
        constants = {k: _freeze(v) for k, v in _constants(rule, hp).items()}
        pid = (rule.name, *map(id, params))
        plan = self.plans.get(pid)
        states = [opt.state[p] for p in params]
        if (
            plan is not None
            and plan.constants == constants
            and plan.exempt == hp["no_decay_roles"]
            and all(a is b for a, b in zip(states, plan.states, strict=True))
            and plan.counts.held_by(states)
        ):
            return plan
        states = [opt._state_for(p, group, rule) for p in params]
        specs = [
            _Spec(
                tuple(p.shape),
                p.dtype,
                p.grad.dtype,
                tuple(sorted(k for k in state if k != "step")),
                rule.fused_context(opt._infos[id(p)], hp),
            )
            for p, state in zip(params, states, strict=True)
        ]
        picks = [
            rule.kernel_picks(p, p.grad, st, hp, sp.ctx)
            for p, st, sp in zip(params, states, specs, strict=True)
        ]
        kernel = [i for i, pick in enumerate(picks) if pick]
        compiled = [i for i, pick in enumerate(picks) if not pick]
        kernel_call = None
        if kernel:
            kernel_call = rule.kernel_plan(
                [params[i] for i in kernel],
                [states[i] for i in kernel],
                hp,
                [specs[i].ctx for i in kernel],
            )
        exempt = hp["no_decay_roles"]
        decays = np.array([float(opt._infos[id(p)].role not in exempt) for p in params])
        plan = _Plan(
            constants,
            specs,
            states,
            decays,
            exempt,
            kernel,
            kernel_call,
            compiled,
            [params[i] for i in compiled],
            [[_writable(states[i][k]) for k in specs[i].state_keys] for i in compiled],
            StepCounts(states, opt._count_pool),
            sum(params[i].numel() for i in compiled) < sum(params[i].numel() for i in kernel),
        )
        self.plans[pid] = plan
        return plan

    def step_group(
        self,
        group: dict[str, Any],
        hp: dict[str, Any],
        rule: Rule,
        params: list[Tensor],
        explicit: bool,
    ) -> list[Tensor]:
        """Update ``params`` (all with gradients) of one group through compiled buckets.

        Returns the parameters it did not update (``fused=None`` and compilation failed, or a
        kernel declined a tensor this step); the caller steps those eagerly.
        """
        buckets: dict[tuple, list[Tensor]] = {}
        for p in params:
            buckets.setdefault((p.device, p.dtype), []).append(p)
        leftover: list[Tensor] = []
        for ps in buckets.values():
            dtype = self.optimizer._dtype(ps[0])
            leftover.extend(self._run_bucket(group, hp, rule, ps, dtype, explicit))
        return leftover

    def _run_bucket(
        self,
        group: dict[str, Any],
        hp: dict[str, Any],
        rule: Rule,
        params: list[Tensor],
        dtype: torch.dtype,
        explicit: bool,
    ) -> list[Tensor]:
        plan = self._plan(group, hp, rule, params)
        states = plan.states
        steps = plan.counts.add_one()
        # a fusable rule's decay_lr depends on the group only (Rule.decay_lr)
        decay_lr = 1.0 if rule.decay_in_direction else rule.decay_lr(params[0], states[0], hp)
        names, table = _scalar_table(rule, hp, steps, plan.decays, decay_lr)
        grads = [p.grad for p in params]
        fn = None
        leftover: list[Tensor] = []
        if plan.compiled:
            key = plan.keys.get(names)
            if key is None:  # the compile key, hashed once per bucket: it describes every tensor
                full = (
                    rule.name,
                    tuple(sorted(plan.constants.items())),
                    dtype,
                    params[0].device.type,
                    names,
                    tuple(
                        (s.shape, s.param_dtype, s.grad_dtype, s.state_keys, _ctx_key(s.ctx))
                        for s in (plan.specs[i] for i in plan.compiled)
                    ),
                )
                key = plan.keys[names] = _KEY_IDS.setdefault(full, len(_KEY_IDS))
            if key in _FAILED and not explicit:
                leftover = _give_back(params, states, plan.compiled)
            else:
                fn = _COMPILED.get(key) or _compiled(
                    key, rule, plan.constants, [plan.specs[i] for i in plan.compiled], names, dtype
                )
        # the first call compiles (inductor, or numba for a kernel), unless another optimizer
        # over the same structure did
        first = not plan.timed and not getattr(fn, "_optarena_done", False)
        start = time.perf_counter()
        compiled_ok = True
        if fn is not None and plan.compiled_first:
            compiled_ok = self._run_compiled(fn, key, plan, params, grads, table, dtype, explicit)
        if plan.kernel_call is not None:  # outside the compiled graph: no guards to check
            done = plan.kernel_call([grads[i] for i in plan.kernel], table[plan.kernel], names)
            if not all(done):
                declined = [i for i, did in zip(plan.kernel, done, strict=True) if not did]
                leftover += _give_back(params, states, declined)
        if fn is not None and not plan.compiled_first:
            compiled_ok = self._run_compiled(fn, key, plan, params, grads, table, dtype, explicit)
        if not compiled_ok:
            return leftover + _give_back(params, states, plan.compiled)
        plan.timed = True
        if first:
            elapsed = time.perf_counter() - start
            COMPILE_STATS.seconds += elapsed
            COMPILE_STATS.functions += 1
            COMPILE_STATS.keys.append(f"{rule.name}:{len(params)} tensors")
        return leftover

    @staticmethod
    def _run_compiled(
        fn: Callable[..., None],
        key: int,
        plan: _Plan,
        params: list[Tensor],
        grads: list[Tensor],
        table: np.ndarray,
        dtype: torch.dtype,
        explicit: bool,
    ) -> bool:
        """Run a bucket's compiled function; ``False`` if it failed (then it is never tried
        again for this key, and its tensors go to the eager path unless ``fused=True``)."""
        every = len(plan.compiled) == len(params)
        rows = table if every else table[plan.compiled]
        sc = torch.from_numpy(rows.astype(_SCALAR_DTYPES[dtype == torch.float64]))
        try:
            fn(
                plan.compiled_params,
                grads if every else [grads[i] for i in plan.compiled],
                plan.compiled_lists,
                sc.to(params[0].device),
            )
        except Exception as err:
            if explicit:
                raise
            _FAILED.add(key)
            warnings.warn(
                f"optarena: fused step failed to compile ({type(err).__name__}: {err}); "
                "using the eager path for these parameters",
                RuntimeWarning,
                stacklevel=7,  # the caller of opt.step()
            )
            return False
        fn._optarena_done = True  # type: ignore[attr-defined]
        return True


def _writable(t: Tensor) -> Tensor:
    """A state tensor as the compiled call takes it: a 0-d one as a 1-element view of itself,
    since ``torch.compile`` (2.13, CPU) drops in-place writes to 0-d tensor inputs."""
    return t.view(1) if t.dim() == 0 else t


def _give_back(params: list[Tensor], states: list[dict], indices: list[int]) -> list[Tensor]:
    """These parameters return to the eager path this step (which counts their step again)."""
    for i in indices:
        states[i]["step"] -= 1
    return [params[i] for i in indices]


def bytes_per_param(optimizer: torch.optim.Optimizer) -> float:
    """Compulsory memory traffic of one step, in bytes per parameter (the bandwidth model).

    Each parameter is read and written once, its gradient read once, each state tensor read and
    written once (read only for ``Rule.read_only_state``, e.g. Sophia's Hessian); the tensors
    that the step streams through memory, nothing else. Works for any torch optimizer whose
    state is initialised (run one step first).
    """
    total = 0.0
    count = 0
    for group in optimizer.param_groups:
        read_only: tuple[str, ...] = ()
        rule = getattr(optimizer, "rule_of", None)
        if rule is not None:
            read_only = rule(group).read_only_state
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


def reset_cache() -> None:
    """Forget this process's compiled functions (inductor's disk cache is kept)."""
    _COMPILED.clear()
    _FAILED.clear()


__all__ = [
    "COMPILE_STATS",
    "CPU_MIN_NUMEL",
    "FusedStepper",
    "bytes_per_param",
    "compile_available",
    "reset_cache",
    "should_fuse",
]
