"""Sweep specs: grids, log ranges, run ids and one-line validation errors."""

from __future__ import annotations

import itertools
import math

import pytest

from optarena.errors import UserError
from optarena.sweep.spec import load_spec, parse_spec, preset_names, run_id

SGD = '[[grid]]\noptimizer = "sgd"\n'
KEYS = {"model", "steps", "batch_size", "seq_len", "lr", "data", "eval_every", "warmup", "seed"}
OPTIMIZERS = {"adamw", "sgd", "lion", "signum", "adam-mini"}


def parse(text: str, **kw):
    kw.setdefault("config_keys", KEYS)
    kw.setdefault("optimizers", OPTIMIZERS)
    return parse_spec(text, source="t.toml", **kw)


BASIC = """
[sweep]
name = "basic"
seeds = [0, 1]

[base]
model = "micro"
steps = 20

[[grid]]
optimizer = "adamw"
lr = {from = 1e-4, to = 1, per_decade = 2}
hparams.betas = {value = [0.9, 0.95]}

[[grid]]
optimizer = "sgd"
lr = [0.1, 1.0]
hparams.momentum = [0.9, 0.98]
seeds = [7]
"""


def test_cartesian_product_with_half_decade_range():
    spec = parse(BASIC)
    runs = spec.runs()
    adam = [r for r in runs if r.config["optimizer"] == "adamw"]
    lrs = sorted({r.config["lr"] for r in adam})
    # 1e-4 .. 1 in half decades: 9 values, both ends included, each sqrt(10) apart
    assert len(lrs) == 9
    assert lrs[0] == pytest.approx(1e-4) and lrs[-1] == pytest.approx(1.0)
    for a, b in itertools.pairwise(lrs):
        assert b / a == pytest.approx(math.sqrt(10))
    assert len(adam) == 9 * 2  # two seeds from [sweep]
    assert {r.config["seed"] for r in adam} == {0, 1}
    assert all(r.config["hparams"]["betas"] == [0.9, 0.95] for r in adam)
    sgd = [r for r in runs if r.config["optimizer"] == "sgd"]
    assert len(sgd) == 2 * 2 * 1
    assert {(r.config["lr"], r.config["hparams"]["momentum"]) for r in sgd} == {
        (0.1, 0.9),
        (0.1, 0.98),
        (1.0, 0.9),
        (1.0, 0.98),
    }
    assert all(r.config["steps"] == 20 and r.config["model"] == "micro" for r in runs)
    assert sgd[0].point.keys() == {"lr", "hparams.momentum"}
    assert len({r.id for r in runs}) == len(runs)


def test_num_range_and_fixed_values():
    spec = parse(
        """
[[grid]]
optimizer = "lion"
lr = {from = 1e-5, to = 1e-3, num = 3}
steps = 5
"""
    )
    assert [r.config["lr"] for r in spec.runs()] == pytest.approx([1e-5, 1e-4, 1e-3])
    assert all(r.config["steps"] == 5 and r.config["seed"] == 0 for r in spec.runs())
    assert spec.runs()[0].point == {"lr": 1e-5}


def test_seeds_option_replaces_every_grid_seeds():
    spec = parse(BASIC, seeds=[3, 4, 5])
    assert {r.config["seed"] for r in spec.runs()} == {3, 4, 5}
    assert len(spec.runs()) == (9 + 4) * 3
    with pytest.raises(UserError, match="--seeds: seeds lists a seed twice"):
        parse(BASIC, seeds=[1, 1])


def test_beta1_sweep_folds_into_betas():
    spec = parse(
        """
[[grid]]
optimizer = "adamw"
lr = 1e-3
hparams.betas = {value = [0.9, 0.95]}
hparams.beta1 = [0.0, 0.5]
"""
    )
    assert [r.config["hparams"]["betas"] for r in spec.runs()] == [[0.0, 0.95], [0.5, 0.95]]
    assert [r.point for r in spec.runs()] == [{"hparams.beta1": 0.0}, {"hparams.beta1": 0.5}]


def test_run_ids_are_stable_and_ignore_execution_keys():
    config = {"optimizer": "adamw", "lr": 0.001, "steps": 10, "hparams": {"betas": [0.9, 0.95]}}
    same = {"hparams": {"betas": (0.9, 0.95)}, "steps": 10.0, "lr": 0.001, "optimizer": "adamw"}
    assert run_id(config) == run_id(same)
    assert run_id(config) == run_id({**config, "out": "/tmp/x", "resume": True, "progress": 0})
    assert run_id(config) != run_id({**config, "lr": 0.002})
    assert len(run_id(config)) == 16
    # ids do not depend on anything outside the config (process, time, grid order)
    assert {r.id for r in parse(BASIC).runs()} == {r.id for r in parse(BASIC).runs()}


