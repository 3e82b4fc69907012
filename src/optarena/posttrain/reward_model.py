"""Training a reward model on preference pairs (``optarena reward``), and loading one.

A :class:`RewardRun` is a :class:`~optarena.train.Run`: the same checkpoints, bit-exact resume,
divergence record, ``metrics.jsonl``, progress and ``summary.json`` as pre-training. Each step
scores a batch of pairs, chosen and rejected in one forward pass, and back-propagates the
Bradley-Terry loss through the head and the whole backbone; evaluation is the loss and the
accuracy (share ordered correctly) on held-out pairs.

Pairs are the built-in task's (:func:`optarena.posttrain.builtin.preference_pairs`: the right
answer against a plausible wrong one; held out: the task's validation split) or a JSONL file of
``{"prompt": ..., "chosen": ..., "rejected": ...}`` (or ``"messages": [...]`` ending with a user
message instead of ``"prompt"``), of which a seeded tenth is held out. Each sequence is the
prompt in the model's chat format, the response and the end-of-sequence token, scored at that
last token.

:func:`load_reward_model` reads the run's newest checkpoint onto the model it started from and
refuses a folder that is not a reward model, or one whose tokenizer is not the policy's.
"""

from __future__ import annotations

import json
import math
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from optarena import checkpoints
from optarena.errors import UserError
from optarena.posttrain.data import jsonl_records
from optarena.posttrain.generate import right_pad
from optarena.posttrain.reward import RewardModel, bradley_terry_loss, pair_accuracy
from optarena.train import Run, RunConfig, _check_range, _check_types

TASK = "reward-model"  # what a reward run's checkpoints say they are
HELD_OUT_SHARE = 0.1  # of a pairs file, seeded


@dataclass(frozen=True)
class Pair:
    """A prompt's chat messages, the preferred response and the other one, and the source
    line (0 for built-in pairs)."""

    messages: tuple[tuple[str, str], ...]
    chosen: str
    rejected: str
    line: int = 0


def _pair(record: Any, where: str, line: int) -> Pair:
    expected = 'expected {"prompt": ..., "chosen": ..., "rejected": ...} with string values'
    if not isinstance(record, dict):
        raise UserError(f"{where}: {expected}, not {type(record).__name__}")
    if "messages" in record and "prompt" not in record:
        messages = record["messages"]
        ok = (
            isinstance(messages, list)
            and messages
            and all(
                isinstance(m, dict)
                and m.get("role") in ("system", "user", "assistant")
                and isinstance(m.get("content"), str)
                for m in messages
            )
        )
        if not ok or messages[-1]["role"] == "assistant":
            raise UserError(
                f"{where}: messages must be a list of {{role, content}} ending with a user "
                "message (the responses are chosen and rejected)"
            )
        prompt = tuple((m["role"], m["content"]) for m in messages)
    elif isinstance(record.get("prompt"), str):
        prompt = (("user", record["prompt"]),)
    else:
        prompt = None
    missing = [k for k in ("chosen", "rejected") if not isinstance(record.get(k), str)]
    if prompt is None:
        missing.insert(0, "prompt")
    if missing:
        raise UserError(f"{where}: no string {', '.join(missing)}; {expected}")
    if record["chosen"] == record["rejected"]:
        raise UserError(f"{where}: chosen and rejected are the same text; a pair must differ")
    return Pair(prompt, record["chosen"], record["rejected"], line)


def read_pairs(path: str | Path) -> list[Pair]:
    """Every pair of a JSONL file (blank lines skipped); one-line errors name the line."""
    path = Path(path).expanduser()
    out = [
        _pair(record, where, number) for record, where, number in jsonl_records(path, "pairs file")
    ]
    if len(out) < 2:
        raise UserError(
            f"pairs file {path} has {len(out)} pair(s); a reward model needs at least 2 (one "
            "JSON object per line), some of which are held out"
        )
    return out


