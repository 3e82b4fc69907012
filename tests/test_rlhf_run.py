"""Reward-model training and RLHF runs end to end on a tiny model: the reward model beats chance
on held-out pairs, ReMax raises the held-out reward, a resumed run is bit-exact, and bad input
is one line, exit 2, with nothing written."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from optarena import atomic
from optarena.cli import main
from optarena.posttrain import builtin
from optarena.posttrain.reward_model import load_pairs, load_reward_model, train_reward_model
from optarena.posttrain.rlhf import paired_gain, rlhf
from optarena.run_log import read_records

pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("rlhf")


@pytest.fixture(scope="module")
def pretrained(root: Path) -> Path:
    """A tiny `optarena train` folder, pre-trained on the built-in task's dialogues."""
    from optarena.train import train

    torch.set_num_threads(1)
    corpus = root / "corpus.txt"
    lines = [
        f"User: {e.messages[-1][1]}\nAssistant: {e.answer}"
        for e in builtin.examples("train")[:2000]
    ]
    corpus.write_text("\n\n".join(lines), encoding="utf-8")
    out = root / "pre"
    train(
        {
            "optimizer": "adamw",
            "lr": 3e-3,
            "model": "micro",
            "model_overrides": {"d_model": 32, "n_layer": 1},
            "vocab_size": 300,
            "data": str(corpus),
            "steps": 200,
            "batch_size": 16,
            "seq_len": 48,
            "eval_windows": 4,
            "progress": False,
            "threads": 1,
            "out": str(out),
            "cache_dir": str(root / "cache"),
        }
    )
    return out


def reward_config(pretrained: Path, out: Path, **kw) -> dict:
    return {
        "optimizer": "adamw",
        "lr": 1e-3,
        "pretrained": str(pretrained),
        "steps": 80,
        "batch_size": 32,
        "eval_pairs": 256,
        "progress": False,
        "threads": 1,
        "out": str(out),
        **kw,
    }


@pytest.fixture(scope="module")
def reward_dir(root: Path, pretrained: Path) -> Path:
    out = root / "reward"
    train_reward_model(reward_config(pretrained, out))
    return out


def rlhf_config(pretrained: Path, reward: Path, out: Path, **kw) -> dict:
    return {
        "optimizer": "adamw",
        "lr": 1e-3,
        "pretrained": str(pretrained),
        "reward_model": str(reward),
        "steps": 30,
        "batch_size": 16,
        "max_new_tokens": 8,
        "eval_prompts": 64,
        "progress": False,
        "threads": 1,
        "log_every": 1,
        "out": str(out),
        **kw,
    }


def test_reward_model_beats_chance_on_held_out_pairs(reward_dir: Path) -> None:
    summary = json.loads((reward_dir / "summary.json").read_text())
    held_out = summary["pairs"]["held_out"]
    assert held_out == 256 and summary["pairs"]["train"] > 1000
    # chance is 1/2; 0.6 is 3.2 binomial standard deviations above it at 256 pairs
    assert summary["accuracy"] >= 0.6
    # the loaded model scores the held-out pairs as the run did
    loaded = load_reward_model(reward_dir, None)
    from optarena.posttrain.pretrained import load_pretrained
    from optarena.posttrain.reward_model import encode_pairs

    tok = load_pretrained(summary["pretrained"]["path"]).tokenizer
    _, val = load_pairs("builtin", 0)
    pairs = encode_pairs(val[:held_out], tok, 48, "builtin")
    tokens, lengths = pairs.batch(range(held_out), tok.pad_id)
    with torch.no_grad():
        chosen, rejected = loaded.model.eval()(tokens, lengths).chunk(2)
    assert float((chosen > rejected).double().mean()) == summary["accuracy"]


def test_rlhf_raises_the_held_out_reward(root: Path, pretrained: Path, reward_dir: Path) -> None:
    summary = rlhf(rlhf_config(pretrained, reward_dir, root / "rl"))
    gain = summary["reward_gain"]
    assert gain["low"] > 0, gain  # the whole 95% interval above zero
    assert summary["final_reward"] == pytest.approx(summary["initial"]["reward"] + gain["mean"])
    records = read_records(root / "rl" / "metrics.jsonl")
    steps = [r for r in records if "baseline_reward" in r]
    assert len(steps) == 30
    assert all(r["kl"] == r["kl"] and r["response_length"] >= 1 for r in steps)
    assert steps[0]["kl"] == pytest.approx(0.0, abs=1e-6)  # the policy is the reference
    assert summary["reward"]["held_out_accuracy"] >= 0.6
    assert summary["final"]["accuracy"] >= 0.0 and summary["final"]["kl"] > 0


