"""SOAP's regular step against pytorch-optimizer's on one tensor, paired step by step.

On the default bench shape (llama-34m) SOAP's step is dominated by the embedding's and the
head's 8192 x 512 matrices, whose 8192-long vocabulary axis gets a basis at the default
``max_precondition_dim``. ``optarena bench step --optimizers soap`` times the whole model, with
a first step of several minutes (two eigendecompositions of 8192 x 8192) and rounds of 5-15 s
each that a shared machine's load moves by 2x. This script times one such tensor instead: both
optimizers take the same gradients, steps 3 to 10 (regular steps: the first refresh is step
11) are timed one by one and alternately, and it prints each step's ratio and their median.

    OMP_NUM_THREADS=1 PYTHONPATH=src python benchmarks/bench_soap_tensor.py --shape 8192x512

The parameters of the two differ after a few steps (float32, and the first gradient's Gram
matrix is rank-deficient on the long axis, whose null-space basis ours settles:
docs/optimizers.md, SOAP); the float64 parity tests compare the two.
"""

from __future__ import annotations

import argparse
import statistics
import time

import pytorch_optimizer
import torch

from optarena.optim import SOAP


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", default="8192x512", help="ROWSxCOLS (default: 8192x512)")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    shape = tuple(int(n) for n in args.shape.lower().split("x"))
    torch.set_num_threads(args.threads)
    gen = torch.Generator().manual_seed(0)
    grads = [torch.randn(shape, generator=gen) for _ in range(4)]
    ours_p = torch.nn.Parameter(torch.randn(shape, generator=gen))
    ref_p = torch.nn.Parameter(ours_p.detach().clone())
    pairs = [
        (SOAP([ours_p], lr=3e-3, fused=False), ours_p),
        (pytorch_optimizer.SOAP([ref_p], lr=3e-3), ref_p),
    ]

    def timed(index: int, t: int) -> float:
        opt, p = pairs[index]
        p.grad = grads[t % len(grads)].clone()
        start = time.perf_counter()
        opt.step()
        return time.perf_counter() - start

    for t in range(2):
        print(f"step {t + 1} (untimed): ours {timed(0, t):.2f} s, reference {timed(1, t):.2f} s")
    ours, ref = [], []
    for t in range(2, 10):
        ours.append(timed(0, t))
        ref.append(timed(1, t))
        print(f"step {t + 1}: ours {ours[-1]:.3f} s, reference {ref[-1]:.3f} s")
    ratio = statistics.median(a / b for a, b in zip(ours, ref, strict=True))
    print(
        f"{args.shape}: median ours {statistics.median(ours):.3f} s, reference "
        f"{statistics.median(ref):.3f} s, median paired ratio {ratio:.3f}"
    )


if __name__ == "__main__":
    main()
