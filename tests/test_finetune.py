"""``optarena finetune``: the SFT run (loss on responses, evaluation, bit-exact resume,
divergence, summary) and its command line (one-line errors, exit 2, nothing written)."""

from __future__ import annotations

import html
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from optarena.cli import main
from optarena.errors import UserError
from optarena.posttrain.data import IGNORE, ExampleSampler, collate
from optarena.posttrain.pretrained import load_pretrained
from optarena.posttrain.sft import FinetuneConfig, finetune, load_examples, prepare

pytestmark = pytest.mark.usefixtures("single_thread")


def config(pretrained: Path, **kw) -> dict:
    base = dict(
        pretrained=str(pretrained),
        optimizer="adamw",
        lr=3e-3,
        steps=6,
        batch_size=4,
        seq_len=48,
        eval_examples=16,
        eval_generate=8,
        progress=False,
        threads=1,
        log_every=1,
    )
    return {**base, **kw}


def records(run: Path) -> list[dict]:
    return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]


def test_finetune_trains_on_responses_and_reports_the_start(pretrained_run, tmp_path) -> None:
    out = tmp_path / "sft"
    heard: list[dict] = []
    from optarena.posttrain.sft import FinetuneRun

    summary = FinetuneRun(
        FinetuneConfig.from_dict(config(pretrained_run, steps=30, out=str(out), eval_every=15)),
        on_log=heard.append,
    ).run()
    assert summary["task"] == "finetune" and summary["steps"] == 30 and not summary["diverged"]
    curve = summary["eval_curve"]
    assert [p["step"] for p in curve] == [0, 15, 30]
    assert curve[0]["val_loss"] == summary["pretrained_val_loss"]
    assert summary["final_val_loss"] == curve[-1]["val_loss"] < curve[0]["val_loss"]
    assert summary["val_loss_gain"] == pytest.approx(curve[0]["val_loss"] - curve[-1]["val_loss"])
    assert all(0 <= p["exact_match"] <= 1 for p in curve)
    assert summary["pretrained"]["kind"] == "optarena"
    assert summary["data"]["source"].startswith("builtin") and summary["data"]["exact_match"]
    assert json.loads((out / "summary.json").read_text())["final_val_loss"] == curve[-1]["val_loss"]
    assert records(out) == heard
    assert (out / "checkpoints" / "step-00000030.pt").is_file()
    # the run's folder is itself a model: the fine-tuned weights on the pretrained architecture
    tuned = load_pretrained(out)
    final = torch.load(out / "checkpoints" / "step-00000030.pt", weights_only=True)["model"]
    for name, p in tuned.model.state_dict().items():
        assert torch.equal(p, final[name])
    assert tuned.tokenizer.fingerprint == load_pretrained(pretrained_run).tokenizer.fingerprint


def test_the_loss_is_the_mean_over_the_batchs_response_tokens(pretrained_run) -> None:
    """The first step's loss, recomputed by hand from the same examples and model; micro-batches
    and padding change nothing."""
    cfg = FinetuneConfig.from_dict(config(pretrained_run, steps=1, batch_size=4))
    pre = load_pretrained(pretrained_run)
    data = prepare(cfg, pre)
    rows = ExampleSampler(len(data.train), 4, cfg.seed).next_global()
    total, count = 0.0, 0
    with torch.no_grad():
        for r in rows:  # one example at a time, no padding
            x, y = collate(data.train, [r], pre.tokenizer.pad_id)
            ce = F.cross_entropy(pre.model(x)[0], y[0], ignore_index=IGNORE, reduction="sum")
            total, count = total + ce.item(), count + int((y != IGNORE).sum())
    for accum in (1, 2):
        summary = finetune(config(pretrained_run, steps=1, grad_accum=accum, eval_generate=0))
        assert summary["initial_loss"] == pytest.approx(total / count, rel=1e-5)


