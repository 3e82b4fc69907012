"""What a parameter *is* in a transformer: its role and the structure a block optimizer needs.

The partition (``optarena.optim.partition``) assigns one :class:`ParamInfo` per parameter from the
module structure; block granularity policies (``optarena.optim.blocks``) turn a ``ParamInfo`` into
the block layout of a particular optimizer (Adam: elements, Adalayer: tensors, Adam-mini: heads
and rows, ...). Keeping "what it is" apart from "how an optimizer cuts it" is what lets every
optimizer share one partition.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from enum import Enum


class Role(str, Enum):
    """The part of a transformer a parameter belongs to."""

    EMBEDDING = "embedding"  # token (or position) embedding table, rows = tokens
    OUTPUT = "output"  # last layer / unembedding, rows = output tokens
    Q = "q"  # query projection
    K = "k"  # key projection
    V = "v"  # value projection
    QKV = "qkv"  # fused query/key/value projection
    O = "o"  # attention output projection
    MLP = "mlp"  # feed-forward matrices (up, gate, down)
    NORM = "norm"  # LayerNorm / RMSNorm gains (a norm's bias is BIAS, like every bias)
    BIAS = "bias"  # bias vectors of linear layers
    OTHER = "other"  # anything else (positional tables, scalars, unknown)

    def __str__(self) -> str:  # pragma: no cover - trivial
        return self.value


@dataclass(frozen=True)
class FusedPart:
    """One of the projections stacked inside a fused tensor (e.g. the Q of a fused QKV)."""

    role: Role
    size: int  # extent along the parameter's ``out_dim``
    heads: int | None = None  # attention heads within this part, if any


@dataclass(frozen=True)
class ParamInfo:
    """Structure of one parameter, as the block optimizers need it.

    ``out_dim`` is the axis that indexes output neurons: 0 for ``nn.Linear`` and embedding tables
    (rows), 1 for GPT-2's ``Conv1D`` which stores weights as (in, out). ``heads`` is the number of
    attention heads laid out along ``out_dim`` (q: query heads, k/v: key/value heads under GQA).
    ``parts`` describes a fused tensor (QKV) as consecutive slices along ``out_dim``.
    ``experts`` is the number of experts stacked along axis 0 of a fused mixture-of-experts
    tensor (``(experts, out, in)``, as transformers' ``gate_up_proj``): each index of axis 0 is
    a matrix of its own, with ``out_dim`` counted in the stacked tensor.
    """

    name: str
    shape: tuple[int, ...]
    role: Role
    out_dim: int = 0
    heads: int | None = None
    parts: tuple[FusedPart, ...] = field(default=())
    tied: bool = False  # shared between embedding and output (weight tying)
    experts: int | None = None  # matrices stacked along axis 0 (fused MoE experts)
    source: str = "structure"  # how the role was found: "structure", "name", "override"

    @property
    def numel(self) -> int:
        return math.prod(self.shape)
