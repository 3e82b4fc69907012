"""``optarena sweep SPEC --out DIR``: run every point of a sweep that has no result yet."""

from __future__ import annotations

import argparse
import signal
import sys
from dataclasses import fields
from pathlib import Path
from typing import Any

from optarena.errors import StorageError, UserError
from optarena.sweep.executors import BACKENDS, DEFAULT_FUNCTION, Executor


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "sweep",
        help="run a sweep (a TOML spec or a preset); re-running resumes it",
        description="Run every run of a sweep spec that has no result in DIR/results.sqlite. "
        "Re-running resumes: finished runs are skipped, interrupted ones restart from their "
        "last checkpoint, values added to the spec run as new points.",
    )
    parser.add_argument("spec", help="a sweep TOML file, or a preset name (e.g. demo, lr)")
    add_sweep_options(parser)
    parser.add_argument(
        "--dry-run", action="store_true", help="list the runs and their status, run nothing"
    )
    parser.add_argument(
        "--refine",
        action="store_true",
        help="after the grid, add half-steps (in log LR) around each series' optimum, round "
        "by round, until it is interior with neighbours half a step away (docs/sweeps.md)",
    )
    parser.add_argument(
        "--refine-rounds",
        type=int,
        default=None,
        metavar="N",
        help="at most N refinement rounds per invocation (default 8; re-running continues)",
    )
    parser.set_defaults(func=run)


def add_sweep_options(parser: argparse.ArgumentParser, default_out: str | None = None) -> None:
    """The options ``sweep`` and ``demo`` share."""
    parser.add_argument(
        "--out",
        default=default_out,
        metavar="DIR",
        help="results folder (default: runs/<sweep name>)"
        if default_out is None
        else f"results folder (default: {default_out})",
    )
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a [base] key for every run, e.g. --set steps=500 --set model=tiny",
    )
    parser.add_argument(
        "--seeds",
        type=int,
        nargs="+",
        default=None,
        metavar="SEED",
        help="seeds for every grid, e.g. --seeds 0 1 2 (default: the spec's)",
    )
    parser.add_argument("--backend", choices=BACKENDS, default="local")
    parser.add_argument(
        "--workers", type=int, default=None, help="runs at a time (local default: 1 per 2 cores)"
    )
    parser.add_argument(
        "--threads", type=int, default=None, help="torch threads per run (default: cores/workers)"
    )
    parser.add_argument("--address", default=None, help="Ray cluster address (--backend ray)")
    parser.add_argument(
        "--gpus-per-run",
        type=int,
        default=None,
        help="GPUs for each run, over [resources] gpus_per_run (Ray default: 1 where the "
        "cluster has GPUs); more than one makes each run a DDP/FSDP run (docs/scaling.md)",
    )
    parser.add_argument(
        "--max-retries",
        type=int,
        default=3,
        help="Ray: times a run is retried when its worker process or node dies (default 3)",
    )
    parser.add_argument("--slurm-partition", default=None)
    parser.add_argument("--slurm-time", type=int, default=24 * 60, help="minutes per run job")
    parser.add_argument(
        "--slurm-gpus", type=int, default=0, help="GPUs per run job (same as --gpus-per-run)"
    )
    parser.add_argument(
        "--slurm-cluster",
        default=None,
        choices=("slurm", "local", "debug"),
        help="submitit cluster (default: auto; 'local' runs jobs as local processes)",
    )
    parser.add_argument(
        "--no-retry-failed",
        dest="retry_failed",
        action="store_false",
        help="leave runs that failed before alone (default: retry them)",
    )
    parser.add_argument(
        "--function",
        default=DEFAULT_FUNCTION,
        metavar="MODULE:FN",
        help="training function taking the run's config dict (default: the spec's [sweep] task: "
        "optarena.train:train, or optarena.posttrain.sft:finetune for task = 'finetune'; "
        "optarena.sweep.toy:train checks a backend in seconds)",
    )


def training_keys(function: str) -> set[str] | None:
    """Keys a run config may set: the config fields of the task whose function it is."""
    from optarena.tasks import task_of_function

    task = task_of_function(function)
    if task is None:
        return None
    return {f.name for f in fields(task.config_class())}


def optimizer_names(function: str) -> set[str] | None:
    from optarena.tasks import task_of_function

    if task_of_function(function) is None:
        return None
    from optarena.optim import available

    return set(available())


def choose_function(args: argparse.Namespace, text: str) -> None:
    """``[sweep] task`` picks the function unless ``--function`` names another one."""
    from optarena.sweep.spec import peek_task
    from optarena.tasks import TASKS

    task = peek_task(text)
    if task in TASKS and args.function == DEFAULT_FUNCTION:
        args.function = TASKS[task].function


