"""Model -> ``{name: ParamInfo}``: what each parameter is, read from the module structure.

Block optimizers (Adam-mini, Adalayer, the hybrids) need to know which tensor is a query, which is
the output layer, how many heads a projection holds and along which axis its output neurons lie.
The official Adam-mini guesses all of this from substrings of parameter names and gets it wrong in
ways that crash or silently mis-cut: BERT's ``attention.output.LayerNorm.weight`` goes to the
per-row branch, fused QKV is never split by head, GPT-2's ``Conv1D`` is cut along its input axis.
Here roles come from what the modules *are*:

* ``nn.Embedding`` / ``nn.EmbeddingBag`` -> EMBEDDING (every table: tokens, positions, types);
* norm modules (``nn.LayerNorm``, ``nn.RMSNorm``, batch/group norms, any class whose name ends in
  ``Norm`` such as ``LlamaRMSNorm``): gains -> NORM, their biases -> BIAS;
* the output layer, ``model.get_output_embeddings()`` when the model has that method, else the last
  dense layer outside the transformer blocks when its width is a vocabulary size -> OUTPUT;
* attention modules, recognised by their query/key/value members (``q_proj/k_proj/v_proj``,
  ``query/key/value``, ``wq/wk/wv``, ``q/k/v``, ``to_q/to_k/to_v``, or one fused ``c_attn``,
  ``qkv_proj``, ``qkv``, ``Wqkv``, ``in_proj_weight``), with head counts from the module's
  attributes, else ``model.config``, else the head size -> Q, K, V, QKV (with its parts) and O
  (``o_proj``, ``out_proj``, ``c_proj``, ``wo``, ``o``, ...; BERT's sibling ``output.dense``);
* dense layers inside an MLP-like module (``mlp``, ``ffn``, ``feed_forward``, ``intermediate``)
  and the other dense layers of a transformer block outside its attention -> MLP;
* fused mixture-of-experts tensors (transformers' ``gate_up_proj`` / ``down_proj`` of shape
  ``(experts, out, in)`` on a module whose ``num_experts`` is their first extent) -> MLP with
  ``experts`` set, each expert's matrix cut on its own (``(experts, in, out)`` storage is read
  from the module's ``hidden_dim``/``hidden_size``); their 2-D biases -> BIAS; a router's
  ``(experts, hidden)`` weight -> MLP (a row per expert);
* biases of dense layers and attention modules -> BIAS.

Dense layers are ``nn.Linear`` (``out_dim=0``) and Hugging Face ``Conv1D`` (weights stored
(in, out), ``out_dim=1``). A transformer block is the outermost ``ModuleList``/``Sequential``
item that holds an attention module. Whatever is left goes through :func:`role_from_name` and
is reported in one warning.

Decisions:

* Tied embedding/output (one tensor under two names): ``named_parameters()`` yields it once, under
  its first name. It gets role EMBEDDING with ``tied=True``, and :attr:`Partition.aliases` maps
  the other name to it. Policies that treat the last layer specially must check ``tied``
  (Adam-mini cuts embedding and output per row alike; Adalayer cuts a tied table per row).
* Norm biases are BIAS, not NORM: Adam-mini v1.1.1 updates every bias elementwise, and Study A's
  adaptive "LayerNorm" parameters are the gains.
* Position and token-type tables are EMBEDDING like token tables (one block per row under
  Adam-mini). The official code does this for BERT's ``position_embeddings`` but, by accident of
  naming, not for GPT-2's ``wpe``.
* A fused QKV is assumed to stack Q, K, V as consecutive slices along ``out_dim`` (GPT-2,
  ``nn.MultiheadAttention``, MPT). Interleaved layouts (GPT-NeoX, Bloom ``query_key_value``) are
  not claimed, so they fall to the name rules and the warning.
"""

from __future__ import annotations

import contextlib
import fnmatch
import re
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, replace

import torch
from torch import nn

from optarena.optim.blocks import BlockLayout
from optarena.optim.roles import FusedPart, ParamInfo, Role

LayoutPolicy = Callable[[ParamInfo], "BlockLayout | None"]

__all__ = ["LayoutPolicy", "Partition", "Roles", "partition", "print_partition", "role_from_name"]

