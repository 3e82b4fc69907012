"""Fine-tuning data: examples from JSONL, tokenized with the loss on the responses only,
right-padded batches, and a seeded sampler whose state resumes exactly.

A JSONL line is one example, either ``{"prompt": str, "response": str}`` or
``{"messages": [{"role": "system"|"user"|"assistant", "content": str}, ...]}`` whose last
message is the assistant's: the response; the messages before it are the prompt. Other keys
are ignored. A line that is none of these is a one-line error naming the file and the line.

Sequences are padded, not packed: each example is its prompt's ids then its response's ids
and end-of-sequence token, alone in its row, right-padded to the longest row of the batch.
Right padding needs no attention mask (no real token attends to a later one), and the loss
reads only the response tokens, so a row's loss is what it would be alone.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from optarena.errors import UserError

IGNORE = -100  # the target of every position whose loss is not counted (cross_entropy's default)


@dataclass(frozen=True)
class Example:
    """A prompt (its chat messages, ``(role, content)`` pairs), the response to learn, the
    one right answer when the task has one (exact match), and its line in the source."""

    messages: tuple[tuple[str, str], ...]
    response: str
    answer: str | None = None
    line: int = 0


# --------------------------------------------------------------------------- reading


def _message(value: Any, where: str, i: int) -> tuple[str, str]:
    if not isinstance(value, dict):
        raise UserError(f"{where}: messages[{i}] must be an object with role and content")
    role, content = value.get("role"), value.get("content")
    if role not in ("system", "user", "assistant"):
        raise UserError(f"{where}: messages[{i}] role must be system, user or assistant")
    if not isinstance(content, str):
        raise UserError(f"{where}: messages[{i}] has no string content")
    return role, content


def parse_example(record: Any, where: str, line: int = 0) -> Example:
    """One example from a decoded JSON line; ``where`` (``FILE:LINE``) names it in errors."""
    expected = 'expected {"prompt": ..., "response": ...} or {"messages": [...]} with string values'
    if not isinstance(record, dict):
        raise UserError(f"{where}: {expected}, not {type(record).__name__}")
    if "messages" in record:
        messages = record["messages"]
        if not isinstance(messages, list) or len(messages) < 2:
            raise UserError(f"{where}: messages must be a list of at least two messages")
        parsed = tuple(_message(m, where, i) for i, m in enumerate(messages))
        if parsed[-1][0] != "assistant":
            raise UserError(f"{where}: the last message must be the assistant's (the response)")
        return Example(parsed[:-1], parsed[-1][1], line=line)
    prompt, response = record.get("prompt"), record.get("response")
    if not isinstance(prompt, str) or not isinstance(response, str):
        missing = [k for k in ("prompt", "response") if not isinstance(record.get(k), str)]
        raise UserError(f"{where}: no string {' and '.join(missing)}; {expected}")
    answer = record.get("answer") if isinstance(record.get("answer"), str) else None
    return Example((("user", prompt),), response, answer, line)


def jsonl_records(path: Path, kind: str = "data file") -> Iterator[tuple[Any, str, int]]:
    """The parsed lines of a JSONL file as ``(record, "PATH:LINE", line)``, blank lines
    skipped. A missing file, a line that is not JSON or a file that is not UTF-8 is a one-line
    error naming the ``kind`` of file, or the line."""
    if not path.is_file():
        raise UserError(f"{kind} {path} does not exist")
    try:
        with path.open(encoding="utf-8") as f:
            for number, text in enumerate(f, 1):
                if not text.strip():
                    continue
                where = f"{path}:{number}"
                try:
                    record = json.loads(text)
                except ValueError as err:
                    raise UserError(f"{where}: not JSON ({err.args[0].split(':')[0]})") from None
                yield record, where, number
    except UnicodeDecodeError:
        raise UserError(f"{kind} {path} is not UTF-8 text") from None


def read_jsonl(path: str | Path) -> list[Example]:
    """Every example of a JSONL file (blank lines skipped); one-line errors name the line."""
    path = Path(path).expanduser()
    out = [parse_example(record, where, number) for record, where, number in jsonl_records(path)]
    if not out:
        raise UserError(f"data file {path} has no examples (one JSON object per line)")
    return out


# --------------------------------------------------------------------------- tokenized


@dataclass
class TokenizedExamples:
    """Examples as token ids: ``ids[i]`` is prompt then response then end-of-sequence,
    ``prompt_len[i]`` the prompt's share. Responses cut to fit ``seq_len`` are counted."""

    ids: list[np.ndarray]
    prompt_len: np.ndarray
    examples: list[Example]
    truncated: int

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def tokens(self) -> int:
        return int(sum(len(x) for x in self.ids))

    @property
    def response_tokens(self) -> int:
        return self.tokens - int(self.prompt_len.sum())