@pytest.mark.parametrize("name", ["adamw", "sophia"])
def test_resume_is_bit_exact(name: str, pretrained_run, tmp_path) -> None:
    run = tmp_path / "run"
    hp = {"hessian_interval": 2} if name == "sophia" else {}
    cfg = config(
        pretrained_run,
        optimizer=name,
        lr=1e-3,
        steps=8,
        out=str(run),
        checkpoint_every=3,
        keep_checkpoints=0,
        eval_every=4,
        hparams=hp,
    )
    full = finetune(cfg)
    losses = {r["step"]: r["loss"] for r in records(run) if "loss" in r}
    final = torch.load(run / "checkpoints" / "step-00000008.pt", weights_only=True)
    for path in (run / "checkpoints").glob("step-0000000[68].*"):  # died after step 6's
        path.unlink()
    (run / "summary.json").unlink()
    resumed = finetune({**cfg, "resume": True})
    assert resumed["resumed_from"].endswith("step-00000003.pt")
    assert {r["step"]: r["loss"] for r in records(run) if "loss" in r} == losses
    assert resumed["eval_curve"] == full["eval_curve"]
    assert resumed["pretrained_val_loss"] == full["pretrained_val_loss"]
    again = torch.load(run / "checkpoints" / "step-00000008.pt", weights_only=True)
    for key, value in final["model"].items():
        assert torch.equal(again["model"][key], value), key
    with pytest.raises(UserError, match="differs in lr"):
        finetune({**cfg, "resume": True, "lr": 1e-2})


def test_divergence_is_recorded(pretrained_run, tmp_path) -> None:
    summary = finetune(
        config(pretrained_run, optimizer="sgd", lr=1e4, grad_clip=None, steps=5, warmup=0)
    )
    assert summary["diverged"] and summary["diverged_at"] is not None
    assert summary["steps"] == summary["diverged_at"] < 5


def test_jsonl_chat_data_with_a_held_out_split(pretrained_run, tmp_path) -> None:
    from optarena.posttrain import builtin

    path = tmp_path / "chat.jsonl"
    lines = []
    for e in builtin.examples("train")[:200]:
        chat = [
            {"role": "system", "content": "Answer."},
            {"role": "user", "content": e.messages[0][1]},
        ]
        lines.append(
            json.dumps({"messages": [*chat, {"role": "assistant", "content": e.response}]})
        )
    path.write_text("\n".join(lines) + "\n")
    cfg = FinetuneConfig.from_dict(
        config(pretrained_run, data=str(path), exact_match=True, seq_len=96)
    )
    source, train, val, exact = load_examples(cfg)
    assert (
        source == str(path) and exact and 0 < len(val) < len(train) and len(train) + len(val) == 200
    )
    assert all(v.answer == v.response for v in val)
    summary = finetune(config(pretrained_run, data=str(path), steps=2, seq_len=96))
    assert summary["data"]["exact_match"] is False and summary["final_exact_match"] is None
    assert summary["data"]["train_examples"] == len(train)


def test_finetune_a_hugging_face_model(hf_pretrained, tmp_path) -> None:
    out = tmp_path / "hf-sft"
    summary = finetune(config(hf_pretrained, steps=3, out=str(out)))
    assert summary["pretrained"]["kind"] == "huggingface"
    assert summary["final_val_loss"] < summary["pretrained_val_loss"]
    tuned = load_pretrained(out)
    assert tuned.kind == "huggingface" and tuned.description["base"] == str(hf_pretrained)
    with pytest.raises(UserError, match="longer than the model's context of 64"):
        finetune(config(hf_pretrained, seq_len=65))


# --------------------------------------------------------------------------- the command line


def one_line_error(capsys, argv: list[str]) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("optarena: error: ") and "\n" not in err and "Traceback" not in err
    return err


def test_cli_runs_and_prints_the_gain(pretrained_run, tmp_path, capsys) -> None:
    out = tmp_path / "cli"
    argv = ["finetune", "--from", str(pretrained_run), "--optimizer", "adamw", "--lr", "3e-3"]
    argv += ["--steps", "2", "--batch-size", "4", "--seq-len", "48", "--eval-examples", "8"]
    argv += ["--eval-generate", "4", "--threads", "1", "--no-progress", "--out", str(out)]
    assert main(argv) == 0
    line = capsys.readouterr().out
    assert "response val loss" in line and "exact match" in line and "summary.json" in line
    assert main([*argv, "--resume"]) == 0
    assert "already finished" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("lines", "message"),
    [
        (
            ['{"prompt": "a", "response": "b"}', '{"prompt": "a"}'],
            r"bad\.jsonl:2: no string response",
        ),
        ([], r"bad\.jsonl has no examples"),
        (['{"prompt": "' + "word " * 80 + '", "response": "b"}'], r"bad\.jsonl:1: the prompt is"),
    ],
)
def test_bad_data_is_one_line_and_writes_nothing(
    pretrained_run, tmp_path, capsys, lines, message
) -> None:
    data = tmp_path / "bad.jsonl"
    data.write_text("\n".join(lines) + ("\n" if lines else ""))
    out = tmp_path / "out"
    argv = ["finetune", "--from", str(pretrained_run), "--optimizer", "adamw", "--data", str(data)]
    argv += ["--val-data", str(data), "--seq-len", "48", "--out", str(out), "--no-progress"]
    import re

    assert re.search(message, one_line_error(capsys, argv))
    assert not out.exists()


