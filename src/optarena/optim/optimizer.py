"""``ChainOptimizer``: the one ``torch.optim.Optimizer`` behind every optimizer here.

It owns what every optimizer shares: taking a model, ``named_parameters()``, plain parameters or
param groups (with the structure-aware partition where it is known); validation of every
hyperparameter the chain's transforms read; state in float32 for low-precision parameters;
complex parameters as their real view; per-group weight-decay exemptions by role; exact
``state_dict`` round trips; deepcopy and pickle; Sophia's Hessian protocol. Each param group
names its optimizer (``group["optimizer"]``, a registry entry), so one object can run different
chains on different parameters (the study's hybrids). Which path computes a group's step is
decided per step: torch's own kernel where the chain is exactly torch's AdamW or SGD, the
compiled chain, the eager chain, or the staged chain on FSDP2 shards.
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn
from torch.autograd import profiler as torch_profiler
from torch.optim import optimizer as torch_optimizer

from optarena.optim import compiled, sharding, torch_kernels
from optarena.optim.blocks import Rows
from optarena.optim.checks import POSITIVE, Check, number, validate
from optarena.optim.engine import Chain, ScalarCache, StepCounter, real, step_slot
from optarena.optim.partition import Roles
from optarena.optim.roles import ParamInfo, Role
from optarena.optim.transforms import Slot

if TYPE_CHECKING:
    from optarena.optim.registry import Entry

_LOW_PRECISION = (torch.float16, torch.bfloat16)
_whole = functools.lru_cache(maxsize=4096)(Rows.whole)  # a shape's Rows, built once

# Group keys that say how a group runs or who it is, not what its update computes.
_NOT_MATH = {
    "params",
    "param_names",
    "fused",
    "foreach",
    "optimizer",
    "route",
    "no_decay_roles",
    "train_mode",
}

# torch.optim's flags: each value torch defaults to is accepted; ``foreach``, a speed choice, at
# any value (``fused`` picks the path here); a value that changes the update names what to do.
_TORCH_FLAGS: dict[str, tuple[tuple[Any, ...], str]] = {
    "foreach": ((None, True, False), "expected None, True or False (fused= picks the path)"),
    "capturable": ((False,), "leave it False (no CUDA-graph capture of the step)"),
    "differentiable": ((False,), "leave it False (the step is not differentiable)"),
}


_FUSED = Check(lambda x: x in (None, True, False), "None, True or False")
_STATE_DTYPE = Check(
    lambda x: x in (None, "param") or isinstance(x, torch.dtype), "None, 'param' or a torch.dtype"
)


def _check_torch_flags(owner: str, flags: Mapping[str, Any]) -> None:
    for name, value in flags.items():
        if name not in _TORCH_FLAGS:
            raise TypeError(f"{owner}() got an unexpected keyword argument {name!r}")
        allowed, fix = _TORCH_FLAGS[name]
        if not any(value is a for a in allowed):
            raise ValueError(f"{owner}: {name}={value!r} is not supported; {fix}")


def role_names(owner: str, roles: Any) -> tuple[str, ...]:
    """``no_decay_roles`` as a tuple of role names (plain strings survive ``state_dict`` and
    JSON); an unknown role is a ValueError listing the known ones."""
    if isinstance(roles, (str, Role)):
        roles = (roles,)
    try:
        return tuple(dict.fromkeys(Role(r).value for r in roles))
    except (TypeError, ValueError):
        raise ValueError(
            f"{owner}: invalid no_decay_roles={roles!r}; expected role names from "
            + ", ".join(r.value for r in Role)
        ) from None


def _hooks_idle(opt: torch.optim.Optimizer) -> bool:
    """Whether torch's step wrapper (step hooks, a profiler range) has nothing to do."""
    return not (
        getattr(torch_profiler, "_is_profiler_enabled", True)
        or getattr(torch_optimizer, "_global_optimizer_pre_hooks", True)
        or getattr(torch_optimizer, "_global_optimizer_post_hooks", True)
        or getattr(opt, "_optimizer_step_pre_hooks", True)
        or getattr(opt, "_optimizer_step_post_hooks", True)
    )


