"""The transforms every optimizer here is a chain of, each piece of math written once.

An optimizer is a short chain (optax's model): each transform takes the update built so far and
returns the next, keeping its own entries in the parameter's ``state``:

* momentum: :class:`EMA` (Adam's, Signum's, Sophia's, bias-corrected or not; classic Adafactor's
  on the scaled update) and :class:`HeavyBall` (torch's SGD);
* :class:`ScaleBySecondMoment` over a :data:`Moment` at some granularity: per element (Adam),
  per block (Adalayer, Adam-mini: :mod:`~optarena.optim.blocks`), factored (Adafactor, the
  study's and the classic one), with Adam's, the frozen preconditioner's or classic Adafactor's
  averaging weights;
* :class:`Orthogonalize` (Muon: Newton-Schulz on each matrix the partition finds) and
  NorMuon's :class:`NormalizeNeurons` of each orthogonalised matrix;
* :class:`Sign`, :class:`LionUpdate`, :class:`SophiaClip`, classic Adafactor's
  :class:`ClipByRMS` and :class:`RelativeStep`;
* weight decay (:class:`DecoupledDecay`, :class:`CoupledDecay`), :class:`ScaleByLR`, and the
  frozen preconditioner's :class:`Gate`.

An :class:`Update` carries its scalar factors beside the tensor (``θ ← θ·(1 - decay) -
scale·tensor/den``), so a learning rate or a bias correction never costs a pass over the entries.

Numbers that change between steps (lr, betas, bias corrections, phase flags) come from each
transform's ``scalars(hp, step)``, computed on the host. ``update`` receives them as Python
floats when it runs eagerly and as 0-d tensors inside a compiled step, and uses them only through
operations that take either: one function serves both, and a schedule never recompiles. The
exceptions are a transform's ``host`` scalars: phase flags (SOAP's first step and refreshes,
Kron's fits, the frozen preconditioner's fill) that ``update`` branches on in Python. They are
always floats; the compiled step is traced with them at 0 (the regular step), and a step where
one is set runs eagerly.

Statistics that span the rows of a tensor (block sums, factor means, RMS) come from
``statistics``: sums over the slot's local entries. On a sharded parameter the engine adds them
over the shards (one collective for every transform at the same place in its chain) before
``update`` reads them; on one process they are read as they are.
"""

from __future__ import annotations

import functools
import math
import zlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar, NamedTuple

import torch
from torch import Tensor

from optarena.optim import blocks
from optarena.optim.blocks import BlockLayout, Rows
from optarena.optim.checks import (
    BETAS,
    BOOL,
    NEGATIVE,
    NONNEG,
    NONNEG_INT,
    POS_INT,
    POSITIVE,
    PROBABILITY,
    UNIT,
    Check,
    number,
    one_of,
    optional,
    pair,
)
from optarena.optim.roles import FusedPart, ParamInfo, Role

Scalar = float | Tensor


# --------------------------------------------------------------------------- arithmetic on scalars
# Scalars are Python floats (eager) or 0-d tensors (compiled). These compute one formula for both;
# with a float they use torch's scalar arguments, which save a temporary.


def times(t: Tensor, s: Scalar) -> Tensor:
    """``s·t`` (``t`` itself when ``s`` is the float 1)."""
    if isinstance(s, float) and s == 1.0:
        return t
    return t * s


def axpy(a: Tensor, b: Tensor, s: Scalar) -> Tensor:
    """``a + s·b``."""
    return torch.add(a, b, alpha=s) if isinstance(s, float) else a + b * s


def axpy_(a: Tensor, b: Tensor, s: Scalar) -> Tensor:
    """``a += s·b`` in place."""
    return a.add_(b, alpha=s) if isinstance(s, float) else a.add_(b * s)


def is_zero(s: Scalar) -> bool:
    """Whether ``s`` is the float 0 (a tensor is never assumed to be)."""
    return isinstance(s, float) and s == 0.0


def computed_once(t: Tensor) -> Tensor:
    """``t``, stored in a buffer of its own inside a compiled step. Inductor inlines a small
    tensor's arithmetic into the loop of every larger tensor it broadcasts into, so a factor's
    root would be recomputed for every entry it scales; fixing the small tensor's layout makes
    inductor store it first (``prims.inductor_force_stride_order``, which ``torch.compile``
    registers; eagerly ``t`` is returned as it is). Inductor takes any layout of a one-entry
    tensor as satisfied and inlines it all the same, so a one-entry ``t`` is stored as a pair of
    equal entries and read back from the first."""
    if not torch.compiler.is_compiling():
        return t
    if t.numel() == 1:
        pair = torch.ops.prims.inductor_force_stride_order(t.reshape(1).repeat(2), (1,))
        return pair[:1].reshape(t.shape)
    return torch.ops.prims.inductor_force_stride_order(t, t.stride())


# --------------------------------------------------------------------------- the update and a slot


class Update(NamedTuple):
    """The step a chain builds: ``θ ← θ·(1 - decay) - scale·tensor/den``.

    ``tensor`` may be a view of the parameter (one row per block, see ``Rows.per_block``) and may
    be state: it is never modified in place. ``den`` is None or broadcasts against ``tensor``.
    ``sq`` is ``Σ (tensor/den)²`` over the whole tensor (every shard) where the transform that
    made it has it from its statistics without a pass over the entries, else None.
    """

    tensor: Tensor
    scale: Scalar = 1.0
    den: Tensor | None = None
    decay: Scalar = 0.0
    sq: Tensor | None = None

    def scaled(self, s: Scalar) -> Update:
        """The whole step times ``s`` (the learning rate, a phase gate)."""
        return Update(self.tensor, self.scale * s, self.den, self.decay * s, self.sq)


@dataclass
class Slot:
    """One parameter as a transform sees it during a step: its entries held here (``p``, ``g``,
    ``state``: local rows of a sharded parameter), in the dtype its state is computed in."""

    p: Tensor
    g: Tensor
    state: dict[str, Tensor]
    info: ParamInfo
    rows: Rows
    const: Mapping[str, Any]  # the group's options that are not numbers
    decays: bool = True  # its role takes weight decay
    # a transform's tensors of this step, kept from its ``statistics`` for its ``update``
    scratch: dict[str, Tensor] = field(default_factory=dict)

    def direction(self, x: Update) -> Tensor:
        """``tensor / den`` in the parameter's shape."""
        t = x.tensor if x.den is None else x.tensor / x.den
        return t.reshape(self.p.shape)

    def value(self, x: Update) -> Tensor:
        """``scale·tensor/den`` in the parameter's shape (``decay`` left aside)."""
        return times(self.direction(x), x.scale)


def apply_(p: Tensor, x: Update) -> None:
    """``p ← p·(1 - decay) - scale·tensor/den`` in place, in one pass where torch has the op."""
    if not is_zero(x.decay):
        p.mul_(1.0 - x.decay)
    t, den, target = x.tensor, x.den, p
    if t.shape != p.shape:  # a block view: view the parameter alike
        if p.is_contiguous():
            target = p.view(t.shape)
        else:
            t, den = (t if den is None else t / den).reshape(p.shape), None
    if not isinstance(x.scale, float):  # a 0-d tensor scale, broadcast
        if den is None:
            target.addcmul_(t, x.scale, value=-1.0)
        elif den.numel() < t.numel():
            # one denominator per block (Adalayer, Adam-mini): its factor ``scale/den`` is
            # computed once per block, not per entry (inductor would inline the block's root,
            # its lerp and a division into every entry's iteration)
            target.sub_(t * computed_once(x.scale / den))
        else:
            target.sub_(t / den * x.scale)
    elif den is None:
        target.add_(t, alpha=-x.scale)
    else:
        target.addcdiv_(t, den, value=-x.scale)


# --------------------------------------------------------------------------- the protocol


