"""The decoder-only transformer of the Deconstructing study, readable in one sitting.

Defaults follow Zhao et al. (OLMo-based): pre-LayerNorm blocks, rotary position embeddings, a GeLU
MLP of width 4d, no biases anywhere, LayerNorm with a gain and no bias, QK-LayerNorm on the
full-width queries and keys, an untied output layer, no dropout. Options cover the Adam-mini
family's Llama variants: RMSNorm, SwiGLU, grouped-query attention, tied embeddings.

Module names follow Hugging Face Llama (``tok_emb``, ``blocks.{i}.attn.q_proj``, ...) so that the
optimizer partition and any other tool recognise every parameter's role.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn


@dataclass
class GPTConfig:
    """Shape and architecture options of :class:`GPT`."""

    vocab_size: int = 2048
    n_layer: int = 2
    n_head: int = 4
    n_kv_head: int | None = None  # None = n_head (no grouped-query attention)
    d_model: int = 64
    mlp_hidden: int | None = None  # None = 4 d (GeLU) or the Llama 8/3 d rounded (SwiGLU)
    norm: str = "layernorm"  # "layernorm" (gain only) or "rmsnorm"
    mlp: str = "gelu"  # "gelu" or "swiglu"
    qk_norm: bool = True
    tie_embeddings: bool = False
    rope_theta: float = 10000.0
    max_seq_len: int = 512  # length of the precomputed rotary table (longer inputs still work)
    norm_eps: float = 1e-5
    init_std: float = 0.02

    def __post_init__(self) -> None:
        if self.n_kv_head is None:
            self.n_kv_head = self.n_head
        sizes = (self.vocab_size, self.n_layer, self.n_head, self.n_kv_head, self.d_model)
        if min(sizes) < 1:  # before the divisibility checks below (a modulo by zero)
            raise ValueError("vocab_size, n_layer, n_head, n_kv_head and d_model must be positive")
        problems = []
        if self.d_model % self.n_head:
            problems.append(f"d_model {self.d_model} is not divisible by n_head {self.n_head}")
        elif (self.d_model // self.n_head) % 2:
            problems.append("head dimension must be even for rotary embeddings")
        if self.n_head % self.n_kv_head:
            problems.append(f"n_head {self.n_head} is not a multiple of n_kv_head {self.n_kv_head}")
        if self.norm not in ("layernorm", "rmsnorm"):
            problems.append(f"norm must be 'layernorm' or 'rmsnorm', not {self.norm!r}")
        if self.mlp not in ("gelu", "swiglu"):
            problems.append(f"mlp must be 'gelu' or 'swiglu', not {self.mlp!r}")
        if problems:
            raise ValueError("; ".join(problems))

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_head

    @property
    def hidden(self) -> int:
        if self.mlp_hidden is not None:
            return self.mlp_hidden
        if self.mlp == "gelu":
            return 4 * self.d_model
        # SwiGLU keeps the parameter count of a 4d GeLU MLP: 2/3 * 4d, rounded up to 64 (Llama).
        return 64 * math.ceil(8 * self.d_model / 3 / 64)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# Named sizes. ``vocab_size`` is the default BPE vocabulary trained for the preset; a pretrained
# tokenizer replaces it. The study's sizes use the T5 vocabulary padded to 32,128.
PRESETS: dict[str, dict[str, Any]] = {
    "micro": dict(d_model=64, n_layer=2, n_head=4, vocab_size=2048),  # ~0.36M params
    "tiny": dict(d_model=128, n_layer=4, n_head=4, vocab_size=4096),  # ~1.8M
    "small": dict(d_model=256, n_layer=6, n_head=8, vocab_size=8192),  # ~8.9M
    "150m": dict(d_model=1024, n_layer=12, n_head=16, vocab_size=32128),
    "300m": dict(d_model=1024, n_layer=24, n_head=16, vocab_size=32128),
    "600m": dict(d_model=1408, n_layer=24, n_head=22, vocab_size=32128),
    "1.2b": dict(d_model=2048, n_layer=24, n_head=32, vocab_size=32128),
}


def make_norm(config: GPTConfig, dim: int) -> nn.Module:
    """LayerNorm with a gain and no bias (the study), or RMSNorm (Llama / Adam-mini)."""
    if config.norm == "rmsnorm":
        return nn.RMSNorm(dim, eps=config.norm_eps)
    return nn.LayerNorm(dim, eps=config.norm_eps, bias=False)


def rotary_table(head_dim: int, length: int, theta: float) -> tuple[Tensor, Tensor]:
    """cos and sin of the rotary angles, shape (length, head_dim), in the rotate-half layout."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
    angles = torch.outer(torch.arange(length, dtype=torch.float32), inv_freq)
    angles = torch.cat((angles, angles), dim=-1)
    return angles.cos(), angles.sin()