def model_widths() -> dict[str, int]:
    """Width of each model preset, for specs that shift LR grids to the model size."""
    try:
        from optarena.model import PRESETS
    except ImportError:  # pragma: no cover - the model ships with the package
        return {}
    return {name: int(kw["d_model"]) for name, kw in PRESETS.items() if "d_model" in kw}


def load(args: argparse.Namespace) -> Any:
    """The validated spec; a missing file answers before torch is imported for validation."""
    from optarena.sweep.spec import parse_spec, read_spec_text

    text, source = read_spec_text(args.spec)
    choose_function(args, text)
    spec = parse_spec(
        text,
        source=source,
        config_keys=training_keys(args.function),
        optimizers=optimizer_names(args.function),
        overrides=args.overrides,
        model_widths=model_widths(),
        seeds=args.seeds,
    )
    from optarena.tasks import task_of_function

    task = task_of_function(args.function)
    if task is not None:
        check_runs(spec, source, task)
    return spec


def check_runs(spec: Any, source: str, task: Any = None) -> None:
    """Every run's config as ``train`` will check it (types, ranges, the optimizer and its
    hyperparameters), before any run starts: a bad value is one error now, not a failure of
    every run."""
    import json

    from optarena.tasks import DEFAULT_TASK, TASKS

    task = task or TASKS[DEFAULT_TASK]
    keys, check = _input_checks().get(task.name, ((), None))
    built: set[str] = set()  # an optimizer and its hyperparameters, built once (lr: a number)
    datasets: dict[str, list[tuple[Any, Any]]] = {}  # the runs of each data set, checked
    for run in spec.runs():
        key = json.dumps([run.config.get(k) for k in ("optimizer", "hparams")], default=str)
        try:
            config = task.check_config(run.config, optimizer=key not in built)
        except UserError as err:
            raise UserError(f"{source}: run {_run_text(run)}: {err}") from None
        built.add(key)
        if check is None:
            continue  # this kind of run reads its model and data when it starts
        data_key = json.dumps([getattr(config, k) for k in keys], default=str)
        datasets.setdefault(data_key, []).append((run, config))
    for runs in datasets.values():
        check(runs, source)


# What decides a fine-tuning run's inputs: the model it starts from and its examples.
_FINETUNE_DATA_KEYS = ("pretrained", "data", "val_data", "eval_examples")


def check_finetune_data(runs: list[tuple[Any, Any]], source: str) -> None:
    """The model these fine-tuning runs start from loads, and their examples read and fit the
    shortest run's ``seq_len``, before any run starts."""
    from optarena.posttrain.pretrained import load_pretrained
    from optarena.posttrain.sft import prepare

    run, config = min(runs, key=lambda rc: rc[1].seq_len)
    try:
        prepare(config, load_pretrained(config.pretrained))
    except UserError as err:
        raise UserError(f"{source}: run {_run_text(run)}: {err}") from None


# What decides a run's token ids: runs that agree on these share a data set.
_DATA_KEYS = (
    "data",
    "tokenizer",
    "vocab_size",
    "model",
    "val_fraction",
    "max_documents",
    "cache_dir",
)


def _input_checks() -> dict[str, tuple[tuple[str, ...], Any]]:
    """Per task: the config keys that decide a run's inputs, and the check of one input set."""
    return {
        "train": (_DATA_KEYS, check_data),
        "finetune": (_FINETUNE_DATA_KEYS, check_finetune_data),
    }


def _run_text(run: Any) -> str:
    point = ", ".join(f"{k}={v}" for k, v in run.point.items())
    return f"{run.label} ({point})"


def check_data(runs: list[tuple[Any, Any]], source: str) -> None:
    """The data of these runs (one data set) exists, is text, and holds a window of every
    run's ``seq_len`` in both splits, checked before any run starts. The token ids are made
    here as each run would make them (and cached for the runs); ``c4`` from the hub and hub
    tokenizers are left to the runs (they need a network)."""
    from optarena.data import load_corpus, prepare_data
    from optarena.data.cache import default_cache_dir
    from optarena.model import PRESETS

    run, config = max(runs, key=lambda rc: rc[1].seq_len)
    cache = Path(config.cache_dir) if config.cache_dir else default_cache_dir()
    if config.data == "c4":
        return
    try:
        local_tokenizer = config.tokenizer == "bpe" or Path(config.tokenizer).expanduser().is_file()
        if not local_tokenizer:
            load_corpus(config.data, cache, config.val_fraction, config.max_documents)
            return
        vocab = config.vocab_size or PRESETS[config.model]["vocab_size"]
        data = prepare_data(
            config.data, config.tokenizer, vocab, cache, config.val_fraction, config.max_documents
        )
    except UserError as err:
        raise UserError(f"{source}: run {_run_text(run)}: {err}") from None
    train, val = len(data.train), len(data.val)
    if train < config.seq_len + 2 or val < config.seq_len + 1:
        raise UserError(
            f"{source}: run {_run_text(run)}: seq_len {config.seq_len} is longer than the data "
            f"{config.data} allows ({train} training and {val} validation tokens); use more "
            "data or a shorter seq_len"
        )


