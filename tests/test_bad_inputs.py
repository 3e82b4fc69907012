"""Bad input, as a user (or an attacker) gives it, across ``train``, ``sweep``, ``report``,
``reproduce``, ``bench``, the post-training commands and the Python API.

Every command-line case runs the real CLI in this process (``optarena.cli.main(argv)``) inside a
workspace that holds what the cases point at: a finished run, a finished sweep, data files that
are not text, a store that is not a database. Each case asserts exit code 2, one line naming the
problem (argparse's usage lines excepted), no traceback, and every file of the workspace
unchanged: nothing written, nothing removed. Each API case asserts its documented exception and
a message naming the problem.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import random
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch

import optarena
from optarena import atomic
from optarena.cli import main
from optarena.errors import UserError
from optarena.optim import SGD, AdamMini, AdamW, Lion, create

TOY = "optarena.sweep.toy:train"
# a tiny, fast run on the workspace's text (each flag below is overridden by some case)
TRAIN = [
    "train",
    "--optimizer",
    "adamw",
    "--steps",
    "2",
    "--batch-size",
    "2",
    "--seq-len",
    "16",
    "--threads",
    "1",
    "--no-progress",
    "--vocab-size",
    "300",
    "--data",
    "{ws}/text.txt",
    "--out",
    "{ws}/new-run",
]
RUN_CONFIG = {
    "optimizer": "adamw",
    "steps": 2,
    "batch_size": 2,
    "seq_len": 16,
    "threads": 1,
    "progress": False,
    "vocab_size": 300,
}
TOY_SPEC = """
[sweep]
name = "toy"
[base]
steps = 10
[[grid]]
optimizer = "adamw"
lr = [1e-3, 1e-2]
"""
# runs of the real training function on the workspace's text
TRAIN_SPEC = """
[sweep]
name = "train"
[base]
steps = 2
batch_size = 2
seq_len = 16
vocab_size = 300
data = "{ws}/text.txt"
[[grid]]
optimizer = "adamw"
lr = [1e-3]
"""


# --------------------------------------------------------------------------- the workspace


def _text(paragraphs: int = 200) -> str:
    rng = random.Random(0)
    words = [
        "the",
        "quick",
        "brown",
        "fox",
        "jumps",
        "over",
        "a",
        "lazy",
        "dog",
        "while",
        "seven",
        "wizards",
        "hex",
        "jam",
        "bags",
    ]
    return "\n\n".join(" ".join(rng.choice(words) for _ in range(30)) for _ in range(paragraphs))


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Tokenizer and token caches of the cases (outside the watched workspace)."""
    return tmp_path_factory.mktemp("bad-inputs-cache")


