"""Batched generation from a causal LM: greedy or seeded sampling, stopping at end-of-text.

Every row of a batch is laid out from position 0 and right-padded: ``prompt, response, pad``.
A causal model's output at a position depends only on the positions before it, so the pads that
follow a row's current end never change what it generates: no attention mask, no left padding,
and the same model call serves every row whatever its prompt's length. The model is re-run over
the batch for each new token (no key/value cache); post-training prompts and responses are
short, and this keeps every model that maps ``ids -> logits`` usable as is.

Sampling draws one uniform number per row and step from a :class:`torch.Generator` (whatever the
row's state, so the stream's position depends only on the number of steps) and inverts the
softmax CDF at it in float64. Saving the generator's state with a checkpoint
(``generator.get_state()``) makes a resumed run draw the same responses bit for bit.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn


@dataclass
class Generation:
    """A batch of prompts with their responses, right-padded.

    ``tokens[i, :prompt_lengths[i]]`` is prompt ``i``; the next ``response_lengths[i]`` tokens
    are its response (ending with end-of-text when the model emitted it, which counts in the
    length); the rest is ``pad_id``.
    """

    tokens: Tensor  # (batch, time), long
    prompt_lengths: Tensor  # (batch,), long
    response_lengths: Tensor  # (batch,), long
    finished: Tensor  # (batch,), bool: the response ended with end-of-text

    @property
    def lengths(self) -> Tensor:
        """Prompt plus response, per row."""
        return self.prompt_lengths + self.response_lengths

    def response_mask(self) -> Tensor:
        """(batch, time - 1) bool: which *targets* ``tokens[:, 1:]`` are response tokens, the
        layout of :func:`token_logprobs`."""
        positions = torch.arange(1, self.tokens.shape[1], device=self.tokens.device)
        start = self.prompt_lengths.unsqueeze(1)
        return (positions >= start) & (positions < self.lengths.unsqueeze(1))

    def responses(self) -> list[list[int]]:
        """Each row's response tokens (end-of-text included when emitted)."""
        out = []
        for row, p, r in zip(self.tokens, self.prompt_lengths, self.response_lengths, strict=True):
            out.append(row[int(p) : int(p) + int(r)].tolist())
        return out


def right_pad(sequences: list[list[int]], pad_id: int, width: int | None = None) -> Tensor:
    """A (len(sequences), width) long tensor of the sequences from position 0, padded."""
    longest = max((len(s) for s in sequences), default=0)
    width = longest if width is None else width
    if width < longest:
        raise ValueError(f"width {width} is shorter than the longest sequence ({longest})")
    out = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    for i, seq in enumerate(sequences):
        out[i, : len(seq)] = torch.as_tensor(seq, dtype=torch.long)
    return out


def sample_from_logits(
    logits: Tensor, temperature: float, generator: torch.Generator | None
) -> Tensor:
    """One token per row: the argmax when ``temperature == 0``, else a draw from
    ``softmax(logits / temperature)`` by inverting its CDF (float64) at one uniform number
    per row from ``generator``."""
    if temperature == 0:
        return logits.argmax(-1)
    rows = logits.shape[0]
    u = torch.rand(rows, 1, generator=generator, device=logits.device, dtype=torch.float64)
    cdf = (logits.double() / temperature).softmax(-1).cumsum(-1)
    # scale to the CDF's own total so that a float64 sum short of 1 never indexes past the end
    picked = torch.searchsorted(cdf, u * cdf[:, -1:]).squeeze(-1)
    return picked.clamp_(max=logits.shape[-1] - 1)


@torch.no_grad()
def generate(
    model: nn.Module,
    prompts: list[list[int]],
    max_new_tokens: int,
    eos_id: int | None,
    pad_id: int,
    temperature: float = 1.0,
    generator: torch.Generator | None = None,
) -> Generation:
    """Responses to ``prompts`` (token ids) of at most ``max_new_tokens`` tokens each, stopping
    a row at ``eos_id`` (None: never). ``temperature == 0`` is greedy decoding (no random
    number is drawn); otherwise tokens are sampled with ``generator`` (see the module
    docstring). The model runs in its current mode under ``no_grad``; the result is on the
    model's device."""
    if not prompts or any(not p for p in prompts):
        raise ValueError("generate needs at least one prompt, and no empty prompt")
    if temperature < 0:
        raise ValueError(f"temperature must be at least 0, not {temperature}")
    device = next(model.parameters()).device
    prompt_lengths = torch.tensor([len(p) for p in prompts], device=device)
    tokens = right_pad(prompts, pad_id, int(prompt_lengths.max()) + max_new_tokens).to(device)
    current = prompt_lengths.clone()
    finished = torch.zeros(len(prompts), dtype=torch.bool, device=device)
    rows = torch.arange(len(prompts), device=device)
    for _ in range(max_new_tokens):
        logits = model(tokens[:, : int(current.max())])
        nxt = sample_from_logits(logits[rows, current - 1].float(), temperature, generator)
        active = ~finished
        tokens[rows[active], current[active]] = nxt[active]
        current += active.long()
        if eos_id is not None:
            finished |= active & (nxt == eos_id)
        if bool(finished.all()):
            break
    return Generation(tokens, prompt_lengths, current - prompt_lengths, finished)


def token_logprobs(model: nn.Module, tokens: Tensor) -> Tensor:
    """(batch, time - 1): the log-probability (temperature 1; at least float32 whatever the
    autocast dtype) the model gives each target ``tokens[:, 1:]`` after its prefix; gradients
    flow when enabled."""
    logits = model(tokens[:, :-1])
    if logits.dtype in (torch.float16, torch.bfloat16):
        logits = logits.float()
    return F.log_softmax(logits, dim=-1).gather(-1, tokens[:, 1:].unsqueeze(-1)).squeeze(-1)
