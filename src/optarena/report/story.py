"""What the page says in words: the setup, the conclusions and the caveats, from the analysis.

Every sentence here is computed from the store; nothing is written by hand per sweep. The noise
model (``noise``) and every rule are in ``docs/analysis.md``.
"""

from __future__ import annotations

import itertools
import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass, field

from optarena.analysis import Analysis, SeriesResult
from optarena.report.views import View, view_of
from optarena.speedup import (
    BASELINE,
    ENDPOINT_LENGTHS,
    Speedup,
    baseline_fit,
    first_step_at_or_below,
    token_speedup,
)
from optarena.sweep.store import RunRecord

# Seed-to-seed standard deviation of a final loss assumed when no point has two seeds.
ASSUMED_SEED_SD = 0.02
HALF_DECADE = 0.5 + 1e-3


@dataclass
class Noise:
    """The standard deviation of one run's final loss over seeds, and where it came from."""

    sd: float
    measured: bool
    points: int  # points with two or more seeds that it was pooled over
    unit: str = "nats"  # of the ranked number: an RLHF sweep's is a reward

    @property
    def band(self) -> float:
        """Two results closer than this are indistinguishable at ~95%: 1.96 * sqrt(2) * sd."""
        return 1.96 * math.sqrt(2.0) * self.sd

    def describe(self) -> str:
        unit = self.unit
        if self.measured:
            return (
                f"seed-to-seed standard deviation {self.sd:.4f} {unit}, pooled over "
                f"{self.points} LRs with several seeds; two results closer than 1.96·√2·sd = "
                f"{self.band:.3f} {unit} are indistinguishable at ~95%"
            )
        return (
            f"one seed per LR, so seed noise is not measured: assumed standard deviation "
            f"{self.sd:.3f} {unit} (typical of these small runs; rerun with --seeds 0 1 2 to "
            f"measure it); two results closer than {self.band:.3f} {unit} are treated as "
            "indistinguishable"
        )


def noise(analysis: Analysis) -> Noise:
    """Pooled within-point variance of every point with >= 2 seeds that all trained."""
    num, dof, points = 0.0, 0, 0
    for s in analysis.series:
        for p in s.curve:
            if len(p.losses) >= 2 and not p.diverged:
                num += statistics.variance(p.losses) * (len(p.losses) - 1)
                dof += len(p.losses) - 1
                points += 1
    units = {view_of([s]).unit for s in analysis.series}
    unit = units.pop() if len(units) == 1 else "nats"
    if dof:
        return Noise(math.sqrt(num / dof), True, points, unit)
    return Noise(ASSUMED_SEED_SD, False, 0, unit)


@dataclass
class Story:
    setup: list[tuple[str, str]] = field(default_factory=list)
    conclusions: list[str] = field(default_factory=list)
    caveats: list[str] = field(default_factory=list)
    speedups: dict[str, Speedup] = field(default_factory=dict)  # series name -> speedup
    best_group: dict[str, list[str]] = field(default_factory=dict)  # model -> names
    noise: Noise | None = None


def ranked(series: Sequence[SeriesResult]) -> list[SeriesResult]:
    return sorted(series, key=lambda s: (s.model, math.inf if s.best_loss is None else s.best_loss))


def tell(analysis: Analysis, runs: dict[str, RunRecord]) -> Story:
    story = Story(noise=noise(analysis))
    labels = {
        r: s.label
        for s in [*analysis.series, *analysis.sensitivities]
        for p in s.curve
        for r in p.run_ids
    }
    story.setup = setup(list(runs.values()), labels)
    for model in analysis.models():
        series = [
            s for s in ranked(analysis.series) if s.model == model and s.best_loss is not None
        ]
        if not series:
            continue
        shown = view_of(series)
        if shown.speedups:  # a power law in training tokens describes this task's loss
            story.speedups.update(speedups(series, runs))
        _conclude(story, model, series, len(analysis.models()) > 1, shown)
    story.caveats = caveats(analysis, list(runs.values()))
    loose = [s.label for s in story.speedups.values() if unbounded(s)]
    if loose:
        story.caveats.append(
            "The power law fitted to AdamW's eval curve is poorly constrained (few evaluations, "
            "and a decaying LR bends the curve's end), so the token-equivalent speedups of "
            f"{', '.join(loose)} have unbounded ranges: read them as indicative only; more "
            "evaluations (eval_every) or AdamW runs of several lengths constrain the fit."
        )
    return story


