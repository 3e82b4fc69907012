"""Batched generation from a causal LM: greedy or seeded sampling, stopping at end-of-text.

Every row of a batch is laid out from position 0 and right-padded: ``prompt, response, pad``.
A causal model's output at a position depends only on the positions before it, so the pads that
follow a row's current end never change what it generates: no attention mask, no left padding,
and the same model call serves every row whatever its prompt's length.

optarena's transformer (a model with ``new_cache`` and ``decode``: :class:`optarena.model.GPT`)
generates with a key/value cache: one forward pass over the prompts fills it, then each new
token is one ``decode`` call per row at the row's own position, attending to that row's
cached positions. The logits are those of re-running the model over the whole batch (what any
other model that maps ``ids -> logits`` does here, e.g. a Hugging Face one), up to the rounding
of matrix products of other shapes (the tests compare both paths in float64 and float32).

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
    cache: bool | None = None,
) -> Generation:
    """Responses to ``prompts`` (token ids) of at most ``max_new_tokens`` tokens each, stopping
    a row at ``eos_id`` (None: never). ``temperature == 0`` is greedy decoding (no random
    number is drawn); otherwise tokens are sampled with ``generator`` (see the module
    docstring). ``cache``: decode with the model's key/value cache (None: when it has one;
    the same draws from ``generator`` either way). The model runs in its current mode under
    ``no_grad``; the result is on the model's device."""
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
    cached = has_cache(model) if cache is None else cache
    if cached and not has_cache(model):
        raise ValueError(f"{type(model).__name__} has no key/value cache (new_cache, decode)")
    kv = model.new_cache(tokens.shape[1]) if cached else None
    for step in range(max_new_tokens):
        if kv is None:  # the whole batch again
            logits = model(tokens[:, : int(current.max())])[rows, current - 1]
        elif step == 0:  # the prompts, filling the cache
            logits = model(tokens[:, : int(prompt_lengths.max())], cache=kv)[rows, current - 1]
        else:  # each row's newest token, at its own position
            logits = model.decode(tokens[rows, current - 1], current - 1, kv)
        nxt = sample_from_logits(logits.float(), temperature, generator)
        active = ~finished
        tokens[rows[active], current[active]] = nxt[active]
        current += active.long()
        if eos_id is not None:
            finished |= active & (nxt == eos_id)
        if bool(finished.all()):
            break
    return Generation(tokens, prompt_lengths, current - prompt_lengths, finished)


def has_cache(model: nn.Module) -> bool:
    """Whether ``model`` decodes with a key/value cache (``new_cache`` and ``decode``)."""
    return callable(getattr(model, "new_cache", None)) and callable(getattr(model, "decode", None))


def token_logprobs(model: nn.Module, tokens: Tensor) -> Tensor:
    """(batch, time - 1): the log-probability (temperature 1; at least float32 whatever the
    autocast dtype) the model gives each target ``tokens[:, 1:]`` after its prefix; gradients
    flow when enabled."""
    logits = model(tokens[:, :-1])
    if logits.dtype in (torch.float16, torch.bfloat16):
        logits = logits.float()
    return F.log_softmax(logits, dim=-1).gather(-1, tokens[:, 1:].unsqueeze(-1)).squeeze(-1)