def is_named(items: list) -> bool:
    """Whether ``items`` are ``(name, parameter)`` pairs (``named_parameters()``)."""
    return bool(items) and isinstance(items[0], tuple) and isinstance(items[0][0], str)


def _constants(
    group: Mapping[str, Any], static: tuple[str, ...] = ()
) -> tuple[tuple[str, Any], ...]:
    """The group's options that shape its chain: every value that is not a number, and the
    numbers its entry names ``static`` (loop counts such as Muon's ``ns_steps``)."""
    out = []
    for key in sorted(group):
        value = group[key]
        if key in _NOT_MATH or (number(value) is not None and key not in static):
            continue
        if isinstance(value, (list, tuple)):
            if all(number(v) is not None for v in value):
                continue
            value = tuple(value)
        out.append((key, value))
    return tuple(out)


@dataclass(frozen=True)
class Plan:
    """What a group's step needs besides its tensors: its entry, chain and constants."""

    entry: Entry
    chain: Chain
    const: Mapping[str, Any]
    key: tuple[tuple[str, Any], ...]


class ChainOptimizer(torch.optim.Optimizer):
    """Base class of every optarena optimizer (see :mod:`optarena.optim.registry`).

    Args:
        params: an ``nn.Module`` (its structure gives each parameter a role), an iterable of
            ``(name, param)`` pairs (roles from names), plain parameters, or param groups.
        defaults: hyperparameters for groups that do not set them (and ``optimizer``, the
            registry name of the group's chain).
        model: the model the parameters belong to, when ``params`` are plain parameters or
            groups (e.g. Hugging Face ``Trainer(optimizer_cls_and_kwargs=(AdamMini,
            {"model": model}))``): roles come from its structure.
        partition: explicit roles, ``{name: ParamInfo}``.
        state_dtype: ``None``: float32 state for float16/bfloat16 parameters (updated in float32,
            rounded once), the parameter's dtype otherwise; ``"param"``: always the parameter's
            dtype; or a torch.dtype.
        no_decay_roles: roles exempt from weight decay: the default of every param group,
            which may set its own.
        maximize: maximise the objective (the gradient's sign flipped), as torch's flag.
        fused: ``False``: the eager chain; ``True``: torch's kernel where the chain is exactly
            torch's AdamW or SGD, else the compiled chain; ``None``: torch's kernel where it
            applies, else compiled on CUDA (and on CPU for groups of at least
            ``compiled.CPU_MIN_NUMEL`` entries) when torch.compile works here, else eager.
            Whatever ``fused`` says, a step at which a chain's host scalars are set (SOAP's
            first step and refreshes, Kron's fits, adam-frozen's fill step) runs eagerly.
        **torch_flags: torch.optim's ``foreach``, ``capturable`` and ``differentiable``,
            accepted at torch's defaults (``foreach`` at any value).
    """

    def __init__(
        self,
        params: nn.Module | Iterable[Any],
        defaults: dict[str, Any],
        *,
        model: nn.Module | None = None,
        partition: Mapping[str, ParamInfo] | None = None,
        state_dtype: torch.dtype | str | None = None,
        no_decay_roles: Iterable[Role | str] | None = None,
        fused: bool | None = None,
        maximize: bool | None = None,
        **torch_flags: Any,
    ):
        from optarena.optim.registry import entry

        owner = type(self).__name__
        _check_torch_flags(owner, torch_flags)
        checks = {"fused": _FUSED, "state_dtype": _STATE_DTYPE}
        validate(owner, checks, {"fused": fused, "state_dtype": state_dtype})
        self.state_dtype = state_dtype
        first = entry(defaults["optimizer"])
        self._structured = first.structured or type(self).__name__ == "Hybrid"
        exempt = first.no_decay_roles if no_decay_roles is None else no_decay_roles
        defaults = {
            **first.defaults,
            "maximize": False,
            "fused": fused,
            "no_decay_roles": role_names(owner, exempt),
            **defaults,
        }
        if maximize is not None:
            defaults["maximize"] = maximize
        self._runtime()
        self._infos: dict[int, ParamInfo] = {}
        self._roles = Roles(partition)
        if model is not None:
            self._roles.learn_model(model)
        super().__init__(self._resolve(params), defaults)
        sharding.refuse_flattened(p for g in self.param_groups for p in g["params"])

    def _runtime(self) -> None:
        """Caches rebuilt after unpickling (compiled functions, plans, host step counts)."""
        self._plans: dict[tuple, Plan] = {}
        self._counter = StepCounter()
        self._compiled = compiled.CompiledSteps()
        self._order: tuple[tuple, list[dict[str, Any]]] = ((), [])
        self._warned_structure = False

    # ----------------------------------------------------------------- parameters and roles

    def _resolve(self, params: Any) -> list:
        """``params`` as torch takes them, the roles of a model learnt."""
        owner = type(self).__name__
        if isinstance(params, nn.Module):
            found = self._roles.learn_model(params)
            return [(n, p) for n, p in found.params.items() if p.requires_grad]
        if isinstance(params, Tensor):
            raise TypeError(
                f"{owner}: params must be an iterable of Tensors, named parameters or param "
                "groups, or a model; got a single Tensor"
            )
        if isinstance(params, (int, float, str, bool)) or params is None:
            raise TypeError(
                f"{owner}: params must be a model, named_parameters(), parameters or param "
                f"groups; got {type(params).__name__} {params!r}"
            )
        return list(params)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        from optarena.optim.registry import entry

        owner = type(self).__name__
        params = param_group["params"]
        if isinstance(params, nn.Module):
            self._roles.learn_module(params)
            named = [(n, p) for n, p in params.named_parameters() if p.requires_grad]
            unnamed = self.param_groups and "param_names" not in self.param_groups[0]
            param_group["params"] = [p for _, p in named] if unnamed else named
        elif not isinstance(params, Tensor):
            param_group["params"] = list(params)
            if is_named(param_group["params"]):  # roles from names (decay exemptions too)
                self._roles.learn_names(param_group["params"], warn=self._structured)
        name = param_group.setdefault("optimizer", self.defaults.get("optimizer", "adamw"))
        spec = entry(name)
        if name != self.defaults.get("optimizer"):
            for key, value in spec.defaults.items():
                param_group.setdefault(key, value)
            if spec.no_decay_roles:
                param_group.setdefault("no_decay_roles", spec.no_decay_roles)
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        group["no_decay_roles"] = role_names(owner, group["no_decay_roles"])
        plan = self._plan(group)
        validate(owner, {"fused": _FUSED, **plan.chain.hyper, **spec.checks}, group)
        spec.check_group(owner, group)
        self._index(group, spec.structured)

    def _index(self, group: dict[str, Any], structured: bool) -> None:
        names = group.get("param_names", [None] * len(group["params"]))
        unknown = []
        for p, name in zip(group["params"], names, strict=True):
            info = self._roles.of(p, name)
            if info is None:
                label = name or f"param{len(self._infos)}"
                info = ParamInfo(label, tuple(p.shape), Role.OTHER, source="none")
                unknown.append(label)
            self._infos[id(p)] = info
        if unknown and structured and not self._warned_structure:
            self._warned_structure = True
            warnings.warn(
                f"{type(self).__name__}: {len(unknown)} parameter(s) came without names or a "
                "model, so their roles are unknown: each is one block of role 'other' (no "
                "per-head or per-row blocks) and norms and biases are not exempt from weight "
                "decay. Pass the model itself (create(name, model)), model.named_parameters(), "
                "or model=model beside plain parameters.",
                stacklevel=4,
            )

    def param_info(self, p: Tensor) -> ParamInfo:
        """The role and structure this optimizer uses for ``p``."""
        return self._infos[id(p)]

    def _dtype(self, p: Tensor) -> torch.dtype:
        dtype = real(p).dtype
        if isinstance(self.state_dtype, torch.dtype):
            return self.state_dtype
        if self.state_dtype is None and dtype in _LOW_PRECISION:
            return torch.float32
        return dtype

    # ----------------------------------------------------------------- chains

    def _plan(self, group: Mapping[str, Any]) -> Plan:
        from optarena.optim.registry import entry

        spec = entry(group["optimizer"])
        key = (group["optimizer"], _constants(group, spec.static))
        plan = self._plans.get(key)
        if plan is None:
            const = dict(key[1])
            plan = self._plans[key] = Plan(spec, spec.chain(const), const, key)
        return plan

    @property
    def hessian_interval(self) -> int | None:
        """Steps between Hessian estimates (Sophia), or ``None`` if no group uses them."""
        found = [
            g["hessian_interval"] for g in self.param_groups if self._plan(g).chain.needs_hessian
        ]
        return min(found) if found else None

    def state_for(self, p: Tensor, group: Mapping[str, Any], plan: Plan | None = None) -> dict:
        """The state of ``p``, created on first use (its ``step`` and the chain's entries)."""
        state = self.state[p]
        if not state:
            plan = plan or self._plan(group)
            if p.is_complex() and not plan.entry.complex_ok:
                raise ValueError(
                    f"{type(self).__name__}: {plan.entry.name} has no meaning for complex "
                    f"parameters ({self._infos[id(p)].name}); use adamw, or a real view"
                )
            state["step"] = torch.tensor(0.0, dtype=torch.float32)
            info = self.real_info(p)
            state.update(plan.chain.init(real(p), info, group, self._dtype(p)))
        return state

    def real_info(self, p: Tensor) -> ParamInfo:
        """``param_info`` of the tensor the chain sees (complex: its real view)."""
        info = self._infos[id(p)]
        return replace(info, shape=tuple(real(p).shape)) if p.is_complex() else info

    def slot(
        self, p: Tensor, group: Mapping[str, Any], plan: Plan, grad: Tensor | None = None
    ) -> Slot:
        """``p`` as the chain sees it this step (whole, in its compute dtype). The slot holds
        the parameter's own state dict (transforms update its tensors, never its keys)."""
        dtype = self._dtype(p)
        g = p.grad if grad is None else grad
        state = self.state[p]
        if p.is_complex():
            g, target, info = real(g), real(p), self.real_info(p)
            state = {k: real(v) for k, v in state.items()}
        else:
            target, info = p, self._infos[id(p)]
        g = g if g.dtype == dtype else g.to(dtype)
        if group["maximize"]:
            g = -g
        target = target if target.dtype == dtype else target.to(dtype)
        decays = info.role.value not in group["no_decay_roles"]
        return Slot(target, g, state, info, _whole(target.shape), plan.const, decays)

    # ----------------------------------------------------------------- stepping

    def step(self, closure=None, bs: float | None = None):  # type: ignore[override]
        """One update of every parameter with a gradient.

        ``bs`` (tokens per batch) overrides Sophia's ``bs`` for this step, as ``sophia-opt``'s
        ``step(bs=...)`` does. Step hooks and profiler ranges run as in torch (its wrapper runs
        them); without either the wrapper is skipped. A user's ``torch.compile`` around a
        function that calls this does not trace it: the step runs as it does outside (on the
        path ``fused`` chooses, its own compiled one included) and the compiled code resumes
        after it, so the update is the eager one.
        """
        if not _hooks_idle(self):
            args = () if closure is None else (closure,)
            return self._hooked_step(*args, **({} if bs is None else {"bs": bs}))
        loss = self._step(closure, bs)
        self._optimizer_step_code()  # where torch's profiler looks for optimizers
        return loss

    step = torch.compiler.disable(step)
    step.hooked = True  # type: ignore[attr-defined]  # torch's __init__ leaves it unwrapped

    @torch.no_grad()
    def _step(self, closure=None, bs: float | None = None):
        if bs is not None and not POSITIVE.test(bs):
            raise ValueError(
                f"{type(self).__name__}: invalid bs={bs!r}; expected {POSITIVE.expected}"
            )
        if any(g.get("train_mode") is False for g in self.param_groups):
            raise ValueError(
                f"{type(self).__name__}: step() with the parameters at their eval point; call "
                "optimizer.train() after evaluating"
            )
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        shards = []
        for group, hp, params in self.jobs(bs):
            if sharding.is_sharded(params):
                shards.append((group, hp, params))
            else:
                self._step_group(group, hp, params)
        if shards:
            sharding.step(self, shards)
        return loss

    def jobs(self, bs: float | None = None) -> Iterator[tuple[dict[str, Any], Mapping, list]]:
        """``(group, hyperparameters, parameters with a gradient)`` of this step, per group."""
        for group in self._groups_small_first():
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            if any(p.grad.is_sparse for p in params):
                raise RuntimeError(f"{type(self).__name__} does not support sparse gradients")
            yield group, (group if bs is None or "bs" not in group else {**group, "bs": bs}), params

    _hooked_step = torch.optim.Optimizer.profile_hook_step(_step)

    def _step_group(self, group: dict[str, Any], hp: Mapping[str, Any], params: list[Tensor]):
        plan = self._plan(group)
        fused = group.get("fused")
        if fused is not False and plan.entry.torch_kernel:
            params = torch_kernels.step(self, group, hp, plan, params)
        if params and compiled.wanted(fused, params, type(self).__name__):
            params = self._compiled.step(self, group, hp, plan, params, explicit=fused is True)
        if params:
            self._step_eager(group, hp, plan, params)

    def _step_eager(
        self, group: Mapping[str, Any], hp: Mapping[str, Any], plan: Plan, params: list[Tensor]
    ) -> None:
        states = [self.state_for(p, group, plan) for p in params]
        steps = self._counter.advance(states)
        scalars = ScalarCache(plan.chain, hp)
        for p, t in zip(params, steps, strict=True):
            step_slot(plan.chain, self.slot(p, group, plan), scalars(t), real(p))

    def _groups_small_first(self) -> list[dict[str, Any]]:
        """The param groups, fewest elements first (groups share no parameter, so the order
        changes no result; a small group stepped after a large one finds its host objects out
        of the caches)."""
        groups = self.param_groups
        if len(groups) == 1:
            return groups
        key = tuple((id(g), len(g["params"])) for g in groups)
        if key != self._order[0]:
            sizes = [sum(p.numel() for p in g["params"]) for g in groups]
            order = sorted(range(len(groups)), key=sizes.__getitem__)
            self._order = (key, [groups[i] for i in order])
        return self._order[1]

    @torch.no_grad()
    def update_hessian(self) -> None:
        """Fold the gradients now in ``.grad`` into Sophia's Hessian EMA.

        The training loop calls this every :attr:`hessian_interval` steps after back-propagating
        the loss on labels sampled from the model's own output distribution (the
        Gauss-Newton-Bartlett estimator). Groups whose chain has no Hessian are untouched.
        """
        for group in self.param_groups:
            plan = self._plan(group)
            if not plan.chain.needs_hessian:
                continue
            for p in group["params"]:
                if p.grad is None:
                    continue
                self.state_for(p, group, plan)
                if sharding.is_dtensor(p):
                    slot = sharding.local_slot(self, p, group, plan, sharding.DTensorPlacement())
                else:
                    slot = self.slot(p, group, plan)
                for t in plan.chain:
                    t.hessian(slot, group)

    # ----------------------------------------------------------------- train and eval points

    @torch.no_grad()
    def eval(self) -> None:
        """Parameters to their evaluation point (Schedule-Free's average ``x``), as
        ``schedulefree``'s ``optimizer.eval()``; optimizers without one are untouched. Call
        :meth:`train` before the next step."""
        self.train(False)

    @torch.no_grad()
    def train(self, mode: bool = True) -> None:
        """Parameters back to the point the step updates (``mode=False``: :meth:`eval`). An
        optimizer is created in train mode; each call that changes nothing is a no-op."""
        for group in self.param_groups:
            movers = [t for t in self._plan(group).chain if t.swaps]
            if not movers or group.get("train_mode", True) == mode:
                continue
            for p in group["params"]:
                state = self.state.get(p)
                if state:
                    for t in movers:
                        t.swap(real(p), {k: real(v) for k, v in state.items()}, group, mode)
            group["train_mode"] = mode

    # ----------------------------------------------------------------- checkpoints

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """torch's ``load_state_dict``, refusing another optimizer's state and keeping each
        saved tensor's dtype (torch casts floating state to the parameter's dtype, which would
        round float32 state of bfloat16 parameters). Every tensor is copied, ``step`` included.
        State dicts of earlier optarena versions load (their groups named a "rule")."""
        from optarena.optim.registry import LEGACY_STATE_KEYS, legacy_name

        owner = type(self).__name__
        state_dict = {**state_dict, "param_groups": [dict(g) for g in state_dict["param_groups"]]}
        for i, (saved, mine) in enumerate(
            zip(state_dict["param_groups"], self.param_groups, strict=False)
        ):
            name = saved.get("optimizer") or legacy_name(saved)
            if name != mine["optimizer"]:
                raise ValueError(
                    f"{owner}.load_state_dict: param group {i} was saved by {name!r}, this group "
                    f"runs {mine['optimizer']!r}; load it into the optimizer that saved it"
                )
            saved["optimizer"] = name
            for key in ("rule", "granularity"):
                saved.pop(key, None)
            for key, value in mine.items():  # options added since the state was saved
                if key != "params":
                    saved.setdefault(key, value)
            if not mine["optimizer"].startswith("adam-frozen"):
                saved.pop("precondition_steps", None)
                saved.pop("freeze", None)
        kept = [g.get("fused") for g in self.param_groups]
        self._runtime()
        super().load_state_dict(state_dict)
        for group, flag in zip(self.param_groups, kept, strict=True):
            group["fused"] = flag  # how this object runs, not what it learnt
            group["no_decay_roles"] = role_names(owner, group["no_decay_roles"])
        for group, saved in zip(self.param_groups, state_dict["param_groups"], strict=True):
            dropped = LEGACY_STATE_KEYS.get(self._plan(group).entry.name, ())
            for index, p in zip(saved["params"], group["params"], strict=True):
                for key, value in state_dict["state"].get(index, {}).items():
                    if isinstance(value, Tensor) and key not in dropped:
                        device = value.device if key == "step" else p.device
                        self.state[p][key] = value.to(device=device, copy=True)

    def __getstate__(self) -> dict[str, Any]:
        state = super().__getstate__()
        state["state_dtype"] = self.state_dtype
        state["_infos_in_order"] = [
            [self._infos.get(id(p)) for p in g["params"]] for g in self.param_groups
        ]
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        # torch's load_state_dict calls this too, with the loaded state and groups only
        infos = state.pop("_infos_in_order", None)
        if "state_dtype" in state:
            self.state_dtype = state.pop("state_dtype")
        super().__setstate__(state)
        if infos is None:
            return
        self._runtime()
        self._roles = Roles()
        self._infos = {}
        for group, group_infos in zip(self.param_groups, infos, strict=True):
            for p, info in zip(group["params"], group_infos, strict=True):
                if info is not None:
                    self._infos[id(p)] = info

    def state_bytes(self) -> int:
        """Bytes held by this optimizer's state."""
        return state_bytes(self)


def state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes of every tensor in any torch optimizer's ``state`` (nested lists and dicts
    included), a tensor held twice counted once."""

    def walk(value: Any) -> Iterator[Tensor]:
        if isinstance(value, Tensor):
            yield value
        elif isinstance(value, (list, tuple, dict)):
            for v in value.values() if isinstance(value, dict) else value:
                yield from walk(v)

    tensors = {id(t): t for t in walk(list(optimizer.state.values()))}
    return sum(t.numel() * t.element_size() for t in tensors.values())
