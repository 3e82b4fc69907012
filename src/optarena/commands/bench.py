"""``optarena bench step|train``: optimizer steps against the bandwidth bound and the
reference implementations; training throughput against a plain loop."""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
from typing import Any

from optarena import atomic
from optarena.errors import UserError


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "bench", help="benchmark optimizer steps (step) or the training loop (train)"
    )
    sub = parser.add_subparsers(dest="bench_command", metavar="BENCH")
    step = sub.add_parser(
        "step",
        help="median step time of every optimizer vs the bandwidth bound and the references",
    )
    _common(step, default_optimizers="all")
    step.add_argument(
        "--modes",
        default="fused,eager",
        help="which of our paths to time: fused, eager or both (default: fused,eager)",
    )
    step.add_argument(
        "--no-references", action="store_true", help="skip the reference implementations"
    )
    step.add_argument(
        "--clock",
        choices=("wall", "cpu"),
        default="wall",
        help="wall (default): elapsed time; cpu: the timing thread's CPU time, which leaves out "
        "the time other processes take the core (needs --device cpu --threads 1)",
    )
    step.set_defaults(func=run_step)
    train = sub.add_parser("train", help="tokens/s of the training loop vs a plain torch loop")
    _common(train, default_optimizers="adamw")
    train.add_argument("--batch-size", type=int, default=4, help="sequences per step")
    train.add_argument("--seq-len", type=int, default=256, help="tokens per sequence")
    train.add_argument(
        "--rounds",
        type=int,
        default=3,
        help="rounds per row, each the torch-AdamW loop, ours and the harness back to back; "
        "ratios are medians of the rounds' (default 3)",
    )
    train.add_argument(
        "--modes", default="fused,eager", help="our paths to time: fused, eager or both"
    )
    train.set_defaults(func=run_train)
    parser.set_defaults(func=lambda args: parser.print_help() or 2)


def _common(parser: argparse.ArgumentParser, default_optimizers: str) -> None:
    parser.add_argument(
        "--shape",
        default="llama-34m",
        help="model shape: a preset (llama-34m: d=512, 8 layers, 8 heads, SwiGLU 1376, vocab "
        "8192; llama-tiny) or key=value pairs, e.g. d_model=256,n_layers=4",
    )
    parser.add_argument(
        "--optimizers",
        default="",
        help=f"comma-separated registry names (default: {default_optimizers})",
    )
    parser.add_argument("--steps", type=int, default=15, help="timed steps per candidate")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first")
    parser.add_argument(
        "--device", default=None, help="cpu, cuda, cuda:1, ... or auto (default: cuda if present)"
    )
    parser.add_argument("--json", type=Path, default=None, help="write the report here")
    parser.add_argument(
        "--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)"
    )
    parser.add_argument(
        "--allocator",
        choices=("steady", "default"),
        default="steady",
        help="steady (default): glibc keeps blocks up to 32 MiB on its heap, as in a running "
        "training loop; default: leave glibc's adaptive thresholds (figures then depend on "
        "what the process freed before)",
    )


def _allocator(args: argparse.Namespace) -> str:
    """Apply ``--allocator``; the name recorded in the report."""
    if args.allocator == "steady":
        from optarena.bench.allocator import steady

        return "steady" if steady() else "default (steady needs glibc)"
    return "default"


def _threads(args: argparse.Namespace) -> None:
    if args.threads is not None:
        if args.threads < 1:
            raise UserError("--threads must be >= 1")
        import torch

        torch.set_num_threads(args.threads)


def _names(args: argparse.Namespace) -> list[str] | None:
    from optarena.optim import REGISTRY

    names = [n.strip() for n in args.optimizers.split(",") if n.strip()]
    if not names and args.optimizers:  # given, but only commas and blanks
        raise UserError(f"--optimizers {args.optimizers!r} names no optimizer; e.g. adamw,lion")
    unknown = [n for n in names if n not in REGISTRY or n == "hybrid"]
    if unknown:
        raise UserError(
            f"unknown optimizer(s) {', '.join(unknown)}; choose from "
            + ", ".join(n for n in REGISTRY if n != "hybrid")
        )
    return names or None


