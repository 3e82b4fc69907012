"""Generation and the ReMax loss on tiny models: seeded sampling and bit-exact resume, greedy
decoding against one-row decoding, the KL term against a direct per-prefix computation, and the
ReMax gradient against hand-computed and exact (enumerated) REINFORCE gradients in float64."""

from __future__ import annotations

import itertools

import pytest
import torch

from optarena.model import GPT, GPTConfig
from optarena.posttrain.generate import (
    generate,
    right_pad,
    sample_from_logits,
    token_logprobs,
)
from optarena.posttrain.remax import remax_loss, reward_to_go

VOCAB, EOS, PAD = 6, 5, 0


def tiny(seed: int, dtype: torch.dtype = torch.float32) -> GPT:
    torch.manual_seed(seed)
    model = GPT(GPTConfig(vocab_size=VOCAB, n_layer=1, n_head=2, d_model=8, init_std=0.5))
    return model.to(dtype)


PROMPTS = [[1, 2, 3], [4], [2, 2], [3, 1, 4, 1]]


# --------------------------------------------------------------------------- generation


def one_row_greedy(model: GPT, prompt: list[int], new: int) -> list[int]:
    seq = list(prompt)
    with torch.no_grad():
        for _ in range(new):
            nxt = int(model(torch.tensor([seq]))[0, -1].argmax())
            seq.append(nxt)
            if nxt == EOS:
                break
    return seq[len(prompt) :]


def test_greedy_batch_matches_one_row_decoding(single_thread):
    """Right-padded rows of different prompt lengths decode as each prompt alone does."""
    model = tiny(0)
    gen = generate(model, PROMPTS, 6, EOS, PAD, temperature=0)
    assert gen.responses() == [one_row_greedy(model, p, 6) for p in PROMPTS]
    for row, r, done in zip(gen.responses(), gen.response_lengths, gen.finished, strict=True):
        assert len(row) == int(r) and bool(done) == (EOS in row)
        assert EOS not in row[:-1]  # a row stops at its first end-of-text
    assert (gen.tokens[0, : len(PROMPTS[0])] == torch.tensor(PROMPTS[0])).all()
    assert (gen.tokens[1, int(gen.lengths[1]) :] == PAD).all()


def test_sampling_is_seeded_and_resumes_bit_exactly(single_thread):
    model = tiny(1)

    def draw(gen: torch.Generator) -> list[list[int]]:
        return generate(model, PROMPTS, 8, EOS, PAD, temperature=1.0, generator=gen).responses()

    g = torch.Generator().manual_seed(7)
    first = draw(g)
    saved = g.get_state()
    second = draw(g)
    again = torch.Generator().manual_seed(7)
    assert draw(again) == first
    resumed = torch.Generator()
    resumed.set_state(saved)
    assert draw(resumed) == second
    assert first != second  # the stream moved on
    assert draw(torch.Generator().manual_seed(8)) != first


CONFIGS = {
    "study": {},
    # Llama options, grouped-query heads and a rotary table shorter than the sequences
    "llama-gqa": dict(norm="rmsnorm", mlp="swiglu", n_head=4, n_kv_head=2, d_model=16),
    "tied-short-rope": dict(tie_embeddings=True, qk_norm=False, max_seq_len=4),
}


def model_of(name: str, dtype: torch.dtype) -> GPT:
    torch.manual_seed(3)
    options = {"vocab_size": VOCAB, "n_layer": 2, "n_head": 2, "d_model": 8, "init_std": 0.5}
    return GPT(GPTConfig(**{**options, **CONFIGS[name]})).to(dtype)


@pytest.mark.parametrize("name", CONFIGS)
@pytest.mark.parametrize(("dtype", "tol"), [(torch.float64, 1e-12), (torch.float32, 1e-5)])
def test_decoding_from_the_cache_gives_the_full_forward_logits(name, dtype, tol, single_thread):
    """A prompt batch through ``forward(cache=)``, then one ``decode`` per token at each row's
    own position, gives the logits of the whole sequence's forward pass: the prompt's padding
    left in the cache past a row's position is never attended to."""
    model = model_of(name, dtype)
    torch.manual_seed(0)
    tokens = torch.randint(1, VOCAB, (4, 11))
    lengths = torch.tensor([3, 5, 1, 7])
    padded = tokens.clone()
    padded[torch.arange(11)[None, :] >= lengths[:, None]] = PAD  # as generate lays prompts out
    full = model(tokens)
    with torch.no_grad():
        kv = model.new_cache(11)
        prefix = model(padded[:, : int(lengths.max())], cache=kv)
        rows = torch.arange(4)
        last = lengths - 1
        assert torch.allclose(prefix[rows, last], full[rows, last], rtol=0, atol=tol)
        positions = lengths.clone()
        for _ in range(4):  # each row's next tokens, rows at different positions
            logits = model.decode(tokens[rows, positions], positions, kv)
            assert torch.allclose(logits, full[rows, positions], rtol=0, atol=tol)
            positions += 1