def test_adding_values_keeps_old_ids():
    small = parse('[[grid]]\noptimizer = "adamw"\nlr = [0.1, 0.01]\n')
    bigger = parse('[[grid]]\noptimizer = "adamw"\nlr = [0.001, 0.1, 0.01]\n')
    old, new = {r.id for r in small.runs()}, {r.id for r in bigger.runs()}
    assert old < new and len(new - old) == 1


def test_overrides_and_lr_scaling():
    spec = parse(
        """
[sweep]
lr_reference_width = 1024
[base]
model = "micro"
[[grid]]
optimizer = "adamw"
lr = [1e-3]
""",
        overrides=["steps=7", "model=micro"],
        model_widths={"micro": 64},
    )
    (run,) = spec.runs()
    assert run.config["steps"] == 7
    # 1024/64 = 16 = 10^1.2 -> snapped to 10^1.0 (two half decades)
    assert run.config["lr"] == pytest.approx(1e-2)


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ("[[grid]\noptimizer='adamw'", "not valid TOML"),
        ("[base]\nsteps = 3\n", "no [[grid]] table"),
        (
            '[[grid]]\noptimizer = "adamm"\nlr = 1e-3\n',
            "unknown optimizer 'adamm'; did you mean 'adamw'",
        ),
        ("[[grid]]\nlr = 1e-3\n", "[[grid]] #1 has no optimizer"),
        (SGD + "", "sets no lr"),
        (
            SGD + "lr = {from = 1, to = 1e-3, per_decade = 2}\n",
            "[[grid]] #1 (optimizer 'sgd'), key 'lr': range has from=1 > to=0.001; swap them",
        ),
        (
            SGD + "lr = {from = 0, to = 1, per_decade = 2}\n",
            "cannot include 0",
        ),
        (SGD + "lr = {from = 1e-3, to = 1}\n", "exactly one of"),
        (SGD + "lr = {from = 1e-3, to = 1, per_decad = 2}\n", "'per_decad'"),
        (SGD + "lr = []\n", "empty list"),
        (
            SGD + "lr = 1.0\nstep = 3\n",
            "unknown training key 'step'; did you mean 'steps'",
        ),
        ('[base]\nout = "x"\n[[grid]]\noptimizer = "sgd"\nlr = 1.0\n', "'out' is set by the sweep"),
        (
            '[base]\noptimizer = "sgd"\n[[grid]]\noptimizer = "sgd"\nlr = 1.0\n',
            "belongs in each [[grid]]",
        ),
        (SGD + "lr = 1.0\nseeds = [1, 1]\n", "seed twice"),
        (SGD + 'lr = 1.0\nseeds = "0"\n', "seeds must be a list"),
        (SGD + "lr = [1.0, 1.0]\n", "listed twice"),
        (
            '[sweep]\nnmae = "x"\n[[grid]]\noptimizer = "sgd"\nlr = 1.0\n',
            "[sweep] has unknown key 'nmae'",
        ),
        ('[[grid]]\noptimizer = "adamw"\nlr = 1.0\nhparams.beta1 = [0.5]\n', "needs its partner"),
        ("[grids]\nx = 1\n", "unknown top-level table or key 'grids'"),
    ],
)
def test_bad_specs_give_one_line_errors(text, needle):
    with pytest.raises(UserError) as info:
        parse(text)
    message = str(info.value)
    assert needle in message
    assert "\n" not in message
    assert message.startswith("t.toml")


def test_second_table_is_named():
    text = BASIC.replace(
        "hparams.momentum = [0.9, 0.98]", "hparams.momentum = {from = 0.9, to = 0.1, num = 2}"
    )
    with pytest.raises(
        UserError, match=r"\[\[grid\]\] #2 \(optimizer 'sgd'\), key 'hparams.momentum'"
    ):
        parse(text)