def check_function(args: argparse.Namespace) -> None:
    """``--function`` names a function before any run starts: the local backend imports it as
    its workers will; Ray and Slurm workers may have more on their path, so for them only the
    module must be found here."""
    from optarena.sweep.executors import resolve_function

    if args.backend == "local":
        resolve_function(args.function)
        return
    import importlib.util

    module, sep, attr = args.function.partition(":")
    if not sep or not module or not attr:
        raise UserError(f"--function {args.function!r}: expected 'package.module:function'")
    try:
        found = importlib.util.find_spec(module)
    except (ImportError, ValueError):
        found = None
    if found is None:
        raise UserError(f"--function {args.function!r}: no module {module!r} on this path")


def resources_of(args: argparse.Namespace, spec: Any = None) -> Any:
    """The spec's ``[resources]`` with ``--gpus-per-run`` (or ``--slurm-gpus``) over it."""
    from optarena.sweep.spec import Resources

    gpus = args.gpus_per_run
    if args.slurm_gpus:
        if gpus is not None and gpus != args.slurm_gpus:
            raise UserError("--slurm-gpus and --gpus-per-run disagree; give --gpus-per-run only")
        gpus = args.slurm_gpus
    if gpus is not None and gpus < 0:
        raise UserError(f"--gpus-per-run {gpus}: give 0 or more")
    base = getattr(spec, "resources", None) or Resources()
    return base.with_gpus(gpus)


