"""A pretrained causal language model behind one interface, whatever made it.

:func:`load_pretrained` reads

* an ``optarena train`` output folder (its newest valid checkpoint, the run's config and the
  ``tokenizer.json`` beside them; a folder written before runs kept their tokenizer rebuilds it
  from the config), or one checkpoint file ``checkpoints/step-N.pt`` in it;
* an ``optarena finetune`` (or ``rlhf``) output folder: the model it started from, with the
  fine-tuned weights of its newest checkpoint;
* a Hugging Face causal-LM folder (``config.json``, weights, tokenizer files), loaded with
  ``from_pretrained`` from the local path only (never the network).

Each gives a :class:`Pretrained`: a model whose ``forward(idx, mask=None)`` returns logits and
``features(idx, mask=None)`` the final hidden states (``mask``: batch x T, True at real
tokens), a :class:`ChatTokenizer`, and the context length.

The chat format is the tokenizer's chat template when it has one. Otherwise it is
:data:`DEFAULT_CHAT_FORMAT`: every message on its own line as ``Role: content`` (``System``,
``User``, ``Assistant``), and the prompt ends with ``Assistant: ``; the response follows it and
ends with the end-of-sequence token.
"""

from __future__ import annotations

import hashlib
import json
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import Tensor, nn

from optarena import checkpoints
from optarena.errors import UserError

DEFAULT_CHAT_FORMAT = "Role: content lines (System/User/Assistant), ending 'Assistant: '"
ROLES = {"system": "System", "user": "User", "assistant": "Assistant"}
Messages = Sequence[tuple[str, str]]  # (role, content) pairs


def default_chat_prompt(messages: Messages) -> str:
    """The default chat format: ``Role: content`` lines, then ``Assistant: `` for the reply."""
    lines = [f"{ROLES[role]}: {content}\n" for role, content in messages]
    return "".join(lines) + "Assistant: "


@dataclass
class ChatTokenizer:
    """What post-training needs of a tokenizer: text <-> ids, end-of-sequence and padding ids,
    and the chat format that turns a prompt's messages into the text the response follows.

    ``fingerprint`` identifies the vocabulary and its rules: two models share a tokenizer when
    their fingerprints are equal (a reward model must share its policy's)."""

    name: str
    fingerprint: str
    vocab_size: int
    eos_id: int
    pad_id: int
    encode_text: Callable[[str], list[int]] = field(repr=False)
    decode_ids: Callable[[list[int]], str] = field(repr=False)
    chat_template: Callable[[Messages], str] | None = field(default=None, repr=False)

    @property
    def chat_format(self) -> str:
        return "the tokenizer's chat template" if self.chat_template else DEFAULT_CHAT_FORMAT

    def encode(self, text: str) -> list[int]:
        return list(self.encode_text(text))

    def decode(self, ids: Sequence[int]) -> str:
        """The text of ``ids``, cut at the first end-of-sequence token."""
        ids = list(ids)
        if self.eos_id in ids:
            ids = ids[: ids.index(self.eos_id)]
        return self.decode_ids(ids)

    def prompt_text(self, messages: Messages) -> str:
        """The text a response to ``messages`` follows, in the chat format."""
        if self.chat_template is not None:
            return self.chat_template(messages)
        return default_chat_prompt(messages)

    def prompt_ids(self, messages: Messages) -> list[int]:
        return self.encode(self.prompt_text(messages))

    def response_ids(self, response: str) -> list[int]:
        """The response's ids with the end-of-sequence token that ends it."""
        return [*self.encode(response), self.eos_id]