class Transform:
    """One step of a chain. Subclasses override what they need."""

    hyper: ClassVar[dict[str, Check]] = {}  # hyperparameters read, with their ranges
    whole: ClassVar[bool] = False  # needs the whole tensor (gathered from shards)
    # phase flags among the scalars that ``update``/``statistics`` branch on in Python: always
    # floats; a compiled step is traced with them at 0.0, a step where one is not runs eagerly
    host: ClassVar[tuple[str, ...]] = ()
    swaps: ClassVar[bool] = False  # moves the parameter between a train and an eval point
    read_only: ClassVar[tuple[str, ...]] = ()  # state read but not written by a step

    def init(self, p: Tensor, info: ParamInfo, hp: Mapping[str, Any], dtype: torch.dtype) -> dict:
        """The state entries of a new parameter (``p``: the whole parameter)."""
        return {}

    def scalars(self, hp: Mapping[str, Any], step: int) -> dict[str, float]:
        """The numbers of this step, on the host; the same keys at every step."""
        return {}

    def statistics(self, x: Update, slot: Slot, sc: Mapping[str, Scalar]) -> dict[str, Tensor]:
        """Sums over the slot's entries that ``update`` needs over the whole tensor."""
        return {}

    def update(
        self, x: Update, slot: Slot, sc: Mapping[str, Scalar], stats: Mapping[str, Tensor]
    ) -> Update:
        raise NotImplementedError

    def hessian(self, slot: Slot, hp: Mapping[str, Any]) -> None:
        """Fold the gradient in ``slot.g`` into a curvature estimate (Sophia); others: nothing."""

    def swap(self, p: Tensor, state: Mapping[str, Tensor], hp: Mapping[str, Any], train: bool):
        """Move ``p`` to its train point (``train``) or its eval point (``swaps`` only)."""


def hp_value(hp: Mapping[str, Any], key: str, index: int | None = None) -> float:
    """A number from the hyperparameters (``betas[index]``); tensors as floats."""
    v = number(hp[key] if index is None else hp[key][index])
    if v is None:
        raise ValueError(f"invalid {key}={hp[key]!r}")
    return v


# --------------------------------------------------------------------------- momentum


class EMA(Transform):
    """``m ← β m + (1-β) u``; the update becomes ``m``, divided by ``1-β^t`` when ``debias``.
    With ``β = 0`` at creation no state is kept and ``u`` passes through."""

    def __init__(
        self,
        key: str = "exp_avg",
        beta: tuple[str, int | None] = ("betas", 0),
        debias: bool = False,
        nesterov: bool = False,
    ):
        self.key, self.beta, self.debias, self.nesterov = key, beta, debias, nesterov
        check = BETAS if beta[1] is not None else optional(UNIT) if beta[0] == "beta1" else UNIT
        self.hyper = {beta[0]: check}

    def _beta(self, hp: Mapping[str, Any]) -> float:
        return 0.0 if hp[self.beta[0]] is None else hp_value(hp, *self.beta)

    def init(self, p, info, hp, dtype):
        return {self.key: torch.zeros_like(p, dtype=dtype)} if self._beta(hp) else {}

    def scalars(self, hp, step):
        beta = self._beta(hp)
        out = {"w": 1.0 - beta, "bc": 1.0 / (1.0 - beta**step) if self.debias else 1.0}
        return out | {"beta": beta} if self.nesterov else out

    def update(self, x, slot, sc, stats):
        m = slot.state.get(self.key)
        if m is None:
            return x
        u = slot.value(x)
        m.lerp_(u, sc["w"])
        if self.nesterov:  # u + β(m - u), torch's Muon's look-ahead
            return Update(u.lerp(m, sc["beta"]), sc["bc"], None, x.decay)
        return Update(m, sc["bc"], None, x.decay)


@functools.lru_cache(maxsize=64)
def _mu_products(beta1: float, decay: float) -> list[float]:
    """NAdam's running products ``Π_{i≤t} μ_i`` (index ``t``), extended on demand."""
    return [1.0]


def nadam_mu(beta1: float, decay: float, step: int) -> float:
    """NAdam's momentum schedule ``μ_t = β1 (1 - 0.5·0.96^(t·ψ))``."""
    return beta1 * (1.0 - 0.5 * (0.96 ** (step * decay)))


class NAdamMomentum(Transform):
    """NAdam (torch's, Dozat 2016): ``m ← β1 m + (1-β1) g``; the update is
    ``(1-μ_t)/(1-Π_{i≤t}μ_i)·g + μ_{t+1}/(1-Π_{i≤t+1}μ_i)·m`` (divided by Adam's root after it).
    The products are computed on the host in float64."""

    hyper = {"betas": BETAS, "momentum_decay": NONNEG}

    def init(self, p, info, hp, dtype):
        return {"exp_avg": torch.zeros_like(p, dtype=dtype)}

    def scalars(self, hp, step):
        beta1, decay = hp_value(hp, "betas", 0), hp_value(hp, "momentum_decay")
        products = _mu_products(beta1, decay)
        while len(products) <= step + 1:
            products.append(products[-1] * nadam_mu(beta1, decay, len(products)))
        mu, mu_next = nadam_mu(beta1, decay, step), nadam_mu(beta1, decay, step + 1)
        prod = products[step]
        return {
            "w": 1.0 - beta1,
            "cg": (1.0 - mu) / (1.0 - prod),
            "cm": mu_next / (1.0 - prod * mu_next),
        }

    def update(self, x, slot, sc, stats):
        g, m = slot.value(x), slot.state["exp_avg"]
        m.lerp_(g, sc["w"])
        # cg·g + cm·m as (cg + cm)·lerp(g, m, cm / (cg + cm)): one pass, the sum in the scale
        total = sc["cg"] + sc["cm"]
        return Update(g.lerp(m, sc["cm"] / total), total, None, x.decay)


class ADOPTUpdate(Transform):
    """ADOPT (Taniguchi et al. 2024, pytorch-optimizer's): step 1 only sets ``v = g²``; then
    ``m ← β1 m + (1-β1) clip(g / max(√v, ε), ±t^clip_exponent)``, the update is ``m``, and
    ``v ← β2 v + (1-β2) g²`` after it (the current gradient never divides itself)."""

    hyper = {"betas": BETAS, "eps": NONNEG, "clip_exponent": optional(NONNEG)}

    def init(self, p, info, hp, dtype):
        return {k: torch.zeros_like(p, dtype=dtype) for k in ("exp_avg", "exp_avg_sq")}

    def scalars(self, hp, step):
        first = float(step == 1)
        exponent = hp["clip_exponent"]
        clip = math.inf if exponent is None else float(step) ** hp_value(hp, "clip_exponent")
        return {
            "first": first,
            "w1": (1.0 - hp_value(hp, "betas", 0)) * (1.0 - first),
            "w2": (1.0 - hp_value(hp, "betas", 1)) * (1.0 - first),
            "eps": hp_value(hp, "eps"),
            "clip": clip,
        }

    def update(self, x, slot, sc, stats):
        g, m, v = slot.value(x), slot.state["exp_avg"], slot.state["exp_avg_sq"]
        g2 = g * g
        if not is_zero(sc["first"]):
            axpy_(v, g2, sc["first"])  # v is zero before the first step
        normed = g / v.sqrt().clamp_(min=sc["eps"])
        if not (isinstance(sc["clip"], float) and math.isinf(sc["clip"])):
            normed = normed.clamp_(min=-sc["clip"], max=sc["clip"])
        m.lerp_(normed, sc["w1"])
        v.lerp_(g2, sc["w2"])
        return Update(m, 1.0 - sc["first"], None, x.decay)


class SlowEMA(Transform):
    """AdEMAMix's second, slow momentum: ``s ← β3_t s + (1-β3_t) g`` (no bias correction); the
    update ``u + α_t s``. With ``t_alpha_beta3`` both warm up (Pagliardini et al. 2024):
    ``α_t = min(tα/T, α)``, ``β3_t = min(exp(ln β1 ln β3 / ((1-t/T) ln β3 + (t/T) ln β1)), β3)``."""

    hyper = {"alpha": NONNEG, "t_alpha_beta3": optional(POSITIVE)}

    def init(self, p, info, hp, dtype):
        return {"exp_avg_slow": torch.zeros_like(p, dtype=dtype)}

    def scalars(self, hp, step):
        alpha, horizon = hp_value(hp, "alpha"), hp["t_alpha_beta3"]
        beta1, beta3 = hp_value(hp, "betas", 0), hp_value(hp, "betas", 2)
        if horizon is not None:
            r = step / float(horizon)
            alpha = min(step * alpha / float(horizon), alpha)
            lb1, lb3 = math.log(beta1), math.log(beta3)
            beta3 = min(math.exp(lb1 * lb3 / ((1.0 - r) * lb3 + r * lb1)), beta3)
        return {"alpha": alpha, "w3": 1.0 - beta3}

    def update(self, x, slot, sc, stats):
        s = slot.state["exp_avg_slow"]
        s.lerp_(slot.g, sc["w3"])
        if x.den is not None:
            return Update(axpy(slot.value(x), s, sc["alpha"]), 1.0, None, x.decay)
        # scale·u + α·s as scale·(u + (α/scale)·s): one pass, the factor in the scale
        u = x.tensor.reshape(slot.p.shape)
        return Update(axpy(u, s, sc["alpha"] / x.scale), x.scale, None, x.decay)