def apply_rotary(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate pairs (i, i + head_dim/2) of ``x`` (batch, heads, time, head_dim) by position."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


class LayerCache:
    """One layer's keys and values during generation, (batch, kv_heads, length, head_dim),
    allocated at the first write in the dtype attention computes them in (autocast's)."""

    def __init__(self, length: int):
        self.length = length
        self.keys: Tensor | None = None
        self.values: Tensor | None = None

    def write(self, k: Tensor, v: Tensor, positions: Tensor | None) -> tuple[Tensor, Tensor]:
        """Store ``k``, ``v`` and return what attention reads: a prompt's (``positions``
        None: positions 0..T-1 of every row) attends to itself; one token per row, at
        ``positions[i]``, attends to the whole cache (the caller masks what lies past it)."""
        if self.keys is None or self.values is None:
            B, H, _, D = k.shape
            self.keys = k.new_zeros(B, H, self.length, D)
            self.values = v.new_zeros(B, H, self.length, D)
        if positions is None:
            T = k.shape[2]
            self.keys[:, :, :T], self.values[:, :, :T] = k, v
            return k, v
        rows = torch.arange(k.shape[0], device=k.device)
        self.keys[rows, :, positions] = k[:, :, 0]
        self.values[rows, :, positions] = v[:, :, 0]
        return self.keys, self.values


class KVCache:
    """Every layer's :class:`LayerCache` for sequences of up to ``length`` tokens."""

    def __init__(self, n_layer: int, length: int):
        self.length = length
        self.layers = [LayerCache(length) for _ in range(n_layer)]


class Attention(nn.Module):
    """Causal self-attention with rotary embeddings, optional QK-norm and grouped-query heads."""

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.n_heads = config.n_head
        self.n_kv_heads = config.n_kv_head
        self.head_dim = config.head_dim
        d, kv_width = config.d_model, config.n_kv_head * config.head_dim
        self.q_proj = nn.Linear(d, d, bias=False)
        self.k_proj = nn.Linear(d, kv_width, bias=False)
        self.v_proj = nn.Linear(d, kv_width, bias=False)
        self.o_proj = nn.Linear(d, d, bias=False)
        # QK-LayerNorm acts on the full-width q and k, before they are split into heads.
        self.q_norm = make_norm(config, d) if config.qk_norm else nn.Identity()
        self.k_norm = make_norm(config, kv_width) if config.qk_norm else nn.Identity()

    def forward(
        self,
        x: Tensor,
        cos: Tensor,
        sin: Tensor,
        mask: Tensor | None = None,
        cache: LayerCache | None = None,
        positions: Tensor | None = None,
    ) -> Tensor:
        B, T, _ = x.shape
        q = self.q_norm(self.q_proj(x)).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)
        k = self.k_norm(self.k_proj(x)).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        if cache is not None:
            k, v = cache.write(k, v, positions)
        if self.n_kv_heads != self.n_heads:
            repeat = self.n_heads // self.n_kv_heads
            k, v = k.repeat_interleave(repeat, dim=1), v.repeat_interleave(repeat, dim=1)
        if mask is None:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, -1))


class MLP(nn.Module):
    """GeLU MLP ``down(gelu(up x))`` (the study) or SwiGLU ``down(silu(gate x) * up x)``."""

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.swiglu = config.mlp == "swiglu"
        self.up_proj = nn.Linear(config.d_model, config.hidden, bias=False)
        if self.swiglu:
            self.gate_proj = nn.Linear(config.d_model, config.hidden, bias=False)
        self.down_proj = nn.Linear(config.hidden, config.d_model, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        if self.swiglu:
            return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))
        return self.down_proj(F.gelu(self.up_proj(x)))