@dataclass
class Pretrained:
    """A model ready to fine-tune: ``model`` (float32, on CPU until moved), ``tokenizer``,
    ``context_length`` (the longest sequence it was built or trained for), what it is
    (``kind``: ``optarena`` or ``huggingface``) and where it came from."""

    model: nn.Module
    tokenizer: ChatTokenizer
    context_length: int
    kind: str
    path: Path
    description: dict[str, Any] = field(default_factory=dict)

    def describe(self) -> dict[str, Any]:
        """What a summary records of the model it started from."""
        return {
            "path": str(self.path),
            "kind": self.kind,
            "context_length": self.context_length,
            "params": sum(p.numel() for p in self.model.parameters()),
            "tokenizer": self.tokenizer.name,
            "tokenizer_fingerprint": self.tokenizer.fingerprint,
            "chat_format": self.tokenizer.chat_format,
            **self.description,
        }


# --------------------------------------------------------------------------- entry point


def load_pretrained(path: str | Path) -> Pretrained:
    """The pretrained model at ``path`` (see the module docstring); a one-line
    :class:`~optarena.errors.UserError` when it is none of the kinds."""
    where = Path(path).expanduser()
    loaded = _load(where)
    loaded.description["name"] = model_name(where)
    return loaded


def _is_checkpoint(where: Path) -> bool:
    """One checkpoint of a run folder: ``checkpoints/step-N.pt`` or ``checkpoints/step-N.dcp``."""
    return checkpoints.step_of(where) is not None and where.parent.name == "checkpoints"


def _load(where: Path) -> Pretrained:
    if not where.exists():
        raise UserError(f"--from {where}: no such file or directory")
    if _is_checkpoint(where) and (where.is_file() or where.suffix == ".dcp"):
        return _from_run(where.parent.parent, where)
    if where.is_file():
        raise UserError(
            f"--from {where}: not a model (pass an `optarena train` output folder, one of "
            "its checkpoints/step-N.pt or step-N.dcp, or a Hugging Face model folder)"
        )
    if (where / "config.json").is_file():
        return _from_huggingface(where)
    if (where / "checkpoints").is_dir():
        return _from_run(where, None)
    raise UserError(
        f"--from {where}: not a model: neither an `optarena train` output folder (with "
        "checkpoints/) nor a Hugging Face model folder (with config.json)"
    )


# --------------------------------------------------------------------------- names


def model_name(path: str | Path) -> str:
    """A short name of the model at ``path`` for the results store and the report, read from
    its config files alone (no weights are loaded): ``FOLDER (ARCHITECTURE)``, where the
    architecture is an optarena run's size preset with its ``model_overrides``
    (``pre (micro, d_model=32)``; a fine-tuned folder names the architecture it started from,
    ``sft (micro, d_model=32)``), or a Hugging Face folder's ``model_type``
    (``gpt2-tiny (gpt2)``); one checkpoint adds its step (``pre step 200 (micro)``). Just the
    folder's name when its config cannot be read: a bad ``--from`` is the run's to report."""
    where = Path(path).expanduser()
    try:
        if _is_checkpoint(where):
            folder = where.parent.parent
            head = f"{folder.name} step {checkpoints.step_of(where)}"
            return f"{head} ({_architecture(folder, where, 0)})"
        return f"{where.name} ({_architecture(where, None, 0)})"
    except (OSError, ValueError, KeyError, TypeError, RuntimeError, RecursionError):
        return where.name or str(where)


def _architecture(folder: Path, ckpt: Path | None, depth: int) -> str:
    """What :func:`model_name` puts in brackets; ValueError when nothing says it."""
    if depth > 8:
        raise RecursionError("fine-tuned from itself")
    hf = folder / "config.json"
    if ckpt is None and hf.is_file():
        kind = json.loads(hf.read_text(encoding="utf-8")).get("model_type")
        if not isinstance(kind, str):
            raise ValueError("no model_type")
        return kind
    config = _run_config(folder, ckpt)
    base = config.get("pretrained")
    if isinstance(base, str):
        where = Path(base).expanduser()
        if not where.exists() and (folder.parent / base).exists():
            where = folder.parent / base
        inner = where.parent.parent if _is_checkpoint(where) else where
        return _architecture(inner, where if _is_checkpoint(where) else None, depth + 1)
    preset, overrides = config["model"], config.get("model_overrides") or {}
    return ", ".join([str(preset), *(f"{k}={v}" for k, v in sorted(overrides.items()))])


