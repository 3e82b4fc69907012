"""Rewards for RLHF: a learned reward model, or a programmatic one.

:class:`RewardModel` is the pretrained (or SFT) language model's final hidden state at a
sequence's last token, through a linear head to one number, as in InstructGPT and the
DeepSpeed-Chat pipeline the Adam-mini study used. It is trained on preference pairs
``(prompt, chosen, rejected)`` with the Bradley-Terry loss ``−log σ(r(chosen) − r(rejected))``
(:func:`bradley_terry_loss`); its quality is the share of held-out pairs it orders correctly
(:func:`pair_accuracy`).

A :class:`Reward` scores a batch of generated responses: :class:`ModelReward` with a reward
model, :class:`ExactMatchReward` with the built-in task's answers (1 for a response that is the
answer, 0 otherwise: a verifiable reward).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from optarena.posttrain.generate import Generation


def bradley_terry_loss(chosen: Tensor, rejected: Tensor) -> Tensor:
    """Mean ``−log σ(chosen − rejected)`` over pairs (stable for any margin)."""
    return -F.logsigmoid(chosen - rejected).mean()


def pair_accuracy(chosen: Tensor, rejected: Tensor) -> float:
    """Share of pairs whose chosen response scores strictly higher (ties count as wrong)."""
    return float((chosen > rejected).double().mean())


class RewardModel(nn.Module):
    """``backbone.features(tokens)`` at each row's last token, through ``head`` to a scalar.

    ``backbone`` is a pretrained model's (:class:`~optarena.model.GPT` or a Hugging Face causal
    LM behind :class:`~optarena.posttrain.pretrained.HFCausalLM`); its output layer is kept, so
    the backbone stays loadable as a language model, but gets no gradient. The head starts at
    zero: every sequence first scores 0."""

    def __init__(self, backbone: nn.Module) -> None:
        super().__init__()
        self.backbone = backbone
        device = next(backbone.parameters()).device
        with torch.no_grad():  # the width of the features, whatever the architecture
            width = backbone.features(torch.zeros(1, 1, dtype=torch.long, device=device)).shape[-1]
        self.head = nn.Linear(width, 1, bias=False, device=device)
        nn.init.zeros_(self.head.weight)

    def forward(self, tokens: Tensor, lengths: Tensor) -> Tensor:
        """(batch,) rewards of right-padded ``tokens`` whose rows hold ``lengths`` tokens."""
        hidden = self.backbone.features(tokens[:, : int(lengths.max())])
        last = hidden[torch.arange(len(tokens), device=tokens.device), lengths - 1]
        return self.head(last.to(self.head.weight.dtype)).squeeze(-1)


class Reward:
    """Scores generated responses: ``reward(generation, answers) -> (batch,)`` float32 on the
    generation's device. ``answers`` holds each row's one right answer (None when unknown);
    a learned reward ignores it."""

    name: str = "reward"

    def __call__(self, generation: Generation, answers: Sequence[str | None]) -> Tensor:
        raise NotImplementedError


class ModelReward(Reward):
    """A trained :class:`RewardModel`, frozen, in evaluation mode, under ``no_grad``."""

    name = "model"

    def __init__(self, model: RewardModel) -> None:
        self.model = model.eval().requires_grad_(False)

    @torch.no_grad()
    def __call__(self, generation: Generation, answers: Sequence[str | None]) -> Tensor:
        return self.model(generation.tokens, generation.lengths).float()


class ExactMatchReward(Reward):
    """1 where the decoded response (cut at end-of-text, outer whitespace stripped) equals the
    row's answer, else 0 (and 0 where the answer is unknown). ``decode`` maps a response's
    token ids to text."""

    name = "exact-match"

    def __init__(self, decode: Callable[[list[int]], str], eos_id: int | None) -> None:
        self.decode, self.eos_id = decode, eos_id

    def matches(self, generation: Generation, answers: Sequence[str | None]) -> list[bool]:
        out = []
        for response, answer in zip(generation.responses(), answers, strict=True):
            if self.eos_id in response:
                response = response[: response.index(self.eos_id)]
            out.append(answer is not None and self.decode(response).strip() == answer.strip())
        return out

    def __call__(self, generation: Generation, answers: Sequence[str | None]) -> Tensor:
        hits = self.matches(generation, answers)
        return torch.tensor(hits, dtype=torch.float32, device=generation.tokens.device)
