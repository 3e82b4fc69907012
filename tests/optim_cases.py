"""Shared material of the optimizer tests: named parameter sets, their roles, seeded gradients.

Everything here is deterministic: a gradient is a function of (parameter index, step, seed) so
that two optimizers (ours and a reference, or an interrupted and an uninterrupted run) see
exactly the same numbers.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import Tensor, nn

from optarena.optim import ParamInfo, Role

Shapes = dict[str, tuple[int, ...]]

# Parity tolerances (float64). Implementations that compute the same formula in a different
# order (lerp vs mul/add, addcdiv vs divide-then-add) agree to a few ulps per step.
RTOL = 1e-10
ATOL = 1e-12

# Shapes for the generic parity tests: 1-D, 2-D and 3-D tensors in two param groups, plus one
# parameter that never receives a gradient.
GROUP_A: Shapes = {"a.vec": (7,), "a.mat": (5, 6), "a.cube": (3, 4, 5)}
GROUP_B: Shapes = {"b.mat": (6, 3), "b.vec": (4,)}
NO_GRAD = "b.nograd"


def make_params(
    shapes: Mapping[str, tuple[int, ...]], dtype: torch.dtype = torch.float64, seed: int = 0
) -> dict[str, nn.Parameter]:
    gen = torch.Generator().manual_seed(seed)
    return {
        name: nn.Parameter(torch.randn(shape, generator=gen, dtype=torch.float64).to(dtype))
        for name, shape in shapes.items()
    }


def clone_params(params: Mapping[str, nn.Parameter]) -> dict[str, nn.Parameter]:
    return {n: nn.Parameter(p.detach().clone()) for n, p in params.items()}


def synthetic_grad(
    shape: tuple[int, ...], index: int, step: int, seed: int = 1, scale: float = 1.0
) -> Tensor:
    """A seeded float64 gradient with ~15% exact zeros; all zeros for parameter 0 at step 3."""
    gen = torch.Generator().manual_seed(seed * 1_000_003 + step * 7_919 + index * 104_729)
    g = torch.randn(shape, generator=gen, dtype=torch.float64) * scale
    mask = torch.rand(shape, generator=gen, dtype=torch.float64) < 0.15
    g = g.masked_fill(mask, 0.0)
    if index == 0 and step == 3:
        g = torch.zeros_like(g)
    return g


def set_grads(
    params: Mapping[str, Tensor],
    step: int,
    *,
    seed: int = 1,
    scale: float = 1.0,
    skip: Iterable[str] = (NO_GRAD,),
) -> None:
    """Give every parameter its seeded gradient (in its own dtype), except those in ``skip``."""
    skip = set(skip)
    for index, (name, p) in enumerate(params.items()):
        if name in skip:
            p.grad = None
            continue
        p.grad = synthetic_grad(tuple(p.shape), index, step, seed, scale).to(p.dtype)


def assert_close(actual: Tensor, expected: Tensor, what: str = "") -> None:
    torch.testing.assert_close(
        actual.to(torch.float64),
        expected.to(torch.float64),
        rtol=RTOL,
        atol=ATOL,
        msg=lambda m: f"{what}: {m}",
    )


# --------------------------------------------------------------------------- Llama-style model


def llama_shapes(
    dim: int = 32,
    n_heads: int = 4,
    n_kv_heads: int = 2,
    ffn: int = 48,
    vocab: int = 40,
    layers: int = 2,
) -> Shapes:
    """Parameter names and shapes of a Hugging Face Llama (untied, GQA, no biases)."""
    head_dim = dim // n_heads
    shapes: Shapes = {"model.embed_tokens.weight": (vocab, dim)}
    for i in range(layers):
        pre = f"model.layers.{i}"
        shapes |= {
            f"{pre}.self_attn.q_proj.weight": (n_heads * head_dim, dim),
            f"{pre}.self_attn.k_proj.weight": (n_kv_heads * head_dim, dim),
            f"{pre}.self_attn.v_proj.weight": (n_kv_heads * head_dim, dim),
            f"{pre}.self_attn.o_proj.weight": (dim, n_heads * head_dim),
            f"{pre}.mlp.gate_proj.weight": (ffn, dim),
            f"{pre}.mlp.up_proj.weight": (ffn, dim),
            f"{pre}.mlp.down_proj.weight": (dim, ffn),
            f"{pre}.input_layernorm.weight": (dim,),
            f"{pre}.post_attention_layernorm.weight": (dim,),
        }
    shapes |= {"model.norm.weight": (dim,), "lm_head.weight": (vocab, dim)}
    return shapes


_NAME_ROLES = (  # first match wins, as in adam-mini
    ("bias", Role.BIAS),
    ("embed", Role.EMBEDDING),
    ("lm_head", Role.OUTPUT),
    ("q_proj", Role.Q),
    ("k_proj", Role.K),
    ("v_proj", Role.V),
    ("o_proj", Role.O),
    ("mlp", Role.MLP),
    ("norm", Role.NORM),
)


def llama_partition(
    shapes: Mapping[str, tuple[int, ...]], n_heads: int, n_kv_heads: int
) -> dict[str, ParamInfo]:
    """The roles of :func:`llama_shapes`, written out by hand (independent of ``partition``)."""
    infos = {}
    for name, shape in shapes.items():
        role = next((r for key, r in _NAME_ROLES if key in name), Role.OTHER)
        heads = {Role.Q: n_heads, Role.K: n_kv_heads, Role.V: n_kv_heads}.get(role)
        infos[name] = ParamInfo(name, tuple(shape), role, heads=heads, source="override")
    return infos


# --------------------------------------------------------------------------- a tiny LM


class TinyAttention(nn.Module):
    def __init__(self, dim: int, n_heads: int, n_kv_heads: int):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = n_heads, n_kv_heads, dim // n_heads
        self.q_proj = nn.Linear(dim, dim, bias=False)
        self.k_proj = nn.Linear(dim, n_kv_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(dim, n_kv_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(dim, dim, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        b, t, _ = x.shape
        q = self.q_proj(x).view(b, t, self.n_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(b, t, self.n_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(b, t, self.n_kv_heads, self.head_dim).transpose(1, 2)
        rep = self.n_heads // self.n_kv_heads
        k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
        y = nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.o_proj(y.transpose(1, 2).reshape(b, t, -1))


class TinyBlock(nn.Module):
    def __init__(self, dim: int, n_heads: int, n_kv_heads: int, ffn: int):
        super().__init__()
        self.input_layernorm = nn.LayerNorm(dim, bias=False)
        self.self_attn = TinyAttention(dim, n_heads, n_kv_heads)
        self.post_attention_layernorm = nn.LayerNorm(dim, bias=False)
        self.mlp = nn.Sequential()
        self.mlp.add_module("up_proj", nn.Linear(dim, ffn, bias=False))
        self.mlp.add_module("act", nn.GELU())
        self.mlp.add_module("down_proj", nn.Linear(ffn, dim, bias=False))

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.self_attn(self.input_layernorm(x))
        return x + self.mlp(self.post_attention_layernorm(x))


class TinyLM(nn.Module):
    """A two-layer Llama-named decoder (LayerNorm gains, GQA, GeLU MLP, untied head)."""

    def __init__(
        self, vocab: int = 16, dim: int = 32, n_heads: int = 4, n_kv_heads: int = 2, ffn: int = 64
    ):
        super().__init__()
        self.n_heads, self.n_kv_heads = n_heads, n_kv_heads
        self.embed_tokens = nn.Embedding(vocab, dim)
        self.layers = nn.ModuleList([TinyBlock(dim, n_heads, n_kv_heads, ffn) for _ in range(2)])
        self.norm = nn.LayerNorm(dim, bias=False)
        self.lm_head = nn.Linear(dim, vocab, bias=False)

    def forward(self, idx: Tensor) -> Tensor:
        x = self.embed_tokens(idx)
        for layer in self.layers:
            x = layer(x)
        return self.lm_head(self.norm(x))

    def partition(self) -> dict[str, ParamInfo]:
        shapes = {n: tuple(p.shape) for n, p in self.named_parameters()}
        return llama_partition(shapes, self.n_heads, self.n_kv_heads)


def lm_batch(vocab: int, batch: int, seq: int, gen: torch.Generator) -> tuple[Tensor, Tensor]:
    """Sequences of a fixed affine recurrence ``x_{t+1} = (5 x_t + 3) mod V``: learnable."""
    start = torch.randint(0, vocab, (batch, 1), generator=gen)
    seqs = [start]
    for _ in range(seq):
        seqs.append((seqs[-1] * 5 + 3) % vocab)
    tokens = torch.cat(seqs, dim=1)
    return tokens[:, :-1], tokens[:, 1:]


def lm_loss(model: nn.Module, idx: Tensor, targets: Tensor) -> Tensor:
    logits = model(idx)
    return nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))


def sampled_label_loss(model: nn.Module, idx: Tensor, gen: torch.Generator) -> Tensor:
    """Sophia's Gauss-Newton-Bartlett loss: cross-entropy on labels sampled from the model."""
    logits = model(idx)
    flat = logits.reshape(-1, logits.shape[-1])
    with torch.no_grad():
        labels = torch.multinomial(flat.softmax(-1), 1, generator=gen).squeeze(-1)
    return nn.functional.cross_entropy(flat, labels)


def bytes_per_param(opt_state_bytes: int, params: Iterable[Tensor]) -> float:
    return opt_state_bytes / sum(p.numel() for p in params)


def count_kernel_calls(monkeypatch: Any, name: str) -> list[int]:
    """Wrap ``torch.<name>`` (a multi-tensor kernel); the list gets each call's tensor count."""
    calls: list[int] = []
    real = getattr(torch, name)

    def counted(*args: Any, **kwargs: Any) -> None:
        calls.append(len(args[0]))
        real(*args, **kwargs)

    monkeypatch.setattr(torch, name, counted)
    return calls
