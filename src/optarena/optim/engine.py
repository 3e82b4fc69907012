"""Running a chain: the one loop every execution mode shares, and the step counts it reads.

:func:`run_chain` is the whole arithmetic of one parameter's step: each transform's statistics
(summed over the local entries), its update, then the parameter's write. The eager path calls it
per parameter; the compiled path traces it over a bucket of parameters (``compiled.py``); the
sharded path runs the same transforms stage by stage, adding the statistics over the shards
between them (``sharding.py``). Only torch's own kernels (``torch_kernels.py``) compute without
it, for the chains that are exactly torch's AdamW or SGD.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from optarena.optim.checks import Check
from optarena.optim.roles import ParamInfo
from optarena.optim.transforms import Scalar, Slot, Transform, Update, apply_

Scalars = Sequence[Mapping[str, Scalar]]  # per transform of a chain


@dataclass(frozen=True)
class Chain:
    """An optimizer's transforms, in order."""

    transforms: tuple[Transform, ...]

    def __iter__(self):
        return iter(self.transforms)

    def init(self, p: Tensor, info: ParamInfo, hp: Mapping[str, Any], dtype: torch.dtype) -> dict:
        state: dict[str, Tensor] = {}
        for t in self.transforms:
            state.update(t.init(p, info, hp, dtype))
        return state

    def scalars(self, hp: Mapping[str, Any], step: int) -> list[dict[str, float]]:
        return [t.scalars(hp, step) for t in self.transforms]

    @property
    def hyper(self) -> dict[str, Check]:
        checks: dict[str, Check] = {}
        for t in self.transforms:
            checks.update(t.hyper)
        return checks

    @property
    def read_only(self) -> tuple[str, ...]:
        return tuple(k for t in self.transforms for k in t.read_only)

    def host_step(self, scalars: Scalars) -> bool:
        """Whether a host scalar (``Transform.host``) is set in these scalars of the chain: a
        step its compiled function, traced with them at 0, does not compute."""
        return any(
            sc[name] for t, sc in zip(self.transforms, scalars, strict=True) for name in t.host
        )

    @property
    def needs_hessian(self) -> bool:
        return any(type(t).hessian is not Transform.hessian for t in self.transforms)


def run_chain(chain: Chain, slot: Slot, scalars: Scalars) -> Update:
    """The update of one parameter (the gradient through every transform)."""
    x = Update(slot.g)
    for transform, sc in zip(chain.transforms, scalars, strict=True):
        x = transform.update(x, slot, sc, transform.statistics(x, slot, sc))
    return x


def step_slot(chain: Chain, slot: Slot, scalars: Scalars, param: Tensor) -> None:
    """:func:`run_chain` and the write of ``param`` (rounded once when the slot holds a copy of
    it in a wider dtype)."""
    apply_(slot.p, run_chain(chain, slot, scalars))
    if slot.p is not param:
        param.copy_(slot.p)


def real(t: Tensor) -> Tensor:
    """A complex tensor as its real view (torch's optimizers update complex parameters so)."""
    return torch.view_as_real(t) if t.is_complex() else t


class StepCounter:
    """Each parameter's step count: ``state["step"]`` (a 0-d float32 tensor, as torch keeps it),
    with a host copy so that reading it never synchronises a device. A count replaced by another
    tensor (a loaded state dict, a count set by hand) is read again."""

    def __init__(self) -> None:
        self._host: dict[int, tuple[Tensor, int]] = {}

    def _read(self, t: Tensor) -> int:
        known = self._host.get(id(t))
        n = known[1] if known is not None and known[0] is t else int(t.item())
        self._host[id(t)] = (t, n)
        return n

    def peek(self, states: Sequence[dict[str, Any]]) -> list[int]:
        """The counts :meth:`advance` would return, counting nothing."""
        return [self._read(st["step"]) + 1 for st in states]

    def advance(self, states: Sequence[dict[str, Any]]) -> list[int]:
        """Count a step for every state (one multi-tensor add); the counts after it."""
        counts = [st["step"] for st in states]
        out = []
        for t in counts:
            n = self._read(t) + 1
            self._host[id(t)] = (t, n)
            out.append(n)
        torch._foreach_add_(counts, 1.0)
        return out

    def take_back(self, states: Sequence[dict[str, Any]]) -> None:
        """Undo :meth:`advance` for these states (a path that declined them this step)."""
        for st in states:
            t, n = self._host[id(st["step"])]
            self._host[id(t)] = (t, n - 1)
            t.sub_(1.0)

    def clear(self) -> None:
        self._host.clear()


class ScalarCache:
    """A chain's scalars per step count within one step: parameters of a group usually share one
    count, so the host computes each distinct count's numbers once."""

    def __init__(self, chain: Chain, hp: Mapping[str, Any]) -> None:
        self.chain, self.hp = chain, hp
        self._by_step: dict[int, list[dict[str, float]]] = {}

    def __call__(self, step: int) -> list[dict[str, float]]:
        found = self._by_step.get(step)
        if found is None:
            found = self._by_step[step] = self.chain.scalars(self.hp, step)
        return found


Factory = Callable[[Mapping[str, Any]], Chain]