def untimed(records: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if k != "tokens_per_second"} for r in records]


def test_rlhf_resume_is_bit_exact(root: Path, pretrained: Path, reward_dir: Path) -> None:
    out = root / "resume"
    config = rlhf_config(
        pretrained, reward_dir, out, steps=6, checkpoint_every=3, keep_checkpoints=0
    )
    full = rlhf(config)
    before = untimed(read_records(out / "metrics.jsonl"))
    final = torch.load(out / "checkpoints" / "step-00000006.pt", weights_only=True)
    for path in (out / "checkpoints").glob("step-00000006.*"):
        path.unlink()
    (out / "summary.json").unlink()
    resumed = rlhf({**config, "resume": True})
    assert resumed["resumed_from"].endswith("step-00000003.pt")
    assert untimed(read_records(out / "metrics.jsonl")) == before  # every number but the time
    again = torch.load(out / "checkpoints" / "step-00000006.pt", weights_only=True)
    for key, value in final["model"].items():
        assert torch.equal(again["model"][key], value), key
    assert resumed["eval_rewards"] == full["eval_rewards"]
    assert resumed["initial"] == full["initial"]


def test_exact_match_reward_runs_on_the_builtin_task(root: Path, pretrained: Path) -> None:
    config = rlhf_config(pretrained, root, root / "em", steps=2, eval_prompts=8)
    del config["reward_model"]
    summary = rlhf({**config, "reward": "exact-match"})
    assert summary["reward"] == {"kind": "exact-match"}
    # the exact-match reward of a greedy response is its accuracy
    assert summary["final"]["reward"] == summary["final"]["accuracy"]


def test_paired_gain_interval() -> None:
    gain = paired_gain([0.0, 1.0, 0.0, 1.0], [1.0, 1.0, 1.0, 2.0])
    # differences 1, 0, 1, 1: mean 0.75, sd 0.5, t(0.975, 3) = 3.182
    assert gain["mean"] == 0.75
    assert gain["high"] - gain["mean"] == pytest.approx(3.182446 * 0.5 / 2, rel=1e-6)


# --------------------------------------------------------------------------- bad input


def cli(argv: list[str], capsys) -> tuple[int, str]:
    code = main(argv)
    return code, capsys.readouterr().err.strip()


def test_bad_input_is_one_line_and_writes_nothing(
    root: Path, pretrained: Path, reward_dir: Path, tmp_path: Path, capsys
) -> None:
    out = tmp_path / "out"
    base = ["--optimizer", "adamw", "--out", str(out), "--no-progress", "--steps", "1"]

    # a reward model that is not one
    code, err = cli(
        ["rlhf", "--from", str(pretrained), "--reward-model", str(pretrained), *base], capsys
    )
    assert code == 2 and "not a reward model" in err and len(err.splitlines()) == 1

    # a checkpoint that is not a model
    bogus = tmp_path / "bogus"
    (bogus / "checkpoints").mkdir(parents=True)
    atomic.save_torch(
        bogus / "checkpoints" / "step-00000001.pt",
        {"step": 1, "version": 1, "requested_config": "{}"},
    )
    code, err = cli(["rlhf", "--from", str(bogus), "--reward", "exact-match", *base], capsys)
    assert code == 2 and "--from" in err and len(err.splitlines()) == 1

    # a pairs file whose line lacks a field: the line is named
    pairs = tmp_path / "pairs.jsonl"
    good = json.dumps({"prompt": "Add 1 and 2.", "chosen": "3", "rejected": "4"})
    pairs.write_text(good + "\n" + good + "\n" + json.dumps({"prompt": "x", "chosen": "y"}) + "\n")
    code, err = cli(["reward", "--from", str(pretrained), "--pairs", str(pairs), *base], capsys)
    assert code == 2 and f"{pairs}:3" in err and "rejected" in err

    # a prompt longer than the context
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(
        json.dumps({"prompt": "short", "answer": "1"})
        + "\n"
        + json.dumps({"prompt": "word " * 60, "answer": "1"})
        + "\n"
    )
    code, err = cli(
        [
            "rlhf",
            "--from",
            str(pretrained),
            "--reward",
            "exact-match",
            "--prompts",
            str(prompts),
            *base,
        ],
        capsys,
    )
    assert code == 2 and f"{prompts}:2" in err and "context" in err

    # a reward model for a different tokenizer
    other = make_other_tokenizer_reward_model(tmp_path, reward_dir)
    code, err = cli(
        ["rlhf", "--from", str(pretrained), "--reward-model", str(other), *base], capsys
    )
    assert code == 2 and "another tokenizer" in err and len(err.splitlines()) == 1

    assert not out.exists()


