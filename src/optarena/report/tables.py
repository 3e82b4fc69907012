"""Tabular views of a sweep: one row per optimizer (summary) and one row per run.

Shared by the CSV/JSON files, the HTML page and ``optarena report --format table`` so that all
three always show the same numbers.
"""

from __future__ import annotations

import csv
import io
import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from optarena import atomic
from optarena.analysis import Analysis, SeriesResult
from optarena.report.story import unbounded
from optarena.speedup import Speedup
from optarena.sweep.store import Member, RunRecord


def tau_column(tau: float) -> str:
    return f"basin_decades_tau_{tau:g}"


def by_loss(analysis: Analysis) -> list[SeriesResult]:
    """Series per model size, best loss first (series without a finished run last)."""
    return sorted(
        analysis.series,
        key=lambda s: (s.model, math.inf if s.best_loss is None else s.best_loss, s.name),
    )


def finetuned(analysis: Analysis) -> bool:
    """Whether the sweep holds fine-tuning runs (their loss is the responses'; they have a
    starting loss and, for one-answer tasks, an exact-match accuracy)."""
    return any(s.start_loss is not None for s in analysis.series)


def rewarded(analysis: Analysis) -> bool:
    """Whether the sweep holds RLHF runs (their loss is the negative held-out reward)."""
    return any(s.reward is not None for s in analysis.series)


def summary_rows(
    analysis: Analysis, speedups: Mapping[str, Speedup] | None = None
) -> list[dict[str, Any]]:
    """One row per series (optimizer x model size x other swept values), best loss first."""
    rows = []
    for s in by_loss(analysis):
        row: dict[str, Any] = {
            "model": s.model,
            "optimizer": s.name,
            "registry_name": s.optimizer,
            "best_final_val_loss": s.best_loss,
            "ci95_low": s.best_interval[0] if s.best_interval else None,
            "ci95_high": s.best_interval[1] if s.best_interval else None,
            "seeds_at_best": len(s.best_losses),
            "best_lr": s.best_lr,
        }
        for tau in analysis.taus:
            basin = s.basins.get(tau)
            row[tau_column(tau)] = basin.width if basin else None
            row[tau_column(tau) + "_censored"] = basin.censored if basin else None
        row.update(
            divergence_rate=s.divergence_rate,
            runs=s.n_runs,
            failed=s.n_failed,
            state_bytes_per_param=s.state_bytes_per_param,
            tokens_per_second=s.tokens_per_second,
        )
        if finetuned(analysis):
            row.update(exact_match_at_best=s.exact_match, start_val_loss=s.start_loss)
        if rewarded(analysis):
            row.update(reward_at_best=s.reward, start_reward=s.start_reward)
        row.update(speedup_fields((speedups or {}).get(s.name)))
        rows.append(row)
    return rows


def run_rows(runs: Sequence[RunRecord], members: Sequence[Member]) -> list[dict[str, Any]]:
    """One row per run: id, optimizer, every swept hyperparameter, seed, status, loss."""
    points: dict[str, dict[str, Any]] = {}
    labels: dict[str, str] = {}
    for m in members:
        points.setdefault(m.run_id, {}).update(m.point)
        labels.setdefault(m.run_id, m.label)
    swept = sorted({k for p in points.values() for k in p}, key=lambda k: (k != "lr", k))
    rows = []
    for r in runs:
        point = points.get(r.id, {"lr": r.lr})
        row: dict[str, Any] = {
            "id": r.id,
            "optimizer": r.optimizer,
            "label": labels.get(r.id, r.optimizer),
            "model": r.model,
        }
        row.update({k: _cell(point.get(k)) for k in swept})
        row.update(seed=r.seed, status=r.status, final_val_loss=r.final_val_loss)
        if r.summary and "final_exact_match" in r.summary:
            row["final_exact_match"] = r.summary["final_exact_match"]
        if r.summary and "final_reward" in r.summary:
            row["final_reward"] = r.summary["final_reward"]
        row.update(wall_seconds=r.wall_seconds, error=r.error)
        rows.append(row)
    return rows


def write_csv(path: Path, rows: Sequence[dict[str, Any]]) -> None:
    columns: list[str] = []
    for row in rows:
        columns += [k for k in row if k not in columns]
    buffer = io.StringIO(newline="")
    writer = csv.DictWriter(buffer, fieldnames=columns)
    writer.writeheader()
    for row in rows:
        writer.writerow({k: csv_cell(v) for k, v in row.items()})
    atomic.write_text(path, buffer.getvalue())