@pytest.mark.parametrize("name", CONFIGS)
def test_cached_and_uncached_generation_are_identical(name, single_thread):
    """The same responses, greedy and sampled, from the same seed, and the generator left in
    the same state (float64: the two paths' rounding cannot flip a token)."""
    model = model_of(name, torch.float64)
    for temperature in (0.0, 1.0):
        out, states = [], []
        for cache in (True, False):
            g = torch.Generator().manual_seed(11)
            gen = generate(model, PROMPTS, 9, EOS, PAD, temperature, g, cache=cache)
            out.append((gen.tokens.tolist(), gen.response_lengths.tolist(), gen.finished.tolist()))
            states.append(g.get_state())
        assert out[0] == out[1]
        assert torch.equal(states[0], states[1])
    assert generate(model, PROMPTS, 9, None, PAD, 0.0).response_lengths.tolist() == [9] * 4


def test_a_model_without_a_cache_is_run_whole():
    class Plain(torch.nn.Module):  # ids -> logits, nothing else
        def __init__(self) -> None:
            super().__init__()
            self.inner = tiny(0)

        def forward(self, idx: torch.Tensor) -> torch.Tensor:
            return self.inner(idx)

    plain = Plain()
    gen = generate(plain, PROMPTS, 5, EOS, PAD, temperature=0)
    assert gen.responses() == generate(plain.inner, PROMPTS, 5, EOS, PAD, 0.0).responses()
    with pytest.raises(ValueError, match="no key/value cache"):
        generate(plain, PROMPTS, 5, EOS, PAD, temperature=0, cache=True)