def _run_config(folder: Path, ckpt: Path | None) -> dict[str, Any]:
    """A run folder's resolved config: its ``summary.json``'s, else its (newest) checkpoint's,
    read without its tensors (``mmap``); ValueError when there is none."""
    import torch

    summary = folder / "summary.json"
    if ckpt is None and summary.is_file():
        config = json.loads(summary.read_text(encoding="utf-8")).get("config")
        if isinstance(config, dict):
            return config
    if ckpt is None:
        found = sorted(
            (p for p in (folder / "checkpoints").iterdir() if checkpoints.step_of(p) is not None),
            key=lambda p: (checkpoints.step_of(p), p.suffix == ".pt"),
        )
        if not found:
            raise ValueError("no checkpoint")
        ckpt = found[-1]
    file = ckpt / "meta.pt" if ckpt.is_dir() else ckpt
    payload = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
    config = json.loads(payload["config"])
    if not isinstance(config, dict):
        raise ValueError("not a config")
    return config


# --------------------------------------------------------------------------- optarena runs


def _checkpoint_payload(folder: Path, file: Path | None) -> tuple[Path, dict[str, Any]]:
    """The checkpoint (``file``, or the folder's newest valid one: a ``step-N.pt`` or the
    ``step-N.dcp`` folder a ``--parallel`` run writes) and its payload (a DCP checkpoint's
    ``meta.pt``: its weights are read by :func:`_load_weights`)."""
    from optarena.distributed import load_meta

    if file is not None:
        try:
            return file, load_meta(file) if file.is_dir() else checkpoints.load_checkpoint(file)
        except ValueError as err:
            raise UserError(f"--from {file}: not a usable checkpoint: {err}") from None
    with warnings.catch_warnings(record=True) as skipped:
        warnings.simplefilter("always")
        found = checkpoints.resume_point(folder / "checkpoints", parallel=True)
    if found is None:  # one line: why the newest was refused, if there was one
        why = (
            f" ({str(skipped[0].message).removeprefix('skipping checkpoint ')})" if skipped else ""
        )
        raise UserError(f"--from {folder}: no valid checkpoint in {folder / 'checkpoints'}{why}")
    for warning in skipped:  # an older checkpoint is used: say which newer ones were not
        warnings.warn(str(warning.message), stacklevel=2)
    return found.path, found.payload


def _from_run(folder: Path, file: Path | None) -> Pretrained:
    """An optarena output folder: a pre-training run, or a post-training run on top of one."""
    ckpt, payload = _checkpoint_payload(folder, file)
    if ("model" not in payload and ckpt.suffix != ".dcp") or "config" not in payload:
        raise UserError(f"--from {ckpt}: not a model checkpoint (no model weights or config)")
    config = json.loads(payload["config"])
    base = config.get("pretrained")
    if base is not None:  # fine-tuned: the architecture and tokenizer of what it started from
        if not Path(base).expanduser().exists() and (folder.parent / base).exists():
            base = str(folder.parent / base)  # a relative --from, given beside the run folder
        pre = _load(Path(base).expanduser())
        _load_weights(pre.model, payload, ckpt)
        pre.path, pre.description = folder, {**pre.description, "base": str(base)}
        pre.description["checkpoint"] = str(ckpt)
        return pre
    if "model" not in config or "tokenizer" not in config:
        raise UserError(f"--from {ckpt}: not a language-model run (its config names no model)")
    return _pretraining_run(folder, ckpt, payload, config)