def csv_cell(value: Any) -> Any:
    """A value as a spreadsheet reads it safely: a text cell starting with ``= + - @`` (or a
    tab or carriage return) would be taken for a formula, so it gets a leading apostrophe;
    numbers are left as they are."""
    if value is None:
        return ""
    if isinstance(value, str) and value[:1] in ("=", "+", "-", "@", "\t", "\r"):
        return "'" + value
    return value


def write_json(path: Path, rows: Sequence[dict[str, Any]]) -> None:
    clean = [{k: _json_number(v) for k, v in row.items()} for row in rows]
    atomic.write_text(path, json.dumps(clean, indent=2) + "\n")


def speedup_fields(sp: Speedup | None) -> dict[str, Any]:
    """The speedup columns of a summary row (all None without an AdamW series to compare)."""
    return {
        "token_speedup_vs_adamw": sp.token_speedup if sp else None,
        "token_speedup_low": sp.interval[0] if sp and sp.interval else None,
        "token_speedup_high": sp.interval[1] if sp and sp.interval else None,
        "steps_to_target": sp.steps_to_target if sp else None,
        "step_speedup_vs_adamw": sp.step_speedup if sp else None,
        "speedup_fit": sp.fit_source if sp else None,
    }


def display_rows(
    analysis: Analysis, speedups: Mapping[str, Speedup] | None = None
) -> tuple[list[str], list[list[str]]]:
    """Header and formatted cells of the summary table, as people read it, best loss first."""
    tuned, rl = finetuned(analysis), rewarded(analysis)
    loss_name = "best −reward" if rl else "best response loss" if tuned else "best loss"
    header = ["model", "optimizer", loss_name, "best LR"]
    header += [f"basin τ={tau:g}" for tau in analysis.taus]
    header += ["diverged", "state B/param", "tokens/s", "× AdamW tokens", "steps to target"]
    if rl:  # the start loss is the negative start reward: not shown twice
        header[4:4] = ["reward", "start reward", "exact match"]
    elif tuned:
        header[4:4] = ["exact match", "start loss"]
    cells = []
    for s in by_loss(analysis):
        sp = (speedups or {}).get(s.name)
        row = _display(s, analysis.taus)
        match = "—" if s.exact_match is None else f"{s.exact_match:.1%}"
        if rl:
            row[4:4] = [
                "—" if s.reward is None else f"{s.reward:.4f}",
                "—" if s.start_reward is None else f"{s.start_reward:.4f}",
                match,
            ]
        elif tuned:
            row[4:4] = [match, "—" if s.start_loss is None else f"{s.start_loss:.4f}"]
        row.append(_speedup_text(sp))
        row.append("—" if sp is None or sp.steps_to_target is None else str(sp.steps_to_target))
        cells.append(row)
    return header, cells


def _speedup_text(sp: Speedup | None) -> str:
    if sp is None or sp.token_speedup is None:
        return "—"
    text = f"{sp.token_speedup:.2f}"
    if unbounded(sp):
        text += " [fit too uncertain]"
    elif sp.interval:
        hi = sp.interval[1]
        text += (
            f" [{sp.interval[0]:.2f}–{hi:.2f}]"
            if math.isfinite(hi)
            else f" [≥{sp.interval[0]:.2f}]"
        )
    return text


def _display(s: SeriesResult, taus: Sequence[float]) -> list[str]:
    loss = "—"
    if s.best_loss is not None:
        loss = f"{s.best_loss:.4f}"
        if s.best_interval:
            loss += f" ± {(s.best_interval[1] - s.best_interval[0]) / 2:.4f}"
    cells = [s.model, s.name, loss, f"{s.best_lr:.3g}" if s.best_lr else "—"]
    for tau in taus:
        basin = s.basins.get(tau)
        cells.append("—" if basin is None else f"{'≥' if basin.censored else ''}{basin.width:.2f}")
    cells.append(f"{s.divergence_rate:.0%}")
    cells.append("—" if s.state_bytes_per_param is None else f"{s.state_bytes_per_param:.2f}")
    cells.append("—" if s.tokens_per_second is None else f"{s.tokens_per_second:,.0f}")
    return cells


def _cell(value: Any) -> Any:
    return json.dumps(value) if isinstance(value, (list, dict)) else value


def _json_number(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value
