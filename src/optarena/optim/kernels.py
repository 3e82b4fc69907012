"""torch's own multi-tensor kernels, for the groups where a rule *is* a torch optimizer.

Element-granularity :class:`~optarena.optim.rules.AdaptiveMoment` (no frozen preconditioner,
``β1 > 0``) is torch's AdamW, and :class:`~optarena.optim.rules.HeavyBall` is torch's SGD. For
those groups the eager path hands the plain CPU tensors to ``torch._fused_adamw_`` /
``torch._fused_sgd_``: one vectorised pass over each tensor instead of five kernels, so the
eager path is never slower than the torch optimizer it replaces. The math is the rule's (the
parity tests pin both against torch and each other); everything else (block second moments,
sign updates, low-precision parameters with float32 state, CUDA tensors, whose kernels want
their step counters on the device) takes the rule's own per-tensor path.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from optarena.optim.rules import AdaptiveMoment, HeavyBall, Rule

# Low-precision parameters keep float32 state by default and never qualify; with
# ``state_dtype="param"`` torch's kernels would round differently from the rule, so they do not.
_DTYPES = (torch.float32, torch.float64)


def _plain(p: Tensor, dtype: torch.dtype) -> bool:
    """A tensor torch's CPU kernels take as it is: dense, contiguous, one dtype throughout."""
    g = p.grad
    return (
        type(p) in (Tensor, torch.nn.Parameter)
        and p.device.type == "cpu"
        and p.dtype == dtype == g.dtype
        and p.dtype in _DTYPES
        and p.layout == torch.strided
        and g.layout == torch.strided
        and p.is_contiguous()
        and g.is_contiguous()
    )


def _adamw_group(hp: dict[str, Any]) -> bool:
    return hp["granularity"] == "element" and not hp["precondition_steps"] and hp["betas"][0] > 0


_ACCEPTS = {AdaptiveMoment: _adamw_group, HeavyBall: lambda hp: True}


def step(
    opt: Any, group: dict[str, Any], hp: dict[str, Any], rule: Rule, params: list[Tensor]
) -> list[Tensor]:
    """Update what torch's kernels can of ``params`` (all with gradients); return the rest."""
    accepts = _ACCEPTS.get(type(rule))
    if accepts is None or not accepts(hp):
        return params
    rest: list[Tensor] = []
    buckets: dict[tuple, list[Tensor]] = {}
    for p in params:
        if not _plain(p, opt._dtype(p)):
            rest.append(p)
            continue
        state = opt._state_for(p, group, rule)
        role = opt.param_info(p).role
        decay = 0.0 if role in hp["no_decay_roles"] else hp["weight_decay"]
        # torch's SGD kernel seeds the momentum buffer on a whole call's first step; AdamW's
        # reads each tensor's own step counter. Without dampening, seeding (b = g) and the
        # usual update of the zero buffer (b = μ·0 + g) give the same bits: no need to read
        # the step (a host sync per tensor, ~0.1 ms a step for 75 tensors)
        first = (
            isinstance(rule, HeavyBall) and hp["dampening"] != 0 and int(state["step"].item()) == 0
        )
        buckets.setdefault((p.dtype, decay, first), []).append(p)
    for (_dtype, decay, first), ps in buckets.items():
        states = [opt.state[p] for p in ps]
        opt._step_counts(ps, states).add_one()
        if isinstance(rule, AdaptiveMoment):
            _adamw(ps, states, hp, decay)
        else:
            _sgd(ps, states, hp, decay, first)
    return rest


def _adamw(ps: list[Tensor], states: list[dict], hp: dict[str, Any], decay: float) -> None:
    beta1, beta2 = hp["betas"]
    torch._fused_adamw_(
        ps,
        [p.grad for p in ps],
        [s["exp_avg"] for s in states],
        [s["exp_avg_sq"] for s in states],
        [],
        [s["step"] for s in states],
        lr=float(hp["lr"]),
        beta1=float(beta1),
        beta2=float(beta2),
        weight_decay=float(decay),
        eps=float(hp["eps"]),
        amsgrad=False,
        maximize=False,
    )


def _sgd(ps: list[Tensor], states: list[dict], hp: dict[str, Any], decay: float, first: bool):
    lr, mu = float(hp["lr"]), float(hp["momentum"])
    if hp["decoupled_weight_decay"]:
        if decay:
            torch._foreach_mul_(ps, 1.0 - lr * decay)
        coupled = 0.0
    else:  # torch's SGD: λθ joins the gradient, whatever the role (as ``HeavyBall``)
        coupled = float(hp["weight_decay"])
    torch._fused_sgd_(
        ps,
        [p.grad for p in ps],
        [s["momentum_buffer"] for s in states] if mu else [],
        weight_decay=coupled,
        momentum=mu,
        lr=lr,
        dampening=float(hp["dampening"]),
        nesterov=bool(hp["nesterov"]),
        maximize=False,
        is_first_step=first and bool(mu),
    )
