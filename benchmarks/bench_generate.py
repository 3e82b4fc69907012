"""Generation with the key/value cache against re-running the model over the batch.

Times :func:`optarena.posttrain.generate.generate` on optarena's transformer both ways,
alternately and ``--repeats`` times each, for a batch of prompts like an RLHF step's (``--batch``
prompts of ``--prompt-len`` tokens, give or take a quarter, right-padded) and each number of new
tokens in ``--new-tokens``. No end-of-text stops a row, so both ways generate every token.
Weights are random (the work does not depend on them). Prints the medians of wall-clock and
process CPU seconds and the ratio uncached / cached (the speedup), and checks that both ways
gave the same greedy tokens.

    python benchmarks/bench_generate.py --model micro --new-tokens 16 64
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from optarena.model import build_model
from optarena.posttrain.generate import generate


def timed(fn) -> tuple[float, float, object]:
    wall, cpu = time.perf_counter(), time.process_time()
    out = fn()
    return time.perf_counter() - wall, time.process_time() - cpu, out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="micro")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--prompt-len", type=int, default=24)
    parser.add_argument("--new-tokens", type=int, nargs="+", default=[16, 64])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--temperature", type=float, default=0.0)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = build_model(args.model).eval()
    vocab = model.config.vocab_size
    spread = max(1, args.prompt_len // 4)
    lengths = torch.randint(args.prompt_len - spread, args.prompt_len + spread + 1, (args.batch,))
    prompts = [torch.randint(1, vocab, (int(n),)).tolist() for n in lengths]
    print(
        f"{args.model}, batch {args.batch}, prompts {int(lengths.min())}-{int(lengths.max())} "
        f"tokens, {args.threads} thread(s), temperature {args.temperature:g}"
    )
    print(
        f"{'new tokens':>10} {'uncached s':>11} {'cached s':>9} {'speedup':>8} {'CPU speedup':>12}"
    )
    for new in args.new_tokens:
        times: dict[bool, list[tuple[float, float]]] = {True: [], False: []}
        outputs = {}
        for _ in range(args.repeats):
            for cache in (False, True):
                g = torch.Generator().manual_seed(0)
                wall, cpu, out = timed(
                    lambda cache=cache, g=g, new=new: generate(
                        model, prompts, new, None, 0, args.temperature, g, cache=cache
                    )
                )
                times[cache].append((wall, cpu))
                outputs[cache] = out.tokens
        same = torch.equal(outputs[True], outputs[False])
        walls = {c: statistics.median(w for w, _ in times[c]) for c in times}
        cpus = {c: statistics.median(p for _, p in times[c]) for c in times}
        print(
            f"{new:>10} {walls[False]:>11.3f} {walls[True]:>9.3f} "
            f"{walls[False] / walls[True]:>7.2f}x {cpus[False] / cpus[True]:>11.2f}x"
            + ("" if same else "  (tokens differ: float32 rounding of the two paths)")
        )


if __name__ == "__main__":
    main()
