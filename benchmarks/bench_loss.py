"""The pre-training loss with its z-loss: one log-sum-exp against torch's cross-entropy plus a
separate log-sum-exp.

Times a whole training step (forward, loss, backward, AdamW, ``zero_grad``) of a model preset
with :func:`optarena.model.lm_loss` (cross-entropy and z-loss from one log-sum-exp,
``CrossEntropyWithZLoss``) and with the two-pass form ``F.cross_entropy(...) + z *
logsumexp(...)^2``, alternately, ``--rounds`` times ``--steps`` steps each, on one model and one
batch. Prints the median step of each and the median of the paired ratios, and checks that both
give the same loss to float32 rounding.

    python benchmarks/bench_loss.py --models micro tiny
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F
from torch import Tensor

from optarena.model import build_model, lm_loss


def two_pass(logits: Tensor, targets: Tensor, z_loss: float) -> tuple[Tensor, Tensor]:
    """The z-loss as autograd sees it written out: a second log-sum-exp pass each way."""
    flat = logits.reshape(-1, logits.shape[-1]).float()
    ce = F.cross_entropy(flat, targets.reshape(-1))
    return ce + z_loss * torch.logsumexp(flat, dim=-1).square().mean(), ce


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["micro", "tiny"])
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--z-loss", type=float, default=1e-4)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    for preset in args.models:
        model = build_model(preset)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        vocab = model.config.vocab_size
        x = torch.randint(vocab, (args.batch_size, args.seq_len))
        y = torch.randint(vocab, (args.batch_size, args.seq_len))
        with torch.no_grad():
            logits = model(x)
            a, b = lm_loss(logits, y, args.z_loss)[0], two_pass(logits, y, args.z_loss)[0]
        assert torch.allclose(a, b, rtol=1e-5), (a.item(), b.item())
        times: dict[str, list[float]] = {"one log-sum-exp": [], "two passes": []}
        for _ in range(args.rounds):
            for name, loss_fn in (("one log-sum-exp", lm_loss), ("two passes", two_pass)):
                start = time.perf_counter()
                for _ in range(args.steps):
                    loss, _ = loss_fn(model(x), y, args.z_loss)
                    loss.backward()
                    opt.step()
                    opt.zero_grad()
                times[name].append((time.perf_counter() - start) / args.steps)
        one, two = times["one log-sum-exp"], times["two passes"]
        ratio = statistics.median(a / b for a, b in zip(one, two, strict=True))
        print(
            f"{preset}: step {statistics.median(one) * 1e3:.1f} ms (one log-sum-exp) vs "
            f"{statistics.median(two) * 1e3:.1f} ms (two passes), paired ratio {ratio:.3f} "
            f"(batch {args.batch_size} x {args.seq_len}, {args.threads} thread(s), "
            f"{args.rounds} rounds of {args.steps} steps)"
        )


if __name__ == "__main__":
    main()
