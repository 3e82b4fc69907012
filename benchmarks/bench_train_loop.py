"""Harness overhead: ``optarena.train`` against a plain nanoGPT-style loop written here.

Both train the same model (same preset, init seed, token ids) with the same optimizer
(``optarena.optim.create``), batch, schedule shape, clipping and z-loss. The plain loop is what a
newcomer would write: memmap, random offsets, ``torch.stack`` of slices, forward, backward, clip,
step. Runs alternate (plain, harness, plain, harness, ...) so that machine drift hits both alike;
the ratio of median tokens/s is printed (goal: >= 1.0).

    PYTHONPATH=src python benchmarks/bench_train_loop.py --model micro --steps 60 --repeats 5
"""

from __future__ import annotations

import argparse
import math
import statistics
import time

import numpy as np
import torch

from optarena.data import prepare_data
from optarena.model import GPT, PRESETS, GPTConfig, lm_loss
from optarena.optim import create
from optarena.train import train


def plain_loop(tokens: np.ndarray, args: argparse.Namespace, vocab: int) -> tuple[float, float]:
    """nanoGPT's train.py, reduced to its loop; tokens per wall second and per CPU second
    over the training steps."""
    torch.manual_seed(args.seed)
    config = GPTConfig(
        **{**PRESETS[args.model], "vocab_size": vocab, "max_seq_len": max(512, args.seq_len)}
    )
    model = GPT(config)
    optimizer = create("adamw", model, lr=args.lr)
    rng = np.random.default_rng(args.seed)
    B, T, steps = args.batch_size, args.seq_len, args.steps
    warmup = round(0.1 * steps)

    def get_batch() -> tuple[torch.Tensor, torch.Tensor]:
        ix = rng.integers(0, len(tokens) - T, size=B)
        x = torch.stack([torch.from_numpy(tokens[i : i + T].astype(np.int64)) for i in ix])
        y = torch.stack([torch.from_numpy(tokens[i + 1 : i + 1 + T].astype(np.int64)) for i in ix])
        return x, y

    def get_lr(it: int) -> float:
        if it < warmup:
            return args.lr * (0.1 + 0.9 * it / warmup)
        ratio = (it - warmup) / max(1, steps - warmup - 1)
        return args.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * ratio)))

    seconds = cpu = 0.0
    for it in range(steps):
        t0, c0 = time.perf_counter(), time.process_time()
        for group in optimizer.param_groups:
            group["lr"] = get_lr(it)
        x, y = get_batch()
        loss, _ = lm_loss(model(x), y, 1e-4)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if it % 10 == 0:
            loss.item()  # nanoGPT logs every log_interval steps
        seconds += time.perf_counter() - t0
        cpu += time.process_time() - c0
    return steps * B * T / seconds, steps * B * T / cpu


def harness(args: argparse.Namespace) -> tuple[float, float]:
    summary = train(
        dict(
            optimizer="adamw",
            lr=args.lr,
            model=args.model,
            steps=args.steps,
            batch_size=args.batch_size,
            seq_len=args.seq_len,
            seed=args.seed,
            data=args.data,
            threads=args.threads,
            progress=not args.no_progress,
        )
    )
    return summary["tokens_per_second"], summary["tokens"] / summary["train_cpu_seconds"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--model", default="micro", choices=["micro", "tiny", "small"])
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--data", default="builtin")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--no-progress", action="store_true", help="harness without its progress bar")
    args = p.parse_args()

    torch.set_num_threads(args.threads)
    data = prepare_data(args.data, "bpe", PRESETS[args.model]["vocab_size"], progress=True)
    vocab = 64 * math.ceil(data.tokenizer.vocab_size / 64)
    harness(argparse.Namespace(**{**vars(args), "steps": 2}))  # warm imports and caches
    plain_loop(data.train, argparse.Namespace(**{**vars(args), "steps": 2}), vocab)

    plain, ours = [], []
    for r in range(args.repeats):
        plain.append(plain_loop(data.train, args, vocab))
        ours.append(harness(args))
        print(
            f"repeat {r + 1}: plain {plain[-1][0]:,.0f} tok/s ({plain[-1][1]:,.0f} per CPU s), "
            f"optarena {ours[-1][0]:,.0f} tok/s ({ours[-1][1]:,.0f} per CPU s)",
            flush=True,
        )
    print(
        f"\n{args.model}, batch {args.batch_size} x {args.seq_len}, {args.steps} steps, "
        f"{args.threads} thread(s), {args.repeats} alternating repeats"
    )
    for i, what in enumerate(("wall", "CPU")):
        a = statistics.median(x[i] for x in plain)
        b = statistics.median(x[i] for x in ours)
        paired = statistics.median(o[i] / q[i] for o, q in zip(ours, plain, strict=True))
        print(
            f"tokens per {what} second: plain {a:,.0f}, optarena {b:,.0f}; ratio of medians "
            f"{b / a:.3f}, median paired ratio {paired:.3f} (goal >= 1.0)"
        )


if __name__ == "__main__":
    main()