def _pretraining_run(
    folder: Path, ckpt: Path, payload: dict[str, Any], config: dict[str, Any]
) -> Pretrained:
    from optarena.model import GPT
    from optarena.train import TrainConfig, _model_config

    shapes = _weight_shapes(payload, ckpt)
    if "tok_emb.weight" not in shapes:
        raise UserError(f"--from {ckpt}: not a model checkpoint of optarena's transformer")
    padded_vocab = int(shapes["tok_emb.weight"][0])
    values = {k: v for k, v in config.items() if k not in ("resume", "out")}
    train_config = TrainConfig.from_dict(values)
    model = GPT(_model_config(train_config, padded_vocab))
    _load_weights(model, payload, ckpt)
    tokenizer = _run_tokenizer(folder, train_config)
    description = {"checkpoint": str(ckpt), "step": int(payload["step"]), "model": config["model"]}
    return Pretrained(model, tokenizer, int(config["seq_len"]), "optarena", folder, description)


def _weight_shapes(payload: dict[str, Any], ckpt: Path) -> dict[str, tuple[int, ...]]:
    """Name -> shape of the checkpoint's model weights (a DCP checkpoint's from its metadata:
    the global shapes, whatever the sharding)."""
    if "model" in payload:
        return {k: tuple(v.shape) for k, v in payload["model"].items()}
    from optarena.distributed import read_dcp_metadata

    prefix = "model."
    metadata = read_dcp_metadata(ckpt)
    return {
        k.removeprefix(prefix): tuple(getattr(v, "size", ()))
        for k, v in metadata.state_dict_metadata.items()
        if k.startswith(prefix)
    }


def _load_weights(model: nn.Module, payload: dict[str, Any], ckpt: Path) -> None:
    """The checkpoint's model weights into ``model``: a ``.pt``'s state dict, or a DCP
    checkpoint's model entries read into this one process (:func:`optarena.distributed.
    load_dcp_model`; its optimizer state is not read)."""
    try:
        if "model" in payload:
            model.load_state_dict(payload["model"])
        else:
            from optarena.distributed import load_dcp_model

            load_dcp_model(ckpt, model)
    except RuntimeError as err:
        first = str(err).strip().splitlines()[0]
        raise UserError(f"--from {ckpt}: the weights do not fit the model: {first}") from None


def _run_tokenizer(folder: Path, config: Any) -> ChatTokenizer:
    """The run's ``tokenizer.json``; else the tokenizer rebuilt from its config."""
    from optarena.train import TOKENIZER_FILE

    path = folder / TOKENIZER_FILE
    if path.is_file():
        return _from_tokenizers_json(path.read_text(encoding="utf-8"), f"{folder.name}/{path.name}")
    from optarena.data import default_cache_dir, load_corpus, load_tokenizer
    from optarena.model import PRESETS

    cache = Path(config.cache_dir) if config.cache_dir else default_cache_dir()
    spec = config.tokenizer
    if spec != "bpe" and not Path(spec).expanduser().is_file():
        return _from_transformers_tokenizer(spec, spec)
    corpus = load_corpus(config.data, cache, config.val_fraction, config.max_documents)
    vocab = config.vocab_size or PRESETS[config.model]["vocab_size"]
    text = load_tokenizer(spec, corpus, vocab, cache)
    if text.definition is None:
        raise UserError(f"--from {folder}: cannot rebuild its tokenizer {spec!r}")
    return _from_tokenizers_json(text.definition, text.name)


def _from_tokenizers_json(definition: str, name: str) -> ChatTokenizer:
    from tokenizers import Tokenizer

    from optarena.data.tokenizer import _EOS_CANDIDATES

    tok = Tokenizer.from_str(definition)
    vocab = tok.get_vocab(with_added_tokens=True)
    eos = next((vocab[t] for t in _EOS_CANDIDATES if t in vocab), None)
    if eos is None:
        raise UserError(f"tokenizer {name} has no end-of-sequence token")
    size = max(tok.get_vocab_size(with_added_tokens=True), max(vocab.values()) + 1)
    return ChatTokenizer(
        name,
        hashlib.sha256(definition.encode("utf-8")).hexdigest(),
        size,
        eos,
        eos,
        lambda text: tok.encode(text, add_special_tokens=False).ids,
        lambda ids: tok.decode(ids, skip_special_tokens=True),
    )