def test_not_a_model_is_one_line_and_writes_nothing(pretrained_run, tmp_path, capsys) -> None:
    out = tmp_path / "out"
    fake = tmp_path / "fake"
    (fake / "checkpoints").mkdir(parents=True)
    shutil.copy(pretrained_run / "summary.json", fake / "checkpoints" / "step-00000001.pt")
    for source, message in [
        (tmp_path, "not a model"),
        (fake / "checkpoints" / "step-00000001.pt", "not a usable checkpoint"),
    ]:
        argv = ["finetune", "--from", str(source), "--optimizer", "adamw", "--out", str(out)]
        assert message in one_line_error(capsys, argv)
        assert not out.exists()
    assert "pass --from DIR" in one_line_error(capsys, ["finetune", "--optimizer", "adamw"])
    assert "model.FIELD" in one_line_error(
        capsys, ["finetune", "--from", "x", "--optimizer", "adamw", "--set", "model.d_model=8"]
    )
    argv = ["finetune", "--from", str(pretrained_run), "--optimizer", "adamz"]
    assert "unknown optimizer 'adamz'" in one_line_error(capsys, argv)


# --------------------------------------------------------------------------- sweeps


def test_a_finetune_sweep_and_its_report(pretrained_run, tmp_path, capsys, monkeypatch) -> None:
    monkeypatch.setenv("COLUMNS", "250")  # the table's headers each on one line
    spec = tmp_path / "ft.toml"
    spec.write_text(
        f"""
[sweep]
name = "ft"
task = "finetune"
[base]
pretrained = "{pretrained_run}"
steps = 3
batch_size = 4
seq_len = 48
eval_examples = 8
eval_generate = 4
[[grid]]
optimizer = "adamw"
lr = [3e-3]
"""
    )
    out = tmp_path / "out"
    assert main(["sweep", str(spec), "--out", str(out), "--workers", "1", "--threads", "1"]) == 0
    capsys.readouterr()
    from optarena.sweep.store import Store

    with Store(out) as store:
        runs = store.runs()
    assert len(runs) == 1 and all(r.status == "done" for r in runs)
    assert all(r.summary["task"] == "finetune" for r in runs)
    assert main(["report", str(out), "--format", "table"]) == 0
    table = capsys.readouterr().out
    assert "best response loss" in table and "exact match" in table and "start loss" in table
    from optarena.analysis import analyze_store
    from optarena.report.tables import run_rows, summary_rows

    (row,) = summary_rows(analyze_store(out))  # the rows of summary.csv and the page
    (run,) = runs
    assert row["best_final_val_loss"] == run.final_val_loss
    assert row["exact_match_at_best"] == run.summary["final_exact_match"]
    assert row["start_val_loss"] == run.summary["pretrained_val_loss"]

    # the store, the tables and the page name the model the runs started from
    arch = "micro, d_model=32, n_layer=1"  # conftest's pretrained_run
    assert run.model == f"{pretrained_run.name} ({arch})" == run.summary["pretrained"]["name"]
    assert row["model"] == run.model
    (cells,) = run_rows(runs, [])
    assert cells["model"] == run.model

    # the page names the response loss and plots the exact match that the run logged
    from optarena.report import figures, write_report
    from optarena.report.views import run_curves

    page = write_report(out).read_text()
    assert "final validation response loss (nats)" in page
    assert html.escape(run.model) in page and "default" not in table
    assert "exact match of greedy responses (held out)" in page
    assert (out / "report" / "loss-vs-lr.png").is_file()
    logged = records(out / "runs" / run.id)
    evals = [r for r in logged if "val_loss" in r]
    curves = run_curves(out, run)
    assert curves["eval:val_loss"] == ([r["step"] for r in evals], [r["val_loss"] for r in evals])
    assert curves["eval:exact_match"][1] == [r["exact_match"] for r in evals]
    assert curves["eval:exact_match"][1][0] == run.summary["pretrained_exact_match"]
    assert curves["train:loss"][1] == [r["loss"] for r in logged if "loss" in r]
    static = figures.best_curves_figure(analyze_store(out).series, {run.id: run}, out, "t")
    assert [ax.get_ylabel() for ax in static.axes if ax.get_visible()] == [
        "training response loss (nats)",
        "validation response loss (nats)",
        "exact match of greedy responses (held out)",
        "learning rate",
    ]


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ('task = "finetune"\n[base]\nmodel = "micro"', "unknown training key 'model'"),
        ('task = "pretrain"\n[base]', "task 'pretrain' is not one of"),
        ('task = "finetune"\n[base]\npretrained = "/nonexistent"', "no such file or directory"),
    ],
)
def test_finetune_spec_errors(tmp_path, capsys, body, message) -> None:
    spec = tmp_path / "bad.toml"
    spec.write_text(f'[sweep]\n{body}\n[[grid]]\noptimizer = "adamw"\nlr = [1e-3]\n')
    assert message in one_line_error(capsys, ["sweep", str(spec), "--out", str(tmp_path / "o")])
    assert not (tmp_path / "o").exists()


