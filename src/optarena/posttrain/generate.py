"""Batched decoding: greedy, or sampled from a seeded generator (so that a run resumes exactly).

Prompts of different lengths are left-padded with a padding mask, so every row's next token is
read at the same last position; the whole sequence is re-encoded at each new token (no key/value
cache: the models fine-tuned here are small and the responses short). A row stops at its
end-of-sequence token; the rest of it is padding.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn


def left_pad(
    prompts: Sequence[Sequence[int]], pad_id: int, device: torch.device
) -> tuple[Tensor, Tensor]:
    """Ids (batch, longest) left-padded with ``pad_id``, and the mask (True at real tokens)."""
    length = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), length), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), length), dtype=torch.bool)
    for i, p in enumerate(prompts):
        if p:
            ids[i, length - len(p) :] = torch.as_tensor(list(p), dtype=torch.long)
            mask[i, length - len(p) :] = True
    return ids.to(device), mask.to(device)


@torch.no_grad()
def generate(
    model: nn.Module,
    prompts: Sequence[Sequence[int]],
    max_new_tokens: int,
    eos_id: int,
    pad_id: int,
    temperature: float = 0.0,
    generator: torch.Generator | None = None,
) -> list[list[int]]:
    """Each prompt's continuation (at most ``max_new_tokens`` ids, the end-of-sequence token
    included when it came): the most likely token at ``temperature`` 0, else a draw from the
    softmax at that temperature using ``generator``."""
    device = next(model.parameters()).device
    ids, mask = left_pad(prompts, pad_id, device)
    done = torch.zeros(len(prompts), dtype=torch.bool, device=device)
    new: list[Tensor] = []
    for _ in range(max_new_tokens):
        logits = model(ids, mask)[:, -1, :].float()
        if temperature > 0:
            probs = torch.softmax(logits / temperature, dim=-1)
            token = torch.multinomial(probs, 1, generator=generator).squeeze(-1)
        else:
            token = logits.argmax(dim=-1)
        token = torch.where(done, torch.full_like(token, pad_id), token)
        new.append(token)
        ids = torch.cat((ids, token[:, None]), dim=1)
        mask = torch.cat((mask, ~done[:, None]), dim=1)  # a finished row's padding is masked
        done |= token == eos_id
        if bool(done.all()):
            break
    if not new:
        return [[] for _ in prompts]
    out = torch.stack(new, dim=1).tolist()
    result = []
    for row in out:
        end = row.index(eos_id) + 1 if eos_id in row else len(row)
        result.append(row[:end])
    return result


__all__ = ["generate", "left_pad"]