class Block(nn.Module):
    """Pre-norm residual block: ``x + attn(norm(x))``, then ``x + mlp(norm(x))``."""

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.attn_norm = make_norm(config, config.d_model)
        self.attn = Attention(config)
        self.mlp_norm = make_norm(config, config.d_model)
        self.mlp = MLP(config)

    def forward(
        self,
        x: Tensor,
        cos: Tensor,
        sin: Tensor,
        mask: Tensor | None = None,
        cache: LayerCache | None = None,
        positions: Tensor | None = None,
    ) -> Tensor:
        x = x + self.attn(self.attn_norm(x), cos, sin, mask, cache, positions)
        return x + self.mlp(self.mlp_norm(x))


def attention_mask(padding: Tensor) -> Tensor:
    """The boolean attention mask (batch, 1, T, T) of a padding mask (batch, T), True at real
    tokens: causal, and no query attends to a padding key. A padding query attends to itself
    alone, so that no row is empty (its output is never used)."""
    T = padding.shape[1]
    causal = torch.ones(T, T, dtype=torch.bool, device=padding.device).tril()
    allowed = causal & padding.bool()[:, None, None, :]
    return allowed | torch.eye(T, dtype=torch.bool, device=padding.device)


class GPT(nn.Module):
    """Token embedding, ``n_layer`` blocks, final norm, output layer: ``forward(idx) -> logits``.

    ``forward(idx, mask)`` and :meth:`features` take an optional padding mask (batch, T), True
    at real tokens, for left-padded batches (generation, a reward model's last token). Without
    one, attention is the plain causal kernel; right padding needs none (no real token attends
    to a later one). Rotary embeddings are relative, so a left-padded row gives its real tokens
    the outputs of the unpadded row."""

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.config = config
        self.tok_emb = nn.Embedding(config.vocab_size, config.d_model)
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.n_layer))
        self.final_norm = make_norm(config, config.d_model)
        self.lm_head = nn.Linear(config.d_model, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.lm_head.weight = self.tok_emb.weight
        cos, sin = rotary_table(config.head_dim, config.max_seq_len, config.rope_theta)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """N(0, 0.02) for every matrix; residual outputs scaled by 1/sqrt(2 n_layer) (GPT-2);
        norm gains 1."""
        std = self.config.init_std
        for name, p in self.named_parameters():
            if p.dim() < 2:
                nn.init.ones_(p)
            elif name.endswith(("o_proj.weight", "down_proj.weight")):
                nn.init.normal_(p, 0.0, std / math.sqrt(2 * self.config.n_layer))
            else:
                nn.init.normal_(p, 0.0, std)

    def num_params(self) -> int:
        """Distinct parameters (a tied embedding counts once)."""
        return sum(p.numel() for p in self.parameters())

    def param_roles(self) -> dict[str, str]:
        """Role of every parameter (values of :class:`optarena.optim.roles.Role`) by name."""
        roles = {}
        for name, _ in self.named_parameters():
            leaf = name.rsplit(".", 2)[-2]
            if name.startswith("tok_emb"):
                roles[name] = "embedding"
            elif name.startswith("lm_head"):
                roles[name] = "output"
            elif leaf.endswith("norm"):
                roles[name] = "norm"
            elif leaf in ("q_proj", "k_proj", "v_proj", "o_proj"):
                roles[name] = leaf[0]
            else:
                roles[name] = "mlp"
        return roles

    def forward(
        self, idx: Tensor, mask: Tensor | None = None, cache: KVCache | None = None
    ) -> Tensor:
        return self.lm_head(self.features(idx, mask, cache))

    def rotary(self, length: int, device: torch.device) -> tuple[Tensor, Tensor]:
        """cos and sin of positions 0..length-1 (the precomputed table, or a longer one)."""
        if self.rope_cos.shape[0] >= length:
            return self.rope_cos[:length], self.rope_sin[:length]
        cos, sin = rotary_table(self.config.head_dim, length, self.config.rope_theta)
        return cos.to(device), sin.to(device)

    def features(
        self, idx: Tensor, mask: Tensor | None = None, cache: KVCache | None = None
    ) -> Tensor:
        """The final hidden states (batch, T, d_model), after the final norm: what the output
        layer (or a reward head) reads. With a ``cache`` (:meth:`new_cache`), the keys and
        values of positions 0..T-1 are kept in it for :meth:`decode`."""
        cos, sin = self.rotary(idx.shape[1], idx.device)
        x = self.tok_emb(idx)
        cos, sin = cos.to(x.dtype), sin.to(x.dtype)
        attn_mask = attention_mask(mask) if mask is not None else None
        layers = cache.layers if cache is not None else [None] * len(self.blocks)
        for block, layer in zip(self.blocks, layers, strict=True):
            x = block(x, cos, sin, attn_mask, layer)
        return self.final_norm(x)

    def new_cache(self, length: int) -> KVCache:
        """An empty key/value cache for sequences of up to ``length`` tokens."""
        return KVCache(len(self.blocks), length)

    def decode(self, idx: Tensor, positions: Tensor, cache: KVCache) -> Tensor:
        """Logits (batch, vocab) of one token per row, ``idx[i]`` at position ``positions[i]``,
        each row attending to its cached keys and values of positions ``0..positions[i]``
        (this token's are written there): the logits ``forward`` gives at that position when
        the cache holds the row's earlier tokens (a prompt through :meth:`features`, then
        one :meth:`decode` per token)."""
        cos, sin = self.rotary(int(positions.max()) + 1, idx.device)
        x = self.tok_emb(idx)[:, None, :]
        cos = cos[positions][:, None, None, :].to(x.dtype)  # (batch, heads, time, head_dim)
        sin = sin[positions][:, None, None, :].to(x.dtype)
        keys = torch.arange(cache.length, device=idx.device)
        mask = (keys[None, :] <= positions[:, None])[:, None, None, :]
        for block, layer in zip(self.blocks, cache.layers, strict=True):
            x = block(x, cos, sin, mask, layer, positions)
        return self.lm_head(self.final_norm(x))[:, 0]


class CrossEntropyWithZLoss(torch.autograd.Function):
    """``(ce + z * mean(lse^2), ce)`` over rows of logits, ``lse`` = logsumexp of each row,
    from one logsumexp forward and one softmax backward (as cheap as the cross-entropy alone;
    autograd through a separate logsumexp would add a second pass each way).

    The gradient of either output is a row-scaled softmax minus the target's one-hot:
    ``d/dx [lse - x_t] = softmax - e_t`` and ``d/dx lse^2 = 2 lse softmax``.
    """

    @staticmethod
    def forward(ctx: Any, flat: Tensor, targets: Tensor, z_loss: float) -> tuple[Tensor, Tensor]:
        lse = torch.logsumexp(flat, dim=-1)
        n = flat.shape[0]
        ce = (lse - flat.gather(1, targets[:, None]).squeeze(1)).sum() / n
        ctx.save_for_backward(flat, targets, lse)
        ctx.z_loss = z_loss
        return ce + z_loss * lse.square().sum() / n, ce

    @staticmethod
    def backward(ctx: Any, grad_loss: Tensor, grad_ce: Tensor) -> tuple[Tensor, None, None]:
        flat, targets, lse = ctx.saved_tensors
        n = flat.shape[0]
        row = (grad_loss * (1 + 2 * ctx.z_loss * lse) + grad_ce) / n
        grad = torch.softmax(flat, dim=-1).mul_(row[:, None])
        picked = ((grad_loss + grad_ce) / n).expand(n, 1)
        return grad.scatter_add_(1, targets[:, None], -picked), None, None


def lm_loss(logits: Tensor, targets: Tensor, z_loss: float = 0.0) -> tuple[Tensor, Tensor]:
    """Cross-entropy plus the study's z-loss ``z * mean(logsumexp(logits)^2)``.

    Returns ``(loss, cross_entropy)``; the loss is what is back-propagated, the cross-entropy is
    what is reported. Computed in float32 whatever the autocast dtype (float64 stays float64).
    """
    flat = logits.reshape(-1, logits.shape[-1])
    flat = flat if flat.dtype == torch.float64 else flat.float()
    flat_targets = targets.reshape(-1)
    if not z_loss:
        ce = F.cross_entropy(flat, flat_targets)
        return ce, ce
    return CrossEntropyWithZLoss.apply(flat, flat_targets, float(z_loss))


def build_model(preset: str = "micro", **overrides: Any) -> GPT:
    """``GPT`` of a named preset with some fields replaced (e.g. ``vocab_size``)."""
    if preset not in PRESETS:
        raise KeyError(preset)
    return GPT(GPTConfig(**{**PRESETS[preset], **overrides}))