def load_pairs(source: str, seed: int) -> tuple[list[Pair], list[Pair]]:
    """(training pairs, held-out pairs) of ``builtin`` or a JSONL file."""
    if source == "builtin":
        from optarena.posttrain import builtin

        def convert(split: str) -> list[Pair]:
            return [
                Pair(tuple(p.messages), p.chosen, p.rejected)
                for p in builtin.preference_pairs(split, seed)
            ]

        return convert("train"), convert("val")
    pairs = read_pairs(source)
    order = torch.randperm(len(pairs), generator=torch.Generator().manual_seed(seed)).tolist()
    held = max(1, round(HELD_OUT_SHARE * len(pairs)))
    return [pairs[i] for i in order[held:]], [pairs[i] for i in sorted(order[:held])]


@dataclass
class EncodedPairs:
    """Token ids of each pair's two sequences (prompt, response, end-of-sequence), and how
    many built-in pairs were left out for not fitting the context."""

    chosen: list[list[int]]
    rejected: list[list[int]]
    too_long: int = 0

    def __len__(self) -> int:
        return len(self.chosen)

    def batch(self, rows: Sequence[int], pad_id: int) -> tuple[Tensor, Tensor]:
        """Right-padded (2 len(rows), T) ids, chosen rows first, and their lengths."""
        seqs = [self.chosen[r] for r in rows] + [self.rejected[r] for r in rows]
        return right_pad(seqs, pad_id), torch.tensor([len(s) for s in seqs])


def encode_pairs(pairs: Sequence[Pair], tokenizer: Any, context: int, source: str) -> EncodedPairs:
    """Each pair in the chat format. A pair of a file longer than ``context`` tokens is an
    error naming its line; the built-in task's such pairs are left out (and counted)."""
    out = EncodedPairs([], [])
    for pair in pairs:
        prompt = tokenizer.prompt_ids(pair.messages)
        c = prompt + tokenizer.response_ids(pair.chosen)
        r = prompt + tokenizer.response_ids(pair.rejected)
        if max(len(c), len(r)) > context:
            if source == "builtin":
                out.too_long += 1
                continue
            raise UserError(
                f"{source}:{pair.line}: {max(len(c), len(r))} tokens, longer than the model's "
                f"context of {context}; shorten it or drop it"
            )
        out.chosen.append(c)
        out.rejected.append(r)
    return out


# --------------------------------------------------------------------------- the run


@dataclass
class RewardConfig(RunConfig):
    """A reward-model run: the loop's settings (:class:`~optarena.train.RunConfig`), the model
    it starts from (``pretrained``: an ``optarena train``/``finetune`` folder or a Hugging Face
    folder) and the pairs. ``seq_len`` is not used (each batch is as long as its pairs)."""

    pretrained: str = ""
    pairs: str = "builtin"
    eval_pairs: int = 512  # held-out pairs evaluated (the first ones)
    steps: int = 150
    batch_size: int = 32
    schedule: str = "cosine"
    # the Bradley-Terry loss starts at log 2 (a zero head) and may fall close to 0: only a
    # non-finite loss or one far above log 2 is divergence
    divergence_factor: float = 4.0

    _INTS = (*RunConfig._INTS, "eval_pairs")

    def validate(self) -> None:
        super().validate()
        _check_types(self, ("eval_pairs",), ())
        _check_range("eval_pairs", self.eval_pairs, 1)
        for key in ("pretrained", "pairs"):
            if not isinstance(getattr(self, key), str) or not getattr(self, key).strip():
                flag = "--from" if key == "pretrained" else "--pairs"
                raise UserError(f"{key} is missing: pass {flag}")
        if self.parallel != "none":
            raise UserError("reward-model training runs in one process: parallel must be none")


