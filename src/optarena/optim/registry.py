"""The registry: every optimizer by name, ``create(name, model, **hyperparams)``, ``available()``.

Names are lowercase with dashes. ``create`` takes torch-style hyperparameter names, so a
Hugging Face ``Trainer(optimizers=(create("adam-mini", model, lr=1e-3), None))`` works as is.
"""

from __future__ import annotations

import difflib
import inspect
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from optarena.optim import optimizers as O
from optarena.optim.roles import Role
from optarena.optim.rules import RULES


@dataclass(frozen=True)
class Entry:
    """One registered optimizer: how to build it and what it is."""

    description: str
    build: Callable[..., torch.optim.Optimizer]
    rule: str | None = None  # the update rule, for routes inside hybrids
    fixed: Mapping[str, Any] = field(default_factory=dict)  # group options the name implies
    family: str = ""


def _hybrid(adaptive: str, roles: tuple[str, ...]) -> Callable[..., torch.optim.Optimizer]:
    """The study's "adaptivity only where it matters" optimizers: EMA-momentum SGD on the body,
    ``adaptive`` (Adalayer or Adafactor) on ``roles``, each with its own peak LR."""

    def build(
        params: Any,
        lr: float = 1.0,
        momentum: float = 0.9,
        adaptive_lr: float = 3.16e-3,
        betas: tuple[float, float] = (0.9, 0.95),
        eps: float = 1e-15,
        weight_decay: float = 0.0,
        **options: Any,
    ) -> torch.optim.Optimizer:
        routes: dict[str, Any] = {
            "default": ("sgd-ema", {"lr": lr, "momentum": momentum, "weight_decay": weight_decay})
        }
        for role in roles:
            routes[role] = (
                adaptive,
                {
                    "lr": adaptive_lr,
                    "betas": O.pair(betas),
                    "eps": eps,
                    "weight_decay": weight_decay,
                },
            )
        return O.Hybrid(params, routes, **options)

    return build


def _frozen(
    params: Any,
    lr: float = 1e-3,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
    precondition_steps: int = 1000,
    unfrozen_roles: Iterable[str] = (),
    **options: Any,
) -> torch.optim.Optimizer:
    return O.Hybrid(
        params, O.frozen_routes(lr, betas, eps, precondition_steps, unfrozen_roles), **options
    )


def _hybrid_custom(
    params: Any, routes: Mapping[str, Any] | None = None, **options: Any
) -> torch.optim.Optimizer:
    if routes is None:
        raise ValueError(
            "hybrid needs routes, which optimizer for which role, e.g. "
            "routes={'default': 'sgd-ema', 'output': ('adamw', {'lr': 3e-3})} "
            "(in a config: [hparams.routes]); or take a registered one: "
            + ", ".join(n for n in REGISTRY if n.startswith("hybrid-"))
        )
    return O.Hybrid(params, routes, **options)


REGISTRY: dict[str, Entry] = {
    "adamw": Entry(
        "Adam with decoupled weight decay (elementwise second moment)",
        O.AdamW,
        "adaptive",
        {"granularity": "element"},
        "adam",
    ),
    "adam-mini": Entry(
        "Adam-mini: one second moment per head / neuron / token block (~half AdamW's state)",
        O.AdamMini,
        "adaptive",
        {"granularity": "adam-mini"},
        "adam",
    ),
    "adalayer": Entry(
        "Adalayer: one second-moment scalar per layer (QKV split, per-row last layer)",
        O.Adalayer,
        "adaptive",
        {"granularity": "layer"},
        "adam",
    ),
    "adafactor": Entry(
        "Adafactor as in the Deconstructing study: Adam with a factored second moment",
        O.Adafactor,
        "adaptive",
        {"granularity": "factored"},
        "adam",
    ),
    "adafactor-classic": Entry(
        "Adafactor of Shazeer & Stern: relative step, update clipping, beta2 schedule",
        O.AdafactorClassic,
        "adafactor-classic",
        {},
        "adam",
    ),
    "sgd": Entry(
        "SGD with heavy-ball momentum (torch.optim.SGD; the study's baseline)",
        O.SGD,
        "sgd",
        {},
        "sgd",
    ),
    "sgd-ema": Entry(
        "SGD with bias-corrected EMA momentum (the hybrids' body optimizer)",
        O.EMASGD,
        "sgd-ema",
        {},
        "sgd",
    ),
    "lion": Entry("Lion: sign of an interpolated momentum", O.Lion, "lion", {}, "sign"),
    "signum": Entry("Signum: sign of EMA momentum", O.Signum, "signum", {}, "sign"),
    "sophia": Entry(
        "Sophia-G: momentum clipped by a Gauss-Newton-Bartlett Hessian estimate",
        O.SophiaG,
        "sophia",
        {},
        "sign",
    ),
    "adam-frozen": Entry(
        "Adam whose second moment is averaged for the first steps, then frozen",
        _frozen,
        None,
        {},
        "adam",
    ),
    "hybrid": Entry(
        "Any mix: routes={role: optimizer name or (name, hyperparameters)}",
        _hybrid_custom,
        None,
        {},
        "hybrid",
    ),
}
for _adaptive in ("adalayer", "adafactor"):
    for _suffix, _roles in (
        ("last-ln", ("output", "norm")),
        ("last", ("output",)),
        ("ln", ("norm",)),
    ):
        _where = {
            "last-ln": "the last layer and LayerNorms",
            "last": "the last layer",
            "ln": "the LayerNorms",
        }[_suffix]
        REGISTRY[f"hybrid-{_adaptive}-{_suffix}"] = Entry(
            f"SGD (EMA momentum) everywhere, {_adaptive.capitalize()} on {_where}",
            _hybrid(_adaptive, _roles),
            None,
            {},
            "hybrid",
        )


