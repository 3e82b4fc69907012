"""``optarena report`` on a 300-run store: wall time, and where it goes (goal: <= 10 s).

Builds a synthetic store in a temporary folder (or ``--out``): ``--optimizers`` optimizers x
``--lrs`` half-decade LRs x ``--seeds`` seeds (default 10 x 10 x 3 = 300 runs), each finished
with a summary, an eval curve and a ``metrics.jsonl`` of ``--steps`` logged steps, the way
the training harness writes them; 18 of the 300 diverge. Then it runs
``optarena report DIR`` as a user does (a fresh process, imports included) ``--repeats`` times
and prints the first one's wall and CPU time (every file written; the CPU time is the wall
time on an idle core) against the goal and the median of the others (run pages unchanged),
and, in this process, the time of each
stage of the report (reading and analysing the store, static figures, interactive figures,
run pages) and of the whole ``write_report``.

    PYTHONPATH=src python benchmarks/bench_report.py                 # 300 runs
    PYTHONPATH=src python benchmarks/bench_report.py --seeds 1       # 100 runs
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

GOAL_SECONDS = 10.0
OPTIMIZERS = (
    "adamw",
    "adam-mini",
    "adafactor",
    "adalayer",
    "lion",
    "signum",
    "sgd",
    "sophia",
    "soap",
    "muon",
    "nadamw",
    "mars",
)


def build_store(out: Path, optimizers: int, lrs: int, seeds: int, steps: int) -> int:
    """A finished synthetic sweep in ``out``; returns its number of runs."""
    from optarena.sweep.driver import register_runs
    from optarena.sweep.spec import parse_spec
    from optarena.sweep.store import Store

    grids = "".join(
        f'[[grid]]\noptimizer = "{name}"\n'
        f"lr = {{from = 1e-5, to = {10 ** (-5 + (lrs - 1) / 2):.6g}, per_decade = 2}}\n"
        for name in OPTIMIZERS[:optimizers]
    )
    spec = parse_spec(
        f'[sweep]\nname = "bench"\nseeds = {list(range(seeds))}\n'
        f"[base]\nsteps = {steps}\nbatch_size = 16\nseq_len = 64\neval_every = {steps // 20}\n"
        + grids
    )
    runs = spec.runs()
    with Store(out) as store:
        register_runs(store, runs, spec.name)
        now = time.time()
        for k, run in enumerate(runs):
            summary, records = _synthetic(run.config, k, steps)
            folder = store.run_dir(run.id)
            folder.mkdir(parents=True, exist_ok=True)
            (folder / "metrics.jsonl").write_text(
                "".join(json.dumps(r) + "\n" for r in records), encoding="utf-8"
            )
            assert store.claim(run.id)
            store.finish(run.id, summary)
            store._conn.execute(  # one run after another: no concurrency caveat
                "UPDATE runs SET started=?, finished=? WHERE id=?",
                (now + 10 * k, now + 10 * k + 9, run.id),
            )
    return len(runs)


def _synthetic(config: dict, k: int, steps: int) -> tuple[dict, list[dict]]:
    """A plausible run: a power-law loss curve whose floor depends on log10(LR)."""
    index = OPTIMIZERS.index(config["optimizer"])
    offset = math.log10(config["lr"]) + 3.0 - 0.3 * index
    diverged = offset > 1.6
    floor = 3.0 + 0.02 * index + 0.15 * offset**2 + 0.005 * config["seed"]
    tokens_per_step = config["batch_size"] * config["seq_len"]
    records, curve = [], []
    for step in range(1, steps + 1):
        loss = floor + 6.0 * step**-0.6
        lr = config["lr"] * min(1.0, step / (0.1 * steps))
        records.append(
            {
                "step": step,
                "tokens": step * tokens_per_step,
                "loss": loss,
                "lr": lr,
                "grad_norm": 1.0 + 0.5 * math.sin(step / 7.0) ** 2,
            }
        )
        if step % config["eval_every"] == 0:
            val = floor + 6.2 * step**-0.6
            records.append({"step": step, "tokens": step * tokens_per_step, "val_loss": val})
            curve.append([step, val])
    summary = {
        "final_val_loss": None if diverged else curve[-1][1],
        "diverged": diverged,
        "steps": steps,
        "tokens": steps * tokens_per_step,
        "tokens_per_second": 5000.0 + 10 * k,
        "params": 1_000_000,
        "optimizer_state_bytes": 8_000_000,
        "wall_seconds": 9.0,
        "eval_curve": curve,
        "environment": {"threads": 1, "torch": "2.13.0", "optarena": "bench", "python": "3.11"},
    }
    return summary, records


def time_command(directory: Path, repeats: int) -> list[tuple[float, float]]:
    """``(wall, CPU)`` seconds of ``optarena report DIR`` in a fresh process, ``repeats``
    times. The CPU seconds (user + system of the child) are what the wall time is on an idle
    machine, the report being one thread; on a loaded one the wall time is longer."""
    src = Path(__file__).resolve().parents[1] / "src"
    env = {**os.environ, "PYTHONPATH": f"{src}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    out = []
    for _ in range(repeats):
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        start = time.perf_counter()
        proc = subprocess.run(
            [sys.executable, "-m", "optarena", "report", str(directory)],
            capture_output=True,
            text=True,
            env=env,
        )
        wall = time.perf_counter() - start
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
        out.append((wall, cpu))
        if proc.returncode != 0:
            raise SystemExit(f"optarena report failed:\n{proc.stderr}")
    return out


def time_stages(directory: Path) -> dict[str, float]:
    """Seconds of each stage of ``write_report``, run in this process."""
    from optarena.analysis import analyze, observations_from_store
    from optarena.report import build, figures, interactive, run_pages, story
    from optarena.sweep.store import Store

    stages: dict[str, float] = {}
    clock = time.perf_counter()

    def lap(name: str) -> None:
        nonlocal clock
        now = time.perf_counter()
        stages[name] = now - clock
        clock = now

    with Store(directory, create=False) as store:
        runs, members = store.runs(), store.members()
    analysis = analyze(observations_from_store(directory))
    by_id = {r.id: r for r in runs}
    told = story.tell(analysis, by_id)
    lap("read + analyse + conclusions")
    figures.all_figures(analysis, by_id, directory, told.speedups)
    lap("static figures (PNG + SVG)")
    interactive.all_divs(analysis, by_id, directory, told.speedups)
    lap("interactive figures")
    shutil.rmtree(directory / "report" / run_pages.FOLDER, ignore_errors=True)
    lap("(removing the run pages)")
    pages = run_pages.write_run_pages(
        directory, directory / "report", runs, members, build._SELF_CHECK
    )
    lap(f"run pages ({pages} built)")
    pages = run_pages.write_run_pages(
        directory, directory / "report", runs, members, build._SELF_CHECK
    )
    lap(f"run pages again ({pages} rebuilt)")
    build.write_report(directory)
    lap("whole write_report (pages unchanged)")
    del stages["(removing the run pages)"]
    return stages


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--optimizers", type=int, default=10)
    parser.add_argument("--lrs", type=int, default=10)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=200, help="logged steps per run")
    parser.add_argument("--repeats", type=int, default=3, help="report invocations (>= 1)")
    parser.add_argument("--out", type=Path, default=None, help="keep the store here")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="optarena-bench-report-") as tmp:
        directory = args.out or Path(tmp) / "store"
        start = time.perf_counter()
        n = build_store(directory, args.optimizers, args.lrs, args.seeds, args.steps)
        print(
            f"store: {n} runs, {args.steps} logged steps each, built in "
            f"{time.perf_counter() - start:.1f} s ({directory})"
        )
        times = time_command(directory, args.repeats)
        (first, first_cpu), again = times[0], times[1:]
        print(
            f"optarena report, first (writes every file): {first:.2f} s wall, {first_cpu:.2f} s "
            f"CPU; goal <= {GOAL_SECONDS:.0f} s: CPU {first_cpu / GOAL_SECONDS:.2f} x the goal "
            f"({'met' if first_cpu <= GOAL_SECONDS else 'missed'} on an idle core)"
        )
        if again:
            print(
                "optarena report, again (unchanged run pages are not rewritten): median "
                f"{statistics.median(w for w, _ in again):.2f} s wall, "
                f"{statistics.median(c for _, c in again):.2f} s CPU over {len(again)}"
            )
        print("stages, in this process (imports done):")
        for name, seconds in time_stages(directory).items():
            print(f"  {name:<38} {seconds:6.2f} s")
        print(f"load: {os.getloadavg()[0]:.2f} (1-min average) on {os.cpu_count()} cores")


if __name__ == "__main__":
    main()