# Attribute names that carry head counts, on attention modules and on model configs.
_HEADS_ATTRS = ("n_heads", "num_heads", "num_attention_heads", "n_head")
_KV_HEADS_ATTRS = ("n_kv_heads", "num_key_value_heads", "num_kv_heads", "n_kv_head", "n_head_kv")
_HEAD_DIM_ATTRS = ("head_dim", "attention_head_size", "head_size", "d_head", "key_value_proj_dim")

# Members of an attention module (submodules or direct parameters).
_SPLIT_QKV = (
    ("q_proj", "k_proj", "v_proj"),
    ("query", "key", "value"),
    ("wq", "wk", "wv"),
    ("q", "k", "v"),
    ("to_q", "to_k", "to_v"),
    ("q_proj_weight", "k_proj_weight", "v_proj_weight"),  # nn.MultiheadAttention, kdim != dim
)
_FUSED_QKV = ("c_attn", "qkv_proj", "qkv", "Wqkv", "wqkv", "in_proj_weight")
_OUT_PROJ = ("o_proj", "out_proj", "c_proj", "wo", "o", "to_out", "dense", "proj", "out")
_SIBLING_OUT_PROJ = ("output.dense",)  # BERT: attention.self + attention.output.dense

_NORM_TYPES: tuple[type[nn.Module], ...] = (
    nn.LayerNorm,
    nn.RMSNorm,
    nn.GroupNorm,
    nn.LocalResponseNorm,
    nn.modules.batchnorm._NormBase,
)
_MLP_RE = re.compile(r"mlp|ffn|ffw|feed_?forward|intermediate", re.IGNORECASE)
_EXPERTS_ATTRS = ("num_experts", "num_local_experts", "n_routed_experts", "moe_num_experts")
_HIDDEN_ATTRS = ("hidden_dim", "hidden_size")
_EXPERT_INPUT = ("gate_up_proj", "up_proj", "gate_proj", "w1", "w3")  # hidden -> intermediate
_EXPERT_OUTPUT = ("down_proj", "w2")  # intermediate -> hidden
_ATTN_RE = re.compile(r"attn|attention", re.IGNORECASE)


# --------------------------------------------------------------------------- name rules

_NAME_NORM_RE = re.compile(r".*norm.*|ln(_?[a-z0-9]+)?")
_NAME_EMBED_RE = re.compile(r".*(embed|embd).*|wte|wpe|tok_emb|pos_emb|emb|.*_emb")
_NAME_OUTPUT = {"lm_head", "unembed", "unembedding", "final_layer"}
_NAME_Q = {"q_proj", "wq", "query", "q", "to_q", "q_attn"}
_NAME_K = {"k_proj", "wk", "key", "k", "to_k"}
_NAME_V = {"v_proj", "wv", "value", "v", "to_v"}
_NAME_QKV = {"c_attn", "qkv", "qkv_proj", "wqkv", "query_key_value", "in_proj"}
_NAME_O = {"o_proj", "wo", "out_proj", "o", "to_out"}
_NAME_O_IN_ATTN = {"c_proj", "dense", "proj"}
# fmt: off
_NAME_MLP = {
    "fc1", "fc2", "c_fc", "up_proj", "gate_proj", "down_proj", "w1", "w2", "w3", "wi", "wi_0",
    "wi_1", "linear1", "linear2", "dense_h_to_4h", "dense_4h_to_h",
}
# fmt: on


