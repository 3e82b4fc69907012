"""The report's words and numbers: speedup vs AdamW, conclusions, caveats, sorting, markers."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from matplotlib.colors import to_hex
from matplotlib.figure import Figure

from optarena.analysis import Observation, analyze
from optarena.report import write_report
from optarena.report.figures import _plot_with_divergence, loss_vs_lr_figure, style
from optarena.report.story import ASSUMED_SEED_SD, caveats, noise, tell, unbounded
from optarena.report.tables import _speedup_text
from optarena.speedup import Speedup, first_step_at_or_below, fit_power_law, token_speedup
from optarena.sweep.store import Store

A, B, C = 40.0, 0.5, 3.0  # L(D) = A D^-B + C


def law(tokens):
    return A * np.asarray(tokens, dtype=float) ** -B + C


def test_power_law_fit_recovers_known_parameters_and_speedup():
    tokens = np.linspace(1e3, 5e4, 12)
    fit = fit_power_law(tokens, law(tokens))
    assert fit is not None
    assert fit.a == pytest.approx(A, rel=1e-4) and fit.b == pytest.approx(B, rel=1e-4)
    assert fit.c == pytest.approx(C, abs=1e-4)
    # an optimizer that reaches AdamW's loss at 40k tokens in 10k tokens: 4x
    value, _ = token_speedup(fit, float(law(4e4)), 1e4)
    assert value == pytest.approx(4.0, rel=1e-3)
    # a loss below AdamW's floor is beyond reach: no finite speedup
    assert token_speedup(fit, C - 0.01, 1e4)[0] is None


def test_speedup_interval_covers_the_truth_under_noise():
    rng = np.random.default_rng(1)
    tokens = np.linspace(1e3, 5e4, 20)
    fit = fit_power_law(tokens, law(tokens) + rng.normal(0, 0.003, tokens.size))
    value, interval = token_speedup(fit, float(law(2e4)), 1e4)
    assert interval is not None and interval[0] < value < interval[1]
    assert interval[0] < 2.0 < interval[1]
    assert fit_power_law([1, 2, 3], [3, 2, 1]) is None  # too few points to fit three numbers


def test_an_anchored_fit_puts_adamw_at_one_and_keeps_the_order():
    """An eval curve bent above the law (a run still at a high LR) fitted as it is says AdamW
    needs fewer tokens than it used to reach its own final loss; anchored at that loss it is
    exactly 1x, with a degenerate interval, and lower losses still give larger speedups."""
    tokens = np.linspace(5e3, 5e4, 10)
    bent = law(tokens) + 0.3 * (1 - tokens / tokens[-1])
    fit = fit_power_law(tokens, bent)
    end = (float(bent[-1]), float(tokens[-1]))
    unanchored, _ = token_speedup(fit, *end)
    assert abs(unanchored - 1.0) > 0.05  # the defect the anchor removes
    value, interval = token_speedup(fit, *end, anchor=end)
    assert value == 1.0 and interval == (1.0, 1.0)
    better, _ = token_speedup(fit, end[0] - 0.05, end[1], anchor=end)
    worse, _ = token_speedup(fit, end[0] + 0.05, end[1], anchor=end)
    assert worse < 1.0 < better
    # the same loss in half the tokens is twice the speedup
    assert token_speedup(fit, end[0], end[1] / 2, anchor=end)[0] == pytest.approx(2.0)


def test_steps_to_target_is_the_first_eval_at_or_below():
    curve = [[10, 5.0], [20, None], [30, 4.0], [40, 3.9]]
    assert first_step_at_or_below(curve, 4.0) == 30
    assert first_step_at_or_below(curve, 3.0) is None


def obs(label, lr, loss, seed=0, status="done"):
    return Observation(
        f"{label}-{lr}-{seed}",
        label,
        "m",
        label,
        {"lr": lr},
        seed,
        status,
        None if status == "diverged" else loss,
    )


def test_conclusions_group_within_noise_and_caveats():
    grid = [1e-3, 3.16e-3, 1e-2, 3.16e-2]
    observations = (
        [obs("adamw", lr, y) for lr, y in zip(grid, [5.5, 5.40, 5.45, 5.6], strict=True)]
        + [obs("adafactor", lr, y) for lr, y in zip(grid, [5.5, 5.42, 5.46, 5.7], strict=True)]
        + [obs("sgd", lr, y) for lr, y in zip(grid, [6.5, 6.3, 6.1, 6.0], strict=True)]
        + [obs("lion", 1e-4, 5.9), obs("lion", 1e-2, 0, status="diverged")]
    )
    analysis = analyze(observations)
    n = noise(analysis)
    assert not n.measured and n.sd == ASSUMED_SEED_SD
    story = tell(analysis, {})
    assert story.best_group["m"] == ["adamw", "adafactor"]  # 0.02 apart < band 0.055
    first = story.conclusions[0]
    assert first.startswith("Best final validation loss: adamw, 5.4000")
    assert "sgd (+0.600)" in first and "lion (+0.500)" in first
    assert any(c.startswith("Diverged: lion at 1 of 2 runs (LR ≥ 0.01)") for c in story.conclusions)
    notes = caveats(analysis, [])
    assert any(c.startswith("One seed per LR") for c in notes)
    assert any(c.startswith("sgd: the best LR 0.0316 is the highest") for c in notes)
    assert any(c.startswith("lion: its LR grid has gaps of up to 2.00 decades") for c in notes)
    assert not any(c.startswith("adamw: its LR grid") for c in notes)  # half decades


def test_noise_is_measured_when_points_have_seeds():
    observations = [obs("adamw", 1e-3, y, seed=s) for s, y in enumerate([5.0, 5.1, 4.9])]
    observations += [obs("adamw", 1e-2, y, seed=s) for s, y in enumerate([5.3, 5.3, 5.3])]
    n = noise(analyze(observations))
    assert n.measured and n.points == 2
    assert n.sd == pytest.approx(math.sqrt((0.02 + 0.0) / 4))  # pooled over 4 dof


def test_one_marker_per_diverged_run_on_rows_of_their_own():
    fig = Figure()
    ax = fig.add_subplot()
    _plot_with_divergence(ax, [1, 2, 3], [5.0, math.inf, math.inf], "a", 0, 6.0, [0, 3, 1], True)
    _plot_with_divergence(ax, [1, 2, 3], [5.1, math.inf, 5.2], "b", 1, 6.1, [0, 2, 0], True)
    crosses = [line for line in ax.lines if line.get_marker() == "x"]
    assert sum(len(line.get_xdata()) for line in crosses) == 6  # 4 + 2 diverged runs
    rows = {float(y) for line in crosses for y in line.get_ydata()}
    assert rows == {6.0, 6.1}  # each series on its own row: never hidden by another
    xs = [float(x) for x in crosses[0].get_xdata()]
    assert len(set(xs)) == 4  # three runs at one LR side by side


def test_thirteen_series_are_told_apart_by_colour_marker_or_line_style():
    """Matplotlib has ten colours: series 0 and 10 shared colour and marker, so a preset of
    thirteen optimizers drew three pairs of identical lines."""
    names = [f"opt{i:02d}" for i in range(13)]
    observations = [
        obs(n, lr, 5.0 + 0.01 * i + abs(k - 1) * 0.1)
        for i, n in enumerate(names)
        for k, lr in enumerate([1e-3, 3.16e-3, 1e-2])
    ]
    fig = loss_vs_lr_figure(analyze(observations).series, "t")
    (ax,) = fig.axes
    handles, labels = ax.get_legend_handles_labels()
    assert sorted(labels) == names
    looks = {(to_hex(h.get_color()), h.get_marker(), h.get_linestyle()) for h in handles}
    assert len(looks) == 13
    assert len({tuple(style(i).values()) for i in range(40)}) == 40
    assert style(3) == {"color": "C3", "marker": "^", "linestyle": "-"}  # the first ten as before


def test_no_empty_divergence_rows_above_the_losses_when_nothing_diverged():
    """The axes reserved a divergence row per series even when no run diverged: thirteen
    series left the top third of the figure empty."""
    names = [f"opt{i:02d}" for i in range(13)]
    grid = [1e-3, 3.16e-3, 1e-2]
    trained = [obs(n, lr, 5.0 + k * 0.5) for n in names for k, lr in enumerate(grid)]
    (ax,) = loss_vs_lr_figure(analyze(trained).series, "t").axes
    low, high = ax.get_ylim()
    assert high == pytest.approx(6.0 + 0.06 * 1.1) and low < 5.0  # the worst loss, a margin
    # one diverged run of the fourth series: the axes reach its row, not the thirteenth's
    (ax,) = loss_vs_lr_figure(
        analyze([*trained, obs(names[3], 3.16e-2, 0, status="diverged")]).series, "t"
    ).axes
    crosses = [line for line in ax.lines if line.get_marker() == "x"]
    (row,) = {float(y) for line in crosses for y in line.get_ydata()}
    assert row < ax.get_ylim()[1] < row + 0.1


def test_a_speedup_range_of_zero_to_infinity_reads_as_unbounded():
    """``token_speedup`` says ``[0, ∞]`` when the anchored fit cannot bound the speedup; the
    table showed it as "[≥0.00]" and the caveat on a poorly constrained fit never fired."""
    loose = Speedup("muon", 4.9, 1e5, 2.47, (0.0, math.inf), None, None)
    assert unbounded(loose)
    assert _speedup_text(loose) == "2.47 [fit too uncertain]"
    assert not unbounded(Speedup("lion", 5.5, 1e5, 0.8, (0.5, math.inf), None, None))
    assert _speedup_text(Speedup("lion", 5.5, 1e5, 0.8, (0.5, math.inf), None, None)) == (
        "0.80 [≥0.50]"
    )
    assert unbounded(Speedup("sgd", 6.0, 1e5, 0.5, (-math.inf, math.inf), None, None))
    assert not unbounded(Speedup("sgd", 6.0, 1e5, 0.5, None, None, None))


def test_report_sorted_by_loss_with_story_and_speedup(tmp_path):
    store = Store(tmp_path)
    per_step = 1000
    specs = {"sgd": (1.0, 0.8), "adamw": (1e-3, 1.0), "lion": (1e-4, 2.0)}  # label: lr, speed
    rows = []
    for label, (lr, _) in specs.items():
        config = {"optimizer": label, "lr": lr, "seed": 0, "batch_size": 10, "seq_len": 100}
        rows.append((label, config, {"lr": lr}))
    store.add_runs([(f"id-{label}", c, label, p) for label, c, p in rows])
    for label, (_, speed) in specs.items():
        steps = list(range(10, 101, 10))
        curve = [[s, float(law(s * per_step * speed))] for s in steps]
        assert store.claim(f"id-{label}")
        store.finish(
            f"id-{label}",
            {
                "final_val_loss": curve[-1][1],
                "diverged": False,
                "eval_curve": curve,
                "tokens": 100 * per_step,
                "steps": 100,
                "params": 10,
                "optimizer_state_bytes": 80,
                "environment": {"threads": 2, "torch": "x"},
            },
        )
    store.close()
    page = write_report(tmp_path)
    summary = json.loads((tmp_path / "report" / "summary.json").read_text())
    assert [r["optimizer"] for r in summary] == ["lion", "adamw", "sgd"]
    speed = {r["optimizer"]: r["token_speedup_vs_adamw"] for r in summary}
    assert speed["lion"] == pytest.approx(2.0, rel=1e-3)
    assert speed["sgd"] == pytest.approx(0.8, rel=1e-3)
    assert speed["adamw"] == pytest.approx(1.0, rel=1e-6)
    steps = {r["optimizer"]: r["steps_to_target"] for r in summary}
    assert steps == {"lion": 50, "adamw": 100, "sgd": None}
    told = json.loads((tmp_path / "report" / "story.json").read_text())
    text = page.read_text()
    for sentence in told["conclusions"]:
        assert sentence.replace("'", "&#x27;") in text
    assert "lion 2.00×" in told["conclusions"][-1]
    setup = {row["what"]: row["value"] for row in told["setup"]}
    assert setup["threads"] == "2" and setup["torch"] == "x"
    assert (tmp_path / "report" / "speedup-vs-adamw.svg").is_file()


def _finished(store, run_id, config, label, final, curve, steps, per_step):
    store.add_runs([(run_id, config, label, {"lr": config["lr"]})])
    assert store.claim(run_id)
    store.finish(
        run_id,
        {
            "final_val_loss": final,
            "diverged": False,
            "eval_curve": curve,
            "tokens": steps * per_step,
            "steps": steps,
            "params": 10,
        },
    )


@pytest.mark.parametrize("n_lengths", [5, 2])
def test_speedup_fit_from_adamw_runs_of_several_lengths(tmp_path, n_lengths):
    """AdamW at several lengths, each with a worse LR beside its best: the final losses of the
    best runs lie on the power law, the eval curves of each run bend above it (a run still at
    a high LR). With four lengths or more the fit uses the final losses and recovers the law;
    with two it uses the curves, and says so."""
    store = Store(tmp_path)
    per_step = 1000
    lengths = [20, 40, 80, 160, 320][:n_lengths]
    for steps in lengths:
        for lr, extra in ((1e-3, 0.0), (1e-2, 0.05)):  # 1e-2 is worse at every length
            final = float(law(steps * per_step)) + extra
            curve = [
                [s, float(law(s * per_step)) + extra + 0.3 * (1 - s / steps)]
                for s in range(steps // 5, steps + 1, steps // 5)
            ]
            config = {"optimizer": "adamw", "lr": lr, "seed": 0, "steps": steps}
            _finished(store, f"adamw-{steps}-{lr}", config, "adamw", final, curve, steps, per_step)
    # lion reaches, in 40 steps, AdamW's loss at 160 steps: 4x the tokens
    lion_curve = [[s, float(law(4 * s * per_step))] for s in range(8, 41, 8)]
    config = {"optimizer": "lion", "lr": 1e-4, "seed": 0, "steps": 40}
    _finished(store, "lion", config, "lion", lion_curve[-1][1], lion_curve, 40, per_step)
    store.close()
    write_report(tmp_path)
    summary = {
        r["optimizer"]: r for r in json.loads((tmp_path / "report" / "summary.json").read_text())
    }
    lion = summary["lion"]
    told = json.loads((tmp_path / "report" / "story.json").read_text())
    if n_lengths == 5:
        assert lion["speedup_fit"] == "final losses of AdamW's best runs at 5 training lengths"
        assert lion["token_speedup_vs_adamw"] == pytest.approx(4.0, rel=1e-3)
        assert "fitted to the final losses of AdamW's best runs at 5" in " ".join(
            told["conclusions"]
        )
    else:
        assert lion["speedup_fit"] == (
            "eval curves of AdamW's best runs at 2 training lengths, anchored at its final loss"
        )
        # the fit is to both best runs' curves (lr 1e-3), in tokens, and not to the worse LR's
        xs = [s * per_step for steps in lengths for s in range(steps // 5, steps + 1, steps // 5)]
        ys = [
            float(law(s * per_step)) + 0.3 * (1 - s / steps)
            for steps in lengths
            for s in range(steps // 5, steps + 1, steps // 5)
        ]
        longest = lengths[-1] * per_step  # the anchor: AdamW's best final loss at 40 steps
        expected, _ = token_speedup(
            fit_power_law(xs, ys),
            lion_curve[-1][1],
            40 * per_step,
            anchor=(float(law(longest)), longest),
        )
        assert lion["token_speedup_vs_adamw"] == pytest.approx(expected, rel=1e-6)
        assert abs(expected - 4.0) > 0.5  # bent curves are not the law: why endpoints win


def test_the_baseline_is_plain_adamw_not_a_variant_of_it(tmp_path):
    """Cautious AdamW's optimizer is also ``adamw``; the speedups are measured against the
    series labelled ``adamw`` whichever comes first, and the variant gets its own speedup."""
    store = Store(tmp_path)
    per_step = 1000
    for label, speed in (("adamw-cautious", 2.0), ("adamw", 1.0)):
        curve = [[s, float(law(s * per_step * speed))] for s in range(10, 101, 10)]
        config = {"optimizer": "adamw", "lr": 1e-3, "seed": 0, "cautious": speed > 1}
        config["hparams"] = {"cautious": speed > 1}
        _finished(store, label, config, label, curve[-1][1], curve, 100, per_step)
    store.close()
    write_report(tmp_path)
    # the setup lists each series' hyperparameters under its label, not both under "adamw"
    told = json.loads((tmp_path / "report" / "story.json").read_text())
    setup = {row["what"]: row["value"] for row in told["setup"]}
    assert setup["adamw hyperparameters"] == "cautious=False"
    assert setup["adamw-cautious (adamw) hyperparameters"] == "cautious=True"
    rows = json.loads((tmp_path / "report" / "summary.json").read_text())
    speed = {r["optimizer"]: r["token_speedup_vs_adamw"] for r in rows}
    assert len(speed) == 2, rows
    assert speed["adamw"] == pytest.approx(1.0, rel=1e-9)
    assert speed["adamw-cautious"] == pytest.approx(2.0, rel=1e-3)