@pytest.fixture(scope="module")
def ws(tmp_path_factory: pytest.TempPathFactory, cache: Path) -> Path:
    """Everything the cases point at; built once, and (the tests check) never changed."""
    root = tmp_path_factory.mktemp("bad-inputs")
    (root / "text.txt").write_text(_text(), encoding="utf-8")
    (root / "latin1.txt").write_bytes(("café naïve " * 300).encode("latin-1"))
    (root / "random.bin").write_bytes(random.Random(1).randbytes(4000))
    (root / "nul.txt").write_bytes(b"plain text" + b"\0" * 16 + b"more text\n" * 100)
    (root / "empty.txt").write_bytes(b"")
    (root / "latin1.jsonl").write_bytes(b'{"text": "ok"}\n{"text": "caf\xe9"}\n')
    (root / "notjson.jsonl").write_text('{"text": "ok"}\nnot json\n')
    (root / "no-text-here").mkdir()
    (root / "no-text-here" / "image.png").write_bytes(b"\x89PNG")
    (root / "a-file").write_text("a file where a folder is wanted\n")
    (root / "bad.toml").write_text("[sweep\nname = 'x'\n")
    (root / "unknown-key.toml").write_text("steps = 2\nbogus_key = 1\n")
    (root / "wrong-type.toml").write_text('optimizer = "adamw"\neval_windows = "abc"\n')
    (root / "latin1.toml").write_bytes(b"[sweep]\nname = 'caf\xe9'\n")
    (root / "broken_module.py").write_text("raise RuntimeError('this module is broken')\n")
    specs = {
        "toy": TOY_SPEC,
        "train": TRAIN_SPEC.replace("{ws}", str(root)),
        "base-typo": TRAIN_SPEC.replace("{ws}", str(root)).replace("steps = 2", "stpes = 2"),
        "no-optimizer": TOY_SPEC.replace('optimizer = "adamw"', 'optimizer = "adamx"'),
        "negative-lr": TOY_SPEC.replace("lr = [1e-3, 1e-2]", "lr = [-1e-3]"),
        "escape": TOY_SPEC.replace('name = "toy"', 'name = "../../outside"'),
        "absolute": TOY_SPEC.replace('name = "toy"', 'name = "/tmp/outside"'),
        "no-grid": '[sweep]\nname = "empty"\n[base]\nsteps = 2\n',
    }
    for name, text in specs.items():
        (root / f"{name}.toml").write_text(text)

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("OPTARENA_CACHE", str(cache))
        optarena.train({**RUN_CONFIG, "data": str(root / "text.txt"), "out": str(root / "run")})
        assert (
            _cli(["sweep", str(root / "toy.toml"), "--out", f"{root}/sweep", "--function", TOY])[0]
            == 0
        )
    (root / "zero").mkdir()
    (root / "zero" / "results.sqlite").write_bytes(b"")
    (root / "notdb").mkdir()
    (root / "notdb" / "results.sqlite").write_bytes(b"these bytes are not a database" * 10)
    _copy_tree(root / "sweep", root / "blocked")
    (root / "blocked" / "report" / "index.html").mkdir(parents=True)
    _copy_tree(root / "sweep", root / "report-is-a-file")
    (root / "report-is-a-file" / "report").write_text("not a folder\n")
    foreign = root / "foreign" / "checkpoints"
    foreign.mkdir(parents=True)  # a whole, checksummed file that is not an optarena checkpoint
    atomic.save_torch(foreign / "step-00000002.pt", {"version": 1, "step": 2, "model": {}})
    return root


def _copy_tree(src: Path, dst: Path) -> None:
    import shutil

    shutil.copytree(src, dst)


def _snapshot(root: Path) -> dict[str, str]:
    """Every file and folder under ``root`` with its content's hash (folders: 'dir')."""
    state = {}
    for path in sorted(root.rglob("*")):
        rel = path.relative_to(root).as_posix()
        if path.is_dir():
            state[rel] = "dir"
        else:
            state[rel] = hashlib.sha256(path.read_bytes()).hexdigest()
    return state