def role_from_name(name: str, shape: tuple[int, ...] | torch.Size) -> Role:
    """The role a parameter's name suggests: the fallback when the module structure says nothing.

    Rules on the lowercased dotted name, first match wins. The *owner* is the segment before the
    parameter's own (``q_proj`` in ``layers.0.q_proj.weight``); rules match whole segments, never
    substrings of the full name, and per-row roles need a tensor of 2+ dimensions, which is what
    keeps BERT's ``attention.output.LayerNorm.weight`` out of the output branch.

    1. last segment contains ``bias`` -> BIAS;
    2. a segment contains ``norm``, or is ``ln``/``ln_*``/``ln1``... -> NORM;
    3. a 0-D or 1-D tensor -> OTHER;
    4. owner ``lm_head``/``unembed``/``final_layer``, or a top-level ``output`` -> OUTPUT;
    5. a segment contains ``embed``/``embd``, or is ``wte``/``wpe``/``tok_emb``/``*_emb``
       -> EMBEDDING;
    6. owner ``c_attn``/``qkv``/``qkv_proj``/``wqkv``/``query_key_value``/``in_proj``, or the
       parameter ``in_proj_weight`` -> QKV (without parts: sizes unknown);
    7. owner (or parameter ``{q,k,v}_proj_weight``) ``q_proj``/``wq``/``query``/``q``/``to_q``
       -> Q, likewise K and V;
    8. owner ``o_proj``/``wo``/``out_proj``/``o``/``to_out``, or ``c_proj``/``dense``/``proj``
       under a segment containing ``attn``/``attention`` -> O;
    9. a segment containing ``mlp``/``ffn``/``feed_forward``/``intermediate``, or owner
       ``fc1``/``fc2``/``c_fc``/``up_proj``/``gate_proj``/``down_proj``/``w1``-``w3``/``wi``/
       ``linear1``/``linear2``/``dense_h_to_4h``/``dense_4h_to_h`` -> MLP;
    10. anything else -> OTHER.

    Names cannot tell head counts or a ``Conv1D``'s (in, out) storage: name-ruled parameters get
    ``heads=None`` and ``out_dim=0``.
    """
    segs = name.lower().split(".")
    leaf, path = segs[-1], segs[:-1]
    owner = path[-1] if path else ""
    if "bias" in leaf:
        return Role.BIAS
    if any(_NAME_NORM_RE.fullmatch(s) for s in segs):
        return Role.NORM
    if len(shape) < 2:
        return Role.OTHER
    if owner in _NAME_OUTPUT or path == ["output"]:
        return Role.OUTPUT
    if any(_NAME_EMBED_RE.fullmatch(s) for s in segs):
        return Role.EMBEDDING
    if owner in _NAME_QKV or leaf == "in_proj_weight":
        return Role.QKV
    for role, names in ((Role.Q, _NAME_Q), (Role.K, _NAME_K), (Role.V, _NAME_V)):
        if owner in names or leaf == f"{role.value}_proj_weight":
            return role
    in_attn = any(_ATTN_RE.search(s) for s in path)
    if owner in _NAME_O or (in_attn and owner in _NAME_O_IN_ATTN):
        return Role.O
    if owner in _NAME_MLP or any(_MLP_RE.search(s) for s in path):
        return Role.MLP
    return Role.OTHER


# --------------------------------------------------------------------------- structure


@dataclass(frozen=True)
class _Dense:
    """A dense layer's weight and the axis of its output neurons."""

    weight: nn.Parameter
    out_dim: int

    @property
    def width(self) -> int:
        return self.weight.shape[self.out_dim]


@dataclass(frozen=True)
class _Claim:
    role: Role
    out_dim: int = 0
    heads: int | None = None
    parts: tuple[FusedPart, ...] = ()
    experts: int | None = None
    tied: bool = False  # an embedding table that is also a dense weight


def _dense_of(module: object) -> _Dense | None:
    """``nn.Linear`` (out, in) or Hugging Face ``Conv1D`` (in, out); None for anything else."""
    if not isinstance(module, nn.Module):
        return None
    w = getattr(module, "weight", None)
    if not isinstance(w, nn.Parameter) or w.dim() != 2:
        return None
    if isinstance(module, nn.Linear):
        return _Dense(w, 0)
    if type(module).__name__ == "Conv1D" and w.shape[1] == getattr(module, "nf", None):
        return _Dense(w, 1)
    return None


def _is_norm(module: nn.Module) -> bool:
    return isinstance(module, _NORM_TYPES) or type(module).__name__.lower().endswith("norm")


def _member(owner: nn.Module, path: str) -> _Dense | None:
    """The dense layer (or bare 2-D parameter, stored (out, in)) at ``owner.<path>``."""
    obj: object = owner
    for part in path.split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            return None
    if isinstance(obj, nn.Parameter):
        return _Dense(obj, 0) if obj.dim() == 2 else None
    if isinstance(obj, (nn.ModuleList, nn.Sequential)):  # diffusers: to_out = [Linear, Dropout]
        obj = next(iter(obj), None)
    return _dense_of(obj)


