"""Two revisions of optarena on one benchmark, run alternately, compared row by row.

Each round runs ``optarena bench step`` (or ``bench train``) once with the old revision and once
with the new one, in separate processes (``PYTHONPATH=<revision>/src``, each with its own Python,
so that a revision's own dependencies can differ), old first on odd rounds and new first on even
ones. Per optimizer (and mode) it prints the median over rounds of each revision's figures and
their ratio. The figures compared are the ones each run already pairs against a baseline measured
in the same process (the bandwidth bound for ``step``, torch's fused AdamW loop for ``train``),
so the host's drift between two runs cancels; raw times are printed beside them.

    python benchmarks/compare_revisions.py --old /tmp/old --old-python /tmp/old-venv/bin/python \\
        --new . --rounds 2 step -- --steps 15 --warmup 3
    python benchmarks/compare_revisions.py --old /tmp/old --old-python /tmp/old-venv/bin/python \\
        --new . --rounds 2 train -- --optimizers adamw,adam-mini,lion --rounds 3
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from collections import defaultdict
from pathlib import Path

# the figures of a row that are compared, per benchmark: (key, label)
STEP_KEYS = (("fused_vs_bound", "fused/bound"), ("eager_vs_bound", "eager/bound"))
STEP_TIMES = (("fused_ms", "fused ms"), ("eager_ms", "eager ms"))
TRAIN_KEYS = (("plain_vs_torch_adamw", "loop/torch-adamw"), ("harness_vs_plain", "harness/loop"))
TRAIN_TIMES = (("plain_tokens_per_second", "loop tok/s"),)


def run_once(python: str, src: Path, kind: str, extra: list[str], out: Path) -> dict:
    env = dict(os.environ, PYTHONPATH=str(src / "src"))
    cmd = [python, "-m", "optarena", "bench", kind, *extra, "--json", str(out)]
    subprocess.run(cmd, env=env, check=True, stdout=subprocess.DEVNULL)
    return json.loads(out.read_text())


def row_key(row: dict) -> str:
    return f"{row['optimizer']} ({row['mode']})" if "mode" in row else row["optimizer"]


def collect(reports: list[dict], keys: tuple[tuple[str, str], ...]) -> dict[str, dict]:
    """row -> figure -> values over rounds (references' ratios included for ``step``)."""
    out: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    for report in reports:
        for row in report["rows"]:
            name = row_key(row)
            for key, label in keys:
                if isinstance(row.get(key), (int, float)):
                    out[name][label].append(float(row[key]))
            for ref in row.get("references", ()):
                for mode in ("fused", "eager"):
                    if isinstance(ref.get(f"{mode}_ratio"), (int, float)):
                        out[name][f"{mode}/{ref['name']}"].append(float(ref[f"{mode}_ratio"]))
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--old", type=Path, required=True, help="checkout of the old revision")
    parser.add_argument("--new", type=Path, default=Path("."), help="checkout of the new one")
    parser.add_argument("--old-python", default=sys.executable)
    parser.add_argument("--new-python", default=sys.executable)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("kind", choices=("step", "train"))
    parser.add_argument("extra", nargs=argparse.REMAINDER, help="after --: bench's own options")
    args = parser.parse_args()
    extra = [a for a in args.extra if a != "--"]
    keys = (STEP_KEYS + STEP_TIMES) if args.kind == "step" else (TRAIN_KEYS + TRAIN_TIMES)
    sides = {"old": (args.old_python, args.old), "new": (args.new_python, args.new)}
    reports: dict[str, list[dict]] = {"old": [], "new": []}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.rounds):
            order = ("old", "new") if r % 2 == 0 else ("new", "old")
            for side in order:
                python, src = sides[side]
                print(f"round {r + 1}/{args.rounds}: {side}", file=sys.stderr, flush=True)
                out = Path(tmp) / f"{side}-{r}.json"
                reports[side].append(run_once(python, src, args.kind, extra, out))
    old, new = collect(reports["old"], keys), collect(reports["new"], keys)
    print(f"{'row':28s} {'figure':34s} {'old':>9s} {'new':>9s} {'new/old':>8s}")
    for name in new:
        for label, values in new[name].items():
            before = old.get(name, {}).get(label)
            b = statistics.median(before) if before else float("nan")
            a = statistics.median(values)
            print(f"{name:28s} {label:34s} {b:9.3f} {a:9.3f} {a / b:8.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