def available() -> dict[str, str]:
    """Registry name -> one-line description, in registry order."""
    return {name: entry.description for name, entry in REGISTRY.items()}


def _lookup(name: str) -> Entry:
    key = name.strip().lower().replace("_", "-")
    if key not in REGISTRY:
        close = difflib.get_close_matches(key, REGISTRY, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ValueError(f"unknown optimizer {name!r}{hint}; choose one of: " + ", ".join(REGISTRY))
    return REGISTRY[key]


def create(name: str, model_or_params: Any, **hyperparams: Any) -> torch.optim.Optimizer:
    """Build the optimizer ``name`` for a model (structure-aware roles), ``named_parameters()``
    or param groups, with torch-style hyperparameter names."""
    entry = _lookup(name)
    signature = inspect.signature(entry.build)
    known = [p for p in signature.parameters if p not in ("params", "self", "options")]
    extra = {"partition", "state_dtype", "no_decay_roles", "fused", "fast_eager"}
    unknown = [k for k in hyperparams if k not in known and k not in extra]
    if unknown:
        raise ValueError(
            f"{name}: unknown hyperparameter(s) {', '.join(map(repr, unknown))}; "
            f"valid: {', '.join(known + sorted(extra))}"
        )
    return entry.build(model_or_params, **hyperparams)


def route_group(role: str, route: Any) -> dict[str, Any]:
    """A hybrid route (``"lion"``, ``("adamw", {"lr": 3e-3})`` or ``{"optimizer": ...}``)
    as the param-group options of the rule it names."""
    if isinstance(route, str):
        name, hp = route, {}
    elif isinstance(route, Mapping):
        hp = dict(route)
        if "optimizer" not in hp:
            raise ValueError(f"Hybrid: route {role!r} needs an 'optimizer' key")
        name = hp.pop("optimizer")
    else:
        name, hp = route
        hp = dict(hp)
    entry = _lookup(name)
    if entry.rule is None:
        raise ValueError(f"Hybrid: route {role!r} names {name!r}, which is not a single optimizer")
    # the optimizer's own decay exemptions (Adam-mini: norms and biases) travel with the route
    defaults = {
        k: p.default
        for k, p in inspect.signature(entry.build).parameters.items()
        if p.default is not inspect.Parameter.empty
    }
    valid = list(defaults) + [k for k in RULES[entry.rule].checks if k not in defaults]
    valid += [] if "no_decay_roles" in valid else ["no_decay_roles"]
    unknown = [k for k in hp if k not in valid]
    if unknown:
        raise ValueError(
            f"Hybrid: route {role!r} ({name}) got unknown hyperparameter(s) "
            f"{', '.join(map(repr, unknown))}; valid: {', '.join(valid)}"
        )
    group = {**defaults, **hp, **entry.fixed, "rule": entry.rule}
    for key in ("betas", "eps"):
        if isinstance(group.get(key), list):
            group[key] = tuple(group[key])
    return group


__all__ = ["REGISTRY", "Entry", "Role", "available", "create", "route_group"]