class RewardRun(Run):
    """Bradley-Terry training of a :class:`RewardModel` on preference pairs."""

    def load_inputs(self) -> None:
        """The model and the pairs, each checked (one-line errors)."""
        from optarena.posttrain.pretrained import load_pretrained

        config = self.config
        self.pretrained = load_pretrained(config.pretrained)
        tok = self.pretrained.tokenizer
        train_pairs, held_out = load_pairs(config.pairs, config.seed)
        if not train_pairs:
            raise UserError(f"--pairs {config.pairs}: no training pairs")
        source = "builtin" if config.pairs == "builtin" else str(config.pairs)
        context = self.pretrained.context_length
        self.train_pairs = encode_pairs(train_pairs, tok, context, source)
        self.val_pairs = encode_pairs(held_out[: config.eval_pairs], tok, context, source)
        if not len(self.train_pairs) or not len(self.val_pairs):
            raise UserError(
                f"--pairs {source}: no {'training' if not len(self.train_pairs) else 'held-out'} "
                f"pair fits the model's context of {context} tokens"
            )
        self.pad_id = tok.pad_id

    def build(self) -> None:
        from optarena.posttrain.data import ExampleSampler

        config = self.config
        self.load_inputs()  # before the folder is made (Run.make_out): bad input writes nothing
        torch.manual_seed(config.seed)
        self.model = RewardModel(self.pretrained.model).to(self.device)
        self.sampler = ExampleSampler(len(self.train_pairs), config.batch_size, config.seed)
        self.micro = config.batch_size // config.grad_accum
        self._tokens = 0

    def make_optimizer(self) -> torch.optim.Optimizer:
        # the partition guesses the head's role ("other") and the backbone's unused output
        # layer's from their names, rightly: no warning about it
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", "optarena partition", UserWarning)
            return super().make_optimizer()

    def data_state(self) -> dict[str, Any]:
        return {"sampler": self.sampler.state_dict(), "task": TASK}

    def load_data_state(self, state: dict[str, Any]) -> None:
        self.sampler.load_state_dict(state["sampler"])

    def next_batch(self) -> list[int]:
        return self.sampler.next_global()

    def forward_backward(self, rows: list[int]) -> Tensor:
        accum = self.config.grad_accum
        total = torch.zeros((), dtype=torch.float64, device=self.device)
        self._tokens = 0
        for m in range(accum):
            part = rows[m * self.micro : (m + 1) * self.micro]
            tokens, lengths = self.train_pairs.batch(part, self.pad_id)
            tokens, lengths = tokens.to(self.device), lengths.to(self.device)
            with self.autocast:
                scores = self.model(tokens, lengths)
            loss = bradley_terry_loss(*scores.float().chunk(2))
            (loss / accum).backward()
            total += loss.detach().double() / accum
            self._tokens += int(lengths.sum())
        return total

    def step_tokens(self, batch: Any) -> int:
        return self._tokens

    @torch.no_grad()
    def scores(self, pairs: EncodedPairs) -> tuple[Tensor, Tensor]:
        """Rewards of every pair's chosen and rejected sequence."""
        was_training = self.model.training
        self.model.eval()
        chosen, rejected = [], []
        size = self.config.batch_size
        for i in range(0, len(pairs), size):
            tokens, lengths = pairs.batch(range(i, min(i + size, len(pairs))), self.pad_id)
            with self.autocast:
                out = self.model(tokens.to(self.device), lengths.to(self.device)).float()
            c, r = out.chunk(2)
            chosen.append(c)
            rejected.append(r)
        self.model.train(was_training)
        return torch.cat(chosen), torch.cat(rejected)

    def evaluate(self) -> dict[str, float]:
        """Held-out Bradley-Terry loss and accuracy (``val_loss``, ``accuracy``)."""
        if not len(self.val_pairs):
            return {"val_loss": math.nan, "accuracy": math.nan}
        chosen, rejected = self.scores(self.val_pairs)
        return {
            "val_loss": bradley_terry_loss(chosen, rejected).item(),
            "accuracy": pair_accuracy(chosen, rejected),
        }

    def summary_fields(self) -> dict[str, Any]:
        last = self.eval_curve[-1] if self.eval_curve else {}
        return {
            "task": TASK,
            "pretrained": self.pretrained.describe(),
            "pairs": {
                "source": self.config.pairs,
                "train": len(self.train_pairs),
                "held_out": len(self.val_pairs),
                # built-in pairs left out: longer than the context
                "too_long": self.train_pairs.too_long + self.val_pairs.too_long,
            },
            "accuracy": last.get("accuracy"),
        }