def _int_attr(sources: Iterable[object], names: tuple[str, ...]) -> int | None:
    for src in sources:
        for n in names:
            v = getattr(src, n, None)
            if isinstance(v, int) and not isinstance(v, bool) and v > 0:
                return v
    return None


def _model_config(model: nn.Module) -> object | None:
    config = getattr(model, "config", None)
    get_text = getattr(config, "get_text_config", None)
    if callable(get_text):  # multimodal Hugging Face configs nest the language model's
        with contextlib.suppress(TypeError, ValueError):
            config = get_text()
    return config


def _check_heads(attn: str, what: str, width: int, heads: int) -> None:
    if width % heads:
        raise ValueError(
            f"attention {attn!r}: {what} width {width} is not divisible by {heads} heads; the head "
            "count (read from the module's attributes or model.config) does not match the weights"
        )


@dataclass
class _Heads:
    heads: int | None
    kv_heads: int | None
    head_dim: int | None


def _read_heads(attn: nn.Module, config: object | None) -> _Heads:
    sources = (attn, getattr(attn, "config", None), config)
    heads = _int_attr(sources, _HEADS_ATTRS)
    kv = _int_attr(sources, _KV_HEADS_ATTRS)
    head_dim = _int_attr(sources, _HEAD_DIM_ATTRS)
    groups = _int_attr((attn,), ("num_key_value_groups",))
    if kv is None and heads and groups and heads % groups == 0:
        kv = heads // groups
    return _Heads(heads, kv, head_dim)


def _split_attention(
    name: str, q: _Dense, k: _Dense, v: _Dense, h: _Heads
) -> list[tuple[nn.Parameter, _Claim]] | None:
    """Claims for separate q/k/v projections; None when the head count is unknown."""
    heads = h.heads
    if heads is None and h.head_dim and q.width % h.head_dim == 0:
        heads = q.width // h.head_dim
    if heads is None:
        return None
    _check_heads(name, "query", q.width, heads)
    kv = h.kv_heads
    if kv is None:
        head_dim = h.head_dim or q.width // heads
        kv = k.width // head_dim if k.width % head_dim == 0 else heads
    _check_heads(name, "key", k.width, kv)
    _check_heads(name, "value", v.width, kv)
    return [
        (q.weight, _Claim(Role.Q, q.out_dim, heads)),
        (k.weight, _Claim(Role.K, k.out_dim, kv)),
        (v.weight, _Claim(Role.V, v.out_dim, kv)),
    ]


def _fused_attention(
    name: str, fused: _Dense, q: _Dense | None, h: _Heads
) -> list[tuple[nn.Parameter, _Claim]] | None:
    """Claims for a fused projection, Q/K/V (or K/V beside a separate ``q``) as consecutive
    slices along ``out_dim``; None when the head count is unknown. Raises when the counts found
    do not add up to the fused width."""
    roles = (Role.K, Role.V) if q else (Role.Q, Role.K, Role.V)
    total = fused.width
    heads, head_dim = h.heads, h.head_dim
    if heads is None:
        if h.kv_heads is None and head_dim and total % (len(roles) * head_dim) == 0:
            heads = total // (len(roles) * head_dim)
        else:
            return None
    kv = h.kv_heads or heads
    counts = [heads if r is Role.Q else kv for r in roles]
    if head_dim is None and total % sum(counts) == 0:
        head_dim = total // sum(counts)
    sizes = [n * (head_dim or 0) for n in counts]
    if sum(sizes) != total:
        raise ValueError(
            f"attention {name!r}: fused projection of width {total} does not split into "
            f"{'/'.join(r.value for r in roles)} for {heads} heads, {kv} key/value heads and "
            f"head size {head_dim}; the head counts (module attributes or model.config) do not "
            "match the weights"
        )
    parts = tuple(FusedPart(r, size, n) for r, size, n in zip(roles, sizes, counts, strict=True))
    claims = [(fused.weight, _Claim(Role.QKV, fused.out_dim, None, parts))]
    if q is not None:
        _check_heads(name, "query", q.width, heads)
        claims.append((q.weight, _Claim(Role.Q, q.out_dim, heads)))
    return claims