class MarsCorrection(Transform):
    """MARS's variance-reduced gradient (Yuan et al. 2024, pytorch-optimizer's):
    ``c = g + γ·β1/(1-β1)·(g - g_prev)``, divided by ``max(1, ‖c‖)``; ``c`` is the gradient of
    every transform after it (their second moments included)."""

    hyper = {"gamma": NONNEG, "betas": BETAS}

    def init(self, p, info, hp, dtype):
        return {"last_grad": torch.zeros_like(p, dtype=dtype)}

    def scalars(self, hp, step):
        beta1 = hp_value(hp, "betas", 0)
        return {"k": hp_value(hp, "gamma") * (beta1 / (1.0 - beta1))}

    def statistics(self, x, slot, sc):
        g = slot.g
        c = slot.scratch["mars"] = times(g - slot.state["last_grad"], sc["k"]).add_(g)
        return {"sq": blocks.entry_sum(c * c)}

    def update(self, x, slot, sc, stats):
        c = slot.scratch.pop("mars") * stats["sq"].sqrt().clamp(min=1.0).reciprocal()
        slot.state["last_grad"].copy_(slot.g)
        slot.g = c
        return Update(c, 1.0, None, x.decay)


class Cautious(Transform):
    """Cautious optimizers (Liang et al. 2024): entries of the update whose sign disagrees with
    the gradient's are zeroed, the rest scaled by ``numel / (kept + 1)`` (pytorch-optimizer's
    ``apply_cautious``). Put right after the momentum, or after a preconditioner that mixes
    entries (SOAP's, Kron's: their update's signs are not the momentum's)."""

    def _mask(self, x: Update, slot: Slot) -> Tensor:
        return (slot.direction(x) * slot.g > 0).to(slot.g.dtype)

    def statistics(self, x, slot, sc):
        return {"kept": self._mask(x, slot).sum()}

    def update(self, x, slot, sc, stats):
        keep = slot.rows.numel / (stats["kept"] + 1.0)
        return Update(slot.direction(x) * self._mask(x, slot), x.scale * keep, None, x.decay)


class HeavyBall(Transform):
    """torch's SGD momentum: ``b_1 = g``, ``b ← μ b + (1-dampening) g``; the update is ``b``, or
    ``g + μ b`` with Nesterov."""

    hyper = {"momentum": UNIT, "dampening": UNIT, "nesterov": BOOL}

    def init(self, p, info, hp, dtype):
        return {"momentum_buffer": torch.zeros_like(p, dtype=dtype)} if hp["momentum"] else {}

    def scalars(self, hp, step):
        # the buffer starts at zero, so b_1 = μ·0 + c·g with c = 1 seeds it with g
        c = 1.0 if step == 1 else 1.0 - hp_value(hp, "dampening")
        return {"mu": hp_value(hp, "momentum"), "c": c}

    def update(self, x, slot, sc, stats):
        b = slot.state.get("momentum_buffer")
        if b is None:
            return x
        g, mu, c = slot.value(x), sc["mu"], sc["c"]
        if isinstance(mu, float) and isinstance(c, float) and c == 1.0:
            torch.add(g, b, alpha=mu, out=b)  # b ← g + μb in one pass (no dampening)
        else:
            axpy_(b.mul_(mu), g, c)
        return Update(axpy(g, b, sc["mu"]) if slot.const["nesterov"] else b, 1.0, None, x.decay)


# --------------------------------------------------------------------------- second moments


# A second moment (a :data:`Moment`) is a running estimate of ``E[g²]`` at one granularity, for
# one parameter, in the state entries ``keys``: ``init(p, dtype)`` makes them; ``statistics(sq,
# slot)`` are the sums over the local entries it needs over the whole tensor (``sq()``: ``g²`` of
# the local entries); ``estimates(sq, slot, stats)`` this step's statistic for every state entry;
# ``per_entry(values, x, slot, inverse)`` is ``(x', r')``: ``x`` and ``sqrt(v)`` (``1/sqrt(v)``
# when ``inverse``) in shapes that broadcast entry by entry.


class ElementMoment:
    """One value per entry: Adam."""

    keys = ("exp_avg_sq",)

    def init(self, p, dtype):
        return {"exp_avg_sq": torch.zeros_like(p, dtype=dtype)}

    def statistics(self, sq, slot):
        return {}

    def estimates(self, sq, slot, stats):
        return {"exp_avg_sq": sq()}

    def per_entry(self, values, x, slot, inverse=False):
        v = values["exp_avg_sq"]
        return x, v.rsqrt() if inverse else v.sqrt()


_ELEMENT = ElementMoment()  # stateless: one for every parameter


@dataclass(frozen=True)
class BlockMoment:
    """One value per block of a :class:`~optarena.optim.blocks.BlockLayout`: the mean of ``g²``
    over the block (Adalayer per tensor, Adam-mini per head and row)."""

    layout: BlockLayout
    keys: tuple[str, ...] = ("exp_avg_sq",)

    def init(self, p, dtype):
        n = self.layout.num_blocks(p.shape)
        return {"exp_avg_sq": torch.zeros(n, dtype=dtype, device=p.device)}

    def statistics(self, sq, slot):
        return {"exp_avg_sq": slot.rows.block_sums(sq(), self.layout)}

    def estimates(self, sq, slot, stats):
        return {"exp_avg_sq": slot.rows.block_means(stats["exp_avg_sq"], self.layout)}

    def per_entry(self, values, x, slot, inverse=False):
        v = values["exp_avg_sq"]
        return slot.rows.per_block(x, v.rsqrt() if inverse else v.sqrt(), self.layout)


@dataclass(frozen=True)
class Factor:
    """One factor of a factored moment: the mean of ``g²`` over every axis but ``keep``."""

    key: str
    keep: tuple[int, ...]
    stored: tuple[int, ...]  # the state's shape
    broadcast: tuple[int, ...]  # the parameter's rank, 1 on averaged axes


