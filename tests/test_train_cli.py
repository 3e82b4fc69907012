"""``optarena train`` on the command line: outputs, flags, and one-line errors with exit code 2."""

from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from optarena.cli import main
from optarena.commands.train import parse_sets, parse_value
from optarena.errors import UserError

SRC = Path(__file__).resolve().parents[1] / "src"
FAST = ["--steps", "4", "--batch-size", "4", "--seq-len", "32", "--threads", "1", "--no-progress"]


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Shared with the other test modules (same folder), so corpora are tokenized once."""
    return tmp_path_factory.getbasetemp() / "optarena-cache"


@pytest.fixture(autouse=True)
def _cache_env(cache_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OPTARENA_CACHE", str(cache_dir))


def cli(*args: str) -> subprocess.CompletedProcess:
    """The real command in a fresh interpreter."""
    env = {**os.environ, "PYTHONPATH": str(SRC)}
    return subprocess.run(
        [sys.executable, "-m", "optarena", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )


def test_train_writes_summary_checkpoints_and_metrics(tmp_path: Path) -> None:
    out = tmp_path / "run"
    result = cli(
        "train",
        "--optimizer",
        "adamw",
        "--lr",
        "3e-3",
        *FAST,
        "--out",
        str(out),
        "--set",
        "betas=0.9,0.95",
        "--set",
        "model.norm=rmsnorm",
        "--checkpoint-every",
        "2",
    )
    assert result.returncode == 0, result.stderr
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 4 and summary["diverged"] is False
    assert summary["config"]["hparams"] == {"betas": [0.9, 0.95]}
    assert summary["model_config"]["norm"] == "rmsnorm"
    assert sorted(p.name for p in (out / "checkpoints").glob("*.pt")) == [
        "step-00000002.pt",
        "step-00000004.pt",
    ]
    assert (out / "metrics.jsonl").read_text().count("val_loss") == 1
    assert "final_val_loss" in result.stdout


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--optimizer", "adamz"], "unknown optimizer 'adamz'"),
        (["--optimizer", "adamw", "--set", "betas"], "malformed --set"),
    ],
)
def test_bad_input_in_a_real_process(args: list[str], message: str) -> None:
    result = cli("train", *args, *FAST)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"optarena: error: {message}"), lines
    assert "Traceback" not in result.stderr


def _one_line_error(capsys: pytest.CaptureFixture, argv: list[str]) -> str:
    code = main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert len(err) == 1 and err[0].startswith("optarena: error: "), err
    return err[0]


def test_unknown_model(capsys) -> None:
    line = _one_line_error(capsys, ["train", "--optimizer", "adamw", "--model", "huge", *FAST])
    assert "unknown model 'huge'" in line and "micro" in line


def test_missing_data_file(capsys, tmp_path: Path) -> None:
    missing = tmp_path / "nope.txt"
    line = _one_line_error(capsys, ["train", "--optimizer", "adamw", "--data", str(missing), *FAST])
    assert str(missing) in line and "does not exist" in line


def test_empty_corpus(capsys, tmp_path: Path) -> None:
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    line = _one_line_error(capsys, ["train", "--optimizer", "adamw", "--data", str(empty), *FAST])
    assert "empty" in line


def test_unusable_device(capsys, tmp_path: Path) -> None:
    argv = ["train", "--optimizer", "adamw", *FAST, "--out", str(tmp_path / "run")]
    line = _one_line_error(capsys, [*argv, "--device", "cuda:99"])
    assert "device 'cuda:99' is not usable here" in line and "--device cpu or auto" in line
    assert "device 'cude'" in _one_line_error(capsys, [*argv, "--device", "cude"])
    assert not (tmp_path / "run").exists()


def test_unknown_hyperparameter(capsys) -> None:
    line = _one_line_error(capsys, ["train", "--optimizer", "lion", "--set", "rho=1", *FAST])
    assert "rho" in line


def test_config_file_with_unknown_key(capsys, tmp_path: Path) -> None:
    config = tmp_path / "run.toml"
    config.write_text('optimizer = "adamw"\nsteps = 4\nlearning_rate = 1e-3\n')
    line = _one_line_error(capsys, ["train", "--config", str(config)])
    assert "'learning_rate'" in line
    config.write_text("optimizer = \n")
    assert "not valid TOML" in _one_line_error(capsys, ["train", "--config", str(config)])


def _files(folder: Path) -> dict[Path, bytes]:
    return {p: p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_resume_of_a_finished_run_is_a_no_op(capsys, tmp_path: Path) -> None:
    out = tmp_path / "run"
    argv = ["train", "--optimizer", "adamw", *FAST, "--out", str(out)]
    assert main(argv) == 0
    capsys.readouterr()
    before = _files(out)
    assert main([*argv, "--resume"]) == 0
    err = capsys.readouterr().err
    assert "already finished (4 steps); nothing to resume" in err, err
    assert _files(out) == before  # not a byte rewritten: no second val_loss, same summary


def test_corrupt_checkpoints_start_the_run_afresh(capsys, tmp_path: Path) -> None:
    out = tmp_path / "run"
    argv = ["train", "--optimizer", "adamw", *FAST, "--out", str(out), "--checkpoint-every", "2"]
    assert main(argv) == 0
    capsys.readouterr()
    summary = json.loads((out / "summary.json").read_text())
    (out / "summary.json").unlink()  # as if killed before the summary
    for ckpt in (out / "checkpoints").glob("*.pt"):
        ckpt.write_bytes(ckpt.read_bytes()[:1000])  # truncated
    assert main([*argv, "--resume"]) == 0
    err = [x for x in capsys.readouterr().err.splitlines() if x.strip()]
    assert all(x.startswith("optarena: ") for x in err), err  # warnings are one line too
    assert any("skipping checkpoint" in x and "step-00000004.pt" in x for x in err), err
    assert any("no valid checkpoint" in x and "starting from scratch" in x for x in err), err
    again = json.loads((out / "summary.json").read_text())
    assert again["resumed_from"] is None
    assert again["final_val_loss"] == summary["final_val_loss"]


def test_config_file_and_flags(tmp_path: Path, capsys) -> None:
    config = tmp_path / "run.toml"
    config.write_text(
        'optimizer = "signum"\nlr = 1e-3\nsteps = 50\nbatch_size = 4\nseq_len = 32\n'
        "threads = 1\nprogress = false\n[hparams]\nmomentum = 0.8\n"
    )
    out = tmp_path / "run"
    assert main(["train", "--config", str(config), "--steps", "3", "--out", str(out)]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 3  # the flag wins over the file
    assert summary["config"]["optimizer"] == "signum"
    assert summary["config"]["hparams"] == {"momentum": 0.8}


def test_parse_set_values() -> None:
    assert parse_value("0.9,0.95") == (0.9, 0.95)
    assert parse_value("3") == 3 and isinstance(parse_value("3"), int)
    assert parse_value("1e-8") == 1e-8
    assert parse_value("true") is True and parse_value("None") is None
    assert parse_value("adamw") == "adamw"
    hp, model = parse_sets(["eps=1e-15", "model.n_kv_head=2"])
    assert hp == {"eps": 1e-15} and model == {"n_kv_head": 2}
    for bad in ("eps", "=3", "eps=", "a b=1"):
        with pytest.raises(UserError, match="malformed"):
            parse_sets([bad])


@pytest.mark.parametrize(
    ("command", "config"),
    [
        ("train", "optarena.train:TrainConfig"),
        ("finetune", "optarena.posttrain.sft:FinetuneConfig"),
        ("reward", "optarena.posttrain.reward_model:RewardConfig"),
        ("rlhf", "optarena.posttrain.rlhf:RLHFConfig"),
    ],
)
def test_every_run_command_shares_the_run_flags_and_states_its_own_default_schedule(
    command: str, config: str, capsys: pytest.CaptureFixture
) -> None:
    module, name = config.split(":")
    default = getattr(importlib.import_module(module), name)().schedule
    with pytest.raises(SystemExit) as exit_info:
        main([command, "--help"])
    assert exit_info.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    assert f"wsd (default: {default})" in text
    for flag in ("--checkpoint-every", "--resume", "--no-progress", "--set KEY=VALUE", "--out"):
        assert flag in text, (command, flag)


@pytest.mark.parametrize(
    ("command", "build"),
    [
        ("train", "optarena.commands.train:build_config"),
        ("finetune", "optarena.commands.finetune:build_config"),
        ("reward", "optarena.commands.rlhf:build_values"),
        ("rlhf", "optarena.commands.rlhf:build_values"),
    ],
)
def test_the_shared_run_flags_reach_every_commands_config(command: str, build: str) -> None:
    from optarena.cli import build_parser

    module, name = build.split(":")
    flags = ["--optimizer", "adamw", "--schedule", "wsd", "--warmup", "0.25", "--threads", "1"]
    flags += ["--grad-clip", "0", "--checkpoint-every", "7", "--out", "somewhere", "--resume"]
    flags += [] if command == "train" else ["--from", "a-run"]
    args = build_parser().parse_args([command, *flags, "--no-progress", "--set", "eps=1e-6"])
    values = getattr(importlib.import_module(module), name)(args)
    assert values["schedule"] == "wsd" and values["warmup"] == 0.25 and values["threads"] == 1
    assert values["grad_clip"] is None and values["checkpoint_every"] == 7
    assert values["out"] == "somewhere" and values["resume"] and values["progress"] is False
    assert values["hparams"] == {"eps": 1e-6}


def test_list_shows_each_optimizer_with_its_family_class_and_reference(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from optarena.optim import REGISTRY

    monkeypatch.setenv("COLUMNS", "400")  # one table row per optimizer
    assert main(["list"]) == 0
    rows = {
        line.split("│")[1].strip(): line
        for line in capsys.readouterr().out.splitlines()
        if line.count("│") > 2
    }
    assert set(REGISTRY) <= set(rows)
    for name, e in REGISTRY.items():
        cells = [c.strip() for c in rows[name].split("│")[1:-1]]
        assert cells[1] == e.family
        assert cells[2] == (
            f"optarena.optim.{e.class_name}" if e.class_name else f"create({name!r}, ...)"
        )
        assert cells[4] == (e.reference or "-")


def test_list_in_a_narrow_terminal_keeps_every_description(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Where the table's rows do not fit, each optimizer gets a block of its own: its name,
    family, class, description and reference each whole on a line (a table would squeeze the
    description and reference columns to nothing)."""
    from optarena.optim import REGISTRY

    monkeypatch.setenv("COLUMNS", "80")
    assert main(["list"]) == 0
    lines = capsys.readouterr().out.splitlines()
    for name, e in REGISTRY.items():
        cls = f"optarena.optim.{e.class_name}" if e.class_name else f"create({name!r}, ...)"
        at = lines.index(f"{name} ({e.family}): {cls}")
        assert lines[at + 1] == f"    {e.description}"
        assert lines[at + 2] == f"    checked against: {e.reference or '-'}"