def test_from_is_stored_absolute_so_a_later_stage_loads_it_anywhere(
    pretrained_run, tmp_path, capsys, monkeypatch
) -> None:
    import shutil

    shutil.copytree(pretrained_run, tmp_path / "pre")
    monkeypatch.chdir(tmp_path)
    argv = ["finetune", "--from", "pre", "--optimizer", "adamw", "--steps", "1"]
    argv += ["--batch-size", "2", "--seq-len", "48", "--eval-examples", "2", "--eval-generate", "0"]
    assert main([*argv, "--threads", "1", "--no-progress", "--out", "sft"]) == 0
    summary = json.loads((tmp_path / "sft" / "summary.json").read_text())
    assert summary["config"]["pretrained"] == str((tmp_path / "pre").resolve())
    monkeypatch.chdir(tmp_path.parent)
    assert load_pretrained(tmp_path / "sft").description["base"] == str(
        (tmp_path / "pre").resolve()
    )
    # a relative base given to the Python API is found beside the run's folder
    monkeypatch.chdir(tmp_path)
    finetune(config("pre", steps=1, batch_size=2, eval_examples=2, eval_generate=0, out="api"))
    monkeypatch.chdir(tmp_path.parent)
    assert load_pretrained(tmp_path / "api").description["base"] == str(tmp_path / "pre")


# --------------------------------------------------------------------------- model names


def test_a_models_name_comes_from_its_config_files(pretrained_run, hf_pretrained, tmp_path) -> None:
    from optarena.posttrain.pretrained import model_name
    from optarena.tasks import model_of_run

    arch = "micro, d_model=32, n_layer=1"
    assert model_name(pretrained_run) == f"{pretrained_run.name} ({arch})"
    (ckpt,) = (pretrained_run / "checkpoints").glob("step-*.pt")
    step = int(ckpt.stem.split("-")[1])
    assert model_name(ckpt) == f"{pretrained_run.name} step {step} ({arch})"
    assert model_name(hf_pretrained) == "gpt2-tiny (gpt2)"
    sft = tmp_path / "sft"
    finetune(config(pretrained_run, steps=1, eval_examples=2, eval_generate=0, out=str(sft)))
    assert model_name(sft) == f"sft ({arch})"  # a fine-tuned folder: what it started from
    (sft / "summary.json").unlink()  # an unfinished folder: its checkpoint's config says it
    assert model_name(sft) == f"sft ({arch})"
    assert load_pretrained(sft).describe()["name"] == f"sft ({arch})"
    assert model_name(tmp_path / "nothing") == "nothing"  # the run reports a bad --from
    assert model_of_run({"model": "small"}) == "small"
    assert model_of_run({"pretrained": str(sft)}) == f"sft ({arch})"


# --------------------------------------------------------------------------- DCP checkpoints