def _block_of(attn_name: str, modules: Mapping[str, nn.Module]) -> str:
    """The transformer block holding an attention module: its outermost ancestor that is an item
    of a ModuleList/Sequential (T5 nests a list of sub-layers inside each block), else the
    attention's parent ("" = the model)."""
    segs = attn_name.split(".") if attn_name else []
    for i in range(1, len(segs)):
        if isinstance(modules.get(".".join(segs[: i - 1])), (nn.ModuleList, nn.Sequential)):
            return ".".join(segs[:i])
    return ".".join(segs[:-1])


def _inside(name: str, prefix: str) -> bool:
    return prefix == "" or name == prefix or name.startswith(prefix + ".")


class _Walker:
    """One pass over a model's modules that claims parameters by what their modules are."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.modules = dict(model.named_modules())
        self.dense = {n: d for n, m in self.modules.items() if (d := _dense_of(m)) is not None}
        self.config = _model_config(model)
        self.claims: dict[int, _Claim] = {}
        self.unknown_heads: list[str] = []
        self.attn_names: list[str] = []
        self.blocks: list[str] = []

    def claim(self, p: nn.Parameter, c: _Claim) -> None:
        self.claims.setdefault(id(p), c)

    def run(self) -> dict[int, _Claim]:
        embeddings = [
            m for m in self.modules.values() if isinstance(m, nn.Embedding | nn.EmbeddingBag)
        ]
        dense = {id(d.weight) for d in self.dense.values()}
        for emb in embeddings:
            self.claim(emb.weight, _Claim(Role.EMBEDDING, tied=id(emb.weight) in dense))
        for m in self.modules.values():
            if _is_norm(m):
                for attr, p in m.named_parameters(recurse=False):
                    self.claim(p, _Claim(Role.BIAS if "bias" in attr else Role.NORM))
        self._attention()
        output = self._output_layer(embeddings)
        if output is not None:
            self.claim(output.weight, _Claim(Role.OUTPUT, output.out_dim))
        self._experts()
        self._mlp()
        attn = set(self.attn_names)
        for name, m in self.modules.items():
            if name in self.dense or name in attn:  # also in_proj_bias, bias_k, bias_v
                for attr, p in m.named_parameters(recurse=False):
                    if "bias" in attr:
                        self.claim(p, _Claim(Role.BIAS))
        return self.claims

    def _attention(self) -> None:
        """Claim q/k/v/qkv/o of every attention module; note the blocks holding them."""
        for name, m in self.modules.items():
            if self._attention_module(name, m):
                self.attn_names.append(name)
                block = _block_of(name, self.modules)
                if block not in self.blocks:
                    self.blocks.append(block)

    def _attention_module(self, name: str, attn: nn.Module) -> bool:
        """Claim the projections of ``attn`` (q/k/v only when its head count is found, else
        they are left to the name rules); False if it is not an attention module."""
        h = _read_heads(attn, self.config)
        split = None
        for names in _SPLIT_QKV:
            q, k, v = (_member(attn, n) for n in names)
            if q and k and v:
                split = (q, k, v)
                break
        fused = next((d for n in _FUSED_QKV if (d := _member(attn, n))), None)
        if split is not None:
            claims = _split_attention(name, *split, h)
        elif fused is not None:  # a separate q_attn: GPT-2's cross-attention (fused k/v)
            claims = _fused_attention(name, fused, _member(attn, "q_attn"), h)
        else:
            return False
        if claims is None:
            self.unknown_heads.append(name or type(attn).__name__)
        for p, c in claims or []:
            self.claim(p, c)
        out = next((d for n in _OUT_PROJ if (d := _member(attn, n))), None)
        if out is None and name:
            parent = self.modules[name.rpartition(".")[0]]
            out = next((d for n in _SIBLING_OUT_PROJ if (d := _member(parent, n))), None)
        if out is not None:
            self.claim(out.weight, _Claim(Role.O, out.out_dim))
        return True

    def _block_containing(self, name: str) -> str | None:
        inside = [b for b in self.blocks if _inside(name, b)]
        return max(inside, key=len) if inside else None

    def _output_layer(self, embeddings: list[nn.Module]) -> _Dense | None:
        """``get_output_embeddings()`` if the model has it, else the last dense layer outside
        the blocks when its width is a vocabulary size (of an embedding or the config)."""
        get = getattr(self.model, "get_output_embeddings", None)
        if callable(get):
            try:
                out = get()
            except (NotImplementedError, AttributeError):
                pass
            else:  # the model says which layer it is; None means it has none
                return _dense_of(out)
        vocab = {e.num_embeddings for e in embeddings}
        if (v := _int_attr((self.config,), ("vocab_size",))) is not None:
            vocab.add(v)
        dense = [
            d for n, d in self.dense.items() if not any(_inside(n, b) for b in self.blocks if b)
        ]
        if dense and dense[-1].width in vocab:
            return dense[-1]
        return None

    def _experts(self) -> None:
        """Fused MoE tensors: 3-D parameters whose first extent is the module's expert count."""
        for m in self.modules.values():
            experts = _int_attr((m,), _EXPERTS_ATTRS)
            if experts is None:
                continue
            hidden = _int_attr((m, self.config), _HIDDEN_ATTRS)
            for attr, p in m.named_parameters(recurse=False):
                if p.dim() == 2 and p.shape[0] == experts:  # a router's (E, d) or a bias
                    self.claim(p, _Claim(Role.BIAS if "bias" in attr else Role.MLP))
                if p.dim() != 3 or p.shape[0] != experts:
                    continue
                if attr in _EXPERT_INPUT:  # (E, out=intermediate, in=hidden) unless transposed
                    out_dim = 2 if hidden and p.shape[1] == hidden != p.shape[2] else 1
                elif attr in _EXPERT_OUTPUT:  # (E, out=hidden, in=intermediate)
                    out_dim = 2 if hidden and p.shape[2] == hidden != p.shape[1] else 1
                else:
                    continue
                self.claim(p, _Claim(Role.MLP, out_dim, experts=experts))

    def _mlp(self) -> None:
        """Dense layers in MLP-like modules, and the non-attention dense layers of each block."""
        for name, dense in self.dense.items():
            if id(dense.weight) in self.claims:
                continue
            segs = name.split(".")
            ancestors = [self.modules.get(".".join(segs[:i])) for i in range(1, len(segs))]
            mlp_like = any(_MLP_RE.search(s) for s in segs) or any(
                _MLP_RE.search(type(a).__name__) for a in ancestors if a is not None
            )
            block = self._block_containing(name)
            if mlp_like or (block is not None and not self._in_attention(name, block)):
                self.claim(dense.weight, _Claim(Role.MLP, dense.out_dim))

    def _in_attention(self, name: str, block: str) -> bool:
        """Inside an attention module, or under an attention-named module within the block."""
        if any(_inside(name, a) for a in self.attn_names if a):
            return True
        rel = name[len(block) + 1 :] if block else name
        return any(_ATTN_RE.search(s) for s in rel.split(".")[:-1])