def _shape(args: argparse.Namespace):
    from optarena.bench.shapes import parse_shape

    try:
        return parse_shape(args.shape)
    except ValueError as err:
        raise UserError(str(err)) from None


def _print(title: str, rows: list[list[str]]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title)
    for i, head in enumerate(rows[0]):
        table.add_column(head, justify="left" if i in (0, len(rows[0]) - 1) else "right")
    for row in rows[1:]:
        table.add_row(*row)
    Console(width=200).print(table)


def _writable(path: Path | None) -> None:
    """Refuse a --json path that cannot be written before the benchmark runs, not after."""
    if path is None:
        return
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise UserError(f"cannot write --json {path}: {err.strerror}") from None
    if path.is_dir() or not os.access(path.parent, os.W_OK):
        raise UserError(f"cannot write --json {path}: give a file in a folder you can write to")


def _write(path: Path | None, report: dict[str, Any]) -> None:
    if path is not None:
        try:
            atomic.write_text(path, json.dumps(report, indent=2))
        except OSError as err:  # the table above is all that is left
            raise UserError(f"cannot write --json {path}: {err.strerror}") from None
        print(f"wrote {path}")


def _modes(args: argparse.Namespace) -> list[str]:
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    if not modes or any(m not in ("fused", "eager") for m in modes):
        raise UserError(f"--modes takes fused and/or eager, got {args.modes!r}")
    return modes


def _at_least_one(args: argparse.Namespace, *names: str) -> None:
    for name in names:
        if getattr(args, name) < 1:
            flag = "--" + name.replace("_", "-")
            raise UserError(f"{flag} must be >= 1, got {getattr(args, name)}")


def run_step(args: argparse.Namespace) -> int:
    import sys

    from optarena.bench.step import bench_step, check_clock, format_step_table

    modes = _modes(args)
    _threads(args)
    _at_least_one(args, "steps", "warmup")
    _writable(args.json)
    shape = _shape(args)
    device = _device(args)
    try:
        check_clock(args.clock, device)
    except ValueError as err:
        raise UserError(str(err)) from None
    allocator = _allocator(args)
    report = bench_step(
        shape,
        _names(args),
        steps=args.steps,
        warmup=args.warmup,
        device=device,
        modes=modes,
        references=not args.no_references,
        clock=args.clock,
        log=lambda s: print(s, file=sys.stderr, flush=True),
    )
    report["allocator"] = allocator
    title = (
        f"optimizer step, {report['params'] / 1e6:.1f}M params, {report['device_name']}, "
        f"{report['threads']} threads, median of {args.steps}, {allocator} allocator, "
        f"{args.clock} clock"
    )
    _print(title, format_step_table(report))
    bw = [r["bandwidth_gbps"] for r in report["rows"]]
    if bw:
        span = f"{min(bw):.1f}-{max(bw):.1f} GB/s"
        print(f"bandwidth probe (θ += g over the model's tensors): {span} across rows")
    _write(args.json, report)
    return 0


def _device(args: argparse.Namespace) -> Any:
    """The ``--device`` asked for; torch loads here, not when ``optarena`` starts (every
    command's parser is built at start-up)."""
    from optarena.devices import resolve_device

    return resolve_device(args.device)


def run_train(args: argparse.Namespace) -> int:
    import sys

    try:
        from optarena.bench.train import bench_train, format_train_table
    except ImportError as err:
        raise UserError(f"bench train needs the training harness: {err}") from None
    modes = _modes(args)
    _threads(args)
    _at_least_one(args, "steps", "warmup", "rounds", "batch_size", "seq_len")
    _writable(args.json)
    allocator = _allocator(args)
    report = bench_train(
        _shape(args),
        _names(args) or ["adamw"],
        steps=args.steps,
        warmup=args.warmup,
        rounds=args.rounds,
        device=_device(args),
        batch_size=args.batch_size,
        seq_len=args.seq_len,
        modes=modes,
        log=lambda s: print(s, file=sys.stderr, flush=True),
    )
    report["allocator"] = allocator
    _print(f"training throughput (tokens/s), {allocator} allocator", format_train_table(report))
    _write(args.json, report)
    return 0