def make_executor(
    args: argparse.Namespace, out: Path, default_threads: int = 2, spec: Any = None
) -> Executor:
    """The backend the flags ask for; local runs get ``default_threads`` cores each unless
    ``--workers``/``--threads`` say otherwise. ``spec`` gives the runs' ``[resources]``."""
    from optarena.sweep import executors

    check_function(args)
    resources = resources_of(args, spec)
    if args.backend == "ray":
        return executors.RayExecutor(
            args.function,
            workers=args.workers,
            threads=_given(args.threads, 1),
            address=args.address,
            resources=resources,
            max_retries=args.max_retries,
        )
    if args.backend == "slurm":
        if args.slurm_time < 1:
            raise UserError(f"--slurm-time {args.slurm_time}: give the minutes per run job, >= 1")
        params: dict[str, Any] = {"timeout_min": args.slurm_time}
        if args.slurm_partition:
            params["slurm_partition"] = args.slurm_partition
        return executors.SlurmExecutor(
            args.function,
            out / "slurm",
            workers=_given(args.workers, 64),
            threads=_given(args.threads, 1),
            cluster=args.slurm_cluster,
            parameters=params,
            resources=resources,
        )
    if args.address:
        raise UserError("--address is for --backend ray; add --backend ray or drop --address")
    import os

    per_run = default_threads * resources.processes_per_node
    workers = _given(args.workers, max(1, (os.cpu_count() or 1) // per_run))
    return executors.LocalExecutor(
        args.function, workers=workers, threads=args.threads, resources=resources
    )


def _given(value: int | None, default: int) -> int:
    """The flag's value if given (0 included, so that it is refused), else the default."""
    return default if value is None else value


def execute(args: argparse.Namespace, spec: Any, out: Path, default_threads: int = 2) -> int:
    """Run the sweep into ``out``; exit code 1 when some run failed (its error is stored), 3
    (:data:`INCOMPLETE`) when another live driver still holds runs, else 0."""
    from rich.console import Console

    from optarena.sweep.driver import run_sweep
    from optarena.sweep.store import Store

    console = Console(stderr=True, soft_wrap=True)
    runs = spec.runs()
    executor = make_executor(args, out, default_threads, spec)  # bad flags fail before any file
    store = Store(out)
    console.print(
        f"sweep [bold]{spec.name}[/]: {len(runs)} runs into {out} "
        f"({args.backend}, {executor.capacity} at a time)",
        highlight=False,
    )
    previous = signal.signal(signal.SIGTERM, _raise_interrupt)
    try:
        result = run_sweep(store, runs, executor, sweep=spec.name, retry_failed=args.retry_failed)
    finally:
        signal.signal(signal.SIGTERM, previous)
        store.close()
    counts = f"{result.done} done, {result.diverged} diverged, {result.failed} failed"
    console.print(
        f"finished: {counts} now; {result.already_finished} had results already.",
        highlight=False,
    )
    if result.storage_error:  # one line, exit 2; the runs not started wait for the next run
        raise StorageError(result.storage_error)
    if result.failed:
        console.print(
            f"[red]{result.failed} runs failed[/]: errors in `optarena report {out}` and "
            f"{out}/runs/<id>/error.txt; re-running the sweep retries them.",
            highlight=False,
        )
    if result.held_elsewhere:
        console.print(
            f"another driver still holds {result.held_elsewhere} runs of this sweep (no result "
            "yet); run the sweep again once it has finished to check that every run has one.",
            highlight=False,
        )
    if result.failed:
        return 1
    return INCOMPLETE if result.held_elsewhere else 0


# The exit code of a sweep whose every run of this driver has a result, while another live
# driver still holds some runs (they have no result yet).
INCOMPLETE = 3


def refine(args: argparse.Namespace, spec: Any, out: Path) -> int:
    """The sweep, then refinement rounds (``--refine``); exit code 1 when some run failed, 3
    while another live driver holds runs."""
    from rich.console import Console

    from optarena.sweep import refine as refinement
    from optarena.sweep.store import Store

    console = Console(stderr=True, soft_wrap=True)
    executor = make_executor(args, out, 2, spec)
    store = Store(out)
    rounds = refinement.DEFAULT_ROUNDS if args.refine_rounds is None else args.refine_rounds
    console.print(
        f"sweep [bold]{spec.name}[/] with refinement (at most {_count(rounds, 'round')}) into "
        f"{out} ({args.backend}, {executor.capacity} at a time)",
        highlight=False,
    )

    def on_round(number: int, plan: refinement.Plan) -> None:
        for addition in plan.additions:
            console.print(
                f"refine round {number}: {refinement.describe(addition)}",
                highlight=False,
                markup=False,
            )

    previous = signal.signal(signal.SIGTERM, _raise_interrupt)
    try:
        result = refinement.refine_sweep(
            store,
            spec,
            executor,
            max_rounds=rounds,
            retry_failed=args.retry_failed,
            on_round=on_round,
        )
    finally:
        signal.signal(signal.SIGTERM, previous)
        store.close()
    if result.sweeps and result.sweeps[-1].storage_error:
        raise StorageError(result.sweeps[-1].storage_error)
    for name, why in result.plan.blocked:
        console.print(f"not refined: {name} {why}", highlight=False, markup=False)
    if result.plan.settled:
        console.print(
            f"refined: {_count(result.added, 'run')} added in {_count(result.rounds, 'round')}; "
            "every series' optimum is interior with neighbours half a step away.",
            highlight=False,
        )
    else:
        console.print(
            f"stopped after {_count(result.rounds, 'round')} ({_count(result.added, 'run')} added) "
            "with series still to refine; run the same command again to continue.",
            highlight=False,
        )
    if result.failed:
        console.print(
            f"[red]{result.failed} runs failed[/]: errors in `optarena report {out}`; "
            "re-running retries them.",
            highlight=False,
        )
        return 1
    held = result.sweeps[-1].held_elsewhere if result.sweeps else 0
    if held:
        console.print(
            f"another driver still holds {held} runs of this sweep (no result yet); run the "
            "same command again once it has finished.",
            highlight=False,
        )
        return INCOMPLETE
    return 0


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" + ("" if n == 1 else "s")


def _raise_interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


def run(args: argparse.Namespace) -> int:
    spec = load(args)
    out = Path(args.out) if args.out else Path("runs") / spec.name
    if args.refine_rounds is not None and not args.refine:
        raise UserError("--refine-rounds needs --refine; add --refine or drop --refine-rounds")
    if args.refine_rounds is not None and args.refine_rounds < 0:
        raise UserError(f"--refine-rounds {args.refine_rounds}: give 0 or more")
    if spec.extra.get("tune") is not None and not args.dry_run:
        raise UserError(
            f"{spec.source} has a [tune] table: it is a tuning spec; run it with "
            "`optarena tune` (a sweep would run the whole product of its axes)"
        )
    if args.dry_run:
        return dry_run(spec, out, refine=args.refine)
    code = refine(args, spec, out) if args.refine else execute(args, spec, out)
    print(f"results: {out / 'results.sqlite'}; report: optarena report {out}")
    return code


# Training FLOPs per CPU-core second on a small transformer, measured on the demo's micro
# model (6 x params x tokens over ``train_cpu_seconds``, one thread): rough, for estimates only.
CPU_FLOPS_PER_SECOND = 5e10

# CPU seconds every run costs besides its FLOPs: a fresh process, imports, data preparation,
# the evaluations' set-up and the run's files. Measured with ``/usr/bin/time`` on one thread
# (2-core machine, load 3): ``optarena train --model micro --steps 1 --batch-size 16
# --seq-len 64`` took 2.8 CPU-s; the demo's run (150 steps, 7 evaluations) took 9.8 CPU-s
# against 7.1 s of FLOP term, 2.7 s more. With it the demo's 45 runs estimate 453 CPU-s; the
# demo measured 527.7 CPU-s at load 11-16 (docs/performance.md).
RUN_OVERHEAD_SECONDS = 3.0
COST_MODEL = (
    f"6 x params x tokens at {CPU_FLOPS_PER_SECOND:.0e} FLOP/s per core, plus "
    f"{RUN_OVERHEAD_SECONDS:g} s a run for start-up, data and evaluation"
)


def estimated_cpu_seconds(config: dict[str, Any]) -> float | None:
    """About the CPU seconds one run of ``config`` needs, from its model preset's size and its
    tokens (6 x params x training tokens plus 2 x params x evaluation tokens, at
    ``CPU_FLOPS_PER_SECOND``) plus ``RUN_OVERHEAD_SECONDS``, or None for a model this cannot
    size."""
    try:
        from optarena.model import PRESETS
    except ImportError:  # pragma: no cover - the model ships with the package
        return None
    shape = {
        **PRESETS.get(str(config.get("model", "micro")), {}),
        **config.get("model_overrides", {}),
    }
    if not {"d_model", "n_layer", "vocab_size"} <= set(shape):
        return None
    d, layers, vocab = shape["d_model"], shape["n_layer"], shape.get("vocab_size")
    vocab = config.get("vocab_size") or vocab
    params = 2 * vocab * d + 12 * layers * d * d
    steps, batch, seq = (
        config.get("steps", 200),
        config.get("batch_size", 16),
        config.get("seq_len", 128),
    )
    every = config.get("eval_every", 0) or steps
    evals = steps // every + 1
    tokens = steps * batch * seq
    eval_tokens = evals * config.get("eval_windows", 64) * seq
    flops = 6 * params * tokens + 2 * params * eval_tokens
    return flops / CPU_FLOPS_PER_SECOND + RUN_OVERHEAD_SECONDS


def dry_run(spec: Any, out: Path, refine: bool = False) -> int:
    from rich.console import Console
    from rich.table import Table

    from optarena.sweep import refine as refinement
    from optarena.sweep.progress import format_seconds, short_value
    from optarena.sweep.store import DB_NAME, Store

    runs = spec.runs()
    status: dict[str, str] = {}
    planned: list[str] = []
    if (out / DB_NAME).is_file():
        with Store(out) as store:
            status = {r.id: r.status for r in store.runs()}
            if refine:
                runs = refinement.all_runs(spec, refinement.series_of(spec, store))
                planned = [refinement.describe(a) for a in refinement.plan(spec, store).additions]
    console = Console(file=sys.stdout)
    if not console.is_terminal:
        console = Console(file=sys.stdout, width=200)
    base = ", ".join(f"{k}={short_value(v)}" for k, v in sorted(spec.base.items()))
    console.print(f"base config: {base}", highlight=False, markup=False, soft_wrap=True)
    varying = sorted({k for r in runs for k in r.point})
    table = Table(title=f"sweep {spec.name}: {len(runs)} runs -> {out}")
    for column in ("id", "optimizer", *varying, "seed", "status", "est. CPU"):
        table.add_column(column)
    todo = 0.0
    for r in runs:
        cost = estimated_cpu_seconds(r.config)
        state = status.get(r.id, "new")
        if cost is not None and state not in ("done", "diverged"):
            todo += cost
        cells = [short_value(r.point[k]) if k in r.point else "" for k in varying]
        est = "?" if cost is None else format_seconds(cost)
        table.add_row(r.id, r.label, *cells, str(r.config["seed"]), state, est)
    console.print(table)
    console.print(
        f"estimated CPU time of the runs without a result: about {format_seconds(todo)} "
        f"core-time ({COST_MODEL}; divide by the cores in use; a loaded machine is slower)",
        highlight=False,
        markup=False,
        soft_wrap=True,
    )
    if refine:
        text = "; ".join(planned) if planned else "nothing (every series settled or not run yet)"
        console.print(f"next refinement round adds: {text}", highlight=False, markup=False)
    return 0