def launch_one_rank(argv: list[str], cwd: Path) -> None:
    """``optarena ARGV`` as the one rank of a gloo process group (what ``torchrun
    --nproc_per_node=1`` sets up), so that ``--parallel`` runs write DCP checkpoints."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = {
        **__import__("os").environ,
        "RANK": "0",
        "LOCAL_RANK": "0",
        "WORLD_SIZE": "1",
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(port),
        "OMP_NUM_THREADS": "1",
    }
    done = subprocess.run(
        [sys.executable, "-m", "optarena", *argv, "--threads", "1", "--no-progress"],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-2000:]


def test_from_takes_the_dcp_checkpoints_of_parallel_runs(tmp_path, capsys) -> None:
    """``--from`` reads the ``step-N.dcp`` folders that ``train --parallel fsdp`` and
    ``finetune --parallel ddp`` write, into one process: the weights are those of torch's own
    converter (``dcp_to_torch_save``), and a fine-tuning run starts from them."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    pre = tmp_path / "pre"
    argv = ["train", "--parallel", "fsdp", "--optimizer", "adamw", "--lr", "3e-3"]
    argv += ["--model", "micro", "--set", "model.d_model=32", "--set", "model.n_layer=1"]
    argv += ["--steps", "4", "--batch-size", "4", "--seq-len", "32", "--checkpoint-every", "2"]
    launch_one_rank([*argv, "--out", str(pre)], tmp_path)
    dcps = sorted((pre / "checkpoints").glob("step-*.dcp"))
    assert [p.name for p in dcps] == ["step-00000002.dcp", "step-00000004.dcp"]
    assert not list((pre / "checkpoints").glob("step-*.pt"))

    def converted(dcp: Path) -> dict[str, torch.Tensor]:
        dcp_to_torch_save(dcp, tmp_path / "converted.pt")
        return torch.load(tmp_path / "converted.pt", weights_only=False)["model"]

    for source, dcp in [(pre, dcps[-1]), (dcps[0], dcps[0])]:  # the folder: its newest
        loaded = load_pretrained(source)
        assert loaded.description["checkpoint"] == str(dcp)
        state, reference = loaded.model.state_dict(), converted(dcp)
        assert state.keys() == reference.keys()
        assert all(torch.equal(state[k], reference[k]) for k in state)
    early, late = converted(dcps[0]), converted(dcps[1])  # two steps apart: not the same
    assert any(not torch.equal(early[k], late[k]) for k in late)

    sft = tmp_path / "sft"
    argv = ["finetune", "--from", str(pre), "--parallel", "ddp", "--optimizer", "adamw"]
    argv += ["--steps", "2", "--batch-size", "4", "--seq-len", "32", "--eval-examples", "4"]
    launch_one_rank([*argv, "--eval-generate", "0", "--out", str(sft)], tmp_path)
    summary = json.loads((sft / "summary.json").read_text())
    assert summary["pretrained"]["checkpoint"] == str(dcps[-1])
    assert summary["pretrained"]["name"] == "pre (micro, d_model=32, n_layer=1)"
    (sft_dcp,) = (sft / "checkpoints").glob("step-*.dcp")
    chained = load_pretrained(sft).model.state_dict()  # a fine-tuned DCP folder chains too
    reference = converted(sft_dcp)
    assert all(torch.equal(chained[k], reference[k]) for k in reference)

    # one process fine-tunes from it: the starting loss is that of the loaded weights
    out = tmp_path / "single"
    result = finetune(config(pre, steps=1, seq_len=32, eval_generate=0, out=str(out)))
    assert result["pretrained"]["checkpoint"] == str(dcps[-1])

    # a DCP folder that is not a whole checkpoint: one line, exit 2, nothing written
    broken = tmp_path / "broken"
    shutil.copytree(pre, broken)
    for dcp in (broken / "checkpoints").glob("step-*.dcp"):
        (dcp / ".metadata").unlink()
    for source in (broken, broken / "checkpoints" / "step-00000004.dcp"):
        argv = ["finetune", "--from", str(source), "--optimizer", "adamw", "--out", str(out) + "x"]
        message = one_line_error(capsys, argv)
        assert "checkpoint" in message and "Traceback" not in message
        assert not Path(str(out) + "x").exists()