# --------------------------------------------------------------------------- the partition


class Partition(Mapping[str, ParamInfo]):
    """``{name: ParamInfo}`` in ``model.named_parameters()`` order, plus the parameters themselves.

    ``params`` maps each name to the model's own parameter object (so optimizers can build their
    groups from it); ``aliases`` maps every other name of a shared parameter (a tied ``lm_head``)
    to the name it is listed under.
    """

    def __init__(
        self,
        infos: Mapping[str, ParamInfo],
        params: Mapping[str, nn.Parameter],
        aliases: Mapping[str, str] | None = None,
    ) -> None:
        if list(infos) != list(params):
            raise ValueError("infos and params must list the same names in the same order")
        self._infos = dict(infos)
        self.params: dict[str, nn.Parameter] = dict(params)
        self.aliases: dict[str, str] = dict(aliases or {})

    def __getitem__(self, name: str) -> ParamInfo:
        return self._infos[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._infos)

    def __len__(self) -> int:
        return len(self._infos)

    def __repr__(self) -> str:
        counts = ", ".join(f"{r.value} {len(n)}" for r, n in self.by_role().items())
        return f"Partition({len(self)} tensors: {counts})"

    def by_role(self) -> dict[Role, list[str]]:
        """Names grouped by role, roles in :class:`Role` order (only those present)."""
        groups: dict[Role, list[str]] = {r: [] for r in Role}
        for name, info in self._infos.items():
            groups[info.role].append(name)
        return {r: names for r, names in groups.items() if names}

    def _notes(self, info: ParamInfo) -> str:
        notes = []
        if info.experts:
            notes.append(f"{info.experts} experts")
        if info.parts:
            notes.append(" ".join(f"{p.role.value}:{p.size}/{p.heads}h" for p in info.parts))
        elif info.heads is not None:
            notes.append(f"{info.heads} heads")
        if info.out_dim != 0:
            notes.append(f"out_dim={info.out_dim}")
        tied_to = [a for a, n in self.aliases.items() if n == info.name]
        if info.tied or tied_to:
            notes.append("tied" + (f" with {', '.join(tied_to)}" if tied_to else ""))
        return "; ".join(notes)

    def table(self, layout: LayoutPolicy | None = None) -> str:
        """A text table of every parameter: name, shape, role, blocks under ``layout`` (a policy
        such as ``blocks.adam_mini_layout``; omitted without one), source and notes."""
        header = ["name", "shape", "role", *(["blocks"] if layout else []), "source", "notes"]
        rows = []
        total_blocks = 0
        for name, info in self._infos.items():
            row = [name, "x".join(map(str, info.shape)) or "scalar", info.role.value]
            if layout is not None:
                lay = layout(info)
                n = lay.num_blocks(info.shape) if lay is not None else info.numel
                total_blocks += n
                row.append(lay.describe(info.shape) if lay is not None else f"element ({n})")
            rows.append([*row, info.source, self._notes(info)])
        widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]

        def fmt(r: list[str]) -> str:
            return "  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip()

        numel = sum(i.numel for i in self._infos.values())
        footer = f"{len(self)} tensors, {numel:,} parameters"
        if layout is not None:
            footer += f", {total_blocks:,} blocks"
        lines = [fmt(header), fmt(["-" * w for w in widths]), *map(fmt, rows), footer]
        return "\n".join(lines)


