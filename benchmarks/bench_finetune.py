"""SFT throughput against pre-training on the same model and sequence length.

Pre-trains a model for a few steps (``optarena train``; the folder is the pretrained model),
then times, alternately and ``--repeats`` times each, ``train`` and ``finetune`` steps on the same
model, batch and sequence length. The fine-tuning examples are longer than the sequence, so
every row is cut to exactly ``seq_len`` tokens: both loops process the same positions per step
and their tokens/s (the summaries' ``tokens_per_second``: training steps only, evaluation
excluded) compare like with like. Prints the medians and the ratio SFT / train, by wall clock
and by the process's CPU time over the same steps (``train_cpu_seconds``: steadier on a shared
machine). ``train-no-z`` is pre-training without its z-loss (torch's cross-entropy, as fine-tuning
computes it, instead of the cross-entropy and z-loss from one log-sum-exp): the same loss kernel
on both sides. ``--allocator steady`` (the default, as in ``optarena bench``) has glibc serve
blocks up to 32 MiB from its heap from the start: in its default regime the big temporaries of
a step page-fault in afresh or not depending on what the process freed before (loading the
pretrained checkpoint, the earlier runs), which moves either loop's rate by 15% or more.

    python benchmarks/bench_finetune.py --model micro --seq-len 128 --steps 40
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
from pathlib import Path

import torch

from optarena.posttrain.sft import finetune
from optarena.train import train


def long_examples(path: Path, count: int) -> None:
    """Prompts and responses of a few hundred words each: every example exceeds the context."""
    from optarena.posttrain import builtin

    prompts = [e.messages[-1][1] for e in builtin.examples("train")]
    with path.open("w", encoding="utf-8") as f:
        for i in range(count):
            words = " ".join(prompts[(i * 7 + j) % len(prompts)] for j in range(30))
            f.write(json.dumps({"prompt": words[:160], "response": words}) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="micro")
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--allocator", choices=("steady", "default"), default="steady")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.allocator == "steady":
        from optarena.bench.allocator import steady

        args.allocator = "steady" if steady() else "default (steady needs glibc)"
    common = dict(
        optimizer="adamw",
        lr=1e-3,
        batch_size=args.batch_size,
        seq_len=args.seq_len,
        steps=args.steps,
        progress=False,
        threads=args.threads,
        device=args.device,
        log_every=args.steps,
    )
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        pre = root / "pre"
        train({**common, "model": args.model, "steps": 2, "eval_windows": 2, "out": str(pre)})
        data = root / "long.jsonl"
        long_examples(data, 400)
        rates: dict[str, list[float]] = {}
        for _ in range(args.repeats):
            s = train({**common, "model": args.model, "eval_windows": 2})
            assert s["tokens"] == args.steps * args.batch_size * args.seq_len
            record(rates, "train", s)
            s = train({**common, "model": args.model, "eval_windows": 2, "z_loss": 0.0})
            record(rates, "train-no-z", s)
            s = finetune(
                {**common, "pretrained": str(pre), "data": str(data), "eval_examples": 1}
                | {"eval_generate": 0}
            )
            assert s["tokens"] == args.steps * args.batch_size * args.seq_len  # no padding
            record(rates, "finetune", s)
    med = {k: statistics.median(v) for k, v in rates.items()}
    for k, v in rates.items():
        print(f"{k:14} median {med[k]:>10,.0f}  runs: {', '.join(f'{x:,.0f}' for x in v)}")
    setup = (
        f"model {args.model}, seq_len {args.seq_len}, batch {args.batch_size}, "
        f"{args.steps} steps, {args.threads} thread(s), {args.device}, allocator {args.allocator}"
    )
    for name in ("train", "train-no-z"):
        wall = med["finetune tok/s"] / med[f"{name} tok/s"]
        cpu = med["finetune tok/cpu-s"] / med[f"{name} tok/cpu-s"]
        print(f"{setup}: SFT / {name} tokens/s = {wall:.3f} (wall clock), {cpu:.3f} (CPU time)")


def record(rates: dict[str, list[float]], name: str, summary: dict) -> None:
    rates.setdefault(f"{name} tok/s", []).append(summary["tokens_per_second"])
    cpu = summary["train_cpu_seconds"]
    rates.setdefault(f"{name} tok/cpu-s", []).append(summary["tokens"] / cpu if cpu else 0.0)


if __name__ == "__main__":
    main()
