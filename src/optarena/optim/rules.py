"""Update rules: each optimizer's per-tensor step, composed from ``transforms``.

A rule turns a gradient into a direction ``u`` and a step size, and the driver
(:class:`~optarena.optim.base.RuleOptimizer`) applies ``θ ← θ·(1 - lr·λ) - step·u``. Rules are
stateless objects; every number they keep lives in the optimizer's ``state`` so that
``state_dict`` round trips are exact. One optimizer object may route different parameter groups
to different rules (the study's hybrids).

The Adam family is one rule, :class:`AdaptiveMoment`, with the granularity of its second moment as
a group option: ``element`` (Adam), ``layer`` (Adalayer), ``adam-mini`` (Adam-mini),
``factored`` (Adafactor, the study's variant).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import torch
from torch import Tensor

from optarena.optim import block_adam, blocks, classic_adafactor, factored_adam, numba_support
from optarena.optim.roles import ParamInfo
from optarena.optim.sharding import shard_of
from optarena.optim.transforms import (
    BlockSecondMoment,
    FactoredSecondMoment,
    SecondMoment,
    bias_correction,
    clip_by_rms_,
    clipped_ratio,
    ema_,
    heavy_ball_,
    mean_over,
    rms,
)

# --------------------------------------------------------------------------- validation


@dataclass(frozen=True)
class Check:
    """A hyperparameter's valid range, and the sentence that explains it."""

    test: Callable[[Any], bool]
    expected: str


