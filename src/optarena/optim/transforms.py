"""The shared pieces every optimizer here is built from.

Each optimizer in ``optarena.optim`` is a short composition of these transforms (in the spirit of
optax): a momentum (EMA or heavy ball), optionally a second moment at some block granularity
(per element, per block, factored), and a final map (preconditioning, sign, clipping). Reading
``rules.py`` with this module beside it shows Adam, Adalayer, Adam-mini and Adafactor as one
algorithm with different second moments, and Lion, Signum and Sophia as sign-like updates of an
EMA momentum.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import NamedTuple, Protocol

import torch
from torch import Tensor

from optarena.optim.blocks import (
    BlockLayout,
    block_mean_square,
    blockwise,
    covers,
    sharding_invariant_sum,
)
from optarena.optim.sharding import LocalShard, shard_of


class Ratio(NamedTuple):
    """A preconditioned update left as ``num / den`` (``den`` broadcasts against ``num``): the
    eager driver applies it with one ``addcdiv_`` over the parameter viewed as ``num``'s shape,
    instead of materialising the quotient and adding it (two full-size passes fewer)."""

    num: Tensor
    den: Tensor


# --------------------------------------------------------------------------- momentum


def ema_(avg: Tensor, x: Tensor, beta: float) -> Tensor:
    """``avg = β avg + (1-β) x`` in place (Adam's first moment, Lion's and Signum's momentum)."""
    return avg.lerp_(x, 1.0 - beta)


def heavy_ball_(buf: Tensor, g: Tensor, momentum: float, dampening: float) -> Tensor:
    """``buf = μ buf + (1-dampening) g`` in place (torch SGD; the caller seeds ``buf = g``)."""
    return buf.mul_(momentum).add_(g, alpha=1.0 - dampening)


def bias_correction(beta: float, step: int) -> float:
    """``1 - β^t``: undoes the zero initialisation of an EMA after ``t`` updates."""
    return 1.0 - beta**step


# --------------------------------------------------------------------------- second moments


class SecondMoment(Protocol):
    """A running estimate of ``E[g²]`` at some granularity, and the division by its root.

    On a sharded parameter (``optarena.optim.sharding``) ``g`` and ``m`` are this rank's rows,
    ``state`` carries the shard, and :meth:`shard_stats` asks, before the step's one collective,
    for the partial sums of every statistic that spans rows.
    """

    def init(self, p: Tensor, dtype: torch.dtype) -> dict[str, Tensor]: ...

    def shard_stats(self, g: Tensor, shard: LocalShard) -> None: ...

    def update_(self, state: dict[str, Tensor], g: Tensor, beta2: float) -> None: ...

    def average_(self, state: dict[str, Tensor], g: Tensor, count: int) -> None: ...

    def average_weighted_(self, state: dict[str, Tensor], g: Tensor, weight: Tensor) -> None:
        """:meth:`average_` with ``1/count`` as a tensor (traced by the fast path)."""
        ...

    def precondition(
        self,
        m: Tensor,
        state: dict[str, Tensor],
        bc2: float | Tensor,
        eps: float,
        lazy: bool = False,
    ) -> Tensor | Ratio:
        """``m / (sqrt(v / bc2) + eps)`` with ``v`` broadcast from its blocks (``lazy``: may
        be a :class:`Ratio` for the eager driver to apply)."""
        ...


class BlockSecondMoment:
    """One second-moment value per block of a :class:`BlockLayout`.

    Per element this is Adam; per tensor, Adalayer; per head/row, Adam-mini. The state is
    ``exp_avg_sq``: the parameter's shape when per element, else ``(num_blocks,)``.
    """

    def __init__(self, layout: BlockLayout):
        self.layout = layout

    def init(self, p: Tensor, dtype: torch.dtype) -> dict[str, Tensor]:
        if self.layout.elementwise:
            return {"exp_avg_sq": torch.zeros_like(p, dtype=dtype)}
        n = self.layout.num_blocks(p.shape)
        return {"exp_avg_sq": torch.zeros(n, dtype=dtype, device=p.device)}

    def shard_stats(self, g: Tensor, shard: LocalShard) -> None:
        if not self.layout.elementwise:
            shard.request_blocks("block_mean_square", g * g, self.layout)

    def _stat(self, state: dict[str, Tensor], g: Tensor) -> Tensor:
        shard = shard_of(state)
        if shard is None or self.layout.elementwise:
            return block_mean_square(g, self.layout)
        return shard.mean("block_mean_square").clone()

    def update_(self, state: dict[str, Tensor], g: Tensor, beta2: float) -> None:
        v = state["exp_avg_sq"]
        if self.layout.elementwise:
            v.mul_(beta2).addcmul_(g, g, value=1.0 - beta2)
        else:
            v.mul_(beta2).add_(self._stat(state, g), alpha=1.0 - beta2)

    def average_(self, state: dict[str, Tensor], g: Tensor, count: int) -> None:
        """Uniform running mean of the block statistic (the frozen-preconditioner phase)."""
        v = state["exp_avg_sq"]
        v.add_(self._stat(state, g).sub_(v), alpha=1.0 / count)

    def average_weighted_(self, state: dict[str, Tensor], g: Tensor, weight: Tensor) -> None:
        v = state["exp_avg_sq"]
        v.add_((block_mean_square(g, self.layout) - v) * weight)

    def precondition(
        self,
        m: Tensor,
        state: dict[str, Tensor],
        bc2: float | Tensor,
        eps: float,
        lazy: bool = False,
    ) -> Tensor | Ratio:
        """``m / (sqrt(v / bc2) + eps)``; ``lazy``: a :class:`Ratio` where the blocks tile ``m``
        in one reshape (one segment, whole tensor, one process)."""
        # a tensor ``bc2`` comes from the fast path (no recompilation when the step changes)
        root_bc2 = bc2.sqrt() if isinstance(bc2, Tensor) else math.sqrt(bc2)

        def den(v: Tensor) -> Tensor:
            if isinstance(root_bc2, float) and root_bc2 == 1.0:  # x / 1 == x: skip the pass
                return v.sqrt() + eps
            return v.sqrt() / root_bc2 + eps

        def fn(x: Tensor, v: Tensor) -> Tensor:
            return x / den(v)

        v = state["exp_avg_sq"]
        shard = shard_of(state)
        if shard is not None and not self.layout.elementwise:
            return shard.blockwise(fn, m, v, self.layout)
        segs = self.layout.segments
        if lazy and not self.layout.elementwise and len(segs) == 1 and m.is_contiguous():
            s = segs[0]
            if covers(m, s):
                return Ratio(m.view(s.shape), den(v).reshape(s.stat_shape))
        return blockwise(fn, m, v, self.layout)


class FactoredSecondMoment:
    """Adafactor's second moment: one EMA per tensor axis of the mean of ``g²`` over the others.

    For a matrix ``V = r cᵀ / mean(r)``; for ``N`` axes ``V = Π_i r_i / mean^(N-1)``. The state
    is ``exp_avg_sq_{i}`` for every axis ``i`` (shape: 1 everywhere but axis ``i``), i.e. the sum
    of the dimensions instead of their product. Tensors with fewer than two axes are not
    factored: they keep one scalar (the study's choice).
    """

    def init(self, p: Tensor, dtype: torch.dtype) -> dict[str, Tensor]:
        if p.dim() < 2:
            return {"exp_avg_sq": torch.zeros(1, dtype=dtype, device=p.device)}
        return {
            f"exp_avg_sq_{i}": torch.zeros(_axis_shape(p.shape, i), dtype=dtype, device=p.device)
            for i in range(p.dim())
        }

    @staticmethod
    def shard_stats(g: Tensor, shard: LocalShard) -> None:
        sq = g * g
        if g.dim() < 2:
            shard.request_sum("exp_avg_sq", sq)
            return
        for i in range(g.dim()):
            shard.request_sum(f"exp_avg_sq_{i}", sq, keep=(i,))

    @staticmethod
    def _stats(g: Tensor, shard: LocalShard | None = None) -> dict[str, Tensor]:
        if shard is not None:  # the global means, identical on every rank like the factors
            if g.dim() < 2:
                return {"exp_avg_sq": shard.mean("exp_avg_sq").reshape(1).clone()}
            keys = [f"exp_avg_sq_{i}" for i in range(g.dim())]
            return {k: shard.mean(k).clone() for k in keys}
        if g.dim() < 2:
            return {"exp_avg_sq": mean_over(g * g, range(g.dim())).reshape(1)}
        sq = g * g
        return {
            f"exp_avg_sq_{i}": mean_over(sq, [d for d in range(g.dim()) if d != i])
            for i in range(g.dim())
        }

    def update_(self, state: dict[str, Tensor], g: Tensor, beta2: float) -> None:
        """EMA of the factors' statistics."""
        for key, stat in self._stats(g, shard_of(state)).items():
            state[key].mul_(beta2).add_(stat, alpha=1.0 - beta2)

    def average_(self, state: dict[str, Tensor], g: Tensor, count: int) -> None:
        for key, stat in self._stats(g, shard_of(state)).items():
            state[key].add_(stat.sub_(state[key]), alpha=1.0 / count)

    def average_weighted_(self, state: dict[str, Tensor], g: Tensor, weight: Tensor) -> None:
        for key, stat in self._stats(g).items():
            state[key].add_((stat - state[key]) * weight)

    def precondition(
        self,
        m: Tensor,
        state: dict[str, Tensor],
        bc2: float | Tensor,
        eps: float,
        lazy: bool = False,
    ) -> Tensor:
        return self.precondition_by_roots(m, self.roots(state, m.dim(), bc2), eps)

    @staticmethod
    def precondition_by_roots(m: Tensor, roots: list[Tensor], eps: float) -> Tensor:
        """``m / (Π roots + eps)``: only the product of the small roots is full-size."""
        if len(roots) == 1:
            return m / (roots[0] + eps)
        root = roots[0] * roots[1]
        for r in roots[2:]:
            root = root * r
        return m / root.add_(eps)  # a fresh product: adding in place saves a full-size copy

    @staticmethod
    def roots(state: dict[str, Tensor], ndim: int, bc2: float | Tensor) -> list[Tensor]:
        """Small tensors whose broadcast product is ``sqrt(V / bc2)`` (on a sharded parameter:
        its local rows; the factors themselves are replicated).

        Every factor has the same mean (that of g²), so ``V = f_0 · Π_{i≥1} (f_i / mean)``: no
        mean^(N-1) to underflow, and an all-zero gradient history gives V = 0, not 0/0. The root
        of a rank-one tensor is rank one: square roots are taken of the factors, once per row
        and column, never per entry.
        """
        if ndim < 2:
            # a 0-d scalar broadcasts against 0-d and 1-D parameters alike
            return [(state["exp_avg_sq"].reshape(()) / bc2).sqrt()]
        factors = [state[f"exp_avg_sq_{i}"] for i in range(ndim)]
        mean = factors[0].mean().clamp_min(torch.finfo(factors[0].dtype).tiny)
        shard = shard_of(state)
        first = (factors[0] / bc2).sqrt()
        roots = [first if shard is None else shard.rows(first)]
        for f in factors[1:]:
            roots.append((f / mean).sqrt())
        return roots


def _axis_shape(shape: torch.Size, axis: int) -> tuple[int, ...]:
    return tuple(s if i == axis else 1 for i, s in enumerate(shape))


# --------------------------------------------------------------------------- final maps


def mean_over(x: Tensor, dims: Iterable[int]) -> Tensor:
    """``x.mean(dims, keepdim=True)``, the same on one process and on row shards (see
    :func:`~optarena.optim.blocks.sharding_invariant_sum`)."""
    dims = list(dims)
    count = 1
    for d in dims:  # no generator expressions: torch.compile traces this (fused.py)
        count *= x.shape[d]
    return (sharding_invariant_sum(x, dims) / max(count, 1)).to(x.dtype)


def rms(x: Tensor) -> Tensor:
    """Root mean square of all entries, in one read of ``x`` (torch's norm sums in cascade,
    accurate in float32; a float64 accumulation of float32 input is several times slower)."""
    return torch.linalg.vector_norm(x) / math.sqrt(max(x.numel(), 1))


def clip_by_rms_(
    u: Tensor, threshold: float, u_rms: Tensor | None = None, scale: float = 1.0
) -> Tensor:
    """Scale ``u`` down so that its RMS is at most ``threshold`` (classic Adafactor), and by
    ``scale`` (its step size) in the same pass; ``u_rms`` is given when ``u`` is one shard."""
    factor = ((rms(u) if u_rms is None else u_rms) / threshold).clamp_(min=1.0)
    return u.mul_(scale / factor)


def clipped_ratio(m: Tensor, h: Tensor, scale: float, floor: float = 1e-15) -> Tensor:
    """Sophia's ``sign(m) · min(|m| / (scale·h + floor), 1)``.

    Computed as ``clamp(m / (scale·h + floor), -1, 1)``: the denominator is positive, so this is
    the same number bit for bit (IEEE division is sign-symmetric), in four passes instead of seven.
    """
    return m.div(h.mul(scale).add_(floor)).clamp_(-1.0, 1.0)
