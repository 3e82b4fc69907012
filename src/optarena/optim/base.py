"""``RuleOptimizer``: the one ``torch.optim.Optimizer`` that drives every update rule.

It owns what every optimizer shares: accepting a model, ``named_parameters`` or param groups;
the structure-aware partition; hyperparameter validation; state in float32 for low-precision
parameters; decoupled weight decay; exact ``state_dict`` round trips; Sophia's Hessian protocol.
The arithmetic of each optimizer lives in its rule (``rules.py``); each param group names its
rule, so one object can run different rules on different parameters (the study's hybrids).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import Tensor, nn
from torch.autograd import profiler as torch_profiler
from torch.optim import optimizer as torch_optimizer

from optarena.optim import kernels
from optarena.optim.fused import FusedStepper, compile_available, should_fuse
from optarena.optim.roles import ParamInfo, Role
from optarena.optim.rules import POSITIVE, RULES, Rule
from optarena.optim.step_counts import CountPool, StepCounts
from optarena.optim.transforms import Ratio

_LOW_PRECISION = (torch.float16, torch.bfloat16)

# torch.optim's per-optimizer flags, so that code written for torch's optimizers runs
# unchanged: each value torch defaults to is accepted (``foreach``, a speed choice, any
# value: here ``fused`` picks the path); a value that changes the update names what to do.
_TORCH_FLAGS: dict[str, tuple[tuple[Any, ...], str]] = {
    "foreach": ((None, True, False), "expected None, True or False (fused= picks the path)"),
    "maximize": ((False,), "minimise the negated objective instead (loss = -objective)"),
    "capturable": ((False,), "leave it False (no CUDA-graph capture of the step)"),
    "differentiable": ((False,), "leave it False (the step is not differentiable)"),
    "amsgrad": ((False,), "AMSGrad is not among the studied optimizers: use torch.optim.AdamW"),
}


def _check_torch_flags(owner: str, flags: Mapping[str, Any]) -> None:
    """Accept torch.optim's flags at values that leave the update unchanged; reject the rest
    with what to do instead."""
    for name, value in flags.items():
        if name not in _TORCH_FLAGS:
            raise TypeError(f"{owner}() got an unexpected keyword argument {name!r}")
        allowed, fix = _TORCH_FLAGS[name]
        if not any(value is a for a in allowed):
            raise ValueError(f"{owner}: {name}={value!r} is not supported; {fix}")


def _role_names(owner: str, roles: Any) -> tuple[str, ...]:
    """``no_decay_roles`` as a tuple of role names (what a param group stores: plain strings
    survive ``state_dict`` and JSON); an unknown role is a ValueError listing the known ones."""
    if isinstance(roles, (str, Role)):
        roles = (roles,)
    try:
        return tuple(dict.fromkeys(Role(r).value for r in roles))  # in order, once each
    except (TypeError, ValueError):
        raise ValueError(
            f"{owner}: invalid no_decay_roles={roles!r}; expected role names from "
            + ", ".join(r.value for r in Role)
        ) from None


def _torch_wrapper_idle(opt: torch.optim.Optimizer) -> bool:
    """Whether torch's step wrapper (step hooks, a profiler range) has nothing to do: no hook
    registered and no profiler recording. Unknown torch internals count as work."""
    return not (
        getattr(torch_profiler, "_is_profiler_enabled", True)
        or getattr(torch_optimizer, "_global_optimizer_pre_hooks", True)
        or getattr(torch_optimizer, "_global_optimizer_post_hooks", True)
        or getattr(opt, "_optimizer_step_pre_hooks", True)
        or getattr(opt, "_optimizer_step_post_hooks", True)
    )


def _is_named(items: list) -> bool:
    return bool(items) and isinstance(items[0], tuple) and isinstance(items[0][0], str)


def _named_pairs(params: list) -> list[tuple[str, Tensor]]:
    """All ``(name, param)`` pairs in a list of named params or named param groups."""
    if _is_named(params):
        return params
    pairs: list[tuple[str, Tensor]] = []
    for item in params:
        if isinstance(item, dict):
            group_params = list(item["params"])
            item["params"] = group_params
            if _is_named(group_params):
                pairs.extend(group_params)
    return pairs


class RuleOptimizer(torch.optim.Optimizer):
    """Base class of every optarena optimizer.

    Args:
        params: an ``nn.Module`` (its structure gives each parameter a role), an iterable of
            ``(name, param)`` pairs (roles from names), plain parameters, or param groups. A
            group may name its update ``rule`` (see ``optarena.optim.rules.RULES``).
        defaults: hyperparameters for groups that do not set them.
        partition: explicit roles, ``{name: ParamInfo}`` (e.g. from
            :func:`optarena.optim.partition.partition` with overrides).
        state_dtype: dtype of the optimizer state. ``None``: float32 for float16/bfloat16
            parameters (their updates are computed in float32 and rounded once), the
            parameter's own dtype otherwise; ``"param"``: always the parameter's dtype.
        no_decay_roles: roles exempt from weight decay (e.g. norms and biases): the default
            of every param group, which may set its own ``no_decay_roles`` (a Hybrid route
            takes its optimizer's, e.g. Adam-mini's norms and biases).
        fast_eager: on the eager path, run AdamW and SGD groups through torch's fused kernels
            (:mod:`optarena.optim.kernels`) and apply block-preconditioned updates with one
            ``addcdiv_``. ``False``: the rules' plain per-tensor arithmetic, which is what the
            FSDP2 per-shard path computes: a one-process run then reproduces a sharded one
            bitwise (the default differs from it by float32 rounding).
        fused: the fast path (:mod:`optarena.optim.fused`), stored per group like torch's flag:
            ``True`` compiles each group's step into fused kernels, ``False`` runs the eager
            per-tensor loop, ``None`` decides per group (see
            :func:`optarena.optim.fused.should_fuse`: on CUDA, or on CPU for large groups,
            when ``torch.compile`` works; ``OPTARENA_FUSED=0/1`` overrides). Both paths
            compute the same update; AdamW and SGD groups of plain CPU tensors run torch's
            fused kernels on either path (:mod:`optarena.optim.kernels`).
        **torch_flags: torch.optim's ``foreach``, ``maximize``, ``capturable``,
            ``differentiable`` and ``amsgrad``, accepted at torch's defaults (``foreach`` at any
            value: ``fused`` chooses the path) so that code written for torch runs unchanged.
    """

    default_rule = "adaptive"

    def __init__(
        self,
        params: nn.Module | Iterable[Any],
        defaults: dict[str, Any],
        *,
        partition: Mapping[str, ParamInfo] | None = None,
        state_dtype: torch.dtype | str | None = None,
        no_decay_roles: Iterable[Role | str] = (),
        fused: bool | None = None,
        fast_eager: bool = True,
        **torch_flags: Any,
    ):
        _check_torch_flags(type(self).__name__, torch_flags)
        if not isinstance(fast_eager, bool):
            raise ValueError(
                f"{type(self).__name__}: invalid fast_eager={fast_eager!r}; expected True or False"
            )
        self.fast_eager = fast_eager
        if fused not in (None, True, False):
            raise ValueError(
                f"{type(self).__name__}: invalid fused={fused!r}; expected None, True or False"
            )
        if state_dtype not in (None, "param") and not isinstance(state_dtype, torch.dtype):
            raise ValueError(
                f"{type(self).__name__}: invalid state_dtype={state_dtype!r}; "
                "expected None, 'param' or a torch.dtype"
            )
        self.state_dtype = state_dtype
        exempt = _role_names(type(self).__name__, no_decay_roles)
        params, infos = self._resolve(params, partition)
        defaults = {
            "rule": self.default_rule,
            "weight_decay": 0.0,
            "fused": fused,
            "no_decay_roles": exempt,
            **defaults,
        }
        rule = RULES.get(defaults["rule"])
        if rule is None:
            raise ValueError(f"{type(self).__name__}: unknown rule {defaults['rule']!r}")
        defaults = {**rule.defaults, **defaults}
        self._infos: dict[int, ParamInfo] = {}
        self._sharded: bool | None = None  # any DTensor parameter (FSDP2); found on first step
        self._fused: FusedStepper | None = None
        self._counts: dict[tuple[int, ...], StepCounts] = {}  # torch's kernels' buckets
        self._count_pool = CountPool()  # every bucket's step counts, a slot per state
        self._order: tuple[tuple, list[dict[str, Any]]] = ((), [])  # _groups_small_first
        super().__init__(params, defaults)
        self._index_infos(infos)
        self._is_sharded()  # refuses FSDP1 / ZeRO flattened shards now, not at the first step

    # ----------------------------------------------------------------- construction

    def _resolve(
        self, params: Any, partition: Mapping[str, ParamInfo] | None
    ) -> tuple[list, Mapping[str, ParamInfo] | None]:
        """Materialise ``params`` and find each parameter's role."""
        if isinstance(params, nn.Module):
            from optarena.optim.partition import partition as partition_model

            found = partition_model(params)
            named = [(n, p) for n, p in found.params.items() if p.requires_grad]
            return named, partition or found
        if isinstance(params, Tensor):
            raise TypeError(
                f"{type(self).__name__}: params must be an iterable of Tensors, named "
                "parameters or param groups, or a model; got a single Tensor"
            )
        params = list(params)
        pairs = _named_pairs(params)
        if partition is None and pairs and self._needs_structure():
            from optarena.optim.partition import partition as partition_named

            partition = partition_named(pairs)
        return params, partition

    def _needs_structure(self) -> bool:
        return False

    def _index_infos(self, partition: Mapping[str, ParamInfo] | None) -> None:
        count = 0
        for group in self.param_groups:
            names = group.get("param_names", [None] * len(group["params"]))
            for p, name in zip(group["params"], names, strict=True):
                info = partition.get(name) if partition is not None and name else None
                if info is None:
                    info = ParamInfo(
                        name or f"param{count}", tuple(p.shape), Role.OTHER, source="none"
                    )
                self._infos[id(p)] = info
                count += 1

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        rule_name = param_group.setdefault("rule", self.defaults.get("rule", self.default_rule))
        rule = RULES.get(rule_name)
        if rule is None:
            raise ValueError(
                f"{type(self).__name__}: unknown rule {rule_name!r}; expected one of "
                + ", ".join(sorted(RULES))
            )
        if rule_name != self.defaults.get("rule"):
            for key, value in rule.defaults.items():
                param_group.setdefault(key, value)
        super().add_param_group(param_group)
        self._sharded = None
        group = self.param_groups[-1]
        rule.validate(group, type(self).__name__)
        group["no_decay_roles"] = _role_names(type(self).__name__, group["no_decay_roles"])
        if group.get("fused") not in (None, True, False):
            raise ValueError(
                f"{type(self).__name__}: invalid fused={group['fused']!r}; "
                "expected None, True or False"
            )
        if group.get("fused") and not rule.fusable:
            raise ValueError(
                f"{type(self).__name__}: rule {rule_name!r} has no fused path; "
                "use fused=False or fused=None"
            )
        for p in group["params"]:
            self._infos.setdefault(
                id(p),
                ParamInfo(f"param{len(self._infos)}", tuple(p.shape), Role.OTHER, source="none"),
            )

    # ----------------------------------------------------------------- introspection

    def param_info(self, p: Tensor) -> ParamInfo:
        """The role and structure this optimizer uses for ``p``."""
        return self._infos[id(p)]

    def rule_of(self, group: dict[str, Any]) -> Rule:
        return RULES[group["rule"]]

    def _dtype(self, p: Tensor) -> torch.dtype:
        if isinstance(self.state_dtype, torch.dtype):
            return self.state_dtype
        if self.state_dtype is None and p.dtype in _LOW_PRECISION:
            return torch.float32
        return p.dtype

    @property
    def hessian_interval(self) -> int | None:
        """Steps between Hessian estimates (Sophia), or ``None`` if no rule uses them."""
        intervals = [
            g["hessian_interval"] for g in self.param_groups if self.rule_of(g).needs_hessian
        ]
        return min(intervals) if intervals else None

    # ----------------------------------------------------------------- stepping

    def _state_for(self, p: Tensor, group: dict[str, Any], rule: Rule) -> dict[str, Any]:
        state = self.state[p]
        if not state:
            state["step"] = torch.tensor(0.0, dtype=torch.float32)
            state.update(rule.init(p, self._infos[id(p)], group, self._dtype(p)))
        return state

    def step(self, closure=None, bs: float | None = None):  # type: ignore[override]
        """One update of every parameter with a gradient.

        ``bs`` (tokens per batch) overrides Sophia's ``bs`` for this step, as the reference
        implementation's ``step(bs=...)`` does. Step hooks and profiler ranges work as in torch
        (its own wrapper runs them); without either, the wrapper is skipped: after the step's
        memory traffic its code is out of the caches, 0.2 ms a step on the benchmark model.
        """
        if not _torch_wrapper_idle(self):
            args = () if closure is None else (closure,)
            return self._hooked_step(*args, **({} if bs is None else {"bs": bs}))
        loss = self._step(closure, bs)
        self._optimizer_step_code()  # where torch's profiler looks for optimizers
        return loss

    step.hooked = True  # type: ignore[attr-defined]  # torch's __init__ leaves it unwrapped

    @torch.no_grad()
    def _step(self, closure=None, bs: float | None = None):
        if bs is not None and not POSITIVE.test(bs):
            raise ValueError(
                f"{type(self).__name__}: invalid bs={bs!r}; expected {POSITIVE.expected}"
            )
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if self._is_sharded():
            from optarena.optim import sharding

            sharding.step(self, bs)
            return loss
        for group in self._groups_small_first():
            rule = self.rule_of(group)
            hp = group if bs is None or "bs" not in group else {**group, "bs": bs}
            params = [p for p in group["params"] if p.grad is not None]
            if any(p.grad.is_sparse for p in params):
                raise RuntimeError(f"{type(self).__name__} does not support sparse gradients")
            if params and self.fast_eager:  # torch's own kernel, where it is this rule
                params = kernels.step(self, group, hp, rule, params)
            if params and self._fuse(group, rule, params):
                if self._fused is None:
                    self._fused = FusedStepper(self)
                params = self._fused.step_group(group, hp, rule, params, group["fused"] is True)
            for p in params:
                state = self._state_for(p, group, rule)
                state["step"] += 1
                step = int(state["step"].item())
                dtype = self._dtype(p)
                g = p.grad if p.grad.dtype == dtype else p.grad.to(dtype)
                info = self._infos[id(p)]
                u, size = rule.direction(g, p, state, hp, step, info)
                if u is None:
                    continue
                decay = 0.0 if info.role in hp["no_decay_roles"] else hp["weight_decay"]
                decay *= rule.decay_lr(p, state, hp)
                self._apply(p, u, size, decay, dtype)
        return loss

    _hooked_step = torch.optim.Optimizer.profile_hook_step(_step)

    def _groups_small_first(self) -> list[dict[str, Any]]:
        """The param groups, fewest elements first. Groups share no parameter, so the order
        changes no result; but a group stepped after a larger one's memory traffic finds its
        host objects out of the caches (a hybrid's 17 LayerNorm vectors: ~0.3 ms)."""
        groups = self.param_groups
        if len(groups) == 1:
            return groups
        key = tuple((id(g), len(g["params"])) for g in groups)
        if key != self._order[0]:
            sizes = [sum(p.numel() for p in g["params"]) for g in groups]
            order = sorted(range(len(groups)), key=sizes.__getitem__)
            self._order = (key, [groups[i] for i in order])
        return self._order[1]

    def _step_counts(self, params: list[Tensor], states: list[dict[str, Any]]) -> StepCounts:
        """The step counts of a bucket of torch's kernels (``kernels.py``), kept in one tensor
        for as long as the bucket stays the same."""
        key = tuple(map(id, params))
        counts = self._counts.get(key)
        if counts is None or not counts.held_by(states):
            if len(self._counts) > 64:  # buckets that come and go (first steps, decay changes)
                self._counts.clear()
            counts = self._counts[key] = StepCounts(states, self._count_pool)
        return counts

    def _is_sharded(self) -> bool:
        """Whether parameters are FSDP2 DTensors: then ``optarena.optim.sharding`` steps them."""
        if self._sharded is None:
            from optarena.optim.sharding import has_dtensors

            self._sharded = has_dtensors(p for g in self.param_groups for p in g["params"])
        return self._sharded

    def _fuse(self, group: dict[str, Any], rule: Rule, params: list[Tensor]) -> bool:
        """Whether this group's step takes the fast path (``group["fused"]``, resolved)."""
        fused = group.get("fused")
        if fused is False or not rule.fusable:
            return False
        device = params[0].device
        if fused and not compile_available(device):
            raise RuntimeError(
                f"{type(self).__name__}: fused=True needs torch.compile for {device.type} "
                "(a C++ compiler on CPU, triton on CUDA); use fused=None or False"
            )
        numel = sum(p.numel() for p in params) if fused is None else 0  # only None reads it
        return should_fuse(fused, device, numel)

    def _apply(
        self, p: Tensor, u: Tensor | Ratio, size: float, decay: float, dtype: torch.dtype
    ) -> None:
        """``θ ← θ·(1 - decay) - size·u``, rounded once into a low-precision parameter."""
        target = p if p.dtype == dtype else p.to(dtype)
        if decay:
            target.mul_(1.0 - decay)
        if isinstance(u, Ratio):
            if self.fast_eager and target.is_contiguous():
                target.view(u.num.shape).addcdiv_(u.num, u.den, value=-size)
            else:
                target.add_((u.num / u.den).reshape(target.shape), alpha=-size)
        else:
            target.add_(u, alpha=-size)
        if target is not p:
            p.copy_(target)

    @torch.no_grad()
    def update_hessian(self) -> None:
        """Fold the gradients now in ``.grad`` into Sophia's Hessian EMA.

        The training loop calls this every :attr:`hessian_interval` steps after back-propagating
        the loss on labels sampled from the model's own output distribution (the
        Gauss-Newton-Bartlett estimator). Groups whose rule needs no Hessian are untouched.
        """
        for group in self.param_groups:
            rule = self.rule_of(group)
            if not rule.needs_hessian:
                continue
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self._state_for(p, group, rule)
                dtype = self._dtype(p)
                if self._is_sharded():  # elementwise: the local shards are all it needs
                    from optarena.optim.sharding import local, state_view

                    rule.update_hessian(local(p.grad).to(dtype), state_view(state, None), group)
                else:
                    rule.update_hessian(p.grad.to(dtype), state, group)

    # ----------------------------------------------------------------- checkpoints

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """torch's ``load_state_dict``, keeping each state tensor's saved dtype.

        torch casts floating state to the parameter's dtype, which would round float32 state
        of bfloat16 parameters; here the saved dtype is kept and only the device follows.
        Every tensor is copied, ``step`` included (torch keeps the saved ``step`` object, so
        two optimizers loaded from one live ``state_dict`` would count each other's steps).
        """
        fused = [g.get("fused") for g in self.param_groups]
        exempt = [g["no_decay_roles"] for g in self.param_groups]
        self._fused = None  # its plans hold references to the state tensors being replaced
        self._counts = {}
        self._count_pool = CountPool()
        super().load_state_dict(state_dict)
        # ``fused`` says how this object runs, not what it learnt: keep the receiver's choice
        for group, flag, kept in zip(self.param_groups, fused, exempt, strict=True):
            group["fused"] = flag
            group.setdefault("no_decay_roles", kept)  # saved before groups carried it
        # saved keys are indices (torch) or parameter names (torch.distributed.checkpoint's
        # get/set_state_dict): like torch, match them to parameters by their group order
        saved_keys = [k for g in state_dict["param_groups"] for k in g["params"]]
        current = [p for g in self.param_groups for p in g["params"]]
        params = dict(zip(saved_keys, current, strict=True))  # torch checked the lengths
        for index, saved in state_dict["state"].items():
            p = params[index]
            for key, value in saved.items():
                if isinstance(value, Tensor):
                    # ``step`` stays where it was saved (a CPU scalar, as ``_state_for`` makes it)
                    device = value.device if key == "step" else p.device
                    self.state[p][key] = value.to(device=device, copy=True)

    def state_bytes(self) -> int:
        """Bytes held by this optimizer's state."""
        return state_bytes(self)


def state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes of every tensor in any torch optimizer's ``state`` (lists of tensors included)."""
    total = 0
    for state in optimizer.state.values():
        for value in state.values():
            for t in value if isinstance(value, (list, tuple)) else [value]:
                if isinstance(t, Tensor):
                    total += t.numel() * t.element_size()
    return total