@pytest.fixture
def in_ws(ws: Path, cache: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Cases run inside the workspace (a default output folder would land in it) with a
    cache of their own, no launcher variables, and no bytecode written for imported files."""
    monkeypatch.chdir(ws)
    monkeypatch.setenv("OPTARENA_CACHE", str(cache))
    for var in ("MASTER_ADDR", "WORLD_SIZE", "RANK", "LOCAL_RANK", "OPTARENA_FAULT"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(sys, "dont_write_bytecode", True)
    monkeypatch.syspath_prepend(str(ws))
    threads = torch.get_num_threads()
    yield ws
    torch.set_num_threads(threads)


def _cli(argv: list[str]) -> tuple[int, str, str]:
    """``optarena ARGV`` in this process: exit code, stdout, stderr. An exception other than
    SystemExit escapes (a traceback: the test fails with it)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main(argv)
        except SystemExit as exit_:
            code = exit_.code if isinstance(exit_.code, int) else 2
    return code, out.getvalue(), err.getvalue()


# --------------------------------------------------------------------------- the table


@dataclass(frozen=True)
class Case:
    id: str
    argv: tuple[str, ...]
    expect: tuple[str, ...]  # lower-case fragments the error line must contain


def train(*extra: str, expect: tuple[str, ...], id: str) -> Case:
    return Case(id, (*TRAIN, *extra), expect)


def sweep(spec: str, *extra: str, expect: tuple[str, ...], id: str) -> Case:
    return Case(f"sweep-{id}", ("sweep", spec, "--out", "{ws}/new-sweep", *extra), expect)


def report(*argv: str, expect: tuple[str, ...], id: str) -> Case:
    return Case(f"report-{id}", ("report", *argv), expect)


def reproduce(*extra: str, expect: tuple[str, ...], id: str) -> Case:
    argv = ("reproduce", "deconstructing", "--scale", "test", "--out", "{ws}/new-repro", *extra)
    return Case(f"reproduce-{id}", argv, expect)


def finetune(*extra: str, expect: tuple[str, ...], id: str) -> Case:
    argv = ("finetune", "--from", "{ws}/run", "--optimizer", "adamw", "--steps", "1")
    argv += ("--threads", "1", "--no-progress", "--out", "{ws}/new-sft", *extra)
    return Case(f"finetune-{id}", argv, expect)


def bench(kind: str, *extra: str, expect: tuple[str, ...], id: str) -> Case:
    argv = ("bench", kind, "--optimizers", "adamw", "--steps", "1", "--warmup", "1", *extra)
    return Case(f"bench-{kind}-{id}", argv, expect)


CASES = [
    # --- train: values that would train something else than asked
    train("--grad-clip", "-1", expect=("grad_clip", "at least 0"), id="grad-clip-negative"),
    train("--grad-clip", "nan", expect=("grad_clip", "finite"), id="grad-clip-nan"),
    train("--z-loss", "-1", expect=("z_loss", "at least 0"), id="z-loss-negative"),
    train("--warmup", "-5", expect=("warmup", "at least 0"), id="warmup-negative"),
    train("--warmup", "nan", expect=("warmup", "finite"), id="warmup-nan"),
    train("--threads", "0", expect=("threads", "at least 1"), id="threads-zero"),
    train("--threads", "-1", expect=("threads", "at least 1"), id="threads-negative"),
    train("--parallel", "ddp", expect=("--parallel ddp", "torchrun"), id="ddp-without-torchrun"),
    train("--parallel", "fsdp", expect=("--parallel fsdp", "torchrun"), id="fsdp-no-torchrun"),
    train("--lr", "-1", expect=("lr", "at least 0"), id="lr-negative"),
    train("--lr", "nan", expect=("lr", "finite"), id="lr-nan"),
    train("--lr", "inf", expect=("lr", "finite"), id="lr-inf"),
    train("--steps", "0", expect=("steps", "at least 1"), id="steps-zero"),
    train("--steps", "abc", expect=("--steps", "invalid int"), id="steps-not-a-number"),
    train("--batch-size", "0", expect=("batch_size", "at least 1"), id="batch-size-zero"),
    train("--batch-size", "3", "--grad-accum", "2", expect=("divisible",), id="batch-accum"),
    train("--grad-accum", "0", expect=("grad_accum", "at least 1"), id="grad-accum-zero"),
    train("--seq-len", "0", expect=("seq_len", "at least 1"), id="seq-len-zero"),
    train("--seed", "-1", expect=("seed", "at least 0"), id="seed-negative"),
    train("--eval-every", "-1", expect=("eval_every",), id="eval-every-negative"),
    train("--checkpoint-every", "-2", expect=("checkpoint_every",), id="ckpt-every-negative"),
    train("--log-every", "0", expect=("log_every",), id="log-every-zero"),
    train("--schedule", "cosin", expect=("schedule", "cosine"), id="schedule-unknown"),
    train("--dtype", "float16", expect=("dtype", "bfloat16"), id="dtype-unknown"),
    train("--device", "tpu", expect=("device", "tpu"), id="device-unknown"),
    train("--device", "cuda:99", expect=("cuda",), id="device-absent"),
    train("--wandb", "maybe", expect=("--wandb", "invalid choice"), id="wandb-choice"),
    train("--parallel", "zero", expect=("--parallel", "invalid choice"), id="parallel-choice"),
    train("--optimizer", "adamx", expect=("adamx", "did you mean"), id="optimizer-unknown"),
    train("--model", "huge", expect=("model", "huge", "micro"), id="model-unknown"),
    train("--vocab-size", "10", expect=("vocab_size", "257"), id="vocab-too-small"),
    train("--tokenizer", "{ws}/missing.json", expect=("tokenizer", "does not exist"), id="tok"),
    # --- train: data that is not there or not text
    train("--data", "{ws}/latin1.txt", expect=("not utf-8", "0xe9", "offset 3"), id="latin1"),
    train("--data", "{ws}/random.bin", expect=("not utf-8", "offset"), id="random-bytes"),
    train("--data", "{ws}/nul.txt", expect=("nul byte", "offset 10"), id="nul-bytes"),
    train("--data", "{ws}/latin1.jsonl", expect=("not utf-8", "offset 28"), id="latin1-jsonl"),
    train("--data", "{ws}/notjson.jsonl", expect=("notjson.jsonl:2", "json"), id="not-jsonl"),
    train("--data", "/dev/null", expect=("/dev/null", "not a regular file"), id="dev-null"),
    train("--data", "{ws}/missing.txt", expect=("missing.txt", "does not exist"), id="data-gone"),
    train("--data", "{ws}/empty.txt", expect=("empty",), id="data-empty"),
    train("--data", "{ws}/nothing-*.txt", expect=("no files match",), id="glob-no-match"),
    train("--data", "{ws}/no-text-here", expect=("holds no",), id="folder-without-text"),
    train(
        "--data",
        "{ws}/text.txt",
        "{ws}/latin1.txt",
        expect=("--data got 2 paths", "quote"),
        id="glob-expanded-by-the-shell",
    ),
    train("--seq-len", "100000", expect=("seq_len 100000", "tokens"), id="seq-len-over-data"),
    # --- train: --set and --config
    train("--set", "model.d_model=abc", expect=("model.d_model", "integer"), id="d-model-abc"),
    train("--set", "model.n_layers=3", expect=("n_layers", "'n_layer'"), id="n-layers-typo"),
    train("--set", "model.d_model=100", expect=("head dimension",), id="d-model-heads"),
    train("--set", "model.norm=batchnorm", expect=("norm",), id="norm-unknown"),
    train("--set", "model.n_head=0", expect=("n_head", "positive"), id="n-head-zero"),
    train("--set", "model.d_model=-8", expect=("d_model", "positive"), id="d-model-negative"),
    train("--set", "bogus=1", expect=("bogus",), id="hparam-unknown"),
    train("--set", "betas=2,3", expect=("betas",), id="betas-out-of-range"),
    train("--set", "betas=0.9", expect=("betas", "pair"), id="betas-not-a-pair"),
    train("--set", "eps=-1", expect=("eps",), id="eps-negative"),
    train("--set", "weight_decay=-0.1", expect=("weight_decay",), id="decay-negative"),
    train("--set", "noequals", expect=("key=value",), id="set-malformed"),
    train("--set", "=3", expect=("key=value",), id="set-no-key"),
    train("--config", "{ws}/missing.toml", expect=("missing.toml", "does not exist"), id="cfg"),
    train("--config", "{ws}/bad.toml", expect=("not valid toml",), id="config-bad-toml"),
    train("--config", "{ws}/unknown-key.toml", expect=("bogus_key",), id="config-unknown-key"),
    train(
        "--config",
        "{ws}/wrong-type.toml",
        "--optimizer",
        "sgd",
        expect=("eval_windows",),
        id="cfg-type",
    ),
    # --- train: output folders
    Case("train-no-optimizer", ("train", "--steps", "2"), ("which optimizer",)),
    Case("train-resume-no-out", ("train", "--optimizer", "adamw", "--resume"), ("--out",)),
    train("--out", "{ws}/run", expect=("already holds a run", "--resume"), id="out-holds-a-run"),
    train(
        "--out", "{ws}/run", "--resume", "--lr", "0.5", expect=("differs in lr",), id="resume-other"
    ),
    train(
        "--out",
        "{ws}/foreign",
        "--resume",
        expect=("not an optarena checkpoint", "requested_config", "move it"),
        id="resume-foreign-checkpoint",
    ),
    train("--out", "{ws}/a-file", expect=("a-file",), id="out-is-a-file"),
    # --- sweep
    Case("sweep-spec-missing", ("sweep", "{ws}/missing.toml"), ("missing.toml",)),
    sweep("{ws}/bad.toml", expect=("not valid toml",), id="bad-toml"),
    sweep("{ws}/latin1.toml", expect=("not utf-8", "offset 19"), id="spec-not-utf8"),
    sweep(
        "{ws}/toy.toml",
        "--function",
        TOY,
        "--backend",
        "slurm",
        "--slurm-time",
        "0",
        expect=("--slurm-time",),
        id="slurm-time-zero",
    ),
    sweep("no-such-preset", expect=("no-such-preset",), id="preset-unknown"),
    sweep("{ws}/base-typo.toml", expect=("stpes", "steps"), id="base-typo"),
    sweep("{ws}/no-optimizer.toml", expect=("adamx",), id="optimizer-unknown"),
    sweep("{ws}/negative-lr.toml", expect=("lr",), id="lr-negative"),
    sweep("{ws}/no-grid.toml", expect=("grid",), id="no-grid"),
    sweep("{ws}/escape.toml", "--function", TOY, expect=("name",), id="name-escapes"),
    sweep("{ws}/absolute.toml", "--function", TOY, expect=("name",), id="name-absolute"),
    sweep("{ws}/train.toml", "--set", "steps=abc", expect=("steps",), id="set-steps-abc"),
    sweep("{ws}/train.toml", "--set", "grad_clip=-1", expect=("grad_clip",), id="clip"),
    sweep(
        "{ws}/train.toml", "--set", "model.n_layers=3", expect=("model_overrides",), id="n-layers"
    ),
    sweep("{ws}/train.toml", "--set", "bad key=1", expect=("key=value",), id="set-malformed"),
    sweep("{ws}/toy.toml", "--function", "nope.mod:fn", expect=("nope.mod",), id="fn-missing"),
    sweep("{ws}/toy.toml", "--function", "optarena.sweep.toy:nofn", expect=("nofn",), id="fn"),
    sweep("{ws}/toy.toml", "--function", "nocolon", expect=("module:function",), id="fn-form"),
    sweep(
        "{ws}/toy.toml",
        "--function",
        "broken_module:train",
        expect=("broken_module", "this module is broken"),
        id="fn-import-raises",
    ),
    sweep(
        "{ws}/toy.toml",
        "--function",
        "nope.mod:fn",
        "--backend",
        "slurm",
        expect=("nope.mod",),
        id="fn-missing-slurm",
    ),
    sweep("{ws}/train.toml", "--set", "data='{ws}/gone.txt'", expect=("gone.txt",), id="data-gone"),
    sweep(
        "{ws}/train.toml",
        "--set",
        "data='{ws}/latin1.txt'",
        expect=("latin1.txt", "not utf-8", "offset 3"),
        id="data-latin1",
    ),
    sweep("{ws}/train.toml", "--set", "seq_len=100000", expect=("seq_len 100000",), id="seq-len"),
    sweep("{ws}/toy.toml", "--function", TOY, "--workers", "0", expect=("workers",), id="w0"),
    sweep("{ws}/toy.toml", "--function", TOY, "--threads", "0", expect=("threads",), id="t0"),
    sweep("{ws}/toy.toml", "--function", TOY, "--address", "x:1", expect=("ray",), id="address"),
    sweep("{ws}/toy.toml", "--function", TOY, "--gpus-per-run", "-1", expect=("gpus",), id="gpu"),
    sweep("{ws}/toy.toml", "--function", TOY, "--seeds", "-1", expect=("seed",), id="seeds"),
    Case(
        "sweep-store-not-a-database",
        ("sweep", "{ws}/toy.toml", "--out", "{ws}/notdb", "--function", TOY),
        ("results.sqlite",),
    ),
    # --- report
    report("{ws}/missing", expect=("holds no sweep results",), id="missing-folder"),
    report("{ws}/zero", expect=("empty (0 bytes)",), id="zero-length-store"),
    report("{ws}/zero", "--format", "table", expect=("empty (0 bytes)",), id="zero-table"),
    report("{ws}/notdb", expect=("results.sqlite",), id="not-a-database"),
    report("{ws}/sweep", "--tau", "nan", expect=("--tau nan", "finite"), id="tau-nan"),
    report("{ws}/sweep", "--tau", "inf", expect=("--tau inf",), id="tau-inf"),
    report("{ws}/sweep", "--tau", "-1", expect=("--tau -1", "positive"), id="tau-negative"),
    report("{ws}/sweep", "--tau", "0", expect=("--tau 0",), id="tau-zero"),
    report("{ws}/sweep", "--format", "pdf", expect=("--format", "invalid choice"), id="format"),
    report("{ws}/blocked", expect=("index.html", "folder"), id="index-html-is-a-folder"),
    report("{ws}/report-is-a-file", expect=("report", "not a folder"), id="report-is-a-file"),
    # --- reproduce
    reproduce("--set", "model=unknown", expect=("model=unknown", "micro"), id="model-unknown"),
    reproduce("--set", "steps=abc", expect=("steps",), id="set-steps-abc"),
    reproduce("--set", "grad_clip=-1", expect=("grad_clip",), id="set-clip"),
    Case("reproduce-scale-unknown", ("reproduce", "adam-mini", "--scale", "huge"), ("huge",)),
    Case(
        "reproduce-study-unknown",
        (
            "reproduce",
            "adam",
        ),
        ("invalid choice",),
    ),
    reproduce("--seeds", "1", "1", expect=("distinct",), id="seeds-repeated"),
    reproduce("--delta", "0", expect=("--delta 0",), id="delta-zero"),
    reproduce("--delta", "nan", expect=("--delta nan", "finite"), id="delta-nan"),
    reproduce("--tau", "inf", expect=("--tau inf", "finite"), id="tau-inf"),
    reproduce("--report-only", expect=("holds no results",), id="report-only-empty"),
    reproduce("--workers", "0", expect=("workers",), id="workers-zero"),
    reproduce("--function", "nope.mod:fn", expect=("nope.mod",), id="function-missing"),
    # --- finetune
    finetune("--from", "{ws}/no-text-here", expect=("not a model",), id="from-a-folder"),
    finetune("--data", "{ws}/notjson.jsonl", expect=("notjson.jsonl:1:",), id="line-fields"),
    finetune("--data", "{ws}/empty.txt", expect=("has no examples",), id="data-empty"),
    finetune("--data", "{ws}/missing.jsonl", expect=("does not exist",), id="data-missing"),
    finetune("--seq-len", "4", expect=("the prompt is", "tokens"), id="prompt-too-long"),
    finetune("--seq-len", "0", expect=("seq_len",), id="seq-len-zero"),
    finetune("--optimizer", "adamz", expect=("unknown optimizer",), id="optimizer-unknown"),
    finetune("--set", "model.d_model=8", expect=("model.field",), id="model-override"),
    finetune("--out", "{ws}/run", expect=("already holds a run",), id="out-holds-a-run"),
    # --- post-training
    Case("finetune-no-from", ("finetune", "--optimizer", "adamw"), ("--from",)),
    Case(
        "finetune-from-gone",
        ("finetune", "--optimizer", "adamw", "--from", "{ws}/gone"),
        ("--from", "no such file"),
    ),
    Case(
        "finetune-from-a-file",
        ("finetune", "--optimizer", "adamw", "--from", "{ws}/text.txt"),
        ("not a model",),
    ),
    Case(
        "finetune-lr",
        (
            "finetune",
            "--optimizer",
            "adamw",
            "--from",
            "{ws}/run",
            "--lr",
            "-1",
            "--out",
            "{ws}/new-ft",
        ),
        ("lr",),
    ),
    Case(
        "finetune-latin1",
        (
            "finetune",
            "--optimizer",
            "adamw",
            "--from",
            "{ws}/run",
            "--data",
            "{ws}/latin1.txt",
            "--out",
            "{ws}/new-ft",
        ),
        ("not utf-8",),
    ),
    Case(
        "reward-from-gone",
        ("reward", "--optimizer", "adamw", "--from", "{ws}/gone"),
        ("--from", "no such file"),
    ),
    Case(
        "rlhf-no-reward-model",
        ("rlhf", "--optimizer", "adamw", "--from", "{ws}/run"),
        ("--reward-model",),
    ),
    # --- bench
    bench("step", "--shape", "d_model=abc", expect=("d_model", "abc"), id="shape-abc"),
    bench("step", "--shape", "d_model=100,n_heads=3", expect=("n_heads",), id="shape-heads"),
    bench("step", "--shape", "huge", expect=("huge",), id="shape-unknown"),
    bench("step", "--shape", "", expect=("empty shape",), id="shape-empty"),
    bench("step", "--optimizers", "nope", expect=("nope",), id="optimizer-unknown"),
    bench("step", "--optimizers", ",", expect=("names no optimizer",), id="optimizers-empty"),
    bench("step", "--steps", "0", expect=("--steps",), id="steps-zero"),
    bench("step", "--warmup", "-1", expect=("--warmup",), id="warmup-negative"),
    bench("step", "--threads", "0", expect=("--threads",), id="threads-zero"),
    bench("step", "--device", "tpu", expect=("tpu",), id="device-unknown"),
    bench("step", "--modes", "fast", expect=("--modes",), id="modes-unknown"),
    bench("step", "--json", "{ws}/run", expect=("--json",), id="json-is-a-folder"),
    bench("step", "--json", "{ws}/a-file/x.json", expect=("--json",), id="json-under-a-file"),
    bench("train", "--batch-size", "0", expect=("--batch-size",), id="batch-size-zero"),
    bench("train", "--seq-len", "0", expect=("--seq-len",), id="seq-len-zero"),
    bench("train", "--rounds", "0", expect=("--rounds",), id="rounds-zero"),
    bench("train", "--allocator", "x", expect=("--allocator", "invalid choice"), id="allocator"),
]


def _one_error_line(stderr: str) -> str:
    """The error line; argparse's usage lines may precede it, nothing else."""
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert lines, "no message on stderr"
    *before, last = lines
    if before:
        assert before[0].startswith("usage:"), f"more than one line:\n{stderr}"
        assert all(line.startswith(" ") for line in before[1:]), f"more than one line:\n{stderr}"
    assert "error:" in last, stderr
    return last


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_command_line_input(case: Case, in_ws: Path) -> None:
    argv = [a.replace("{ws}", str(in_ws)) for a in case.argv]
    before = _snapshot(in_ws)
    code, out, err = _cli(argv)
    assert "Traceback" not in err and "Traceback" not in out, err
    assert code == 2, f"exit {code}\nstdout: {out}\nstderr: {err}"
    line = _one_error_line(err).lower()
    for fragment in case.expect:
        assert fragment.replace("{ws}", str(in_ws)).lower() in line, line
    assert _snapshot(in_ws) == before, "the command changed the workspace"


def test_case_ids_are_unique_and_many() -> None:
    ids = [c.id for c in CASES] + [c[0] for c in API_CASES]
    assert len(set(ids)) == len(ids)
    assert len(ids) >= 80


# --------------------------------------------------------------------------- the Python API


def _model() -> torch.nn.Module:
    return torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.LayerNorm(4))