def test_presets_all_parse():
    names = preset_names()
    assert {"demo", "lr", "beta1", "beta2", "eps", "weight-decay", "warmup", "hybrids"} <= set(
        names
    )
    from dataclasses import fields

    from optarena.commands.sweep import model_widths
    from optarena.optim import available
    from optarena.train import TrainConfig

    keys = {f.name for f in fields(TrainConfig)}
    for name in names:
        spec = load_spec(
            name, config_keys=keys, optimizers=available(), model_widths=model_widths()
        )
        assert spec.runs(), name
        for run in spec.runs():  # every run is a valid training config
            TrainConfig.from_dict(run.config)


def test_missing_file_and_unknown_preset(tmp_path):
    with pytest.raises(UserError, match="not found"):
        load_spec(tmp_path / "nope.toml")
    with pytest.raises(
        UserError, match=r"no sweep spec file or preset named 'nope'; presets: .*demo"
    ):
        load_spec("nope")


@pytest.mark.parametrize("name", ["../../x", "/tmp/x", "a/b", "..", ".", "", "a\\b"])
def test_sweep_name_that_is_not_one_folder_is_refused(name):
    text = BASIC.replace('name = "basic"', f"name = {name!r}".replace("'", '"'))
    text = text.replace('"a\\b"', "'a\\b'")  # a TOML literal string keeps the backslash
    with pytest.raises(UserError, match=r"\[sweep\] name .* must be one folder name"):
        parse(text)


def test_sweep_name_of_one_folder_is_kept():
    spec = parse(BASIC.replace('name = "basic"', 'name = "lr sweep.v2_b-1"'))
    assert spec.name == "lr sweep.v2_b-1"


def _preset(name: str):
    from dataclasses import fields

    from optarena.commands.sweep import model_widths
    from optarena.optim import available
    from optarena.train import TrainConfig

    keys = {f.name for f in fields(TrainConfig)}
    return load_spec(name, config_keys=keys, optimizers=available(), model_widths=model_widths())


MODERN = {
    "adamw", "adamw-cautious", "adam-mini", "lion", "nadamw", "adopt", "ademamix", "mars",
    "schedule-free", "soap", "kron", "muon", "normuon",
}  # fmt: skip


def test_modern_preset_sweeps_lr_and_decay_for_every_optimizer_of_2026():
    runs = _preset("modern").runs()
    by_label: dict[str, list] = {}
    for r in runs:
        by_label.setdefault(r.label, []).append(r)
    assert set(by_label) == MODERN
    centre = {}
    for label, group in by_label.items():
        lrs = sorted({r.config["lr"] for r in group})
        decays = {r.config["hparams"]["weight_decay"] for r in group}
        assert len(lrs) == 4 and len(decays) == 2 and 0.0 in decays, label
        assert len(group) == len(lrs) * len(decays), label  # LR x decay, jointly
        for a, b in itertools.pairwise(lrs):
            assert b / a == pytest.approx(math.sqrt(10), rel=1e-2), label
        centre[label] = math.sqrt(lrs[0] * lrs[-1])
    assert all(r.config["hparams"]["cautious"] for r in by_label["adamw-cautious"])
    # grids placed from each method's optimum relative to AdamW's: Muon's is its own scale
    assert centre["muon"] / centre["adamw"] == pytest.approx(math.sqrt(10), rel=1e-2)
    assert centre["normuon"] == pytest.approx(centre["muon"], rel=1e-2)
    assert centre["lion"] / centre["adamw"] == pytest.approx(0.1, rel=1e-2)
    for label in ("adam-mini", "nadamw", "adopt", "ademamix", "soap", "adamw-cautious"):
        assert centre[label] == pytest.approx(centre["adamw"], rel=1e-2), label
    muon = by_label["muon"][0].config["hparams"]
    assert muon["adamw_lr"] == pytest.approx(centre["adamw"], rel=1e-2)  # AdamW's centre
    assert all(r.config["schedule"] == "constant" for r in by_label["schedule-free"])
    assert all(r.config.get("schedule", "cosine") != "constant" for r in by_label["adamw"])


@pytest.mark.parametrize("preset", ["demo", "lr"])
def test_demo_and_lr_presets_include_muon_and_soap(preset: str):
    runs = _preset(preset).runs()
    lrs = {
        name: sorted({r.config["lr"] for r in runs if r.label == name})
        for name in ("adamw", "muon", "soap")
    }
    assert all(len(v) >= 5 for v in lrs.values()), lrs
    assert lrs["soap"] == lrs["adamw"]  # SOAP on AdamW's grid
    assert lrs["muon"][0] > lrs["adamw"][0] * 3  # Muon's grid is its own, higher