def test_sampling_follows_the_softmax_at_its_temperature():
    logits = torch.tensor([[2.0, 0.0, -1.0, 1.0]])
    n = 40_000
    g = torch.Generator().manual_seed(0)
    for temperature in (1.0, 0.5):
        draws = torch.cat(
            [sample_from_logits(logits.expand(1000, -1), temperature, g) for _ in range(n // 1000)]
        )
        freq = torch.bincount(draws, minlength=4).double() / n
        expected = (logits[0].double() / temperature).softmax(-1)
        # 4 standard errors of a frequency
        assert (freq - expected).abs().max() < 4 * (0.25 / n) ** 0.5
    assert sample_from_logits(logits, 0.0, None).item() == 0


def test_right_pad_rejects_a_short_width():
    assert right_pad([[1, 2], [3]], 9).tolist() == [[1, 2], [3, 9]]
    with pytest.raises(ValueError):
        right_pad([[1, 2, 3]], 0, width=2)


# --------------------------------------------------------------------------- KL and loss


def direct_logprob(model: GPT, prefix: list[int], token: int) -> float:
    with torch.no_grad():
        return float(torch.log_softmax(model(torch.tensor([prefix]))[0, -1].double(), -1)[token])


def test_kl_term_matches_a_direct_per_prefix_computation(single_thread):
    policy, ref = tiny(2, torch.float64), tiny(3, torch.float64)
    gen = generate(policy, PROMPTS, 5, EOS, PAD, generator=torch.Generator().manual_seed(0))
    logp = token_logprobs(policy, gen.tokens)
    ref_logp = token_logprobs(ref, gen.tokens)
    mask = gen.response_mask()
    zeros = torch.zeros(len(PROMPTS), dtype=torch.float64)
    terms = remax_loss(logp, ref_logp, mask, zeros, zeros, kl_coef=0.1)
    for i, (prompt, response) in enumerate(zip(PROMPTS, gen.responses(), strict=True)):
        seq = prompt + response
        direct = sum(
            direct_logprob(policy, seq[:t], seq[t]) - direct_logprob(ref, seq[:t], seq[t])
            for t in range(len(prompt), len(seq))
        )
        assert terms.kl[i].item() == pytest.approx(direct, abs=1e-10)
    assert int(mask.sum()) == int(gen.response_lengths.sum())


def test_reward_to_go():
    values = torch.tensor([[1.0, 2.0, 3.0], [0.5, 0.0, -1.0]])
    assert reward_to_go(values).tolist() == [[6.0, 5.0, 3.0], [-0.5, -1.0, -1.0]]


def test_remax_gradient_matches_a_hand_computed_reinforce_estimate(single_thread):
    """−(1/N) Σ_i Σ_t G_it ∇ log π(y_it), G_it = (r_i − b_i) − β Σ_{s≥t} kl_is, each token's
    score gradient taken on its own prefix (no padding) and summed by hand."""
    policy, ref = tiny(4, torch.float64), tiny(5, torch.float64)
    gen = generate(policy, PROMPTS, 5, EOS, PAD, generator=torch.Generator().manual_seed(3))
    rewards = torch.tensor([1.0, -0.5, 2.0, 0.25], dtype=torch.float64)
    baseline = torch.tensor([0.5, 0.5, -1.0, 0.0], dtype=torch.float64)
    beta = 0.3

    terms = remax_loss(
        token_logprobs(policy, gen.tokens),
        token_logprobs(ref, gen.tokens),
        gen.response_mask(),
        rewards,
        baseline,
        beta,
    )
    policy.zero_grad()
    terms.loss.backward()
    ours = [p.grad.clone() for p in policy.parameters()]

    params = list(policy.parameters())
    expected = [torch.zeros_like(p) for p in params]
    n_tokens = int(gen.response_lengths.sum())
    for i, (prompt, response) in enumerate(zip(PROMPTS, gen.responses(), strict=True)):
        seq = prompt + response
        kls = [
            direct_logprob(policy, seq[:t], seq[t]) - direct_logprob(ref, seq[:t], seq[t])
            for t in range(len(prompt), len(seq))
        ]
        for k, t in enumerate(range(len(prompt), len(seq))):
            g_t = float(rewards[i] - baseline[i]) - beta * sum(kls[k:])
            logp = torch.log_softmax(policy(torch.tensor([seq[:t]]))[0, -1], -1)[seq[t]]
            for acc, grad in zip(expected, torch.autograd.grad(logp, params), strict=True):
                acc -= g_t * grad / n_tokens
    for got, want in zip(ours, expected, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-13)


def test_remax_gradient_is_the_exact_policy_gradient_in_expectation(single_thread):
    """Enumerate every response of a fixed length: Σ_y π(y) ∇loss(y) must equal
    −(1/L) ∇ (E_π[r] − β KL(π ‖ π_ref)), exactly (the greedy baseline adds no bias)."""
    policy, ref = tiny(6, torch.float64), tiny(7, torch.float64)
    prompt, length, beta = [1, 3], 2, 0.4
    rng = torch.Generator().manual_seed(1)
    table = torch.randn(VOCAB, VOCAB, dtype=torch.float64, generator=rng)

    def reward(response: list[int]) -> torch.Tensor:
        return table[response[0], response[1]].reshape(1)

    greedy = generate(policy, [prompt], length, None, PAD, temperature=0).responses()[0]
    baseline = reward(greedy)
    params = list(policy.parameters())
    expected_grad = [torch.zeros_like(p) for p in params]
    objective = torch.zeros((), dtype=torch.float64)
    for response in itertools.product(range(VOCAB), repeat=length):
        tokens = torch.tensor([prompt + list(response)])
        mask = torch.zeros(1, tokens.shape[1] - 1, dtype=torch.bool)
        mask[0, len(prompt) - 1 :] = True
        logp = token_logprobs(policy, tokens)
        with torch.no_grad():
            ref_logp = token_logprobs(ref, tokens)
        terms = remax_loss(logp, ref_logp, mask, reward(list(response)), baseline, beta)
        grads = torch.autograd.grad(terms.loss, params, retain_graph=True)
        seq_logp = (logp * mask).sum()
        prob = seq_logp.exp()
        for acc, g in zip(expected_grad, grads, strict=True):
            acc += prob.detach() * g
        seq_ref = (ref_logp * mask).sum()
        objective = objective + prob * (reward(list(response))[0] - beta * (seq_logp - seq_ref))
    exact = torch.autograd.grad(-objective / length, params)
    for got, want in zip(expected_grad, exact, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-12)