def _num(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


NONNEG = Check(lambda x: _num(x) and x >= 0, "a finite number >= 0")
POSITIVE = Check(lambda x: _num(x) and x > 0, "a finite number > 0")
UNIT = Check(lambda x: _num(x) and 0 <= x < 1, "a number in [0, 1)")
BETAS = Check(
    lambda x: isinstance(x, (tuple, list)) and len(x) == 2 and all(UNIT.test(b) for b in x),
    "a pair (beta1, beta2) with each in [0, 1)",
)
BOOL = Check(lambda x: isinstance(x, bool), "True or False")
POS_INT = Check(lambda x: isinstance(x, int) and not isinstance(x, bool) and x > 0, "an int > 0")
NONNEG_INT = Check(
    lambda x: isinstance(x, int) and not isinstance(x, bool) and x >= 0, "an int >= 0"
)


def one_of(*values: str) -> Check:
    return Check(lambda x: x in values, "one of " + ", ".join(repr(v) for v in values))


# --------------------------------------------------------------------------- the rule protocol


class Rule:
    """One update rule. Subclasses set ``name``, ``defaults`` and ``checks``."""

    name: str = ""
    defaults: dict[str, Any] = {}
    checks: dict[str, Check] = {}
    needs_hessian: bool = False

    def validate(self, group: dict[str, Any], owner: str) -> None:
        for key, check in self.checks.items():
            if key in group and not check.test(group[key]):
                raise ValueError(
                    f"{owner}: invalid {key}={group[key]!r}; expected {check.expected}"
                )

    def init(self, p: Tensor, info: ParamInfo, group: dict, dtype: torch.dtype) -> dict:
        """The state entries of a new parameter (``step`` is added by the driver)."""
        return {}

    def direction(
        self, g: Tensor, p: Tensor, state: dict, group: dict, step: int, info: ParamInfo
    ) -> tuple[Tensor | None, float]:
        """``(u, step_size)``; ``u = None`` means no update this step."""
        raise NotImplementedError

    def decay_lr(self, p: Tensor, state: dict, group: dict) -> float:
        """The learning rate that scales decoupled weight decay (``θ *= 1 - lr·λ``). The fast
        path asks once per bucket: a fusable rule's may depend on the group only."""
        return group["lr"]

    def shard_stats(
        self, g: Tensor, p: Tensor, state: dict, group: dict, step: int, info: ParamInfo
    ) -> None:
        """On a sharded parameter (``g``, ``p``: this rank's rows), ask ``shard_of(state)`` for
        the partial sums of every statistic that spans rows; they are all-reduced, for all
        parameters at once, before :meth:`direction` runs. Elementwise rules need none."""

    # ------------------------------------------------------------- fast path (``fused.py``)
    # The same math as :meth:`direction`, written so that ``torch.compile(fullgraph=True)`` can
    # trace it: everything that changes from step to step (lr, bias corrections, first-step and
    # phase flags) arrives as 0-d tensors in ``sc``, computed on the host by
    # :meth:`fused_scalars`, so a new LR or step never recompiles.

    fusable: bool = False
    # fused_direction applies the weight decay itself (its scale depends on the step's own data);
    # the driver's ``keep`` is then ``1 - λ`` for it to read
    decay_in_direction: bool = False
    read_only_state: tuple[str, ...] = ()  # state the step reads but never writes (bytes model)
    host_options: tuple[str, ...] = ("lr",)  # group options read by ``fused_scalars`` only

    def fused_context(self, info: ParamInfo, group: dict) -> Any:
        """Per-parameter structure the traced step needs (e.g. the block layout); hashable."""
        return None

    def fused_scalars(self, group: dict, step: int) -> dict[str, float]:
        """The step-dependent numbers of one parameter's update, on the host (float64)."""
        return {"size": group["lr"]}

    def fused_direction(
        self, g: Tensor, p: Tensor, state: dict, group: dict, sc: dict, ctx: Any
    ) -> tuple[Tensor, Tensor]:
        """``(u, step_size)`` as :meth:`direction`, traceable; ``sc`` holds 0-d tensors.

        An ``"apply"`` scalar of 0 in ``sc`` means: leave the parameter unchanged this step.
        """
        raise NotImplementedError

    def fused_phases(self, group: dict) -> int:
        """2: the fast path first runs :meth:`fused_prepare` over the bucket in a graph of its
        own and hands each parameter's result to :meth:`fused_direction` (small statistics that
        would otherwise be recomputed for every entry of the update)."""
        return 1

    def kernel_picks(self, p: Tensor, g: Tensor, state: dict, group: dict, ctx: Any) -> bool:
        """Whether :meth:`kernel_plan`'s call updates this tensor on the fast path (decided when
        the fast path plans a bucket); the compiled function updates the others."""
        return False

    def kernel_plan(
        self, params: list[Tensor], states: list[dict], group: dict, ctxs: list[Any]
    ) -> KernelCall:
        """The kernel call for the tensors :meth:`kernel_picks` took, prepared when the fast
        path plans a bucket and made every step."""
        raise NotImplementedError

    def fused_prepare(
        self, g: Tensor, p: Tensor, state: dict, group: dict, sc: dict, ctx: Any
    ) -> Any:
        """What :meth:`fused_direction` receives as ``prepared``; None: nothing, and nothing
        done (the tensor is then updated unprepared)."""
        raise NotImplementedError


COMMON_CHECKS = {"lr": NONNEG, "weight_decay": NONNEG}


# --------------------------------------------------------------------------- Adam family


GRANULARITIES = ("element", "layer", "adam-mini", "factored")


def second_moment_for(info: ParamInfo, group: dict) -> SecondMoment:
    """The second moment a group's ``granularity`` gives one parameter."""
    return _second_moment(
        info,
        group["granularity"],
        group.get("split_qkv", True),
        group.get("per_row_output", True),
        group.get("single_block_value", False),
    )


@functools.lru_cache(maxsize=4096)
def _second_moment(
    info: ParamInfo,
    granularity: str,
    split_qkv: bool,
    per_row_output: bool,
    single_block_value: bool,
) -> SecondMoment:
    if granularity == "element":
        return BlockSecondMoment(blocks.element_layout())
    if granularity == "factored":
        return FactoredSecondMoment()
    if granularity == "layer":
        return BlockSecondMoment(blocks.adalayer_layout(info, split_qkv, per_row_output))
    if granularity == "adam-mini":
        return BlockSecondMoment(blocks.adam_mini_layout(info, single_block_value))
    raise ValueError(f"unknown granularity {granularity!r}; expected one of {GRANULARITIES}")


class AdaptiveMoment(Rule):
    """Adam at any block granularity: EMA momentum, block second moment, both bias-corrected.

    ``m = β1 m + (1-β1) g``; ``v_b = β2 v_b + (1-β2) mean_b(g²)``;
    ``u = (m / (1-β1^t)) / (sqrt(v / (1-β2^t)) + ε)``. With ``β1 = 0`` no momentum is stored.

    ``precondition_steps = K > 0`` gives the study's frozen preconditioner: for the first ``K``
    steps ``v`` is the uniform mean of the block statistic and nothing is updated; afterwards
    ``v`` stays fixed when ``freeze`` is true (no bias correction: a uniform mean is unbiased).
    """

    name = "adaptive"
    defaults = {
        "betas": (0.9, 0.999),
        "eps": 1e-8,
        "granularity": "element",
        "precondition_steps": 0,
        "freeze": True,
    }
    checks = {
        **COMMON_CHECKS,
        "betas": BETAS,
        "eps": NONNEG,
        "granularity": one_of(*GRANULARITIES),
        "precondition_steps": NONNEG_INT,
        "freeze": BOOL,
        "split_qkv": BOOL,
        "per_row_output": BOOL,
        "single_block_value": BOOL,
    }

    def init(self, p, info, group, dtype):
        state = second_moment_for(info, group).init(p, dtype)
        if group["betas"][0] > 0:
            state["exp_avg"] = torch.zeros_like(p, dtype=dtype)
        return state

    def shard_stats(self, g, p, state, group, step, info):
        second_moment_for(info, group).shard_stats(g, shard_of(state))

    def direction(self, g, p, state, group, step, info):
        beta1, beta2 = group["betas"]
        moment = second_moment_for(info, group)
        k = group["precondition_steps"]
        m = ema_(state["exp_avg"], g, beta1) if beta1 > 0 else g
        if k and step <= k:
            moment.average_(state, g, step)
            return None, 0.0
        if (k and not group["freeze"]) or not k:
            moment.update_(state, g, beta2)
        bc2 = 1.0 if k else bias_correction(beta2, step)
        u = moment.precondition(m, state, bc2, group["eps"], lazy=True)
        return u, group["lr"] / bias_correction(beta1, step)

    fusable = True

    def fused_context(self, info, group):
        return second_moment_for(info, group)

    def fused_scalars(self, group, step):
        beta1, beta2 = group["betas"]
        k = group["precondition_steps"]
        size = group["lr"] / bias_correction(beta1, step)
        bc2 = 1.0 if k else bias_correction(beta2, step)
        root = math.sqrt(bc2)
        sc = {
            "size": size,
            "bc2": bc2,
            # m / (sqrt(v / bc2) + ε) = √bc2 · m / (√v + ε√bc2): with the bias correction in
            # the step size and ε (host scalars), each denominator in the update loop is one
            # sqrt and one add (for block moments that work repeats for every vector of a
            # row: 1 ms of Adam-mini's 17 on the Llama shape)
            "folded_size": size * root,
            "folded_eps": group["eps"] * root,
        }
        if k:
            averaging = step <= k
            sc["apply"] = float(not averaging)
            sc["averaging"] = float(averaging)
            sc["update_v"] = float(not averaging and not group["freeze"])
            sc["inv_count"] = 1.0 / step
        return sc

    def fused_phases(self, group):
        return 2 if group["granularity"] == "factored" and not group["precondition_steps"] else 1

    # On CPU each matrix's whole update is one kernel, where inductor would read g twice (from
    # memory for Adalayer's and Adafactor's whole-tensor statistics, from cache for Adam-mini's
    # rows and heads, after a separate reduction loop): block moments whose blocks are runs of
    # rows (block_adam.py), factored ones (factored_adam.py)

    def kernel_picks(self, p, g, state, group, ctx):
        if group["precondition_steps"] or group["granularity"] == "element":
            return False
        if group["granularity"] == "factored" and p.dim() == 2:
            return _factored(p, g, state)
        return group["betas"][0] > 0 and _row_blocks(p, g, state, ctx) is not None

    def kernel_plan(self, params, states, group, ctxs):
        return _AdaptiveKernels(params, states, group, ctxs)

    def fused_prepare(self, g, p, state, group, sc, ctx):
        # Adafactor: the factors and the roots of V in a graph of their own, so that the update
        # pass reads one root per row and column instead of recomputing them for every entry
        if g.dim() < 2:
            return None  # one root for the whole tensor: nothing to share
        ctx.update_(state, g, group["betas"][1])
        return ctx.roots(state, g.dim(), sc["bc2"])

    def fused_direction(self, g, p, state, group, sc, ctx, prepared=None):
        beta1, beta2 = group["betas"]
        m = ema_(state["exp_avg"], g, beta1) if beta1 > 0 else g
        if prepared is not None:
            return ctx.precondition_by_roots(m, prepared, group["eps"]), sc["size"]
        if group["precondition_steps"]:
            # every phase of the frozen preconditioner, selected by flags instead of branches
            before = {key: v.clone() for key, v in state.items() if key.startswith("exp_avg_sq")}
            averaged = {key: v.clone() for key, v in before.items()}
            ctx.average_weighted_(averaged, g, sc["inv_count"])
            updated = {key: v.clone() for key, v in before.items()}
            ctx.update_(updated, g, beta2)
            for key, v in before.items():
                new = torch.where(sc["update_v"] > 0, updated[key], v)
                state[key].copy_(torch.where(sc["averaging"] > 0, averaged[key], new))
        else:
            ctx.update_(state, g, beta2)
        return ctx.precondition(m, state, 1.0, sc["folded_eps"]), sc["folded_size"]


def _factored(p: Tensor, g: Tensor, state: dict) -> bool:
    """Whether ``factored_adam``'s kernel can make this parameter's whole update."""
    rows, cols = state.get("exp_avg_sq_0"), state.get("exp_avg_sq_1")
    if rows is None or cols is None:
        return False
    return factored_adam.applies(p, g, state.get("exp_avg"), rows, cols)


def _blocks_of(p: Tensor, ctx: Any) -> tuple[int, ...] | None:
    """A parameter's blocks as ``block_adam`` takes them: a factored moment keeps one value
    for a vector (one block), a block moment has its layout."""
    if isinstance(ctx, FactoredSecondMoment):
        return block_adam.VECTOR if p.dim() == 1 else None
    return block_adam.row_blocks(ctx.layout, tuple(p.shape))


def _row_blocks(p: Tensor, g: Tensor, state: dict, ctx: Any) -> tuple[int, ...] | None:
    """The blocks ``block_adam``'s kernel takes for this parameter, or None where it cannot."""
    rows = _blocks_of(p, ctx)
    m, v = state.get("exp_avg"), state.get("exp_avg_sq")
    if m is None or v is None or not block_adam.applies(p, g, m, v, rows):
        return None
    return rows


class KernelCall(Protocol):
    """A bucket's kernel call (:meth:`Rule.kernel_plan`), made every step."""

    def __call__(
        self, grads: list[Tensor], scalars: np.ndarray, names: tuple[str, ...]
    ) -> list[bool]:
        """Update the tensors (parameter and state, in place); ``scalars``: each tensor's host
        scalars (float64, columns ``names``). False where a tensor no longer qualifies (a
        gradient that is not contiguous, ``p.data`` replaced): it then takes the eager path."""
        ...


class _AdaptiveKernels:
    """AdaptiveMoment's kernel tensors of one bucket: its matrices with a factored moment in
    one ``factored_adam`` call, the rest (row blocks, one-block vectors) in one ``block_adam``
    call, each prepared once."""

    def __init__(
        self, params: list[Tensor], states: list[dict], group: dict, ctxs: list[Any]
    ) -> None:
        self.params, self.states, self.ctxs = params, states, ctxs
        (self.beta1, self.beta2), self.eps = group["betas"], group["eps"]
        self.shapes = [p.shape for p in params]
        self.dtype = params[0].dtype
        self.columns: dict[tuple[str, ...], tuple[list[int], list[int]]] = {}
        self.calls = self._calls(range(len(params)))

    def _calls(self, indices: Iterable[int]) -> tuple[tuple[list[int], Any], ...]:
        """``(indices, prepared call)`` per kernel, for these tensors."""
        indices = list(indices)
        factored = [i for i in indices if "exp_avg_sq_0" in self.states[i]]
        blocked = [i for i in indices if "exp_avg_sq_0" not in self.states[i]]
        calls: list[tuple[list[int], Any]] = []
        if factored:
            ps = [self.params[i] for i in factored]
            sts = [self.states[i] for i in factored]
            moments = [st["exp_avg"] for st in sts] if self.beta1 > 0 else None
            rows = [st["exp_avg_sq_0"] for st in sts]
            cols = [st["exp_avg_sq_1"] for st in sts]
            calls.append((factored, factored_adam.Bucket(ps, moments, rows, cols)))
        if blocked:
            ps = [self.params[i] for i in blocked]
            sts = [self.states[i] for i in blocked]
            call = block_adam.Bucket(
                ps,
                [st["exp_avg"] for st in sts],
                [st["exp_avg_sq"] for st in sts],
                [_blocks_of(self.params[i], self.ctxs[i]) for i in blocked],
            )
            calls.append((blocked, call))
        # the smaller call first: after the larger one's memory traffic, the host's objects
        # (tables, tensors, numba's dispatcher) are out of the caches (paired: 2-4% a step)
        calls.sort(key=lambda c: sum(self.params[i].numel() for i in c[0]))
        return tuple(calls)

    def __call__(self, grads, scalars, names):
        done = numba_support.unchanged(self.params, grads, self.shapes, self.dtype)
        calls = self.calls if all(done) else self._calls(i for i, ok in enumerate(done) if ok)
        columns = self.columns.get(names)
        if columns is None:
            columns = self.columns[names] = (
                [names.index(n) for n in ("size", "bc2", "keep")],
                [names.index(n) for n in ("folded_size", "folded_eps", "keep")],
            )
        for indices, call in calls:
            gs = [grads[i] for i in indices]
            if isinstance(call, factored_adam.Bucket):
                sc = scalars[np.ix_(indices, columns[0])]
                call(gs, sc, self.beta1, self.beta2, self.eps)
            else:
                call(gs, scalars[np.ix_(indices, columns[1])], self.beta1, self.beta2)
        return done


# --------------------------------------------------------------------------- SGD


class HeavyBall(Rule):
    """torch-style SGD: ``b_1 = g_1``, ``b = μ b + (1-dampening) g``, optional Nesterov.

    ``decoupled_weight_decay=False`` adds ``λθ`` to the gradient as ``torch.optim.SGD`` does.
    """

    name = "sgd"
    defaults = {
        "momentum": 0.0,
        "dampening": 0.0,
        "nesterov": False,
        "decoupled_weight_decay": True,
    }
    checks = {
        **COMMON_CHECKS,
        "momentum": UNIT,
        "dampening": UNIT,
        "nesterov": BOOL,
        "decoupled_weight_decay": BOOL,
    }

    def validate(self, group, owner):
        super().validate(group, owner)
        if group.get("nesterov") and (group.get("momentum", 0) <= 0 or group.get("dampening")):
            raise ValueError(f"{owner}: nesterov=True needs momentum > 0 and dampening = 0")

    def init(self, p, info, group, dtype):
        return {"momentum_buffer": torch.zeros_like(p, dtype=dtype)} if group["momentum"] else {}

    def direction(self, g, p, state, group, step, info):
        if not group["decoupled_weight_decay"] and group["weight_decay"]:
            g = g.add(p.to(g.dtype), alpha=group["weight_decay"])
        mu = group["momentum"]
        if mu:
            buf = state["momentum_buffer"]
            if step == 1:
                buf.copy_(g)
            else:
                heavy_ball_(buf, g, mu, group["dampening"])
            g = g.add(buf, alpha=mu) if group["nesterov"] else buf
        return g, group["lr"]

    def decay_lr(self, p, state, group):
        return group["lr"] if group["decoupled_weight_decay"] else 0.0

    fusable = True

    def fused_scalars(self, group, step):
        return {"size": group["lr"], "first": float(step == 1)}

    def fused_direction(self, g, p, state, group, sc, ctx):
        if not group["decoupled_weight_decay"] and group["weight_decay"]:
            g = g.add(p.to(g.dtype), alpha=group["weight_decay"])
        mu = group["momentum"]
        if mu:
            buf = state["momentum_buffer"]
            ball = heavy_ball_(buf.clone(), g, mu, group["dampening"])
            buf.copy_(torch.where(sc["first"] > 0, g, ball))
            g = g.add(buf, alpha=mu) if group["nesterov"] else buf
        return g, sc["size"]


class EMAMomentum(Rule):
    """SGD with bias-corrected EMA momentum: ``θ -= lr · m / (1-β^t)`` (the study's hybrids)."""

    name = "sgd-ema"
    defaults = {"momentum": 0.9}
    checks = {**COMMON_CHECKS, "momentum": UNIT}

    def init(self, p, info, group, dtype):
        return {"exp_avg": torch.zeros_like(p, dtype=dtype)} if group["momentum"] else {}

    def direction(self, g, p, state, group, step, info):
        beta = group["momentum"]
        if not beta:
            return g, group["lr"]
        return ema_(state["exp_avg"], g, beta), group["lr"] / bias_correction(beta, step)

    fusable = True

    def fused_scalars(self, group, step):
        beta = group["momentum"]
        return {"size": group["lr"] / bias_correction(beta, step) if beta else group["lr"]}

    def fused_direction(self, g, p, state, group, sc, ctx):
        beta = group["momentum"]
        return (ema_(state["exp_avg"], g, beta) if beta else g), sc["size"]


# --------------------------------------------------------------------------- sign family


class LionRule(Rule):
    """Lion: ``u = sign(β1 m + (1-β1) g)``, then ``m = β2 m + (1-β2) g``."""

    name = "lion"
    defaults = {"betas": (0.9, 0.99)}
    checks = {**COMMON_CHECKS, "betas": BETAS}

    def init(self, p, info, group, dtype):
        return {"exp_avg": torch.zeros_like(p, dtype=dtype)}

    @staticmethod
    def _update(g: Tensor, state: dict, group: dict) -> Tensor:
        beta1, beta2 = group["betas"]
        m = state["exp_avg"]
        u = m.lerp(g, 1.0 - beta1).sign_()
        ema_(m, g, beta2)
        return u

    def direction(self, g, p, state, group, step, info):
        return self._update(g, state, group), group["lr"]

    fusable = True

    def fused_direction(self, g, p, state, group, sc, ctx):
        return self._update(g, state, group), sc["size"]


class SignumRule(Rule):
    """Signum: ``m = β m + (1-β) g``, ``u = sign(m)`` (Lion with β1 = β2; no bias correction)."""

    name = "signum"
    defaults = {"momentum": 0.9}
    checks = {**COMMON_CHECKS, "momentum": UNIT}

    def init(self, p, info, group, dtype):
        return {"exp_avg": torch.zeros_like(p, dtype=dtype)} if group["momentum"] else {}

    def direction(self, g, p, state, group, step, info):
        beta = group["momentum"]
        m = ema_(state["exp_avg"], g, beta) if beta else g
        return m.sign(), group["lr"]

    fusable = True

    def fused_direction(self, g, p, state, group, sc, ctx):
        beta = group["momentum"]
        m = ema_(state["exp_avg"], g, beta) if beta else g
        return m.sign(), sc["size"]


class SophiaRule(Rule):
    """Sophia-G: ``u = sign(m) · min(|m| / (ρ·bs·h + 1e-15), 1)`` with ``h`` an EMA of
    Gauss-Newton-Bartlett estimates fed by :meth:`update_hessian` every ``hessian_interval``
    steps. Until the first estimate ``h = 0`` and the update is ``sign(m)`` (EMA Signum)."""

    name = "sophia"
    defaults = {"betas": (0.965, 0.99), "rho": 0.04, "bs": 5120, "hessian_interval": 10}
    checks = {
        **COMMON_CHECKS,
        "betas": BETAS,
        "rho": NONNEG,
        "bs": POSITIVE,
        "hessian_interval": POS_INT,
    }
    needs_hessian = True

    def init(self, p, info, group, dtype):
        return {
            "exp_avg": torch.zeros_like(p, dtype=dtype),
            "hessian": torch.zeros_like(p, dtype=dtype),
        }

    def direction(self, g, p, state, group, step, info):
        m = ema_(state["exp_avg"], g, group["betas"][0])
        return clipped_ratio(m, state["hessian"], group["rho"] * group["bs"]), group["lr"]

    fusable = True
    read_only_state = ("hessian",)
    host_options = ("lr", "rho", "bs")

    def fused_scalars(self, group, step):
        return {"size": group["lr"], "scale": group["rho"] * group["bs"]}

    def fused_direction(self, g, p, state, group, sc, ctx):
        m = ema_(state["exp_avg"], g, group["betas"][0])
        return clipped_ratio(m, state["hessian"], sc["scale"]), sc["size"]

    def update_hessian(self, g: Tensor, state: dict, group: dict) -> None:
        beta2 = group["betas"][1]
        state["hessian"].mul_(beta2).addcmul_(g, g, value=1.0 - beta2)


# --------------------------------------------------------------------------- classic Adafactor


class AdafactorClassic(Rule):
    """Adafactor as Shazeer & Stern (2018) and ``transformers`` define it.

    ``β2_t = 1 - t^decay_rate``; factored over the last two axes; update clipped to RMS
    ``clip_threshold``; with ``relative_step`` the step size is ``min(1e-2, 1/sqrt(t))`` times
    ``max(eps2, RMS(θ))`` when ``scale_parameter``; optional momentum ``beta1`` on the scaled
    update. Its learning rate is not comparable to Adam's: use ``adafactor`` in LR sweeps.
    """

    name = "adafactor-classic"
    defaults = {
        "eps": (1e-30, 1e-3),
        "clip_threshold": 1.0,
        "decay_rate": -0.8,
        "beta1": None,
        "relative_step": True,
        "scale_parameter": True,
        "warmup_init": False,
    }
    checks = {
        "lr": Check(lambda x: x is None or NONNEG.test(x), "None or a finite number >= 0"),
        "weight_decay": NONNEG,
        "eps": Check(
            lambda x: (
                isinstance(x, (tuple, list)) and len(x) == 2 and all(NONNEG.test(e) for e in x)
            ),
            "a pair (eps1, eps2) of numbers >= 0",
        ),
        "clip_threshold": POSITIVE,
        "decay_rate": Check(lambda x: _num(x) and x < 0, "a number < 0"),
        "beta1": Check(lambda x: x is None or UNIT.test(x), "None or a number in [0, 1)"),
        "relative_step": BOOL,
        "scale_parameter": BOOL,
        "warmup_init": BOOL,
    }

    def validate(self, group, owner):
        super().validate(group, owner)
        if group.get("lr") is None and not group.get("relative_step", True):
            raise ValueError(f"{owner}: lr=None needs relative_step=True; give an lr")
        if group.get("lr") is not None and group.get("relative_step", True):
            raise ValueError(
                f"{owner}: lr={group['lr']!r} with relative_step=True would be ignored (the "
                "step size is min(1e-2, 1/sqrt(t))); pass lr=None or relative_step=False"
            )
        if group.get("warmup_init") and not group.get("relative_step", True):
            raise ValueError(f"{owner}: warmup_init=True needs relative_step=True")

    def init(self, p, info, group, dtype):
        shape = p.shape
        if p.dim() >= 2:
            state = {
                "exp_avg_sq_row": torch.zeros(shape[:-1], dtype=dtype, device=p.device),
                "exp_avg_sq_col": torch.zeros(
                    shape[:-2] + shape[-1:], dtype=dtype, device=p.device
                ),
            }
        else:
            state = {"exp_avg_sq": torch.zeros_like(p, dtype=dtype)}
        if group["beta1"] is not None:
            state["exp_avg"] = torch.zeros_like(p, dtype=dtype)
        state["lr"] = torch.zeros((), dtype=torch.float64)  # this step's size (weight decay)
        return state

    @staticmethod
    def _base_lr(step: int, group: dict) -> float:
        """The step size before scaling by RMS(θ): the group's, or the relative step."""
        if not group["relative_step"]:
            return group["lr"]
        min_step = 1e-6 * step if group["warmup_init"] else 1e-2
        return min(min_step, 1.0 / math.sqrt(step))

    def _lr(self, p: Tensor, step: int, group: dict, mean_sq: Tensor | None = None) -> float:
        """The step size; ``mean_sq`` is the mean of ``θ²`` when ``p`` is only a shard of θ."""
        lr = self._base_lr(step, group)
        if not group["scale_parameter"]:
            return lr
        p_rms = rms(p) if mean_sq is None else mean_sq.sqrt()
        return max(group["eps"][1], float(p_rms)) * lr

    # On a sharded parameter the update is clipped by its *global* RMS, known only once every
    # rank has its unclipped update: the sharded step calls ``unclipped``, reduces, ``finish``.
    clips_update_rms = True

    def direction(self, g, p, state, group, step, info):
        u = self.unclipped(g, p, state, group, step, info)
        return self.finish(u, rms(u), state, group)

    def shard_stats(self, g, p, state, group, step, info):
        shard = shard_of(state)
        if group["scale_parameter"]:
            shard.request_sum("param_sq", p.to(g.dtype).square())
        if g.dim() >= 2:
            sq = g * g + group["eps"][0]
            shard.request_sum("row", sq, keep=range(g.dim() - 1))
            shard.request_sum("col", sq, keep=[*range(g.dim() - 2), g.dim() - 1])

    def unclipped(self, g, p, state, group, step, info) -> Tensor:
        """The factored update before clipping (and before the learning rate)."""
        shard = shard_of(state)
        if shard is None:
            lr = self._lr(p.to(g.dtype), step, group)
        else:
            mean_sq = shard.mean("param_sq") if group["scale_parameter"] else None
            lr = self._lr(p, step, group, mean_sq)
        state["lr"].fill_(lr)
        beta2t = 1.0 - step ** group["decay_rate"]
        if g.dim() >= 2:
            if shard is None:  # g² + eps1 in one pass
                sq = torch.addcmul(g.new_tensor(group["eps"][0]), g, g)
                row_stat = mean_over(sq, [-1]).squeeze(-1)
                col_stat = mean_over(sq, [-2]).squeeze(-2)
            else:  # global means over the whole tensor; the factors are replicated
                row_stat = shard.mean("row").reshape(state["exp_avg_sq_row"].shape)
                col_stat = shard.mean("col").reshape(state["exp_avg_sq_col"].shape)
            row, col = state["exp_avg_sq_row"], state["exp_avg_sq_col"]
            row.mul_(beta2t).add_(row_stat, alpha=1.0 - beta2t)
            col.mul_(beta2t).add_(col_stat, alpha=1.0 - beta2t)
            r, c = self._roots(state)
            if shard is not None:
                r = shard.rows(r)
                c = shard.rows(c) if g.dim() > 2 else c
            return (g * r).mul_(c)
        v = state["exp_avg_sq"]
        v.mul_(beta2t).add_(g * g + group["eps"][0], alpha=1.0 - beta2t)
        return v.rsqrt() * g

    def finish(self, u: Tensor, u_rms: Tensor, state: dict, group: dict) -> tuple[Tensor, float]:
        """Clip ``u`` to RMS ``clip_threshold`` given its RMS, scale by the lr, add momentum.
        Without momentum the scale is the step size, applied in the update's own pass (two
        passes over ``u`` fewer)."""
        lr = float(state["lr"])
        if group["beta1"] is None:
            return u, lr / max(1.0, float(u_rms) / group["clip_threshold"])
        clip_by_rms_(u, group["clip_threshold"], u_rms, scale=lr)
        return ema_(state["exp_avg"], u, group["beta1"]), 1.0

    def decay_lr(self, p, state, group):
        return float(state["lr"])

    @staticmethod
    def _roots(state: dict) -> tuple[Tensor, Tensor]:
        """``1/sqrt`` of the factored second moment's row and column factors (rows normalised
        by their mean), shaped to broadcast over the matrix."""
        row, col = state["exp_avg_sq_row"], state["exp_avg_sq_col"]
        r = (row / row.mean(dim=-1, keepdim=True)).rsqrt_().unsqueeze(-1)
        return r, col.unsqueeze(-2).rsqrt()

    # Fast path: the step's reductions (RMS(θ), the factors' statistics, RMS(u)) and the update,
    # data-dependent step size, clipping and the weight decay it scales included, with no host
    # synchronisation: on CPU one numba kernel per bucket (classic_adafactor.py), elsewhere two
    # compiled graphs (the step size and roots, then the update).

    fusable = True
    decay_in_direction = True
    host_options = ("lr", "relative_step", "warmup_init", "decay_rate")

    def fused_scalars(self, group, step):
        return {"size": self._base_lr(step, group), "beta2t": 1.0 - step ** group["decay_rate"]}

    def fused_phases(self, group):
        return 2

    def kernel_picks(self, p, g, state, group, ctx):
        return classic_adafactor.applies(p, g, state)

    def kernel_plan(self, params, states, group, ctxs):
        return _ClassicKernels(params, states, group)

    def fused_prepare(self, g, p, state, group, sc, ctx):
        # the step size and the second moment's roots in a graph of their own: the update's
        # graph then reads one root per row and column
        lr = sc["size"]
        if group["scale_parameter"]:
            lr = lr * torch.clamp(rms(p.to(g.dtype)), min=group["eps"][1])
        state["lr"].copy_(lr)
        beta2t = sc["beta2t"]
        sq = g * g + group["eps"][0]
        if g.dim() >= 2:
            row_stat, col_stat = mean_over(sq, [-1]).squeeze(-1), mean_over(sq, [-2]).squeeze(-2)
            state["exp_avg_sq_row"].mul_(beta2t).add_(row_stat * (1 - beta2t))
            state["exp_avg_sq_col"].mul_(beta2t).add_(col_stat * (1 - beta2t))
            return self._roots(state)
        return (state["exp_avg_sq"].mul_(beta2t).add_(sq * (1 - beta2t)).rsqrt(),)

    def fused_direction(self, g, p, state, group, sc, ctx, prepared=None):
        u = g
        for root in prepared:
            u = u * root
        lr = state["lr"].to(g.dtype)
        u = u * (lr / torch.clamp(rms(u) / group["clip_threshold"], min=1.0))
        if group["beta1"] is not None:
            u = ema_(state["exp_avg"], u, group["beta1"])
        # θ·(1 - λ·lr) - u as the driver's θ·keep - u with keep = 1 - λ (``decay_in_direction``)
        return u + p.to(g.dtype) * ((1 - sc["keep"]) * (lr - 1)), 1.0


class _ClassicKernels:
    """AdafactorClassic's kernel tensors of one bucket in one ``classic_adafactor`` call,
    prepared once; a step where one tensor no longer fits calls the others alone."""

    def __init__(self, params: list[Tensor], states: list[dict], group: dict) -> None:
        self.params, self.states, self.group = params, states, group
        self.shapes = [p.shape for p in params]
        self.dtype = params[0].dtype
        self.call = classic_adafactor.Bucket(params, states)
        self.columns: dict[tuple[str, ...], list[int]] = {}

    def __call__(self, grads, scalars, names):
        done = numba_support.unchanged(self.params, grads, self.shapes, self.dtype)
        columns = self.columns.get(names)
        if columns is None:
            columns = self.columns[names] = [names.index(n) for n in ("size", "beta2t", "keep")]
        if all(done):
            self.call(grads, scalars[:, columns], self.group)
            return done
        kept = [i for i, ok in enumerate(done) if ok]
        if kept:
            call = classic_adafactor.Bucket(
                [self.params[i] for i in kept], [self.states[i] for i in kept]
            )
            call([grads[i] for i in kept], scalars[np.ix_(kept, columns)], self.group)
        return done


RULES: dict[str, Rule] = {
    r.name: r
    for r in (
        AdaptiveMoment(),
        HeavyBall(),
        EMAMomentum(),
        LionRule(),
        SignumRule(),
        SophiaRule(),
        AdafactorClassic(),
    )
}