@dataclass(frozen=True)
class FactoredMoment:
    """Adafactor's second moment: per factored axis, the mean of ``g²`` over the other factored
    axes (``V = r cᵀ / mean(r)`` for a matrix). The study factors every axis
    (``exp_avg_sq_{i}``); the classic algorithm the last two, each leading index a matrix of its
    own (``exp_avg_sq_row``, ``exp_avg_sq_col``). ``V = f_0 · Π_{i≥1} f_i / mean(f_0)``: every
    factor has the mean of ``g²``, so nothing underflows and an all-zero history gives 0."""

    factors: tuple[Factor, ...]
    norm_axes: tuple[int, ...]  # axes of f_0 averaged into mean(f_0)

    @property
    def keys(self) -> tuple[str, ...]:
        return tuple(f.key for f in self.factors)

    @classmethod
    def study(cls, shape: tuple[int, ...]) -> FactoredMoment:
        n = len(shape)
        factors = tuple(
            Factor(f"exp_avg_sq_{i}", (i,), b, b)
            for i in range(n)
            for b in [tuple(s if d == i else 1 for d, s in enumerate(shape))]
        )
        return cls(factors, tuple(range(n)))

    @classmethod
    def classic(cls, shape: tuple[int, ...]) -> FactoredMoment:
        n = len(shape)
        row = Factor("exp_avg_sq_row", tuple(range(n - 1)), shape[:-1], (*shape[:-1], 1))
        col_keep = (*range(n - 2), n - 1)
        col = Factor(
            "exp_avg_sq_col", col_keep, shape[:-2] + shape[-1:], (*shape[:-2], 1, shape[-1])
        )
        return cls((row, col), (n - 2,))

    def init(self, p, dtype):
        return {f.key: torch.zeros(f.stored, dtype=dtype, device=p.device) for f in self.factors}

    def statistics(self, sq, slot):
        x = sq()
        out = {}
        for f in self.factors:
            s = _sum_keep(x, [d for d in range(x.dim()) if d not in f.keep])
            out[f.key] = slot.rows.scatter(s) if 0 in f.keep else s
        return out

    def estimates(self, sq, slot, stats):
        shape = slot.rows.shape
        return {
            f.key: (stats[f.key] / (math.prod(shape) // math.prod(f.broadcast))).reshape(f.stored)
            for f in self.factors
        }

    def per_entry(self, values, x, slot, inverse=False):
        """The root as the outer product of the factors' roots: one square root per row and
        per column (per index of each factored axis), then a product per entry."""
        f = [values[k.key].view(k.broadcast) for k in self.factors]
        mean = self._mean(f[0])
        root = torch.rsqrt if inverse else torch.sqrt
        out = slot.rows.rows(computed_once(root(f[0])))
        for fi in f[1:]:
            out = out * slot.rows.rows(computed_once(root(fi / mean)))
        return x, out

    def _mean(self, f0: Tensor) -> Tensor:
        return f0.mean(self.norm_axes, keepdim=True).clamp_min(torch.finfo(f0.dtype).tiny)

    # The sum of squares of ``x / sqrt(V)`` (classic Adafactor clips by its RMS) for two factors,
    # rows ``r`` and columns ``c`` of each matrix: ``Σ_ij x²_ij · mean(r) / (r_i c_j)`` is
    # ``Σ_j W_j · mean(r) / c_j`` with ``W_j = Σ_i x²_ij / r_i``. ``r_i`` is known as soon as row
    # ``i`` is summed, so ``W`` is a column sum like ``c``'s own, in the same loop over runs of
    # rows, and the clipping needs no pass of its own over the entries.
    SQ = "direction_sq"

    @property
    def row_col(self) -> bool:
        """Whether the factors are a row and a column factor of each matrix (the classic
        layout, for which ``SQ`` is defined)."""
        return len(self.factors) == 2 and self.norm_axes == (len(self.factors[0].broadcast) - 2,)

    def square_sums(
        self, x: Tensor, slot: Slot, stats: Mapping[str, Tensor], w: Scalar
    ) -> dict[str, Tensor]:
        """``W`` over the local rows (``x``: the tensor that ``sqrt(V)`` divides; ``stats``:
        this step's local sums), with the row factor as this step's update leaves it."""
        row, col = self.factors
        n = x.shape[-1]
        r_old = slot.rows.rows(slot.state[row.key].view(row.broadcast))
        inv = computed_once(r_old.lerp(slot.rows.rows(stats[row.key]) / n, w).reciprocal())
        wsum = _sum_keep(x * x * inv, [x.dim() - 2])
        return {self.SQ: slot.rows.scatter(wsum) if 0 in col.keep else wsum}

    def square_sum(self, values: Mapping[str, Tensor], stats: Mapping[str, Tensor]) -> Tensor:
        """``Σ (x / sqrt(V))²`` of the whole tensor, from ``W`` and the updated factors."""
        row, col = self.factors
        mean = self._mean(values[row.key].view(row.broadcast))
        c = values[col.key].view(col.broadcast)
        return (stats[self.SQ].view(col.broadcast) * (mean / c)).sum()


Moment = ElementMoment | BlockMoment | FactoredMoment


def _sum_keep(x: Tensor, reduce: list[int], chunk: int = 16) -> Tensor:
    """``x`` summed over the axes ``reduce``, kept as extents of 1. Where the last axis is kept
    (a column factor) the sum runs down the columns, a strided walk over the whole tensor per
    vector of columns; it is taken over runs of ``chunk`` rows first, which stay in cache."""
    d = max(reduce)
    n = x.shape[d]
    if d == x.dim() - 1 or n <= chunk or n % chunk:
        return x.sum(reduce, keepdim=True)
    split = x.view(*x.shape[:d], n // chunk, chunk, *x.shape[d + 1 :]).sum(d + 1)
    return split.sum(reduce, keepdim=True)


@functools.lru_cache(maxsize=8192)
def moment_for(info: ParamInfo, granularity: str, options: tuple[tuple[str, Any], ...]) -> Moment:
    """The second moment a granularity gives one parameter (``options``: the group's)."""
    o = dict(options)
    shape = info.shape
    if granularity == "element":
        return _ELEMENT
    if granularity in ("layer", "adam-mini"):
        if granularity == "layer":
            layout = blocks.adalayer_layout(info, o["split_qkv"], o["per_row_output"])
        else:
            layout = blocks.adam_mini_layout(info, o["single_block_value"])
        return _ELEMENT if layout.elementwise else BlockMoment(layout)
    if granularity == "factored":  # the study's: a vector is one block
        if len(shape) >= 2:
            return FactoredMoment.study(shape)
        return BlockMoment(blocks.tensor_layout(shape))
    if granularity == "factored-classic":  # Shazeer & Stern's: a vector is elementwise
        return FactoredMoment.classic(shape) if len(shape) >= 2 else _ELEMENT
    raise ValueError(f"unknown granularity {granularity!r}")


GRANULARITY_OPTIONS = ("split_qkv", "per_row_output", "single_block_value")


# Averaging weights of a second moment: ``v ← v + w (stat - v)``, the root divided by
# ``sqrt(bc2)``. Each returns the step's scalars: w, root_bc2, the folded epsilon (absent: none
# outside the root, the update is ``u / sqrt(v)``) and eps1 (added to g² before averaging), and for
# the frozen preconditioner its phase flags.


def adam_weights(hp: Mapping[str, Any], step: int) -> dict[str, float]:
    """Adam: an EMA of rate ``1-β2``, bias-corrected by ``1-β2^t``."""
    beta2 = hp_value(hp, "betas", 1)
    root = math.sqrt(1.0 - beta2**step)
    return {"w": 1.0 - beta2, "root_bc2": root, "eps": hp_value(hp, "eps") * root, "eps1": 0.0}


def unfolded_weights(hp: Mapping[str, Any], step: int) -> dict[str, float]:
    """Adam's, with ``ε`` added to ``√v`` before the bias correction (MARS's convention):
    ``u·√bc2 / (√v + ε)``."""
    return adam_weights(hp, step) | {"eps": hp_value(hp, "eps")}


def frozen_weights(hp: Mapping[str, Any], step: int) -> dict[str, float]:
    """The study's frozen preconditioner: the uniform mean of the statistic over the first
    ``precondition_steps`` steps (``w = 1/t``; a uniform mean is unbiased), then frozen
    (``w = 0``), or an EMA with ``freeze=False``."""
    k = hp["precondition_steps"]
    beta2 = hp_value(hp, "betas", 1)
    w = 1.0 / step if step <= k else (0.0 if hp["freeze"] else 1.0 - beta2)
    fill = float(step == k + 1 and hp["freeze"])
    return {"w": w, "root_bc2": 1.0, "eps": hp_value(hp, "eps"), "eps1": 0.0, "fill": fill}


def classic_weights(hp: Mapping[str, Any], step: int) -> dict[str, float]:
    """Classic Adafactor: ``β2_t = 1 - t^decay_rate`` (so ``w = t^decay_rate``), ``eps1`` added
    to ``g²``, no bias correction, no epsilon outside the root."""
    return {
        "w": float(step) ** hp_value(hp, "decay_rate"),
        "root_bc2": 1.0,
        "eps1": hp_value(hp, "eps", 0),
    }


class ScaleBySecondMoment(Transform):
    """``v ← v + w (mean_b(g²) - v)``; ``u ← u / (sqrt(v / bc2) + ε)`` with ``v`` broadcast from
    its blocks, computed as ``√bc2 · u / (sqrt(v) + ε√bc2)`` (the bias correction in the update's
    scale). ``amsgrad`` divides by the running maximum of ``v``.

    Frozen preconditioner: where ``v`` is still zero when the averaging ends (an embedding row of a
    token never seen), it takes the tensor's mean over its non-zero entries, so nothing is divided
    by a bare epsilon; a tensor whose ``v`` is zero throughout is not updated.

    ``square_sum`` (classic Adafactor, which clips by RMS(u)): a moment of row and column factors
    also sums what ``Σ (u / sqrt(V))²`` needs in its statistics' loop over the entries
    (:meth:`FactoredMoment.square_sums`) and hands the sum on as ``Update.sq``.
    """

    def __init__(
        self,
        granularity: str,
        weights: Callable[[Mapping[str, Any], int], dict[str, float]] = adam_weights,
        amsgrad: bool = False,
        square_sum: bool = False,
    ):
        self.granularity, self.weights, self.amsgrad = granularity, weights, amsgrad
        self.square_sum = square_sum
        self.frozen = weights is frozen_weights
        self.hyper = {"eps": NONNEG, "betas": BETAS}
        if weights is classic_weights:
            self.hyper = {"eps": pair(NONNEG, "(eps1, eps2)"), "decay_rate": NEGATIVE}
        if self.frozen:
            self.hyper = {**self.hyper, "precondition_steps": NONNEG_INT, "freeze": BOOL}
            self.host = ("fill",)

    def moment(self, info: ParamInfo, const: Mapping[str, Any]) -> Moment:
        if self.granularity == "element":  # every parameter's: no lookup per tensor
            return _ELEMENT
        options = tuple((k, const[k]) for k in GRANULARITY_OPTIONS if k in const)
        if torch.compiler.is_compiling():  # traced once: the cache is for the eager path
            return moment_for.__wrapped__(info, self.granularity, options)
        return moment_for(info, self.granularity, options)

    def init(self, p, info, hp, dtype):
        state = self.moment(info, hp).init(p, dtype)
        if self.amsgrad:
            state["max_exp_avg_sq"] = torch.zeros_like(state["exp_avg_sq"])
        return state

    def scalars(self, hp, step):
        return self.weights(hp, step)

    def _square(self, slot: Slot, sc: Mapping[str, Scalar]) -> Callable[[], Tensor]:
        def sq() -> Tensor:
            g2 = slot.g * slot.g
            return g2 if is_zero(sc["eps1"]) else g2 + sc["eps1"]

        return sq

    def _sums_squares(self, moment: Moment, sc: Mapping[str, Scalar]) -> bool:
        """Whether this update carries ``Update.sq`` (``u / sqrt(V)``, no epsilon outside)."""
        return (
            self.square_sum
            and "eps" not in sc
            and isinstance(moment, FactoredMoment)
            and moment.row_col
        )

    def statistics(self, x, slot, sc):
        moment = self.moment(slot.info, slot.const)
        stats = moment.statistics(self._square(slot, sc), slot)
        if self._sums_squares(moment, sc):
            base = x.tensor if x.den is None else slot.direction(x)
            stats |= moment.square_sums(base, slot, stats, sc["w"])
        if self.frozen and isinstance(moment, ElementMoment) and sc["fill"]:
            # v is sharded like θ: its non-zero entries counted over the shards
            stats["nonzero"] = _nonzero(slot.state["exp_avg_sq"])
        return stats

    def update(self, x, slot, sc, stats):
        moment = self.moment(slot.info, slot.const)
        for key, est in moment.estimates(self._square(slot, sc), slot, stats).items():
            slot.state[key].lerp_(est, sc["w"])
        values = {k: slot.state[k] for k in moment.keys}
        if self.amsgrad:
            top = slot.state["max_exp_avg_sq"]
            values["exp_avg_sq"] = torch.maximum(top, values["exp_avg_sq"], out=top)
        base = x.tensor if x.den is None else slot.direction(x)
        if self.frozen:
            return self._frozen(x, base, moment, values, slot, sc, stats)
        if "eps" not in sc:  # u / sqrt(v) as u · (1/sqrt(v)): no division per entry
            t, inverse = moment.per_entry(values, base, slot, inverse=True)
            sq = moment.square_sum(values, stats) if self._sums_squares(moment, sc) else None
            return Update(t * inverse, x.scale * sc["root_bc2"], None, x.decay, sq)
        t, root = moment.per_entry(values, base, slot)
        return Update(t, x.scale * sc["root_bc2"], root + sc["eps"], x.decay)

    def _frozen(self, x, base, moment, values, slot, sc, stats) -> Update:
        v = values["exp_avg_sq"]
        if sc["fill"]:  # the step the averaging ends (a host scalar)
            total, count = stats["nonzero"] if "nonzero" in stats else _nonzero(v)  # replicated v
            v.copy_(torch.where(v > 0, v, total / count.clamp_min(1.0)))
        t, root = moment.per_entry(values, base, slot)
        step = torch.where(root > 0, t / (root + sc["eps"]), 0.0)  # v = 0: no step
        return Update(step, x.scale * sc["root_bc2"], None, x.decay)


def _nonzero(v: Tensor) -> Tensor:
    """``[sum, count]`` of the non-zero entries of ``v`` (which is >= 0)."""
    return torch.stack([v.sum(), (v > 0).sum().to(v.dtype)])


# --------------------------------------------------------------------------- orthogonalisation

NS_DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32, "float64": torch.float64}


def matrices(info: ParamInfo, shape: tuple[int, ...], per_head: bool) -> list[tuple[tuple, int]]:
    """The matrices one parameter holds, as ``(index, out_dim)``: ``x[index]`` is one matrix
    whose output axis is ``out_dim``. Each expert of a fused MoE tensor; each part of a fused
    QKV; with ``per_head`` each head of a query, key or value projection."""
    out, mshape = info.out_dim, shape
    leads: list[tuple] = [()]
    if info.experts and len(shape) == 3:
        out, mshape = out - 1, shape[1:]
        leads = [(e,) for e in range(shape[0])]
    parts = info.parts or (FusedPart(info.role, mshape[out], info.heads),)
    found = []
    for lead in leads:
        start = 0
        for part in parts:
            qkv = part.role in (Role.Q, Role.K, Role.V)
            cut = part.heads if per_head and part.heads and qkv else 1
            size = part.size // cut
            for i in range(cut):
                index = [slice(None), slice(None)]
                index[out] = slice(start + i * size, start + (i + 1) * size)
                found.append(((*lead, *index), out))
            start += part.size
    return found


def newton_schulz(
    g: Tensor,
    coefficients: tuple[Scalar, Scalar, Scalar],
    steps: int,
    eps: Scalar,
    dtype: torch.dtype,
) -> Tensor:
    """torch.optim.Muon's orthogonalisation: ``X ← aX + (bA + cA²)X``, ``A = XXᵀ``, for
    ``steps`` steps from ``X = G/‖G‖_F`` in ``dtype``, on the wide orientation of ``G``."""
    a, b, c = coefficients
    x = g.to(dtype)
    tall = g.size(0) > g.size(1)
    if tall:
        x = x.T
    x = x.div(x.norm().clamp(min=eps))
    for _ in range(steps):
        gram = x @ x.T
        if isinstance(b, float):
            x = torch.addmm(x, torch.addmm(gram, gram, gram, beta=b, alpha=c), x, beta=a)
        else:
            x = x * a + (gram * b + (gram @ gram) * c) @ x
    return x.T if tall else x


class Orthogonalize(Transform):
    """Muon: each matrix of the update (see :func:`matrices`) replaced by its Newton-Schulz
    orthogonalisation times :meth:`ratio` of its shape. Needs the whole matrix (gathered on
    FSDP2 shards)."""

    hyper = {
        "ns_coefficients": Check(
            lambda x: (
                isinstance(x, (tuple, list))
                and len(x) == 3
                and all(number(v) is not None for v in x)
            ),
            "three finite numbers (a, b, c)",
        ),
        "ns_steps": Check(lambda x: POS_INT.test(x) and x < 100, "an int in [1, 99]"),
        "eps": POSITIVE,
        "adjust_lr_fn": one_of(None, "original", "match_rms_adamw"),
        "ns_dtype": one_of(*NS_DTYPES),
        "per_head": BOOL,
    }
    whole = True

    def init(self, p, info, hp, dtype):
        if p.dim() != 2 and not (p.dim() == 3 and info.experts):
            raise ValueError(
                f"muon: {info.name} of shape {tuple(p.shape)} is not a matrix; give Muon the "
                "hidden matrices only, or the model: create('muon', model) routes the rest to AdamW"
            )
        return {}

    def scalars(self, hp, step):
        a, b, c = (hp_value(hp, "ns_coefficients", i) for i in range(3))
        return {"a": a, "b": b, "c": c, "eps": hp_value(hp, "eps")}

    def update(self, x, slot, sc, stats):
        u = slot.direction(x)
        const = slot.const
        mats = matrices(slot.info, tuple(u.shape), const["per_head"])
        ratios = [self.ratio(const, u[i].size(out), u[i].size(1 - out)) for i, out in mats]
        ns = functools.partial(
            newton_schulz,
            coefficients=(sc["a"], sc["b"], sc["c"]),
            steps=const["ns_steps"],
            eps=sc["eps"],
            dtype=NS_DTYPES[const["ns_dtype"]],
        )
        if len(mats) == 1:  # the ratio in the scale: torch's rounding
            ((index, out),) = mats
            o = self.finish(ns(u[index]).to(u.dtype), index, out, slot, sc)
            return Update(o.reshape(u.shape), x.scale * ratios[0], None, x.decay)
        o = torch.empty_like(u)
        for (index, out), ratio in zip(mats, ratios, strict=True):
            o[index] = self.finish(ns(u[index]).to(u.dtype), index, out, slot, sc) * ratio
        return Update(o, x.scale, None, x.decay)

    def ratio(self, const: Mapping[str, Any], out: int, inp: int) -> float:
        """The factor of one matrix's orthogonalised update, torch's ``adjust_lr_fn``:
        ``sqrt(max(1, out/in))`` (Keller Jordan's, ``None``/"original") or
        ``0.2·sqrt(max(out, in))`` ("match_rms_adamw", Moonshot's)."""
        if const["adjust_lr_fn"] == "match_rms_adamw":
            return 0.2 * math.sqrt(max(out, inp))
        return math.sqrt(max(1.0, out / inp))

    def finish(self, o: Tensor, index: tuple, out: int, slot: Slot, sc: Mapping[str, Scalar]):
        """One orthogonalised matrix (``index`` of the parameter) before its ratio; Muon: as is."""
        return o


class NormalizeNeurons(Orthogonalize):
    """NorMuon (Li et al. 2025; pytorch-optimizer's ``NorMuon``): :class:`Orthogonalize`, each
    output neuron (row) of each orthogonalised matrix ``O`` divided by the root of an EMA of its
    mean square, ``v ← β2 v + (1-β2) mean_row(O²)``, ``N = O / (√v + ε)``, and ``N`` rescaled to
    ``‖O‖_F`` (``preserve_norm``, the official code) or to an RMS of 0.2 (``match_rms``, the
    paper's algorithm, without Muon's ratio), before the ratio."""

    hyper = {
        **Orthogonalize.hyper,
        "beta2": UNIT,
        "row_eps": NONNEG,
        "update_scale": one_of("preserve_norm", "match_rms"),
    }

    def init(self, p, info, hp, dtype):
        super().init(p, info, hp, dtype)
        inputs = p.dim() - 1 if info.out_dim != p.dim() - 1 else p.dim() - 2
        shape = tuple(1 if d == inputs else n for d, n in enumerate(p.shape))
        return {"second_momentum_buffer": replicated(shape, dtype, p.device)}

    def scalars(self, hp, step):
        w = 1.0 - hp_value(hp, "beta2")
        return super().scalars(hp, step) | {"w": w, "row_eps": hp_value(hp, "row_eps")}

    def ratio(self, const, out, inp):
        return 1.0 if const["update_scale"] == "match_rms" else super().ratio(const, out, inp)

    def finish(self, o, index, out, slot, sc):  # o: Newton-Schulz's own result, reused here
        v = slot.state["second_momentum_buffer"][0][index]  # this matrix's rows
        v.lerp_(o.square().mean(1 - out, keepdim=True), sc["w"])
        preserve = slot.const["update_scale"] == "preserve_norm"
        size = o.norm() if preserve else 0.2 * math.sqrt(o.numel())
        n = o.div_(v.sqrt() + sc["row_eps"])
        return n.mul_(size / (n.norm() + sc["row_eps"]))


# --------------------------------------------------------------------------- Kronecker factors
# SOAP and PSGD-Kron keep a factor per axis of a tensor (``Q{i}``, whole on every rank) and apply
# each along its axis.


def replicated(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> Tensor:
    """Zeros of ``shape`` behind a leading axis of 1: state that every rank keeps whole (a
    tensor shaped like its parameter would be cut into the parameter's shards)."""
    return torch.zeros((1, *shape), dtype=dtype, device=device)


def per_axis(x: Tensor, factors: list[Tensor | None], how: str = "q") -> Tensor:
    """``x`` with each axis ``i`` multiplied by ``Qᵢ = factors[i]``: ``"q"`` applies ``Qᵢ``,
    ``"qt"`` ``Qᵢᵀ``, ``"solve"`` ``Qᵢ⁻ᵀ`` (``Qᵢ`` upper triangular); a vector is a diagonal,
    ``None`` the identity. Each axis is moved last as it is done, so the axes come back in
    order (the contraction order of SOAP's reference)."""
    for q in factors:
        x = x.movedim(0, -1)
        if q is None:
            continue
        if q.dim() == 1:
            x = x / q if how == "solve" else x * q
        elif how == "solve":
            flat = x.reshape(-1, q.size(0))
            x = torch.linalg.solve_triangular(q, flat, upper=True, left=False).reshape(x.shape)
        else:
            x = x @ (q.mT if how == "q" else q)
    return x


def _gram(x: Tensor, i: int, diagonal: bool) -> Tensor:
    """``X_(i) X_(i)ᵀ`` of the axis-``i`` unfolding (its diagonal when ``diagonal``)."""
    if diagonal:
        others = [d for d in range(x.dim()) if d != i]
        return (x * x).sum(others) if others else x * x  # sum([]) would sum every axis
    unfolded = x.movedim(i, 0).reshape(x.size(i), -1)
    return unfolded @ unfolded.T


def settle(q: Tensor, sizes: Tensor) -> Tensor:
    """``q`` (orthonormal columns) with the columns of numerically zero ``sizes`` turned within
    their span to a basis of the span alone (docs/optimizers.md, SOAP)."""
    null = sizes <= sizes.max() * (q.size(0) * torch.finfo(q.dtype).eps)
    if int(null.sum()) < 2:  # a single column is fixed up to its sign, which SOAP ignores
        return q
    n = q[:, null]
    ramp = torch.arange(1, q.size(0) + 1, dtype=q.dtype, device=q.device)
    q = q.clone()
    q[:, null] = n @ torch.linalg.eigh(n.T @ (ramp[:, None] * n))[1]
    return q


class SoapStep(Transform):
    """SOAP (Vyas et al. 2024; pytorch-optimizer's): Adam in the eigenbases of Shampoo's
    statistics, refreshed every ``precondition_frequency`` steps (docs/optimizers.md)."""

    hyper = {"betas": BETAS, "shampoo_beta": optional(UNIT), "eps": NONNEG}
    hyper |= dict.fromkeys(("precondition_frequency", "max_precondition_dim"), POS_INT)
    hyper |= dict.fromkeys(("precondition_1d", "correct_bias", "normalize_gradient"), BOOL)
    whole, host = True, ("first", "refresh")

    def init(self, p, info, hp, dtype):
        axes = [i for i, n in enumerate(p.shape) if n <= hp["max_precondition_dim"]]
        shapes = {"exp_avg_eigen": p.shape, "exp_avg_sq": p.shape}
        for i in axes if p.dim() != 1 or hp["precondition_1d"] else []:
            shapes[f"GG{i}"] = shapes[f"Q{i}"] = (p.shape[i], p.shape[i])
        return {k: replicated(shape, dtype, p.device) for k, shape in shapes.items()}

    def scalars(self, hp, step):
        beta1, beta2, t = hp_value(hp, "betas", 0), hp_value(hp, "betas", 1), step - 1
        shampoo = beta2 if hp["shampoo_beta"] is None else hp_value(hp, "shampoo_beta")
        size = math.sqrt(1.0 - beta2**t) / (1.0 - beta1**t) if hp["correct_bias"] and t else 1.0
        refresh = float(t > 0 and t % hp["precondition_frequency"] == 0)
        out = {"w1": 1.0 - beta1, "w2": 1.0 - beta2, "ws": 1.0 - shampoo, "size": size}
        return out | {"eps": hp_value(hp, "eps"), "first": float(t == 0), "refresh": refresh}

    def update(self, x, slot, sc, stats):
        st, g = {k: v[0] for k, v in slot.state.items() if k != "step"}, slot.g
        bases = [st.get(f"Q{i}") for i in range(g.dim())]
        axes = [i for i, q in enumerate(bases) if q is not None]
        for i in axes:  # Shampoo's statistics (read only by the bases, after the step)
            st[f"GG{i}"].lerp_(_gram(g, i, False), sc["ws"])
        if sc["first"]:  # the bases (eigenvectors, descending), no update
            for i in axes:
                gg = st[f"GG{i}"]
                values, vectors = torch.linalg.eigh(gg + 1e-30 * torch.eye(len(gg)).to(gg))
                st[f"Q{i}"].copy_(settle(vectors, values).flip(1))
            return Update(x.tensor, 0.0, None, x.decay)
        rotated = per_axis(g, bases, "qt")
        m = st["exp_avg_eigen"].lerp_(rotated, sc["w1"])  # Qᵀm: m kept in the eigenbasis
        v = st["exp_avg_sq"].lerp_(rotated * rotated, sc["w2"])
        u = per_axis(m / (v.sqrt() + sc["eps"]), bases)
        if slot.const["normalize_gradient"]:
            u = u / (u.square().mean().sqrt() + sc["eps"])
        if sc["refresh"]:
            self._refresh(st, axes, bases)
        # the bias correction in the tensor: one rounding whether or not the step is gathered
        return Update(u * sc["size"], x.scale, None, x.decay)

    def _refresh(self, st: dict[str, Tensor], axes: list[int], bases: list) -> None:
        """One power iteration and a QR (float32 at least) per basis; ``v`` permuted alike,
        ``m`` turned from the old bases to the new ones."""
        m, v = per_axis(st["exp_avg_eigen"], bases), st["exp_avg_sq"]
        for i in axes:
            q = st[f"Q{i}"]
            product = st[f"GG{i}"] @ q
            order = torch.argsort((q * product).sum(0), descending=True)
            v = v.index_select(i, order)
            power = product.index_select(1, order)
            basis, r = torch.linalg.qr(power.float() if power.dtype.itemsize < 4 else power)
            q.copy_(settle(basis, r.diagonal().abs()))
        st["exp_avg_sq"].copy_(v)
        st["exp_avg_eigen"].copy_(per_axis(m, bases, "qt"))  # ``bases`` hold the new ones now


def norm_lower_bound(a: Tensor) -> Tensor:
    """PSGD's lower bound of the spectral norm of the symmetric ``a`` (docs/optimizers.md)."""
    top = a.abs().max()
    a = a / torch.where(top > 0, top, 1.0)
    (col, i), (row, j) = (a * a).sum(0).max(0), (a * a).sum(1).max(0)
    x = torch.where(col > row, a[:, i] @ a, a @ a[j])
    x = x / x.norm().clamp_min(torch.finfo(a.dtype).tiny)
    return top * torch.where(col > row, (x @ a.T).norm(), (a.T @ x).norm())


class KronSchedule:
    """PSGD-Kron's (fit, balance) per step, the reference's counter (docs/optimizers.md)."""

    def __init__(self, probability: float | None) -> None:
        self.probability, self.events, self.counter, self.fits = probability, [], 0, 0

    def __call__(self, step: int) -> tuple[bool, bool]:
        while len(self.events) < step:  # p: given, or the reference's schedule in float32
            t = torch.tensor(len(self.events), dtype=torch.float32)
            p = self.probability or float((t - 500).mul(-1e-3).exp().clamp(0.03, 1.0))
            fit = self.counter + 1 >= 1.0 / p
            self.counter, self.fits = (0, self.fits + 1) if fit else (self.counter + 1, self.fits)
            self.events.append((fit, fit and self.fits % 100 == 0))
        return self.events[step - 1]


kron_schedule = functools.lru_cache(maxsize=16)(KronSchedule)


def kron_noise(like: Tensor, name: str, step: int) -> Tensor:
    """A fit's standard normal probe, drawn from a generator seeded by ``name`` and ``step``."""
    generator = torch.Generator(like.device).manual_seed((zlib.crc32(name.encode()) << 24) + step)
    return torch.randn(like.shape, generator=generator, dtype=like.dtype, device=like.device)


class KronPrecondition(Transform):
    """PSGD-Kron: ``u = P m``, ``P`` Kronecker factors fitted to probes (docs/optimizers.md)."""

    hyper = {"pre_conditioner_update_probability": optional(PROBABILITY)}
    hyper |= dict.fromkeys(("max_size_triangular", "min_ndim_triangular"), POS_INT)
    hyper |= {"memory_save_mode": one_of(None, "one_diag", "smart_one_diag", "all_diag")}
    hyper |= {"momentum_into_precondition_update": BOOL}
    hyper |= dict.fromkeys(("precondition_lr", "precondition_init_scale"), POSITIVE)
    whole, host, eps = True, ("fit", "balance"), torch.finfo(torch.bfloat16).tiny

    def init(self, p, info, hp, dtype):
        shape, mode = tuple(p.shape) or (1,), hp["memory_save_mode"]
        ranked, top = sorted(shape), max(range(len(shape)), key=lambda d: (shape[d], d))
        smart = mode == "smart_one_diag" and len(shape) > 1 and ranked[-1] > ranked[-2]
        scale, state = hp_value(hp, "precondition_init_scale") ** (1.0 / len(shape)), {}
        for i, n in enumerate(shape):
            flat = mode == "all_diag" or (i == top and (mode == "one_diag" or smart)) or n == 1
            flat = flat or n > hp["max_size_triangular"] or len(shape) < hp["min_ndim_triangular"]
            q = torch.ones(n, dtype=dtype) if flat else torch.eye(n, dtype=dtype)
            state[f"Q{i}"] = replicated(q.shape, dtype, p.device).add_(q * scale)
        return state

    def scalars(self, hp, step):
        fit, balance = kron_schedule(number(hp["pre_conditioner_update_probability"]))(step)
        lr = hp_value(hp, "precondition_lr")
        return {"fit": float(fit), "balance": float(balance), "lr": lr, "step": float(step)}

    def update(self, x, slot, sc, stats):
        m = slot.value(x).reshape(tuple(slot.p.shape) or (1,))
        qs = [slot.state[f"Q{i}"][0] for i in range(m.dim())]
        if sc["balance"] and m.dim() > 1:  # equal factor norms: P is unchanged
            norms = torch.stack([q.abs().max() for q in qs])
            torch._foreach_mul_(qs, list(norms.prod() ** (1.0 / len(qs)) / norms))
        if sc["fit"]:
            g = m if slot.const["momentum_into_precondition_update"] else slot.g.reshape(m.shape)
            self._fit(qs, g, kron_noise(m, slot.info.name, int(sc["step"])), sc["lr"])
        u = per_axis(per_axis(m, qs), qs, "qt")
        u = u * (1.1 / (u.square().mean().sqrt() + 1e-6)).clamp(max=1.0)
        return Update(u.reshape(slot.p.shape), 1.0, None, x.decay)

    def _fit(self, qs: list[Tensor], g: Tensor, v: Tensor, lr: Scalar) -> None:
        a, b = per_axis(g, qs), per_axis(v, qs, "solve")
        for i, q in enumerate(qs):
            flat = q.dim() == 1
            aa, bb = _gram(a, i, flat), _gram(b, i, flat)
            den = ((aa + bb).abs().max() if flat else norm_lower_bound(aa + bb)) + self.eps
            step = (aa - bb) * lr
            q.sub_(step * q / den if flat else torch.triu(step) / den @ q)


# --------------------------------------------------------------------------- sign-like maps


class Sign(Transform):
    """``u ← sign(u)`` (Signum; ``sign(0) = 0``)."""

    def update(self, x, slot, sc, stats):
        return Update(torch.sign(slot.direction(x)), 1.0, None, x.decay)


class LionUpdate(Transform):
    """Lion: ``u = sign(β1 m + (1-β1) g)``, then ``m ← β2 m + (1-β2) g``."""

    hyper = {"betas": BETAS}

    def init(self, p, info, hp, dtype):
        return {"exp_avg": torch.zeros_like(p, dtype=dtype)}

    def scalars(self, hp, step):
        return {"w1": 1.0 - hp_value(hp, "betas", 0), "w2": 1.0 - hp_value(hp, "betas", 1)}

    def update(self, x, slot, sc, stats):
        g, m = slot.value(x), slot.state["exp_avg"]
        u = m.lerp(g, sc["w1"]).sign_()
        m.lerp_(g, sc["w2"])
        return Update(u, 1.0, None, x.decay)


class SophiaClip(Transform):
    """Sophia-G: ``u ← sign(u) · min(|u| / (ρ·bs·h + 1e-15), 1)``, ``h`` an EMA of
    Gauss-Newton-Bartlett estimates fed by :meth:`hessian`. Until the first estimate ``h = 0``
    and the update is ``sign(u)``.

    Computed as ``clamp(u / (ρ·bs·h + 1e-15), -1, 1)``: the denominator is positive, so this is
    the same number bit for bit (IEEE division is sign-symmetric) in fewer passes."""

    hyper = {"rho": NONNEG, "bs": POSITIVE, "betas": BETAS}
    read_only = ("hessian",)

    def init(self, p, info, hp, dtype):
        return {"hessian": torch.zeros_like(p, dtype=dtype)}

    def scalars(self, hp, step):
        return {"scale": hp_value(hp, "rho") * hp_value(hp, "bs")}

    def update(self, x, slot, sc, stats):
        h = slot.state["hessian"]
        u = slot.value(x).div(h.mul(sc["scale"]).add_(1e-15)).clamp_(-1.0, 1.0)
        return Update(u, 1.0, None, x.decay)

    def hessian(self, slot, hp):
        slot.state["hessian"].lerp_(slot.g * slot.g, 1.0 - hp_value(hp, "betas", 1))


class ClipByRMS(Transform):
    """Classic Adafactor's update clipping: ``u ← u / max(1, RMS(u) / clip_threshold)``."""

    hyper = {"clip_threshold": POSITIVE}

    def scalars(self, hp, step):
        return {"threshold": hp_value(hp, "clip_threshold")}

    def statistics(self, x, slot, sc):
        if x.sq is not None:  # known already (a factored moment's)
            return {}
        u = slot.direction(x)
        return {"sq": blocks.entry_sum(u * u)}

    def update(self, x, slot, sc, stats):
        rms = ((stats["sq"] if x.sq is None else x.sq) / slot.rows.numel).sqrt()
        return Update(x.tensor, x.scale / (rms / sc["threshold"]).clamp(min=1.0), x.den, x.decay)


class RelativeStep(Transform):
    """Classic Adafactor's step size: ``lr``, or with ``relative_step`` ``min(1e-2, 1/√t)``
    (``1e-6·t`` with ``warmup_init``), times ``max(eps2, RMS(θ))`` with ``scale_parameter``.
    It scales the decay too: ``θ ← θ - λ·step·θ``."""

    hyper = {
        "lr": optional(NONNEG),
        "relative_step": BOOL,
        "warmup_init": BOOL,
        "scale_parameter": BOOL,
    }

    def scalars(self, hp, step):
        if not hp["relative_step"]:
            size = hp_value(hp, "lr")
        else:
            size = min(1e-6 * step if hp["warmup_init"] else 1e-2, 1.0 / math.sqrt(step))
        return {"size": size, "eps2": hp_value(hp, "eps", 1)}

    def statistics(self, x, slot, sc):
        return {"p_sq": blocks.entry_sum(slot.p * slot.p)} if slot.const["scale_parameter"] else {}

    def update(self, x, slot, sc, stats):
        if not slot.const["scale_parameter"]:
            return x.scaled(sc["size"])
        rms = (stats["p_sq"] / slot.rows.numel).sqrt()
        return x.scaled(rms.clamp(min=sc["eps2"]) * sc["size"])


# --------------------------------------------------------------------------- schedule-free


class ScheduleFreeStep(Transform):
    """Schedule-Free AdamW (Defazio et al. 2024; ``schedulefree.AdamWScheduleFree``): the
    normalised gradient ``u`` (Adam's second moment before this) plus ``λy``; ``z ← z - γu``
    and the parameter, in train mode the point ``y = (1-β1) z + β1 x``, becomes
    ``y ← (1-c) y + c z + γ(β1(1-c) - 1) u`` with ``c = w_t / Σ w``, ``w_t = t^r·γ_max^p``
    (``γ = lr``, linearly warmed over ``warmup_steps``; ``γ_max`` its running maximum, kept with
    ``Σ w`` per parameter). The average ``x`` is the eval point (:meth:`swap`). Last in its
    chain: it moves the parameter to ``(1-c) y + c z`` itself (a ``lerp``, as the reference)
    and returns the rest of the step."""

    hyper = {
        "lr": NONNEG,
        "betas": BETAS,
        "weight_decay": NONNEG,
        "warmup_steps": NONNEG_INT,
        "r": NONNEG,
        "weight_lr_power": NONNEG,
    }
    swaps = True

    def init(self, p, info, hp, dtype):
        scalar = functools.partial(torch.zeros, (), dtype=dtype, device=p.device)
        return {
            "z": p.detach().to(dtype, copy=True),
            "lr_max": scalar() - 1.0,
            "weight_sum": scalar(),
        }

    def scalars(self, hp, step):
        warmup = hp["warmup_steps"]
        lr = hp_value(hp, "lr") * (step / warmup if step <= warmup else 1.0)
        return {
            "lr": lr,
            "beta1": hp_value(hp, "betas", 0),
            "wd": hp_value(hp, "weight_decay"),
            "power": hp_value(hp, "weight_lr_power"),
            "tr": float(step) ** hp_value(hp, "r"),
        }

    def update(self, x, slot, sc, stats):
        st, lr = slot.state, sc["lr"]
        weight = st["lr_max"].clamp_(min=lr) ** sc["power"] * sc["tr"]
        total = st["weight_sum"].add_(weight)
        # c = weight / Σw, 0 where Σw = 0 (then weight = 0 too: 0/0, the only NaN there is).
        # No in-place operation on these temporaries: inductor (torch 2.13) then drops the
        # write of weight_sum
        c = (weight / total).nan_to_num(nan=0.0)
        u, scale = slot.direction(x), x.scale  # the normalised gradient is scale·u
        if slot.decays and not is_zero(sc["wd"]):
            u = axpy(u, slot.p, sc["wd"] / scale)
        z = st["z"]
        slot.p.lerp_(z, c)  # exactly y where z = y (a parameter that never had a gradient)
        axpy_(z, u, -lr * scale)
        # γ·scale·(1 - β1(1 - c)) as γ·scale·β1·c + γ·scale·(1 - β1): two 0-d operations
        step = lr * scale
        return Update(u, c * (step * sc["beta1"]) + step * (1.0 - sc["beta1"]), None, 0.0)

    def swap(self, p, state, hp, train):
        z = state.get("z")
        if z is not None:
            beta1 = hp_value(hp, "betas", 0)
            p.lerp_(z.to(p.dtype), 1.0 - beta1 if train else 1.0 - 1.0 / beta1)


# --------------------------------------------------------------------------- decay, lr, gates


class DecoupledDecay(Transform):
    """``θ ← θ·(1 - λ·lr)``, where the role takes decay (put before the learning rate, which
    scales it)."""

    hyper = {"weight_decay": NONNEG}

    def scalars(self, hp, step):
        return {"wd": hp_value(hp, "weight_decay")}

    def update(self, x, slot, sc, stats):
        return Update(x.tensor, x.scale, x.den, x.decay + sc["wd"]) if slot.decays else x


class MatrixDecay(DecoupledDecay):
    """:class:`DecoupledDecay` on tensors of two or more axes only (PSGD-Kron's reference)."""

    def update(self, x, slot, sc, stats):
        return super().update(x, slot, sc, stats) if slot.p.dim() >= 2 else x


class DecayAfterStep(Transform):
    """The decay applied to the stepped parameter, ``θ ← (θ - s·u)(1 - d)`` (SOAP's
    reference), from the second step on (its first step only sets its bases). Last in a
    chain."""

    def scalars(self, hp, step):
        return {"on": float(step > 1)}

    def update(self, x, slot, sc, stats):
        decay = x.decay * sc["on"]
        return Update(x.tensor, x.scale * (1.0 - decay), x.den, decay)


class CoupledDecay(Transform):
    """torch's coupled decay: ``g ← g + λθ`` before everything else (``torch.optim.SGD``)."""

    hyper = {"weight_decay": NONNEG}

    def scalars(self, hp, step):
        return {"wd": hp_value(hp, "weight_decay")}

    def update(self, x, slot, sc, stats):
        if not slot.decays or is_zero(sc["wd"]):
            return x
        return Update(axpy(slot.value(x), slot.p, sc["wd"]), 1.0, None, x.decay)


class ScaleByLR(Transform):
    """The learning rate: ``u ← lr·u`` (the decay before it too)."""

    hyper = {"lr": NONNEG}

    def scalars(self, hp, step):
        return {"lr": hp_value(hp, "lr")}

    def update(self, x, slot, sc, stats):
        return x.scaled(sc["lr"])


class Gate(Transform):
    """The frozen preconditioner's measuring phase: no update for the first
    ``precondition_steps`` steps (momentum and ``v`` still accumulate)."""

    def scalars(self, hp, step):
        return {"active": float(step > hp["precondition_steps"])}

    def update(self, x, slot, sc, stats):
        return x.scaled(sc["active"])