def _as_role(value: Role | str) -> Role:
    try:
        return Role(value.lower() if isinstance(value, str) else value)
    except ValueError:
        expected = ", ".join(r.value for r in Role)
        raise ValueError(f"unknown role {value!r}; expected one of {expected}") from None


def _apply_overrides(
    infos: dict[str, ParamInfo], aliases: Mapping[str, str], overrides: Mapping[str, Role | str]
) -> set[str]:
    """Set roles by exact name (an alias counts) or fnmatch glob; later keys win. Returns the
    overridden names."""
    done: set[str] = set()
    unknown = []
    for key, value in overrides.items():
        role = _as_role(value)
        if key in infos or key in aliases:
            names = [aliases.get(key, key)]
        else:
            names = [n for n in infos if fnmatch.fnmatchcase(n, key)]
            names += [n for a, n in aliases.items() if fnmatch.fnmatchcase(a, key)]
        if not names:
            unknown.append(key)
        for n in names:
            infos[n] = replace(infos[n], role=role, source="override")
            done.add(n)
    if unknown:
        sample = ", ".join(list(infos)[:3])
        raise ValueError(
            f"overrides match no parameter: {', '.join(map(repr, unknown))} "
            f"(names look like: {sample}, ...)"
        )
    return done


def _summary(infos: Mapping[str, ParamInfo], names: list[str], limit: int = 12) -> str:
    shown = ", ".join(f"{n} -> {infos[n].role.value}" for n in names[:limit])
    return shown + (f", ... and {len(names) - limit} more" if len(names) > limit else "")


