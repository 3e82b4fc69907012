"""``optarena bench train``: tokens/s of the training harness against a plain training loop.

The plain loop is the least a training step can do: forward, z-loss cross-entropy, backward,
global clipping, ``optimizer.step()``, ``zero_grad`` on random tokens, timed step by step
(median). The harness (:func:`optarena.train.train`) adds data loading, the LR schedule,
logging and divergence checks; its figure is also the median step after the warm-up steps,
read from its log (``on_log``, every step). Both use the same model, batch and optimizer; the
fast path is compiled before either is timed (the process-wide cache of
:mod:`optarena.optim.compiled` then serves both), so compile time is reported apart.

A row runs in rounds, each the reference plain loop (torch's fused AdamW), ours and the
harness back to back; its ratios are medians of the rounds' ratios, as in ``bench step``: the
machine's speed drifts by tens of percent between runs of a few seconds, and a ratio of two
candidates timed minutes apart would measure the drift.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch

from optarena.bench.shapes import Shape


def model_overrides(shape: Shape) -> dict[str, Any]:
    """The harness's ``GPTConfig`` fields for a Llama shape (RMSNorm, SwiGLU, no QK-norm)."""
    return {
        "d_model": shape.d_model,
        "n_layer": shape.n_layers,
        "n_head": shape.n_heads,
        "n_kv_head": shape.n_kv_heads,
        "mlp_hidden": shape.d_ff,
        "mlp": "swiglu",
        "norm": "rmsnorm",
        "qk_norm": False,
        "vocab_size": shape.vocab,
    }


def _model(shape: Shape, seq_len: int, device: torch.device) -> torch.nn.Module:
    from optarena.model import GPT, GPTConfig

    return GPT(GPTConfig(**model_overrides(shape), max_seq_len=max(512, seq_len))).to(device)


def _optimizer(name: str, model: torch.nn.Module, fused: bool | None) -> torch.optim.Optimizer:
    if name == "torch-adamw-fused":
        return torch.optim.AdamW(model.parameters(), lr=1e-3, fused=True)
    from optarena.optim import create

    return create(name, model, fused=fused)


def plain_loop(
    shape: Shape,
    optimizer: str,
    fused: bool | None,
    *,
    steps: int,
    warmup: int,
    batch_size: int,
    seq_len: int,
    device: torch.device,
) -> dict[str, float]:
    """Median step time of the plain loop; the first warm-up step includes any compilation."""
    from optarena.model import lm_loss

    torch.manual_seed(0)
    model = _model(shape, seq_len, device)
    opt = _optimizer(optimizer, model, fused)
    params = [p for p in model.parameters() if p.requires_grad]
    x = torch.randint(0, shape.vocab, (batch_size, seq_len), device=device)
    y = torch.randint(0, shape.vocab, (batch_size, seq_len), device=device)
    times, opt_times, first = [], [], 0.0
    for i in range(warmup + steps):
        _sync(device)
        t0 = time.perf_counter()
        loss, _ = lm_loss(model(x), y, 1e-4)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        _sync(device)
        t1 = time.perf_counter()
        opt.step()
        opt.zero_grad(set_to_none=True)
        _sync(device)
        t2 = time.perf_counter()
        if i == 0:
            first = t2 - t0
        if i >= warmup:
            times.append(t2 - t0)
            opt_times.append(t2 - t1)
    step_s = statistics.median(times)
    return {
        "tokens_per_second": batch_size * seq_len / step_s,
        "step_ms": step_s * 1e3,
        "optimizer_ms": statistics.median(opt_times) * 1e3,
        "first_step_s": first,
    }