def _params() -> Any:
    return _model().parameters()


API_CASES: list[tuple[str, Callable[[], Any], type[BaseException], tuple[str, ...]]] = [
    ("create-int-params", lambda: create("adamw", 5), TypeError, ("params", "int 5")),
    ("create-str-params", lambda: create("adamw", "model"), TypeError, ("params", "str")),
    ("create-unknown", lambda: create("adamx", _model()), ValueError, ("adamx",)),
    ("create-not-a-name", lambda: create(5, _model()), ValueError, ("unknown optimizer",)),
    ("create-lr-negative", lambda: create("adamw", _model(), lr=-1), ValueError, ("lr=-1",)),
    ("create-lr-nan", lambda: create("adamw", _model(), lr=float("nan")), ValueError, ("lr",)),
    ("create-lr-str", lambda: create("adamw", _model(), lr="abc"), ValueError, ("lr='abc'",)),
    ("create-betas-one", lambda: create("adamw", _model(), betas=(0.9,)), ValueError, ("betas",)),
    (
        "create-betas-big",
        lambda: create("lion", _model(), betas=(0.9, 2.0)),
        ValueError,
        ("betas",),
    ),
    ("create-eps", lambda: create("adamw", _model(), eps=-1), ValueError, ("eps",)),
    ("create-decay", lambda: create("adamw", _model(), weight_decay=-1), ValueError, ("weight_",)),
    ("create-typo", lambda: create("adamw", _model(), bogus=1), ValueError, ("bogus",)),
    ("create-empty", lambda: create("adamw", []), ValueError, ("empty",)),
    ("create-hybrid", lambda: create("hybrid", _model()), ValueError, ("routes",)),
    (
        "create-capturable",
        lambda: create("adamw", _model(), capturable=True),
        ValueError,
        ("capt",),
    ),
    ("adamw-lr", lambda: AdamW(_params(), lr=-1.0), ValueError, ("lr",)),
    ("adamw-typo", lambda: AdamW(_params(), lrr=1e-3), TypeError, ("lrr",)),
    ("lion-betas", lambda: Lion(_params(), betas=(1.5, 0.9)), ValueError, ("betas",)),
    ("sgd-momentum", lambda: SGD(_params(), lr=0.1, momentum=-0.5), ValueError, ("momentum",)),
    ("adam-mini-lr", lambda: AdamMini(_params(), lr=float("inf")), ValueError, ("lr",)),
    (
        "train-grad-clip",
        lambda: optarena.train({"optimizer": "adamw", "grad_clip": -1}),
        UserError,
        ("grad_clip",),
    ),
    ("train-typo", lambda: optarena.train({"optimzer": "adamw"}), UserError, ("optimizer",)),
    ("train-steps-str", lambda: optarena.train({"steps": "abc"}), UserError, ("steps",)),
    ("train-not-a-dict", lambda: optarena.train(["adamw"]), UserError, ("table",)),
    (
        "train-parallel",
        lambda: optarena.train({"optimizer": "adamw", "parallel": "ddp"}),
        UserError,
        ("torchrun",),
    ),
]


@pytest.mark.parametrize(
    ("make", "error", "expect"),
    [c[1:] for c in API_CASES],
    ids=[c[0] for c in API_CASES],
)
def test_bad_python_api_input(
    make: Callable[[], Any],
    error: type[BaseException],
    expect: tuple[str, ...],
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MASTER_ADDR", raising=False)
    with pytest.raises(error) as caught:
        make()
    message = str(caught.value)
    assert "\n" not in message.strip()
    for fragment in expect:
        assert fragment in message, message
    assert not list(tmp_path.iterdir()), "the call wrote files"
