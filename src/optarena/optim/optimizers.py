"""The public optimizers: each one a :class:`RuleOptimizer` pinned to a rule and its defaults.

Defaults follow the reference implementation each class replaces (``torch.optim.AdamW``,
``torch.optim.SGD``, ``lion-pytorch``, ``sophia-opt``, ``adam-mini``, ``transformers``'
Adafactor), so each is a drop-in. The studies' settings live in the sweep presets.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from torch import nn

from optarena.optim.base import RuleOptimizer
from optarena.optim.roles import ParamInfo, Role
from optarena.optim.rules import RULES

Params = nn.Module | Iterable[Any]


def pair(betas: Any) -> Any:
    """``betas`` as a tuple when it is a sequence; anything else as given, for the rule's
    check to refuse with its message (``tuple(0.9)`` would raise a bare TypeError first)."""
    return tuple(betas) if isinstance(betas, (tuple, list)) else betas


class AdamW(RuleOptimizer):
    """Adam with decoupled weight decay: elementwise second moment (``torch.optim.AdamW``)."""

    def __init__(
        self,
        params: Params,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
        **options: Any,
    ):
        super().__init__(
            params,
            dict(
                lr=lr, betas=pair(betas), eps=eps, weight_decay=weight_decay, granularity="element"
            ),
            **options,
        )


class Adalayer(RuleOptimizer):
    """Adam with one second-moment scalar per layer (Zhao et al.).

    The study's two corrections are on by default: a fused QKV matrix is three blocks
    (``split_qkv``) and the last layer has one block per output token (``per_row_output``).
    """

    def __init__(
        self,
        params: Params,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        *,
        split_qkv: bool = True,
        per_row_output: bool = True,
        **options: Any,
    ):
        super().__init__(
            params,
            dict(
                lr=lr,
                betas=pair(betas),
                eps=eps,
                weight_decay=weight_decay,
                granularity="layer",
                split_qkv=split_qkv,
                per_row_output=per_row_output,
            ),
            **options,
        )

    def _needs_structure(self) -> bool:
        return True


class AdamMini(RuleOptimizer):
    """Adam-mini (Zhang et al., v1.1.1 partition): one second moment per Hessian block.

    Query/key: per head (key/value heads under GQA); value, attention output, MLP, embedding and
    output: per row; norms and other tensors: one block; biases: elementwise Adam. Norms and
    biases get no weight decay, as in the official code. ``single_block_value`` makes the value
    projection one block (the authors' advice for runs under ~10-20k steps).
    """

    def __init__(
        self,
        params: Params,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        *,
        single_block_value: bool = False,
        no_decay_roles: Iterable[Role | str] = (Role.NORM, Role.BIAS),
        **options: Any,
    ):
        super().__init__(
            params,
            dict(
                lr=lr,
                betas=pair(betas),
                eps=eps,
                weight_decay=weight_decay,
                granularity="adam-mini",
                single_block_value=single_block_value,
            ),
            no_decay_roles=no_decay_roles,
            **options,
        )

    def _needs_structure(self) -> bool:
        return True


class Adafactor(RuleOptimizer):
    """Adafactor as the Deconstructing study runs it: Adam with a factored second moment.

    One EMA per tensor axis of the mean of ``g²`` over the other axes (``V = r cᵀ / mean(r)`` for
    a matrix), bias corrections, constant β2, no update clipping or relative step; ``betas[0] = 0``
    drops the momentum. Its learning rate means what Adam's means. For Shazeer & Stern's
    algorithm use :class:`AdafactorClassic`.
    """

    def __init__(
        self,
        params: Params,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        **options: Any,
    ):
        super().__init__(
            params,
            dict(
                lr=lr,
                betas=pair(betas),
                eps=eps,
                weight_decay=weight_decay,
                granularity="factored",
            ),
            **options,
        )


class AdafactorClassic(RuleOptimizer):
    """Adafactor of Shazeer & Stern (2018), with ``transformers.optimization.Adafactor``'s API.

    ``lr=None`` with ``relative_step=True`` uses the relative step ``min(1e-2, 1/sqrt(t))``.
    """

    default_rule = "adafactor-classic"

    def __init__(
        self,
        params: Params,
        lr: float | None = None,
        eps: tuple[float, float] = (1e-30, 1e-3),
        clip_threshold: float = 1.0,
        decay_rate: float = -0.8,
        beta1: float | None = None,
        weight_decay: float = 0.0,
        scale_parameter: bool = True,
        relative_step: bool = True,
        warmup_init: bool = False,
        **options: Any,
    ):
        super().__init__(
            params,
            dict(
                lr=lr,
                eps=tuple(eps),
                clip_threshold=clip_threshold,
                decay_rate=decay_rate,
                beta1=beta1,
                weight_decay=weight_decay,
                scale_parameter=scale_parameter,
                relative_step=relative_step,
                warmup_init=warmup_init,
            ),
            **options,
        )


class SGD(RuleOptimizer):
    """Heavy-ball SGD as ``torch.optim.SGD`` (``b_1 = g_1``, ``b = μ b + (1-dampening) g``).

    Weight decay is decoupled (``θ *= 1 - lr·λ``) as in the study; pass
    ``decoupled_weight_decay=False`` for torch's coupled decay.
    """

    default_rule = "sgd"

    def __init__(
        self,
        params: Params,
        lr: float = 1e-3,
        momentum: float = 0.0,
        dampening: float = 0.0,
        weight_decay: float = 0.0,
        nesterov: bool = False,
        *,
        decoupled_weight_decay: bool = True,
        **options: Any,
    ):
        super().__init__(
            params,
            dict(
                lr=lr,
                momentum=momentum,
                dampening=dampening,
                weight_decay=weight_decay,
                nesterov=nesterov,
                decoupled_weight_decay=decoupled_weight_decay,
            ),
            **options,
        )


class EMASGD(RuleOptimizer):
    """SGD with bias-corrected EMA momentum, ``θ -= lr · m / (1-β^t)``: the body optimizer of
    the study's "adaptivity only where it matters" hybrids."""

    default_rule = "sgd-ema"

    def __init__(
        self,
        params: Params,
        lr: float = 1e-3,
        momentum: float = 0.9,
        weight_decay: float = 0.0,
        **options: Any,
    ):
        super().__init__(
            params, dict(lr=lr, momentum=momentum, weight_decay=weight_decay), **options
        )


class Lion(RuleOptimizer):
    """Lion (Chen et al., 2023): ``θ -= lr · sign(β1 m + (1-β1) g)``, ``m = β2 m + (1-β2) g``."""

    default_rule = "lion"

    def __init__(
        self,
        params: Params,
        lr: float = 1e-4,
        betas: tuple[float, float] = (0.9, 0.99),
        weight_decay: float = 0.0,
        **options: Any,
    ):
        super().__init__(
            params, dict(lr=lr, betas=pair(betas), weight_decay=weight_decay), **options
        )


class Signum(RuleOptimizer):
    """Signum: the sign of EMA momentum, ``m = β m + (1-β) g``, ``θ -= lr · sign(m)``."""

    default_rule = "signum"

    def __init__(
        self,
        params: Params,
        lr: float = 1e-3,
        momentum: float = 0.9,
        weight_decay: float = 0.0,
        **options: Any,
    ):
        super().__init__(
            params, dict(lr=lr, momentum=momentum, weight_decay=weight_decay), **options
        )


class SophiaG(RuleOptimizer):
    """Sophia with the Gauss-Newton-Bartlett Hessian estimator (``sophia-opt`` API).

    The training loop calls :meth:`update_hessian` every :attr:`hessian_interval` steps after
    back-propagating the loss on labels sampled from the model; ``bs`` is tokens per batch (also
    accepted by ``step(bs=...)``). Before the first estimate the update is ``sign(m)``.
    """

    default_rule = "sophia"

    def __init__(
        self,
        params: Params,
        lr: float = 1e-4,
        betas: tuple[float, float] = (0.965, 0.99),
        rho: float = 0.04,
        weight_decay: float = 0.1,
        *,
        bs: float = 5120,
        hessian_interval: int = 10,
        **options: Any,
    ):
        super().__init__(
            params,
            dict(
                lr=lr,
                betas=pair(betas),
                rho=rho,
                weight_decay=weight_decay,
                bs=bs,
                hessian_interval=hessian_interval,
            ),
            **options,
        )


# --------------------------------------------------------------------------- hybrids

Route = str | tuple[str, Mapping[str, Any]] | Mapping[str, Any]


class Hybrid(RuleOptimizer):
    """Different optimizers on different parameter roles, in one optimizer object.

    ``routes`` maps a role (``"output"``, ``"norm"``, ``"embedding"``, ``"q"``, ...; see
    :class:`~optarena.optim.roles.Role`) or ``"default"`` to an optimizer name from the registry,
    optionally with its own hyperparameters (its own peak ``lr`` included)::

        Hybrid(model, {"default": ("lion", {"lr": 3e-4}), "output": ("adamw", {"lr": 3e-3})})

    Each route becomes one param group (named ``group["route"]``); schedules scale every group's
    own lr. One ``step``, one ``state_dict``. A route keeps its optimizer's weight-decay
    exemptions (an ``"adam-mini"`` route: norms and biases, as ``AdamMini``); ``no_decay_roles``
    in a route's options changes them, ``Hybrid(..., no_decay_roles=...)`` sets them for routes
    whose optimizer has none.
    """

    def __init__(self, params: Params, routes: Mapping[str, Route], **options: Any):
        from optarena.optim.registry import route_group

        if "default" not in routes:
            raise ValueError("Hybrid: routes need a 'default' entry for unrouted parameters")
        roles = {}
        for key in routes:
            if key == "default":
                continue
            try:
                roles[key] = Role(key)
            except ValueError:
                raise ValueError(
                    f"Hybrid: unknown role {key!r} in routes; expected 'default' or one of "
                    + ", ".join(r.value for r in Role)
                ) from None
        self._route_specs = {key: route_group(key, value) for key, value in routes.items()}
        for key, spec in self._route_specs.items():
            # validated here too: a route that no parameter takes never becomes a param group
            RULES[spec["rule"]].validate(spec, f"Hybrid (route {key!r})")
        self._pending_routes = dict(roles)
        first = self._route_specs["default"]
        # the default route's own exemptions stay with its group: the optimizer-wide default
        # (``no_decay_roles=``) is for routes whose optimizer has none
        shared = {k: v for k, v in first.items() if k not in ("params", "no_decay_roles")}
        super().__init__(params, shared, **options)

    def _needs_structure(self) -> bool:
        return True

    def _resolve(self, params: Any, partition: Mapping[str, ParamInfo] | None):
        named, infos = super()._resolve(params, partition)
        roles = set(self._pending_routes.values())
        if not named or not isinstance(named[0], tuple):
            raise TypeError("Hybrid needs a model or named_parameters to find parameter roles")
        by_route: dict[str, list] = {key: [] for key in self._route_specs}
        for name, p in named:
            info = infos.get(name) if infos is not None else None
            key = "default"
            if info is not None:
                # A tied embedding is also the last layer: the output route takes it.
                role = Role.OUTPUT if info.tied and Role.OUTPUT in roles else info.role
                key = next((k for k, r in self._pending_routes.items() if r is role), "default")
            by_route[key].append((name, p))
        groups = [
            {**spec, "params": by_route[key], "route": key}
            for key, spec in self._route_specs.items()
            if by_route[key]
        ]
        return groups, infos


def frozen_routes(
    lr: float,
    betas: tuple[float, float],
    eps: float,
    precondition_steps: int,
    unfrozen_roles: Iterable[str],
) -> dict[str, Route]:
    """Routes of the frozen-preconditioner variant: Adam everywhere, ``v`` averaged over the
    first ``precondition_steps`` steps (no update), then frozen except on ``unfrozen_roles``."""
    common = {"lr": lr, "betas": pair(betas), "eps": eps, "precondition_steps": precondition_steps}
    routes: dict[str, Route] = {
        "default": ("adamw", {**common, "weight_decay": 0.0, "freeze": True})
    }
    for role in unfrozen_roles:
        routes[str(role)] = ("adamw", {**common, "weight_decay": 0.0, "freeze": False})
    return routes


__all__ = [
    "EMASGD",
    "SGD",
    "Adafactor",
    "AdafactorClassic",
    "Adalayer",
    "AdamMini",
    "AdamW",
    "Hybrid",
    "Lion",
    "Signum",
    "SophiaG",
    "frozen_routes",
]
