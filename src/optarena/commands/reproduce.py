"""``optarena reproduce {deconstructing,adam-mini} --scale S --out DIR``: re-run a study, check
its claims, write the report. A staged sweep: re-running resumes where it stopped."""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

from optarena.commands import sweep as sweep_command
from optarena.errors import UserError

STUDIES = ("deconstructing", "adam-mini")


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "reproduce",
        help="re-run a study's experiments (deconstructing, adam-mini) and say which claims hold",
        description="Run a study's experiments at the chosen scale as staged sweeps into DIR "
        "(re-running resumes), then check each of its claims and write DIR/report/index.html "
        "with the verdicts (holds / does not hold / inconclusive at this scale).",
    )
    parser.add_argument("study", choices=STUDIES)
    parser.add_argument(
        "--scale",
        default="micro",
        help="test (CI: a handful of short runs), micro (< 1 h on 2 CPU cores), tiny, small, "
        "150m (the study's size: a GPU cluster)",
    )
    parser.add_argument("--delta", type=float, default=None, help="δ in nats (default 0.05)")
    parser.add_argument("--tau", type=float, default=None, help="basin τ in nats (default 0.05)")
    parser.add_argument(
        "--report-only", action="store_true", help="check the claims on what DIR holds; run nothing"
    )
    sweep_command.add_sweep_options(parser)
    # --seeds (from the sweep options): the first seed runs every stage; the others repeat the
    # best LRs (deconstructing) / AdamW's best LR (adam-mini), for measured intervals.
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from optarena.reproduce import protocol as P
    from optarena.reproduce.claims import Tolerances

    scale = P.get_scale(args.scale)
    seeds = list(args.seeds or [0])
    if len(set(seeds)) != len(seeds) or any(s < 0 for s in seeds):
        raise UserError(f"--seeds {' '.join(map(str, seeds))}: give distinct seeds >= 0")
    args.seeds = seeds
    tol = Tolerances()
    for flag in ("delta", "tau"):
        value = getattr(args, flag)
        if value is not None:
            if not (math.isfinite(value) and value > 0):
                raise UserError(f"--{flag} {value:g}: give a positive finite number of nats")
            tol = Tolerances(**{**tol.__dict__, flag: value})
    if args.overrides:
        scale = _with_overrides(scale, args.overrides)
    _check_model(scale)
    out = Path(args.out) if args.out else Path("runs") / f"reproduce-{args.study}-{scale.name}"
    if args.workers is None and scale.workers is not None:
        args.workers = scale.workers
    start = time.monotonic()
    if args.study == "deconstructing":
        page, claims = _deconstructing(args, scale, tol, out)
    else:
        page, claims = _adam_mini(args, scale, tol, out)
    minutes, seconds = divmod(round(time.monotonic() - start), 60)
    from optarena.reproduce.claims import overall

    counts = overall(claims)
    print(
        f"{args.study} at scale {scale.name}: {counts['holds']} claims hold, "
        f"{counts['does not hold']} do not, {counts['inconclusive']} inconclusive "
        f"({minutes}m{seconds:02d}s)"
    )
    for c in claims:
        print(f"  {c.id:6} {c.verdict:13} {c.statement}")
    print(f"report: {page.resolve()}")
    print(f"claims: {(out / 'report' / 'claims.md').resolve()}")
    return 0


def _with_overrides(scale, overrides):
    """``--set KEY=VALUE`` applies to every run's [base] (e.g. --set data=c4)."""
    import dataclasses

    from optarena.sweep.spec import _apply_override

    extra = dict(scale.extra)
    for item in overrides:
        _apply_override(extra, item)
    fields = {f.name for f in dataclasses.fields(scale)}
    direct = {k: v for k, v in extra.items() if k in fields and k not in ("extra", "name")}
    rest = {k: v for k, v in extra.items() if k not in direct}
    return dataclasses.replace(scale, **direct, extra=rest)


def _check_model(scale) -> None:
    """The scale's models are presets (``--set model=...`` may name any)."""
    from optarena.model import PRESETS

    models = scale.adam_mini_models
    if isinstance(models, str):
        models = (models,)
    for key, model in [("model", scale.model), *(("adam_mini_models", m) for m in models)]:
        if not isinstance(model, str) or model not in PRESETS:
            raise UserError(
                f"--set {key}={model}: unknown model; choose one of: {', '.join(PRESETS)}"
            )


def _stager(args: argparse.Namespace, out: Path, prefix: str):
    from optarena.reproduce.runner import Stager

    if not args.report_only:
        sweep_command.make_executor(args, out)  # flag errors now, before anything runs
    return Stager(out, args, prefix)


def _deconstructing(args, scale, tol, out):
    from optarena.reproduce import deconstructing

    return _study(deconstructing, "deconstructing", args, scale, tol, out)


def _adam_mini(args, scale, tol, out):
    from optarena.reproduce import adam_mini

    return _study(adam_mini, "adam-mini", args, scale, tol, out)


def _study(module, name, args, scale, tol, out):
    """Run (or, with ``--report-only``, re-read) a study's stages, then check and write."""
    st = _stager(args, out, name)
    if args.report_only:
        _need_store(out)
        analysis = st.analysis(_taus(tol))
    else:
        analysis = module.run_stages(st, scale, args.seeds, _taus(tol))
    return module.write(out, analysis, scale, tol, _header(name, scale, args, st))


def _taus(tol) -> tuple[float, ...]:
    return tuple(sorted({0.01, tol.tau, 0.1}))


def _need_store(out: Path) -> None:
    from optarena.sweep.store import DB_NAME

    if not (out / DB_NAME).is_file():
        raise UserError(f"{out} holds no results ({DB_NAME}); run without --report-only first")


def _header(study: str, scale, args, st) -> str:
    import html

    command = f"optarena reproduce {study} --scale {scale.name}"
    if args.seeds != [0]:
        command += " --seeds " + " ".join(map(str, args.seeds))
    stages = "; ".join(
        f"{s.name}: {s.runs} runs ({s.done} done, {s.diverged} diverged, {s.failed} failed now, "
        f"{s.already} before) in {s.seconds:.0f}s"
        for s in st.stages
    )
    return html.escape(
        f"Scale {scale.name}: model {scale.model}, {scale.steps} steps of {scale.batch_size}x"
        f"{scale.seq_len} tokens, data {scale.data}. Command: {command}. "
        + (f"Stages this invocation: {stages}." if stages else "")
    )