def partition(
    model_or_named_params: nn.Module | Iterable[tuple[str, nn.Parameter]],
    overrides: Mapping[str, Role | str] | None = None,
    *,
    warn: bool = True,
) -> Partition:
    """Assign each parameter a :class:`ParamInfo` from the module structure (see module doc).

    ``model_or_named_params`` is a model (structure-aware) or ``(name, parameter)`` pairs (name
    rules only, so no head counts and no ``Conv1D`` orientation). ``overrides`` maps exact names
    (aliases included) or fnmatch globs to roles (``Role`` or its value, e.g. ``"mlp"``); later
    keys win and keys that match nothing raise ``ValueError``. Parameters whose role had to be
    guessed from their names, and not overridden, are reported in one warning unless
    ``warn=False``.
    """
    if isinstance(model_or_named_params, nn.Module):
        walker = _Walker(model_or_named_params)
        claims = walker.run()
        pairs = model_or_named_params.named_parameters(remove_duplicate=False)
    else:
        walker, claims, pairs = None, {}, model_or_named_params
    params, aliases = _first_names(pairs)
    infos: dict[str, ParamInfo] = {}
    for name, p in params.items():
        shape = tuple(p.shape)
        if (c := claims.get(id(p))) is not None:
            info = ParamInfo(name, shape, c.role, c.out_dim, c.heads, c.parts, c.tied, c.experts)
        else:
            info = ParamInfo(name, shape, role_from_name(name, shape), source="name")
        infos[name] = info
    done = _apply_overrides(infos, aliases, overrides or {})
    guessed = [n for n, i in infos.items() if i.source == "name" and n not in done]
    notes = []
    if guessed and walker is not None:
        notes.append(
            f"{len(guessed)} parameter(s) not recognised from the module structure, roles "
            f"guessed from their names: {_summary(infos, guessed)}"
        )
    elif guessed:
        notes.append(
            f"no module structure given, so the roles of {len(guessed)} parameter(s) were guessed "
            f"from their names (no head counts; Conv1D read as (out, in)): "
            f"{_summary(infos, guessed)}. Pass the model itself for a structure-aware partition"
        )
    if walker is not None and walker.unknown_heads:
        notes.append(
            "head count not found (module attributes or model.config) for attention "
            f"{', '.join(walker.unknown_heads)}; their q/k/v were left to the name rules"
        )
    if notes and warn:
        warnings.warn(
            "optarena partition: "
            + "; ".join(notes)
            + ". Check with print_partition(model); set roles with overrides={name: role}.",
            stacklevel=2,
        )
    return Partition(infos, params, aliases)


def _first_names(
    pairs: Iterable[tuple[str, nn.Parameter]],
) -> tuple[dict[str, nn.Parameter], dict[str, str]]:
    """Each tensor under the first name it is listed with, and the other names -> that one."""
    params: dict[str, nn.Parameter] = {}
    aliases: dict[str, str] = {}
    first: dict[int, str] = {}
    for item in pairs:
        if not (isinstance(item, tuple) and len(item) == 2 and isinstance(item[0], str)):
            raise TypeError(
                "partition() takes an nn.Module or (name, parameter) pairs such as "
                f"model.named_parameters(); got an item {type(item).__name__}"
            )
        name, p = item
        if id(p) in first:
            aliases[name] = first[id(p)]
        else:
            first[id(p)] = name
            params[name] = p
    return params, aliases


def print_partition(model: nn.Module, layout: LayoutPolicy | None = None) -> None:
    """Print the partition table of ``model`` (with the blocks of ``layout``, if given)."""
    print(partition(model).table(layout))


class Roles:
    """What an optimizer knows of its parameters' roles: an explicit partition (by name), the
    partition of the model they belong to (by identity: the same tensor whatever it is called
    in a param group), and the name rules for named parameters of neither."""

    def __init__(self, explicit: Mapping[str, ParamInfo] | None = None) -> None:
        self.by_name: dict[str, ParamInfo] = dict(explicit or {})
        self.by_id: dict[int, ParamInfo] = {}

    def learn_model(self, model: nn.Module) -> Partition:
        found = partition(model)
        self.by_id.update({id(found.params[n]): info for n, info in found.items()})
        return found

    def learn_module(self, module: nn.Module) -> None:
        """A module added later: its parameters the model's where known (a submodule seen
        alone has lost its context, e.g. that its Linear is the output layer)."""
        if any(id(p) not in self.by_id for p in module.parameters()):
            found = partition(module)
            for name, info in found.items():
                self.by_id.setdefault(id(found.params[name]), info)

    def learn_names(self, pairs: list[tuple[str, nn.Parameter]], warn: bool = True) -> None:
        """Name rules for named parameters that neither the explicit partition nor a model
        gives (one warning lists the guesses)."""
        rest = [(n, p) for n, p in pairs if n not in self.by_name and id(p) not in self.by_id]
        for name, info in partition(rest, warn=warn).items():
            self.by_name.setdefault(name, info)

    def of(self, p: nn.Parameter, name: str | None) -> ParamInfo | None:
        found = self.by_name.get(name) if name else None
        return found if found is not None else self.by_id.get(id(p))