# --------------------------------------------------------------------------- Hugging Face


class HFCausalLM(nn.Module):
    """A Hugging Face causal LM with optarena's interface: ``forward(idx, mask)`` -> logits,
    ``features(idx, mask)`` -> the last hidden states (after the final norm). With a padding
    mask, positions count real tokens only, so a left-padded row sees the positions of the
    unpadded one (absolute position embeddings, as in GPT-2, need it)."""

    def __init__(self, hf: nn.Module):
        super().__init__()
        self.hf = hf

    @staticmethod
    def _inputs(idx: Tensor, mask: Tensor | None) -> dict[str, Any]:
        inputs: dict[str, Any] = {"input_ids": idx, "use_cache": False}
        if mask is not None:
            mask = mask.long()
            inputs["attention_mask"] = mask
            inputs["position_ids"] = (mask.cumsum(-1) - 1).clamp(min=0)
        return inputs

    def forward(self, idx: Tensor, mask: Tensor | None = None) -> Tensor:
        return self.hf(**self._inputs(idx, mask)).logits

    def features(self, idx: Tensor, mask: Tensor | None = None) -> Tensor:
        return self.hf.base_model(**self._inputs(idx, mask)).last_hidden_state


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def _from_huggingface(folder: Path) -> Pretrained:
    try:
        from transformers import AutoConfig, AutoModelForCausalLM
    except ImportError:
        raise UserError(
            f"--from {folder} is a Hugging Face model; it needs transformers: "
            "pip install 'optarena[c4]'"
        ) from None
    try:
        hf_config = AutoConfig.from_pretrained(folder, local_files_only=True)
        hf = AutoModelForCausalLM.from_pretrained(folder, local_files_only=True)
    except (OSError, ValueError, KeyError) as err:
        raise UserError(
            f"--from {folder}: not a causal language model: {_first_line(err)}"
        ) from None
    hf = hf.float()
    tokenizer = _from_transformers_tokenizer(str(folder), folder.name, local=True)
    context = next(
        (
            int(getattr(hf_config, key))
            for key in ("max_position_embeddings", "n_positions", "n_ctx")
            if getattr(hf_config, key, None)
        ),
        2048,
    )
    description = {"architecture": type(hf).__name__, "model_type": hf_config.model_type}
    return Pretrained(HFCausalLM(hf), tokenizer, context, "huggingface", folder, description)


def _from_transformers_tokenizer(spec: str, name: str, local: bool = False) -> ChatTokenizer:
    try:
        from transformers import AutoTokenizer
    except ImportError:
        raise UserError(f"tokenizer {spec!r} needs transformers") from None
    try:
        tok = AutoTokenizer.from_pretrained(spec, local_files_only=local)
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise UserError(f"cannot load the tokenizer of {spec}: {_first_line(err)}") from None
    if tok.eos_token_id is None:
        raise UserError(f"the tokenizer of {spec} has no end-of-sequence token")
    if getattr(tok, "is_fast", False):
        definition = tok.backend_tokenizer.to_str()
    else:
        definition = json.dumps(sorted(tok.get_vocab().items()))
    template = None
    if getattr(tok, "chat_template", None):

        def template(messages: Messages) -> str:
            chat = [{"role": role, "content": content} for role, content in messages]
            return tok.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)

    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    return ChatTokenizer(
        name,
        hashlib.sha256((definition + str(tok.chat_template or "")).encode()).hexdigest(),
        len(tok),
        int(tok.eos_token_id),
        int(pad),
        lambda text: tok.encode(text, add_special_tokens=False),
        lambda ids: tok.decode(ids, skip_special_tokens=True),
        template,
    )


__all__ = [
    "DEFAULT_CHAT_FORMAT",
    "ChatTokenizer",
    "HFCausalLM",
    "Pretrained",
    "default_chat_prompt",
    "load_pretrained",
]