def _conclude(
    story: Story, model: str, series: list[SeriesResult], several: bool, shown: View
) -> None:
    """The sentences of one model's series, in the words of their task (``shown``): an RLHF
    sweep's best is its highest held-out reward, said with the reward's sign."""
    assert story.noise is not None
    where = f" ({model})" if several else ""
    best = series[0]
    group = [s for s in series if s.best_loss - best.best_loss <= story.noise.band]
    story.best_group[model] = [s.name for s in group]
    others = [s.name for s in group if s is not best]
    band, unit = story.noise.band, shown.unit
    text = (
        f"Best final {'validation loss' if shown.task == 'train' else shown.noun}{where}: "
        f"{best.name}, {shown.shown(best.best_loss):.4f} at LR {best.best_lr:.3g}. "
    )
    if others:
        text += (
            f"Within the noise band ({band:.3f} {unit}) of it, and so not "
            f"distinguishable from it by this sweep: {', '.join(others)}. "
        )
    else:
        text += f"No other optimizer is within the noise band ({band:.3f} {unit}). "
    rest = [s for s in series if s not in group]
    if rest:
        text += (
            "Worse by more than the noise: "
            + ", ".join(
                f"{s.name} ({shown.shown(s.best_loss - best.best_loss):+.3f})" for s in rest
            )
            + "."
        )
    story.conclusions.append(text.strip())

    taus = sorted({t for s in series for t in s.basins})
    if taus:
        tau = taus[len(taus) // 2]
        widths = [(s.basins[tau].width, s) for s in series if tau in s.basins]
        widths.sort(key=lambda ws: ws[0])
        lo, hi = widths[0], widths[-1]
        mark = "≥" if hi[1].basins[tau].censored else ""
        story.conclusions.append(
            f"Most stable{where} (widest LR basin within {tau:g} {unit} of its own best): "
            f"{hi[1].name}, {mark}{hi[0]:.2f} decades; least stable: {lo[1].name}, "
            f"{lo[0]:.2f} decades."
        )
    diverged = [s for s in series if s.divergence_rate > 0]
    if diverged:
        story.conclusions.append(
            f"Diverged{where}: "
            + ", ".join(
                f"{s.name} at {sum(p.n_diverged for p in s.curve)} of {s.n_runs} runs "
                f"(LR ≥ {min(p.x for p in s.curve if p.diverged):.3g})"
                for s in diverged
            )
            + "."
        )
    else:
        story.conclusions.append(f"No run diverged{where}.")
    memory = [s for s in series if s.state_bytes_per_param is not None]
    base = next((s for s in baselines(memory)), None)
    if memory:
        low = min(memory, key=lambda s: s.state_bytes_per_param)
        text = (
            f"Optimizer state{where}: least {low.name} ({low.state_bytes_per_param:.2f} "
            "bytes/parameter)"
        )
        if base is not None and base.state_bytes_per_param:
            text += f", {low.state_bytes_per_param / base.state_bytes_per_param:.0%} of AdamW's"
        story.conclusions.append(text + ".")
    base_names = {s.name for s in baselines(series)}
    sp = [(s.name, story.speedups.get(s.name)) for s in series if s.name not in base_names]
    sp = [(n, v) for n, v in sp if v is not None and v.token_speedup is not None]
    if sp:
        story.conclusions.append(
            f"Token-equivalent speedup over AdamW{where} (AdamW's tokens for the same loss ÷ "
            f"the optimizer's tokens; power law fitted to the {sp[0][1].fit_source}): "
            + ", ".join(f"{n} {v.token_speedup:.2f}×{_interval(v)}" for n, v in sp)
            + "."
        )


def unbounded(v: Speedup) -> bool:
    """Whether the fit cannot bound the speedup: a range with no finite lower end, or the
    ``[0, ∞]`` that ``token_speedup`` returns when most anchored draws define no shift."""
    if v.interval is None:
        return False
    low, high = v.interval
    return not math.isfinite(low) or (low <= 0.0 and not math.isfinite(high))


def _interval(v: Speedup) -> str:
    if v.interval is None:
        return ""
    if unbounded(v):
        return " (range unbounded)"
    hi = "∞" if not math.isfinite(v.interval[1]) else f"{v.interval[1]:.2f}"
    return f" [{v.interval[0]:.2f}, {hi}]"


def baselines(series: Sequence[SeriesResult]) -> list[SeriesResult]:
    """The AdamW series that speedups and memory are measured against: those labelled
    ``adamw`` (plain AdamW: not a variant such as cautious AdamW, whose optimizer is also
    ``adamw``), else every series whose optimizer is AdamW."""
    plain = [s for s in series if s.optimizer == BASELINE and s.label == BASELINE]
    return plain or [s for s in series if s.optimizer == BASELINE]


def speedups(series: Sequence[SeriesResult], runs: dict[str, RunRecord]) -> dict[str, Speedup]:
    """Every series of one model against its AdamW series (the first of :func:`baselines`)."""
    base = next(iter(baselines(series)), None)
    if base is None:
        return {}
    base_run = _best_run(base, runs)
    if base_run is None:
        return {}
    lengths = _adamw_lengths(series, runs)
    if len(lengths) < 2:  # one length: the best AdamW series' own best point
        group = [runs[r] for r in base.best_run_ids if r in runs]
        lengths = {_run_tokens(base_run): (base.best_loss or math.nan, group)}
    fit, source = baseline_fit(
        {
            tokens: (loss, [(st * _tokens_per_step(group[0]), y) for st, y in _mean_curve(group)])
            for tokens, (loss, group) in lengths.items()
        }
    )
    anchor = None
    if len(lengths) < ENDPOINT_LENGTHS:  # a fit to eval curves: shift it through AdamW's end
        longest = max(lengths)
        anchor = (lengths[longest][0], longest)
        source += ", anchored at its final loss"
    target = base.best_loss
    base_steps = first_step_at_or_below(base_run.eval_curve, target)
    out = {}
    for s in series:
        run = _best_run(s, runs)
        if run is None or s.best_loss is None:
            continue
        tokens = float((run.summary or {}).get("tokens") or 0) or math.nan
        value, interval = (None, None)
        if fit is not None and math.isfinite(tokens):
            value, interval = token_speedup(fit, s.best_loss, tokens, anchor=anchor)
        steps = first_step_at_or_below(run.eval_curve, target)
        ratio = base_steps / steps if steps and base_steps else None
        out[s.name] = Speedup(s.name, s.best_loss, tokens, value, interval, steps, ratio, source)
    return out


def _adamw_lengths(
    series: Sequence[SeriesResult], runs: dict[str, RunRecord]
) -> dict[float, tuple[float, list[RunRecord]]]:
    """AdamW's best point at each training length (tokens): ``(mean final loss over its seeds,
    its runs)``, over every AdamW series and LR of the model; a point where a seed did not
    finish training is not a candidate."""
    best: dict[float, tuple[float, list[RunRecord]]] = {}
    for s in baselines(series):
        for point in s.curve:
            by_length: dict[float, list[RunRecord]] = {}
            for run_id in point.run_ids:
                if run_id in runs:
                    by_length.setdefault(_run_tokens(runs[run_id]), []).append(runs[run_id])
            for tokens, group in by_length.items():
                if not math.isfinite(tokens) or any(
                    r.status != "done" or r.final_val_loss is None for r in group
                ):
                    continue
                loss = statistics.fmean(r.final_val_loss for r in group)
                if tokens not in best or loss < best[tokens][0]:
                    best[tokens] = (loss, group)
    return best


def _run_tokens(run: RunRecord) -> float:
    """A run's training tokens (its summary's, else steps x batch x sequence of its config)."""
    tokens = (run.summary or {}).get("tokens")
    if tokens:
        return float(tokens)
    steps = run.config.get("steps")
    return float(steps) * _tokens_per_step(run) if steps else math.nan


def _mean_curve(group: Sequence[RunRecord]) -> list[list[float]]:
    """The eval curve averaged over the seeds of one point (steps every seed evaluated), so
    that the fit describes the same mean loss the best loss is."""
    by_step: dict[float, list[float]] = {}
    for run in group:
        for step, loss in run.eval_curve:
            if loss is not None and math.isfinite(loss):
                by_step.setdefault(step, []).append(loss)
    return [[st, statistics.fmean(v)] for st, v in sorted(by_step.items()) if len(v) == len(group)]


def _best_run(s: SeriesResult, runs: dict[str, RunRecord]) -> RunRecord | None:
    return next((runs[r] for r in s.best_run_ids if r in runs and runs[r].eval_curve), None)


def _tokens_per_step(run: RunRecord) -> float:
    summary = run.summary or {}
    if summary.get("tokens") and summary.get("steps"):
        return summary["tokens"] / summary["steps"]
    return float(run.config.get("batch_size", 16) * run.config.get("seq_len", 128))


def setup(runs: Sequence[RunRecord], labels: dict[str, str] | None = None) -> list[tuple[str, str]]:
    """``(what, value)`` rows: the config every run shares, what varies, the environment. The
    hyperparameters are listed per series label (``labels``: run id to label; a run without
    one under its optimizer), the optimizer named beside a label that differs from it."""
    if not runs:
        return []
    configs = [r.config for r in runs]
    keys = sorted({k for c in configs for k in c} - {"hparams", "seed", "lr", "optimizer"})
    shared = {
        k: configs[0].get(k) for k in keys if all(c.get(k) == configs[0].get(k) for c in configs)
    }
    rows = [("shared config", ", ".join(f"{k}={v}" for k, v in shared.items()) or "—")]
    params = sorted({(r.summary or {}).get("params") for r in runs} - {None})
    if params:
        rows.append(("model parameters", ", ".join(f"{p:,}" for p in params)))
    tokens = sorted({(r.summary or {}).get("tokens") for r in runs if r.status == "done"} - {None})
    if tokens:
        rows.append(("training tokens per run", ", ".join(f"{t:,}" for t in tokens)))
    per_label: dict[str, set[str]] = {}
    for r in runs:
        hp = ", ".join(f"{k}={v}" for k, v in sorted((r.config.get("hparams") or {}).items()))
        label = (labels or {}).get(r.id, r.optimizer)
        name = label if label == r.optimizer else f"{label} ({r.optimizer})"
        per_label.setdefault(name, set()).add(hp or "defaults")
    for name, hps in sorted(per_label.items()):
        rows.append((f"{name} hyperparameters", " | ".join(sorted(hps))))
    seeds = sorted({r.seed for r in runs if r.seed is not None})
    rows.append(("seeds", ", ".join(map(str, seeds))))
    envs = [(r.summary or {}).get("environment") or {} for r in runs if r.summary]
    for key in ("threads", "torch", "optarena", "python"):
        values = sorted({str(e[key]) for e in envs if key in e})
        rows.append(
            (key if key != "optarena" else "code version", ", ".join(values) or "not recorded")
        )
    rows.append(("unlisted keys", "optarena's TrainConfig defaults of the code version above"))
    return rows


def caveats(analysis: Analysis, runs: Sequence[RunRecord]) -> list[str]:
    out = []
    seeds = max((len(s.best_losses) for s in analysis.series), default=0)
    if analysis.series and seeds <= 1:
        out.append(
            "One seed per LR: seed noise is assumed, not measured, and a difference smaller "
            "than the noise band may flip with another seed (run with --seeds 0 1 2)."
        )
    for s in analysis.series:
        lrs = [p.x for p in s.curve]
        if s.best_lr is not None and len(lrs) > 1 and s.best_lr in (min(lrs), max(lrs)):
            side = "lowest" if s.best_lr == min(lrs) else "highest"
            out.append(
                f"{s.name}: the best LR {s.best_lr:.3g} is the {side} of its grid, so its true "
                "optimum may lie beyond it and its best loss is an upper bound "
                "(`optarena sweep SPEC --out DIR --refine` adds half-steps past that end "
                "until the optimum is interior; runs already in the store are not repeated)."
            )
        gaps = [math.log10(b / a) for a, b in itertools.pairwise(lrs) if a > 0]
        if gaps and max(gaps) > HALF_DECADE:
            out.append(
                f"{s.name}: its LR grid has gaps of up to {max(gaps):.2f} decades, coarser "
                "than half a decade: its best LR and basin widths are interpolation between "
                "far points, and rankings against other optimizers can be grid artifacts."
            )
    threads = {
        ((r.summary or {}).get("environment") or {}).get("threads") for r in runs if r.summary
    }
    counts = sorted(threads - {None})
    if len(counts) > 1:
        out.append(
            f"Runs used different torch thread counts ({', '.join(map(str, counts))}); "
            "losses of the same config differ slightly between thread counts."
        )
    if _concurrent(runs):
        out.append(
            "Timings (tokens/s) come from runs that ran at the same time on shared cores: they "
            "describe this machine under that load, not the optimizers; use `optarena bench` "
            "for speed."
        )
    return out


def _concurrent(runs: Sequence[RunRecord]) -> bool:
    spans = sorted((r.started, r.finished) for r in runs if r.started and r.finished)
    return any(b[0] < a[1] for a, b in itertools.pairwise(spans))