def train_reward_model(
    config: RewardConfig | dict[str, Any],
    on_log: Callable[[dict[str, Any]], None] | None = None,
) -> dict[str, Any]:
    """Train a reward model and return its summary (also ``OUT/summary.json``); ``on_log``
    receives every record of ``metrics.jsonl``."""
    return RewardRun(check_config(config, optimizer=True), None, on_log).run()


def check_config(config: RewardConfig | dict[str, Any], optimizer: bool = True) -> RewardConfig:
    """Keys, types, ranges and (``optimizer``) the optimizer and its hyperparameters over a
    stand-in model, without the model or pairs (what a sweep checks before it starts)."""
    values = config if isinstance(config, dict) else config.to_dict()
    checked = RewardConfig.from_dict(values)
    check_optimizer(checked, optimizer)
    return checked


def check_optimizer(config: RunConfig, hyperparameters: bool = True) -> None:
    """The optimizer's name and (``hyperparameters``) its hyperparameters, checked over a
    stand-in model as ``optarena train`` does."""
    from optarena.train import _check_optimizer_name, _make_optimizer, _stand_in_model

    _check_optimizer_name(config.optimizer)
    if hyperparameters:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            _make_optimizer(config, _stand_in_model())


# --------------------------------------------------------------------------- loading


@dataclass
class LoadedRewardModel:
    model: RewardModel
    path: Path
    checkpoint: Path
    description: dict[str, Any] = field(default_factory=dict)


def load_reward_model(path: str | Path, tokenizer_fingerprint: str | None) -> LoadedRewardModel:
    """The reward model of an ``optarena reward`` folder (its newest checkpoint). Refused in
    one line: a folder that is not one, and (``tokenizer_fingerprint`` given) one trained with
    another tokenizer than the policy's."""
    from optarena.posttrain.pretrained import load_pretrained

    folder = Path(path).expanduser()
    hint = "train one with `optarena reward --from MODEL --out DIR`"
    if not folder.is_dir():
        raise UserError(f"--reward-model {folder}: no such folder; {hint}")
    found = checkpoints.resume_point(folder / "checkpoints", parallel=False)
    if found is None:
        raise UserError(f"--reward-model {folder}: no valid checkpoint, not a reward model; {hint}")
    payload = found.payload
    if payload.get("task") != TASK or "model" not in payload:
        raise UserError(f"--reward-model {folder}: not a reward model; {hint}")
    config = json.loads(payload["config"])
    backbone = load_pretrained(config["pretrained"])
    tok = backbone.tokenizer
    if tokenizer_fingerprint is not None and tok.fingerprint != tokenizer_fingerprint:
        raise UserError(
            f"--reward-model {folder} uses another tokenizer ({tok.name}, "
            f"{tok.fingerprint[:12]}) than the policy ({tokenizer_fingerprint[:12]}); train the "
            "reward model from a model with the policy's tokenizer"
        )
    model = RewardModel(backbone.model)
    try:
        model.load_state_dict(payload["model"])
    except RuntimeError as err:
        first = str(err).strip().splitlines()[0]
        raise UserError(f"--reward-model {found.path}: weights do not fit: {first}") from None
    summary_path = folder / "summary.json"
    accuracy = None
    if summary_path.is_file():
        try:
            accuracy = json.loads(summary_path.read_text(encoding="utf-8")).get("accuracy")
        except ValueError:
            accuracy = None
    description = {
        "path": str(folder),
        "checkpoint": str(found.path),
        "step": int(payload["step"]),
        "pretrained": config["pretrained"],
        "pairs": config.get("pairs"),
        "held_out_accuracy": accuracy,
        "tokenizer_fingerprint": tok.fingerprint,
    }
    return LoadedRewardModel(model, folder, found.path, description)
