"""Model shapes for benchmarks and tests: Llama-shaped named parameters with their roles.

The parameters are plain tensors with the names and shapes of a Hugging Face Llama model
(``transformers.LlamaConfig``), and the :class:`ParamInfo` of each, so that the block optimizers
(Adam-mini's heads and rows, Adalayer's last layer) see the structure a real model has without
building the model (an optimizer step only needs parameters and gradients).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import nn

from optarena.optim.roles import ParamInfo, Role


@dataclass(frozen=True)
class Shape:
    """A decoder-only Llama shape (SwiGLU MLP, RMSNorm gains, untied embedding and output)."""

    d_model: int = 512
    n_layers: int = 8
    n_heads: int = 8
    n_kv_heads: int = 8
    d_ff: int = 1376
    vocab: int = 8192

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    def as_dict(self) -> dict[str, int]:
        return asdict(self)


SHAPES: dict[str, Shape] = {
    # the reference model: 33.7M parameters
    "llama-34m": Shape(),
    # ~125k parameters with every role present: quick checks of the bench itself
    "llama-tiny": Shape(d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=176, vocab=256),
}


def parse_shape(text: str) -> Shape:
    """A preset name or ``key=value,...`` (``d_model=256,n_layers=4``) over the default."""
    if text in SHAPES:
        return SHAPES[text]
    if not text.strip(" ,"):
        raise ValueError(
            f"empty shape {text!r}: omit --shape for the default, or name a preset "
            f"({', '.join(SHAPES)}) or key=value pairs"
        )
    fields = Shape().as_dict()
    for item in filter(None, (t.strip() for t in text.split(","))):
        key, _, value = item.partition("=")
        key = key.strip()
        if key not in fields or not value:
            raise ValueError(
                f"invalid shape {text!r}: use a preset ({', '.join(SHAPES)}) or key=value pairs "
                f"with keys {', '.join(fields)}"
            )
        try:
            fields[key] = int(value)
        except ValueError:
            fields[key] = 0
        if fields[key] < 1:
            raise ValueError(
                f"invalid shape {text!r}: {key} must be a positive integer, not {value.strip()!r}"
            )
    shape = Shape(**fields)
    if shape.d_model % shape.n_heads or shape.n_heads % shape.n_kv_heads:
        raise ValueError(
            f"invalid shape {text!r}: d_model ({shape.d_model}) must be a multiple of n_heads "
            f"({shape.n_heads}) and n_heads of n_kv_heads ({shape.n_kv_heads})"
        )
    return shape


def llama_layout(shape: Shape) -> list[tuple[str, tuple[int, ...], ParamInfo]]:
    """Every parameter of the Llama model: ``(name, shape, ParamInfo)``, in module order."""
    d, kv = shape.d_model, shape.n_kv_heads * shape.head_dim
    out: list[tuple[str, tuple[int, ...], ParamInfo]] = []

    def add(name: str, dims: tuple[int, ...], role: Role, heads: int | None = None) -> None:
        out.append((name, dims, ParamInfo(name, dims, role, heads=heads)))

    add("model.embed_tokens.weight", (shape.vocab, d), Role.EMBEDDING)
    for i in range(shape.n_layers):
        pre = f"model.layers.{i}"
        add(f"{pre}.self_attn.q_proj.weight", (d, d), Role.Q, shape.n_heads)
        add(f"{pre}.self_attn.k_proj.weight", (kv, d), Role.K, shape.n_kv_heads)
        add(f"{pre}.self_attn.v_proj.weight", (kv, d), Role.V, shape.n_kv_heads)
        add(f"{pre}.self_attn.o_proj.weight", (d, d), Role.O)
        add(f"{pre}.mlp.gate_proj.weight", (shape.d_ff, d), Role.MLP)
        add(f"{pre}.mlp.up_proj.weight", (shape.d_ff, d), Role.MLP)
        add(f"{pre}.mlp.down_proj.weight", (d, shape.d_ff), Role.MLP)
        add(f"{pre}.input_layernorm.weight", (d,), Role.NORM)
        add(f"{pre}.post_attention_layernorm.weight", (d,), Role.NORM)
    add("model.norm.weight", (d,), Role.NORM)
    add("lm_head.weight", (shape.vocab, d), Role.OUTPUT)
    return out


def llama_params(
    shape: Shape,
    *,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
    seed: int = 0,
    grads: bool = True,
) -> tuple[list[tuple[str, nn.Parameter]], dict[str, ParamInfo]]:
    """Named parameters of the Llama shape (with random gradients) and their partition."""
    gen = torch.Generator().manual_seed(seed)
    named: list[tuple[str, nn.Parameter]] = []
    infos: dict[str, ParamInfo] = {}
    for name, dims, info in llama_layout(shape):
        init = torch.randn(dims, generator=gen) * 0.02 if len(dims) > 1 else torch.ones(dims)
        p = nn.Parameter(init.to(device=device, dtype=dtype))
        if grads:
            p.grad = (torch.randn(dims, generator=gen) * 1e-3).to(device=device, dtype=dtype)
        named.append((name, p))
        infos[name] = info
    return named, infos


def num_params(shape: Shape) -> int:
    total = 0
    for _, dims, _ in llama_layout(shape):
        n = 1
        for s in dims:
            n *= s
        total += n
    return total