def tokenize(
    examples: Sequence[Example], tokenizer: Any, seq_len: int, source: str
) -> TokenizedExamples:
    """Token ids of every example, at most ``seq_len + 1`` each (input and target shifted by
    one); a prompt that leaves no room for a response token is an error naming its line."""
    if not examples:
        raise UserError(f"{source} has no examples")
    ids, prompt_len, truncated = [], [], 0
    for example in examples:
        prompt = tokenizer.prompt_ids(example.messages)
        response = tokenizer.response_ids(example.response)
        if len(prompt) >= seq_len:
            line = f"{source}:{example.line}" if example.line else source
            raise UserError(
                f"{line}: the prompt is {len(prompt)} tokens, which leaves no room for a "
                f"response in the context of {seq_len} tokens (raise --seq-len up to the "
                "model's context, or shorten the prompt)"
            )
        full = prompt + response
        if len(full) > seq_len + 1:
            full, truncated = full[: seq_len + 1], truncated + 1
        ids.append(np.asarray(full, dtype=np.int64))
        prompt_len.append(len(prompt))
    return TokenizedExamples(ids, np.asarray(prompt_len, dtype=np.int64), list(examples), truncated)


def collate(data: TokenizedExamples, rows: Sequence[int], pad_id: int) -> tuple[Tensor, Tensor]:
    """Inputs and targets (batch, L) for ``rows``, right-padded to the longest: the target is
    the next token on response positions and :data:`IGNORE` elsewhere (prompt, padding)."""
    length = max(len(data.ids[r]) for r in rows) - 1
    x = np.full((len(rows), length), pad_id, dtype=np.int64)
    y = np.full((len(rows), length), IGNORE, dtype=np.int64)
    for i, r in enumerate(rows):
        seq, start = data.ids[r], int(data.prompt_len[r])
        x[i, : len(seq) - 1] = seq[:-1]
        y[i, start - 1 : len(seq) - 1] = seq[start:]
    return torch.from_numpy(x), torch.from_numpy(y)


def prompt_batches(
    data: TokenizedExamples, rows: Sequence[int], size: int
) -> Iterator[tuple[list[int], list[list[int]]]]:
    """The prompts' ids of ``rows``, ``size`` at a time (with their rows)."""
    rows = list(rows)
    for i in range(0, len(rows), size):
        chunk = rows[i : i + size]
        yield chunk, [data.ids[r][: data.prompt_len[r]].tolist() for r in chunk]


# --------------------------------------------------------------------------- sampling


class ExampleSampler:
    """Batches of example indices: a seeded random permutation per epoch, read in order.

    ``state_dict`` holds the generator's state before the current epoch's permutation and the
    position in it, so a resumed sampler continues with exactly the indices the uninterrupted
    one would have drawn. ``shard=(rank, world)``: every rank draws the whole global batch and
    takes its own rows (the run is the same at every world size)."""

    def __init__(
        self, size: int, batch_size: int, seed: int, shard: tuple[int, int] = (0, 1)
    ) -> None:
        if size < 1:
            raise UserError("the training set has no examples")
        self.size, self.batch_size = size, batch_size
        self.rank, self.world = shard
        self.generator = torch.Generator().manual_seed(seed)
        self.epoch = 0
        self._new_epoch()

    def _new_epoch(self) -> None:
        self._epoch_state = self.generator.get_state()
        self.order = torch.randperm(self.size, generator=self.generator)
        self.position = 0

    def next_global(self) -> list[int]:
        """The next global batch of indices (every rank's rows)."""
        out: list[int] = []
        while len(out) < self.batch_size:
            if self.position == self.size:
                self.epoch += 1
                self._new_epoch()
            take = min(self.batch_size - len(out), self.size - self.position)
            out.extend(self.order[self.position : self.position + take].tolist())
            self.position += take
        return out

    def mine(self, rows: list[int]) -> list[int]:
        share = len(rows) // self.world
        return rows[self.rank * share : (self.rank + 1) * share]

    def state_dict(self) -> dict[str, Tensor]:
        return {
            "generator": self._epoch_state,
            "epoch": torch.tensor(self.epoch),
            "position": torch.tensor(self.position),
        }

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        self.generator.set_state(state["generator"])
        self._new_epoch()
        self.epoch, self.position = int(state["epoch"]), int(state["position"])


__all__ = [
    "IGNORE",
    "Example",
    "ExampleSampler",
    "TokenizedExamples",
    "collate",
    "parse_example",
    "prompt_batches",
    "read_jsonl",
    "tokenize",
]