def make_other_tokenizer_reward_model(tmp_path: Path, reward_dir: Path) -> Path:
    """A copy of the reward model whose base model carries another tokenizer.json."""
    import shutil

    from tokenizers import Tokenizer, models, pre_tokenizers

    summary = json.loads((reward_dir / "summary.json").read_text())
    base = Path(summary["pretrained"]["path"])
    other_base = tmp_path / "other-base"
    shutil.copytree(base, other_base)
    tok = Tokenizer(models.WordLevel({"<|endoftext|>": 0, "[UNK]": 1}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    (other_base / "tokenizer.json").write_text(tok.to_str())
    other = tmp_path / "other-reward"
    shutil.copytree(reward_dir, other)
    ckpt = next((other / "checkpoints").glob("step-*.pt"))
    payload = torch.load(ckpt, weights_only=True)
    payload["config"] = json.dumps({**json.loads(payload["config"]), "pretrained": str(other_base)})
    atomic.save_torch(ckpt, payload)
    return other


def test_a_hugging_face_policy_and_reward_model(hf_pretrained: Path, tmp_path: Path) -> None:
    reward = tmp_path / "reward"
    summary = train_reward_model(
        reward_config(hf_pretrained, reward, steps=2, batch_size=4, eval_pairs=8)
    )
    assert summary["pretrained"]["kind"] == "huggingface" and summary["accuracy"] is not None
    config = rlhf_config(hf_pretrained, reward, tmp_path / "rl", steps=2, batch_size=4)
    summary = rlhf({**config, "eval_prompts": 4, "max_new_tokens": 4})
    assert summary["steps"] == 2 and summary["reward"]["pretrained"] == str(hf_pretrained)
    # the RLHF folder loads as a model again (for a next stage), with the trained weights
    from optarena.posttrain.pretrained import load_pretrained

    again = load_pretrained(tmp_path / "rl")
    ckpt = torch.load(next((tmp_path / "rl" / "checkpoints").glob("step-*.pt")), weights_only=True)
    for name, value in again.model.state_dict().items():
        assert torch.equal(value, ckpt["model"][name]), name


def test_an_rlhf_sweep_and_its_report(
    pretrained: Path, reward_dir: Path, tmp_path: Path, capsys
) -> None:
    spec = tmp_path / "rl.toml"
    spec.write_text(
        f"""
[sweep]
name = "rl"
task = "rlhf"
[base]
pretrained = "{pretrained}"
reward_model = "{reward_dir}"
steps = 2
batch_size = 4
max_new_tokens = 4
eval_prompts = 8
[[grid]]
optimizer = "adamw"
lr = [1e-3]
[[grid]]
optimizer = "adam-mini"
lr = [1e-3]
"""
    )
    out = tmp_path / "out"
    assert main(["sweep", str(spec), "--out", str(out), "--workers", "1", "--threads", "1"]) == 0
    capsys.readouterr()
    from optarena.sweep.store import Store

    with Store(out) as store:
        runs = store.runs()
    assert len(runs) == 2 and all(r.status == "done" for r in runs)
    assert all(r.final_val_loss == -r.summary["final_reward"] for r in runs)
    assert main(["report", str(out), "--format", "table"]) == 0
    from optarena.analysis import analyze_store
    from optarena.report.tables import display_rows, summary_rows

    analysis = analyze_store(out)
    header, cells = display_rows(analysis)
    assert header[2:7] == ["best −reward", "best LR", "reward", "start reward", "exact match"]
    assert all(float(row[2].split()[0]) == -float(row[4]) for row in cells)
    rows = {r["registry_name"]: r for r in summary_rows(analysis)}
    adamw = next(r for r in runs if r.optimizer == "adamw")
    assert rows["adamw"]["reward_at_best"] == adamw.summary["final_reward"]
    assert rows["adam-mini"]["start_reward"] == adamw.summary["initial"]["reward"]
    check_the_page_shows_rewards(out, runs)


def check_the_page_shows_rewards(out: Path, runs: list) -> None:
    """The report of an RLHF sweep plots the reward with its own sign (the store ranks by its
    negative), and the KL, response length and accuracy that the runs logged, by name."""
    from optarena.analysis import analyze_store
    from optarena.report import figures, interactive, write_report
    from optarena.report.build import story_json
    from optarena.report.story import tell
    from optarena.report.views import run_curves

    page = write_report(out).read_text()
    assert (out / "report" / "reward-vs-lr.png").is_file()
    assert not (out / "report" / "loss-vs-lr.png").exists()
    assert "final held-out reward (greedy responses)" in page
    assert "KL to the reference (nats per sampled response)" in page
    assert "sampled response length (tokens)" in page
    assert "validation loss (nats)" not in page  # the old label of −reward
    (c,) = analyze_store(out).comparisons  # adamw against adam-mini: their rewards' difference
    a, b = (next(s for s in analyze_store(out).series if s.name == n) for n in (c.a, c.b))
    assert f"{-a.best_loss + b.best_loss:+.4f} reward" in page
    analysis = analyze_store(out)
    by_id = {r.id: r for r in runs}
    fig = interactive.loss_vs_lr_figure(analysis.series, "t", False)
    assert fig.layout.yaxis.title.text == "final held-out reward (greedy responses)"
    for s in analysis.series:
        (run_id,) = s.best_run_ids
        trace = next(t for t in fig.data if t.name == s.name)
        assert list(trace.y) == [by_id[run_id].summary["final_reward"]]  # not its negative
    for run in runs:
        records = read_records(out / "runs" / run.id / "metrics.jsonl")
        steps = [r for r in records if "loss" in r]
        curves = run_curves(out, run)
        assert curves["train:kl"] == ([r["step"] for r in steps], [r["kl"] for r in steps])
        assert curves["train:reward"][1] == [r["reward"] for r in steps]
        assert curves["train:response_length"][1] == [r["response_length"] for r in steps]
        held_out = curves["eval:reward"][1]
        assert held_out[0] == run.summary["initial"]["reward"]
        assert held_out[-1] == run.summary["final_reward"] == -run.final_val_loss
        assert curves["eval:accuracy"][1][-1] == run.summary["final_exact_match"]
        run_page = (out / "report" / "runs" / f"{run.id}.html").read_text()
        assert "held-out mean reward (greedy responses)" in run_page
    static = figures.best_curves_figure(analysis.series, by_id, out, "t")
    labels = [ax.get_ylabel() for ax in static.axes if ax.get_visible()]
    assert labels[:2] == [
        "mean reward of sampled responses (training batch)",
        "held-out mean reward (greedy responses)",
    ]
    assert "held-out exact match (greedy responses)" in labels
    best = tell(analysis, by_id).conclusions[0]
    top = min(analysis.series, key=lambda s: s.best_loss)
    assert best.startswith(f"Best final held-out reward: {top.name}, {-top.best_loss:.4f}")
    assert "reward" in story_json(tell(analysis, by_id))["conclusions"][1]


def test_the_cli_stores_absolute_folders(
    root: Path, pretrained: Path, tmp_path: Path, monkeypatch, capsys
) -> None:
    """A relative --from is resolved: the run's folder loads from any working directory."""
    monkeypatch.chdir(pretrained.parent)
    out = tmp_path / "rel"
    argv = ["rlhf", "--from", pretrained.name, "--reward", "exact-match", "--optimizer", "adamw"]
    argv += ["--steps", "1", "--eval-prompts", "4", "--max-new-tokens", "2", "--out", str(out)]
    assert main([*argv, "--no-progress", "--threads", "1"]) == 0
    assert "held-out reward" in capsys.readouterr().out
    summary = json.loads((out / "summary.json").read_text())
    assert summary["config"]["pretrained"] == str(pretrained.resolve())


def test_a_reward_models_curves_are_its_pair_losses_and_accuracy(reward_dir: Path, tmp_path):
    """The report reads a reward-model run's log under the names it writes."""
    from optarena.report.views import run_curves, run_view
    from optarena.sweep.store import RunRecord

    summary = json.loads((reward_dir / "summary.json").read_text())
    (tmp_path / "runs").mkdir()
    (tmp_path / "runs" / "rm").symlink_to(reward_dir)
    run = RunRecord(
        "rm", summary["config"], "adamw", None, 1e-3, 0, "done", None, 1, None, None, None,
        None, None, summary["final_val_loss"], None, summary, [],
    )  # fmt: skip
    assert run_view(run).headline == "final held-out Bradley-Terry loss (nats)"
    records = read_records(reward_dir / "metrics.jsonl")
    evals = [r for r in records if "val_loss" in r]
    curves = run_curves(tmp_path, run)
    assert curves["eval:accuracy"] == ([r["step"] for r in evals], [r["accuracy"] for r in evals])
    assert curves["eval:accuracy"][1][-1] == summary["accuracy"]
    assert curves["train:loss"][1] == [r["loss"] for r in records if "loss" in r]
