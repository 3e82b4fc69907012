"""The Bradley-Terry loss against its formula, pair accuracy, and the exact-match reward."""

from __future__ import annotations

import math

import pytest
import torch

from optarena.posttrain.generate import Generation
from optarena.posttrain.reward import ExactMatchReward, bradley_terry_loss, pair_accuracy


def test_bradley_terry_loss_is_the_negative_log_likelihood_of_the_preference():
    g = torch.Generator().manual_seed(0)
    chosen = torch.randn(50, dtype=torch.float64, generator=g, requires_grad=True)
    rejected = torch.randn(50, dtype=torch.float64, generator=g, requires_grad=True)
    loss = bradley_terry_loss(chosen, rejected)
    margin = (chosen - rejected).detach().tolist()
    direct = sum(-math.log(1 / (1 + math.exp(-m))) for m in margin) / len(margin)
    assert loss.item() == pytest.approx(direct, rel=1e-12)
    loss.backward()
    # d/d chosen_i = −(1 − σ(m_i)) / n ; d/d rejected_i = −d/d chosen_i
    want = torch.tensor([-(1 - 1 / (1 + math.exp(-m))) / 50 for m in margin], dtype=torch.float64)
    torch.testing.assert_close(chosen.grad, want, rtol=1e-12, atol=0)
    torch.testing.assert_close(rejected.grad, -want, rtol=1e-12, atol=0)


def test_bradley_terry_loss_is_stable_for_large_margins():
    chosen = torch.tensor([0.0, 800.0])
    rejected = torch.tensor([800.0, 0.0])
    assert bradley_terry_loss(chosen, rejected).item() == pytest.approx(400.0)


def test_pair_accuracy_counts_ties_as_wrong():
    assert (
        pair_accuracy(torch.tensor([1.0, 2.0, 3.0, 0.0]), torch.tensor([0.0, 2.0, 4.0, -1.0]))
        == 0.5
    )


def test_exact_match_reward_drops_end_of_text_and_whitespace():
    eos = 9
    # prompts [5], [5, 6]; responses "12" + eos, "3" (unfinished), "13" + eos
    tokens = torch.tensor([[5, 1, 2, 9, 0], [5, 6, 3, 0, 0], [5, 1, 3, 9, 0]])
    gen = Generation(
        tokens,
        torch.tensor([1, 2, 1]),
        torch.tensor([3, 1, 3]),
        torch.tensor([True, False, True]),
    )
    digits = {1: "1", 2: "2", 3: "3", eos: "<eos>"}

    def decode(ids: list[int]) -> str:
        return " " + "".join(digits[i] for i in ids)

    reward = ExactMatchReward(decode, eos)
    assert reward(gen, ["12", "3 ", "99"]).tolist() == [1.0, 1.0, 0.0]
    assert reward(gen, ["99", "3", None]).tolist() == [0.0, 1.0, 0.0]