def harness(
    shape: Shape,
    optimizer: str,
    fused: bool | None,
    *,
    steps: int,
    warmup: int,
    batch_size: int,
    seq_len: int,
    device: torch.device,
) -> dict[str, float]:
    """Tokens/s of :func:`optarena.train.train` for the same model and batch, taken as the
    plain loop's: the median step after ``warmup`` steps. Each step's time comes from the
    run's own log (every step: its tokens/s so far, so step k ended k·tokens/rate seconds in)."""
    from optarena.train import train

    tokens = batch_size * seq_len
    ends: dict[int, float] = {}

    def record(r: dict[str, Any]) -> None:
        if r.get("tokens_per_second"):
            ends[r["step"]] = r["step"] * tokens / r["tokens_per_second"]

    summary = train(
        {
            "optimizer": optimizer,
            "hparams": {} if fused is None else {"fused": fused},
            "model": "small",
            "model_overrides": {
                k: v for k, v in model_overrides(shape).items() if k != "vocab_size"
            },
            "vocab_size": shape.vocab,
            "steps": warmup + steps,
            "batch_size": batch_size,
            "seq_len": seq_len,
            "eval_windows": 1,
            "log_every": 1,
            "progress": False,
            "device": device.type,
            "dtype": "float32",
        },
        on_log=record,
    )
    timed = [k for k in range(warmup + 1, warmup + steps + 1) if k in ends]
    if not timed:  # the run stopped early (diverged): its own mean is all there is
        rate = summary["tokens_per_second"]
    else:
        rate = tokens / statistics.median(ends[k] - ends.get(k - 1, 0.0) for k in timed)
    return {"tokens_per_second": rate, "train_seconds": summary["train_seconds"]}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bench_train(
    shape: Shape,
    optimizers: Sequence[str],
    *,
    steps: int = 10,
    warmup: int = 2,
    rounds: int = 3,
    device: str | torch.device | None = None,
    batch_size: int = 4,
    seq_len: int = 256,
    modes: Sequence[str] = ("fused", "eager"),
    log: Callable[[str], None] = lambda s: None,
) -> dict[str, Any]:
    """One row per (optimizer, path): plain-loop and harness tokens/s, against the plain loop
    with torch's fused AdamW of the same rounds."""
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    kw = dict(batch_size=batch_size, seq_len=seq_len, device=dev)
    rows, bases = [], []
    for name in optimizers:
        for mode in modes:
            fused = mode == "fused"
            base, plain, loop = [], [], []
            timed = dict(steps=steps, warmup=warmup, **kw)
            for r in range(rounds):
                base.append(plain_loop(shape, "torch-adamw-fused", None, **timed))
                plain.append(plain_loop(shape, name, fused, **timed))
                loop.append(harness(shape, name, fused, **timed))
                log(
                    f"{name} ({mode}) round {r + 1}/{rounds}: tokens/s torch fused AdamW "
                    f"{base[-1]['tokens_per_second']:.0f}, plain loop "
                    f"{plain[-1]['tokens_per_second']:.0f}, harness "
                    f"{loop[-1]['tokens_per_second']:.0f}"
                )
            bases += base
            rate = "tokens_per_second"
            harness_vs_plain = [h[rate] / p[rate] for p, h in zip(plain, loop, strict=True)]
            plain_vs_torch = [p[rate] / b[rate] for b, p in zip(base, plain, strict=True)]
            rows.append(
                {
                    "optimizer": name,
                    "mode": mode,
                    "plain_tokens_per_second": _median(plain, "tokens_per_second"),
                    "plain_step_ms": _median(plain, "step_ms"),
                    "optimizer_ms": _median(plain, "optimizer_ms"),
                    "first_step_s": plain[0]["first_step_s"],
                    "harness_tokens_per_second": _median(loop, "tokens_per_second"),
                    "harness_vs_plain": statistics.median(harness_vs_plain),
                    "plain_vs_torch_adamw": statistics.median(plain_vs_torch),
                    "harness_vs_plain_rounds": harness_vs_plain,
                    "plain_vs_torch_adamw_rounds": plain_vs_torch,
                }
            )
    base_row = {
        key: _median(bases, key) for key in ("tokens_per_second", "step_ms", "optimizer_ms")
    }
    return {
        "benchmark": "train",
        "device": str(dev),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "shape": shape.as_dict(),
        "batch_size": batch_size,
        "seq_len": seq_len,
        "steps": steps,
        "warmup": warmup,
        "rounds": rounds,
        "torch_adamw_fused_plain": base_row,
        "rows": rows,
    }


def _median(results: list[dict[str, float]], key: str) -> float:
    return statistics.median(x[key] for x in results)


def format_train_table(report: dict[str, Any]) -> list[list[str]]:
    header = [
        "optimizer",
        "path",
        "plain tok/s",
        "harness tok/s",
        "harness/plain",
        "plain/torch-AdamW loop",
        "step ms",
        "optimizer ms",
    ]
    table = [header]
    base = report["torch_adamw_fused_plain"]
    table.append(
        [
            "torch AdamW (fused)",
            "-",
            f"{base['tokens_per_second']:.0f}",
            "-",
            "-",
            "1.00",
            f"{base['step_ms']:.1f}",
            f"{base['optimizer_ms']:.1f}",
        ]
    )
    for r in report["rows"]:
        table.append(
            [
                r["optimizer"],
                r["mode"],
                f"{r['plain_tokens_per_second']:.0f}",
                f"{r['harness_tokens_per_second']:.0f}",
                f"{r['harness_vs_plain']:.2f}",
                f"{r['plain_vs_torch_adamw']:.2f}",
                f"{r['plain_step_ms']:.1f}",
                f"{r['optimizer_ms']:.1f}",
            ]
        )
    return table
