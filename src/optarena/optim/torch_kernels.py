"""torch's own fused kernels, for the groups whose chain *is* torch's AdamW or SGD.

``adamw`` (elementwise second moment, ``β1 > 0``) is ``torch._fused_adamw_`` and ``sgd`` is
``torch._fused_sgd_``: one vectorised pass over each tensor, on CPU and on CUDA. The math is the
chain's (the parity suite holds the two to each other and to torch's optimizers); tensors the
kernels do not take (DTensor shards, state in another dtype than the parameter, layouts they do
not stride through) take the chain. A user's ``torch.compile`` never traces them: the step runs
outside the user's graphs (``ChainOptimizer.step``).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from optarena.optim.engine import real
from optarena.optim.transforms import hp_value

if TYPE_CHECKING:
    from optarena.optim.optimizer import ChainOptimizer, Plan

_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_DEVICES = ("cpu", "cuda")


def _takes(opt: ChainOptimizer, p: Tensor, state: Mapping[str, Tensor], keys: tuple[str, ...]):
    """Whether the kernel takes ``p`` as it is: a dense tensor whose gradient and state share
    its dtype, device and contiguity."""
    g = p.grad
    r = real(p)
    return (
        type(p) in (Tensor, torch.nn.Parameter)
        and p.device.type in _DEVICES
        and r.dtype in _DTYPES
        and opt._dtype(p) == r.dtype == real(g).dtype
        and p.layout == torch.strided == g.layout
        and p.is_contiguous()
        and g.is_contiguous()
        and all(k in state for k in keys)
    )


def step(
    opt: ChainOptimizer, group: dict[str, Any], hp: Mapping[str, Any], plan: Plan, params: list
) -> list[Tensor]:
    """Update what the kernel can of ``params`` (all with gradients); return the rest."""
    if hp.get("cautious"):  # the mask is not in torch's kernels
        return params
    kind = plan.entry.torch_kernel
    keys = ("exp_avg", "exp_avg_sq") if kind == "adamw" else ()
    if kind == "adamw" and hp.get("amsgrad"):
        keys += ("max_exp_avg_sq",)
    if kind == "sgd" and hp["momentum"]:
        keys = ("momentum_buffer",)
    rest: list[Tensor] = []
    buckets: dict[tuple, list[Tensor]] = {}
    for p in params:
        state = opt.state_for(p, group, plan)
        if not _takes(opt, p, state, keys):
            rest.append(p)
            continue
        decays = opt.param_info(p).role.value not in group["no_decay_roles"]
        buckets.setdefault((p.device, real(p).dtype, decays), []).append(p)
    for (device, _dtype, decays), ps in buckets.items():
        states = [opt.state[p] for p in ps]
        if device.type != "cpu":  # the kernels read their step counts where the tensors are
            for st in states:
                if st["step"].device != device:
                    st["step"] = st["step"].to(device)
        steps = opt._counter.advance(states)
        run = _adamw if kind == "adamw" else _sgd
        run([real(p) for p in ps], [real(p.grad) for p in ps], states, steps, hp, decays)
    return rest


def _adamw(ps, grads, states, steps, hp, decays) -> None:
    torch._fused_adamw_(
        ps,
        grads,
        [real(s["exp_avg"]) for s in states],
        [real(s["exp_avg_sq"]) for s in states],
        [real(s["max_exp_avg_sq"]) for s in states] if hp.get("amsgrad") else [],
        [s["step"] for s in states],
        lr=hp_value(hp, "lr"),
        beta1=hp_value(hp, "betas", 0),
        beta2=hp_value(hp, "betas", 1),
        weight_decay=hp_value(hp, "weight_decay") if decays else 0.0,
        eps=hp_value(hp, "eps"),
        amsgrad=bool(hp.get("amsgrad")),
        maximize=bool(hp["maximize"]),
    )


def _sgd(ps, grads, states, steps, hp, decays) -> None:
    lr, mu, wd = hp_value(hp, "lr"), hp_value(hp, "momentum"), hp_value(hp, "weight_decay")
    coupled = 0.0
    if not decays:
        wd = 0.0
    elif hp["decoupled_weight_decay"]:
        if wd:
            torch._foreach_mul_(ps, 1.0 - lr * wd)
    else:
        coupled = wd
    buffers = [real(s["momentum_buffer"]) for s in states] if mu else []
    # the kernel seeds a buffer with g on a call's first step; the chain's b_1 = μ·0 + 1·g is
    # the same number, so only dampening (b = μ b + (1-d) g afterwards) needs the flag right
    firsts = {t == 1 for t in steps}
    damp = hp_value(hp, "dampening")
    if mu and damp and len(firsts) > 1:
        for first in (True, False):
            idx = [i for i, t in enumerate(steps) if (t == 1) is first]
            pick = [[x[i] for i in idx] for x in (ps, grads, buffers)]
            _fused_sgd(*pick, coupled, mu, lr, damp, hp, first)
        return
    _fused_sgd(ps, grads, buffers, coupled, mu, lr, damp, hp, bool(damp) and firsts == {True})


def _fused_sgd(ps, grads, buffers, coupled, mu, lr, damp, hp, first: bool) -> None:
    torch._fused_sgd_(
        ps,
        grads,
        buffers,
        weight_decay=coupled,
        momentum=mu,
        lr=lr,
        dampening=damp,
        nesterov=bool(hp["nesterov"]),
        maximize=bool(hp["maximize"]),
        is_first_step=first and bool(mu),
    )
