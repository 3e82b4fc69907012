"""The ReMax loss (Li et al. 2023, "ReMax: A Simple, Effective, and Efficient Reinforcement
Learning Method for Aligning Large Language Models"), as the Adam-mini study ran it.

For each prompt ``x`` the policy samples a response ``y`` and decodes a greedy one ``ŷ``; the
greedy response's reward is the baseline, so the advantage of ``y`` is
``A = r(x, y) − r(x, ŷ)``. As in the authors' code (DeepSpeed-Chat's reward shaping with
γ = 1), a per-token KL penalty to the frozen SFT reference enters the return of every token::

    kl_t = log π(y_t | x, y_<t) − log π_ref(y_t | x, y_<t)          (the sample's tokens)
    G_t  = A − β Σ_{s ≥ t} kl_s                                        (reward-to-go)
    loss = − Σ_{i,t} G_{i,t} log π(y_{i,t} | ·) / (number of response tokens in the batch)

``G`` is a constant of the gradient (computed from detached log-probabilities). Its expectation
is the gradient of ``E[r] − β KL(π ‖ π_ref)`` up to the token normalisation: the baseline does not
depend on the sample, and a token's score is uncorrelated with the KL terms before it.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor


@dataclass
class ReMaxTerms:
    """One batch's loss and what the log reports of it."""

    loss: Tensor  # 0-d, back-propagates into the policy's log-probabilities
    kl: Tensor  # (batch,): Σ_t kl_t of each sampled response (the sample estimate of KL)
    advantage: Tensor  # (batch,): r(y) − r(ŷ)


def reward_to_go(values: Tensor) -> Tensor:
    """``out[:, t] = Σ_{s ≥ t} values[:, s]`` along the last dimension."""
    return values.flip(-1).cumsum(-1).flip(-1)


def remax_loss(
    logprobs: Tensor,
    ref_logprobs: Tensor,
    mask: Tensor,
    rewards: Tensor,
    baseline_rewards: Tensor,
    kl_coef: float,
) -> ReMaxTerms:
    """The ReMax loss of a batch of sampled responses.

    ``logprobs`` (batch, time) are the policy's log-probabilities of the sampled tokens, with
    gradients; ``ref_logprobs`` the reference's; ``mask`` (bool) marks the response tokens;
    ``rewards`` and ``baseline_rewards`` (batch,) are the rewards of the sampled and greedy
    responses; ``kl_coef`` is β."""
    mask_f = mask.to(logprobs.dtype)
    kl_tokens = (logprobs.detach() - ref_logprobs.to(logprobs.dtype)) * mask_f
    advantage = (rewards - baseline_rewards).to(logprobs.dtype)
    returns = advantage.unsqueeze(1) - kl_coef * reward_to_go(kl_tokens)
    tokens = mask_f.sum().clamp(min=1)
    loss = -(logprobs * returns * mask_f).sum() / tokens
    return ReMaxTerms(loss, kl_tokens.sum(1), advantage)
