"""The training harness through its Python API: every optimizer learns, resume is bit-exact,
divergence is recorded, checkpoints are validated, schedules have the study's shape."""

from __future__ import annotations

import itertools
import json
import math
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch

import optarena
from optarena.errors import UserError
from optarena.model import build_model
from optarena.optim import available
from optarena.train import LanguageModelRun, TrainConfig, latest_checkpoint, lr_multiplier, train

# Peak LRs for a 24-step micro run: the study's optima, raised for the sign methods (whose
# study optimum, 3e-4, barely moves a model in 24 steps) and lowered for heavy-ball SGD.
LR = {"sgd": 0.3, "sgd-ema": 1.0, "lion": 1e-3, "signum": 1e-3, "sophia": 1e-3, "hybrid": None}
LR["muon"] = LR["normuon"] = 2e-2  # their own scale (orthogonalised updates); AdamW at adamw_lr
LR["kron"] = 3e-2  # the identity preconditioner it starts from is fitted over the first steps
EXTRA: dict[str, dict[str, Any]] = {
    "adam-frozen": {"precondition_steps": 4},
    # external LR (transformers' recipe): a relative step barely moves a model in 24 steps
    "adafactor-classic": {"relative_step": False, "scale_parameter": False},
    "hybrid": {"routes": {"default": ("sgd-ema", {"lr": 1.0}), "output": ("adamw", {"lr": 3e-3})}},
    "sophia": {"hessian_interval": 5},
    "muon": {"adamw_lr": 3e-3},
    "normuon": {"adamw_lr": 3e-3},
    # the 2048-token embedding and output rows take a diagonal factor / no basis (as in a
    # real run's routing), which keeps a micro step fast
    "kron": {"max_size_triangular": 256},
    "soap": {"max_precondition_dim": 256},
}


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Shared with the other test modules (same folder), so corpora are tokenized once."""
    return tmp_path_factory.getbasetemp() / "optarena-cache"


def micro(cache_dir: Path, **overrides: Any) -> dict[str, Any]:
    """A fast micro run: 24 steps of 8 x 64 tokens, one thread (two threads on a shared
    two-core machine can be ten times slower than one)."""
    config = dict(
        optimizer="adamw",
        lr=3e-3,
        steps=24,
        batch_size=8,
        seq_len=64,
        eval_windows=16,
        cache_dir=str(cache_dir),
        progress=False,
        threads=1,
    )
    config.update(overrides)
    return config


@pytest.fixture(scope="module")
def shakespeare(shared_data: Path) -> str:
    return str(shared_data / "tinyshakespeare.txt")


@pytest.mark.parametrize("name", list(available()))
@pytest.mark.parametrize("data", ["builtin", "shakespeare"])
def test_every_optimizer_learns(name: str, data: str, cache_dir: Path, request) -> None:
    source = "builtin" if data == "builtin" else request.getfixturevalue("shakespeare")
    lr = 1.0 if name.startswith("hybrid-") else LR.get(name, 3e-3)  # hybrids: the SGD body's LR
    summary = train(
        micro(cache_dir, optimizer=name, lr=lr, data=source, hparams=EXTRA.get(name, {}))
    )
    assert not summary["diverged"]
    assert summary["steps"] == 24 and summary["tokens"] == 24 * 8 * 64
    start = summary["initial_loss"]
    assert math.isclose(start, math.log(2048), abs_tol=0.3)  # an untrained model is ~uniform
    # falling loss: validation ends well below where training started
    assert summary["final_val_loss"] < start - 0.2, summary["eval_curve"]


def test_summary_has_the_contract_fields(tmp_path: Path, cache_dir: Path) -> None:
    heard: list[dict] = []
    summary = train(micro(cache_dir, out=str(tmp_path / "run"), eval_every=8), on_log=heard.append)
    for key in (
        "final_val_loss",
        "diverged",
        "steps",
        "tokens",
        "tokens_per_second",
        "params",
        "optimizer_state_bytes",
        "peak_memory_bytes",
        "wall_seconds",
        "eval_curve",
    ):
        assert key in summary
    assert summary["config"]["optimizer"] == "adamw" and summary["config"]["vocab_size"] == 2048
    assert [e["step"] for e in summary["eval_curve"]] == [8, 16, 24]
    assert summary["eval_curve"][-1]["val_loss"] == summary["final_val_loss"]
    params = sum(p.numel() for p in build_model("micro").parameters())
    assert summary["params"] == params
    # AdamW keeps two float32 tensors per parameter (plus per-tensor step counters)
    assert 8 * params <= summary["optimizer_state_bytes"] < 8 * params + 4096
    assert summary["tokens_per_second"] > 0 and summary["peak_memory_bytes"] > 0
    on_disk = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert on_disk["final_val_loss"] == summary["final_val_loss"]
    metrics = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics if "loss" in m] == [10, 20, 24]
    assert [m["step"] for m in metrics if "val_loss" in m] == [8, 16, 24]
    assert heard == metrics  # on_log hears every record of metrics.jsonl


def test_on_log_without_an_output_dir(cache_dir: Path) -> None:
    heard: list[dict] = []
    summary = train(micro(cache_dir, steps=3, log_every=1), on_log=heard.append)
    assert [r["step"] for r in heard if "loss" in r] == [1, 2, 3]
    assert heard[-1] == {"step": 3, "val_loss": summary["final_val_loss"]}
    assert all(r["tokens_per_second"] > 0 for r in heard if "loss" in r)


def test_adam_mini_keeps_about_half_the_state(cache_dir: Path) -> None:
    adamw = train(micro(cache_dir, steps=2))
    mini = train(micro(cache_dir, optimizer="adam-mini", steps=2))
    assert 0.45 < mini["optimizer_state_bytes"] / adamw["optimizer_state_bytes"] < 0.55


def test_optarena_train_is_the_api() -> None:
    assert callable(optarena.train) and optarena.TrainConfig is TrainConfig


def _losses(run: Path) -> dict[int, float]:
    records = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in records if "loss" in r}


@pytest.mark.parametrize("name", ["adamw", "adam-mini", "sophia"])
def test_resume_is_bit_exact(name: str, tmp_path: Path, cache_dir: Path) -> None:
    run = tmp_path / "run"
    config = micro(
        cache_dir,
        optimizer=name,
        lr=LR.get(name, 3e-3),
        steps=16,
        out=str(run),
        checkpoint_every=7,
        keep_checkpoints=0,
        log_every=1,
        hparams={"hessian_interval": 3} if name == "sophia" else {},
    )
    full = train(config)
    losses = _losses(run)
    final_weights = torch.load(run / "checkpoints" / "step-00000016.pt", weights_only=True)
    # interrupt: keep only the step-7 checkpoint, as if the process died at step 10
    for path in (run / "checkpoints").glob("step-0000001[46].*"):
        path.unlink()
    (run / "summary.json").unlink()
    resumed = train({**config, "resume": True})
    assert resumed["resumed_from"].endswith("step-00000007.pt")
    assert _losses(run) == losses  # steps 8..16 recomputed exactly, 1..7 kept
    assert resumed["final_val_loss"] == full["final_val_loss"]
    again = torch.load(run / "checkpoints" / "step-00000016.pt", weights_only=True)
    for key, value in final_weights["model"].items():
        assert torch.equal(again["model"][key], value), key


def test_resume_skips_a_corrupt_newest_checkpoint(tmp_path: Path, cache_dir: Path) -> None:
    run = tmp_path / "run"
    config = micro(cache_dir, steps=8, out=str(run), checkpoint_every=4, keep_checkpoints=0)
    train(config)
    newest = run / "checkpoints" / "step-00000008.pt"
    raw = bytearray(newest.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    newest.write_bytes(bytes(raw))
    (run / "summary.json").unlink()
    with pytest.warns(UserWarning, match="step-00000008.pt"):
        summary = train({**config, "resume": True})
    assert summary["resumed_from"].endswith("step-00000004.pt") and summary["steps"] == 8

    # a checkpoint without its checksum (torn) is skipped too; with none valid the run starts
    # from scratch (never wedged) and ends where the uninterrupted run ended
    for path in (run / "checkpoints").glob("*.sha256"):
        path.unlink()
    (run / "summary.json").unlink()
    with pytest.warns(UserWarning, match="no valid checkpoint"):
        assert latest_checkpoint(run / "checkpoints") is None
    with pytest.warns(UserWarning, match="starting from scratch"):
        fresh = train({**config, "resume": True})
    assert fresh["resumed_from"] is None
    assert fresh["final_val_loss"] == summary["final_val_loss"]
    path, payload = latest_checkpoint(run / "checkpoints")
    assert path.name == "step-00000008.pt" and payload["step"] == 8  # rewritten, valid


def test_resume_refuses_a_different_config(tmp_path: Path, cache_dir: Path) -> None:
    config = micro(cache_dir, steps=4, out=str(tmp_path / "run"))
    train(config)
    with pytest.raises(UserError, match="lr"):
        train({**config, "resume": True, "lr": 1e-2})
    with pytest.raises(UserError, match="already holds a run"):
        train(config)


def test_huge_lr_is_recorded_as_diverged(tmp_path: Path, cache_dir: Path) -> None:
    summary = train(micro(cache_dir, lr=1e3, warmup=0, steps=40, out=str(tmp_path / "run")))
    assert summary["diverged"] is True
    assert summary["steps"] < 40 and summary["diverged_at"] == summary["steps"]
    on_disk = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert on_disk["diverged"] is True
    assert not list((tmp_path / "run" / "checkpoints").glob("*.pt"))  # diverged state not kept


def test_gradient_accumulation_matches_the_full_batch(cache_dir: Path) -> None:
    one = train(micro(cache_dir, steps=6))
    two = train(micro(cache_dir, steps=6, grad_accum=4))
    assert math.isclose(one["final_val_loss"], two["final_val_loss"], rel_tol=1e-4)
    assert one["final_val_loss"] != train(micro(cache_dir, steps=6, seed=1))["final_val_loss"]


def test_study_architecture_ablation_and_llama_options(cache_dir: Path) -> None:
    summary = train(
        micro(
            cache_dir,
            steps=4,
            z_loss=0.0,
            model_overrides={
                "qk_norm": False,
                "norm": "rmsnorm",
                "mlp": "swiglu",
                "n_kv_head": 2,
                "tie_embeddings": True,
            },
        )
    )
    assert summary["model_config"]["qk_norm"] is False
    assert summary["params"] < train(micro(cache_dir, steps=1))["params"]


def test_pretrained_tokenizer_on_c4_shards_trains(shared_data: Path, cache_dir: Path) -> None:
    summary = train(
        micro(
            cache_dir,
            steps=3,
            batch_size=4,
            seq_len=32,
            eval_windows=4,
            data=str(shared_data / "c4-sample"),
            tokenizer=str(shared_data / "tokenizers" / "gpt-neox-20b.json"),
        )
    )
    assert summary["model_config"]["vocab_size"] % 64 == 0
    assert summary["model_config"]["vocab_size"] >= summary["data"]["tokenizer_vocab"] > 50_000
    assert math.isfinite(summary["final_val_loss"])


def test_tensorboard_logger_writes_events(tmp_path: Path, cache_dir: Path) -> None:
    pytest.importorskip("tensorboard")
    train(micro(cache_dir, steps=2, out=str(tmp_path / "run"), tensorboard=True, log_every=1))
    assert list((tmp_path / "run" / "tensorboard").glob("events.out.tfevents.*"))


def test_hybrid_groups_keep_their_own_peak_lrs(cache_dir: Path) -> None:
    summary = train(
        micro(
            cache_dir,
            optimizer="hybrid-adalayer-last-ln",
            lr=0.5,
            steps=2,
            hparams={"adaptive_lr": 2e-3},
        )
    )
    assert summary["peak_lrs"] == [2e-3, 0.5]


# --------------------------------------------------------------------------- config and schedule


def test_unknown_config_key_names_the_key() -> None:
    with pytest.raises(UserError, match=r"'stpes'.*'steps'"):
        TrainConfig.from_dict({"optimizer": "adamw", "stpes": 3})
    with pytest.raises(UserError, match="batch_size"):
        TrainConfig.from_dict({"batch_size": "big"})
    with pytest.raises(UserError, match="unknown model"):
        TrainConfig.from_dict({"model": "huge"})


def test_unknown_optimizer_fails_before_any_work(tmp_path: Path) -> None:
    with pytest.raises(UserError, match=r"unknown optimizer 'adamm'.*adamw"):
        train({"optimizer": "adamm", "out": str(tmp_path / "run")})
    assert not (tmp_path / "run").exists()


def test_cosine_schedule_is_the_studys() -> None:
    config = TrainConfig(steps=100)
    mults = [lr_multiplier(config, s) for s in range(100)]
    assert mults[0] == pytest.approx(0.1)  # warmup from 0.1 eta
    assert mults[5] == pytest.approx(0.1 + 0.9 * 5 / 10)
    assert mults[10] == pytest.approx(1.0)  # peak after 10% of steps
    assert mults[-1] == pytest.approx(0.1)  # cosine to 0.1 eta
    assert all(a >= b for a, b in itertools.pairwise(mults[10:]))
    assert mults[55] == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 45 / 89)))


@pytest.mark.parametrize(
    ("schedule", "at_60", "last"),
    [("constant", 1.0, 1.0), ("linear", 1 - 0.9 * 0.6, 0.1), ("wsd", 1.0, 0.1)],
)
def test_other_schedules(schedule: str, at_60: float, last: float) -> None:
    config = TrainConfig(steps=101, schedule=schedule, warmup=0.0, decay_fraction=0.2)
    assert lr_multiplier(config, 0) == pytest.approx(1.0)
    assert lr_multiplier(config, 60) == pytest.approx(at_60)
    assert lr_multiplier(config, 100) == pytest.approx(last)
    if schedule == "wsd":
        assert lr_multiplier(config, 80) == 1.0 > lr_multiplier(config, 82)


def test_no_output_dir_writes_nothing(tmp_path: Path, cache_dir: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    train(micro(cache_dir, steps=1))
    assert list(tmp_path.iterdir()) == []


def test_out_dir_is_never_clobbered(tmp_path: Path, cache_dir: Path) -> None:
    run = tmp_path / "run"
    train(micro(cache_dir, steps=2, out=str(run)))
    before = (run / "summary.json").read_bytes()
    with pytest.raises(UserError):
        train(micro(cache_dir, steps=3, out=str(run)))
    assert (run / "summary.json").read_bytes() == before
    shutil.rmtree(run)


def test_bf16_autocast_runs_where_asked(cache_dir: Path) -> None:
    summary = train(micro(cache_dir, steps=3, dtype="bfloat16"))
    assert summary["dtype"] == "bfloat16" and math.isfinite(summary["final_val_loss"])
    assert train(micro(cache_dir, steps=1))["dtype"] == "float32"  # CPU default


def test_relative_step_adafactor_runs_without_an_lr(cache_dir: Path) -> None:
    summary = train(micro(cache_dir, optimizer="adafactor-classic", lr=None, steps=3))
    assert summary["peak_lrs"] == [] and math.isfinite(summary["final_val_loss"])


def test_wandb_offline_logger_writes_a_run(
    tmp_path: Path, cache_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    out = tmp_path / "run"
    summary = train(micro(cache_dir, steps=2, out=str(out), wandb="offline", log_every=1))
    runs = list((out / "wandb").glob("offline-run-*"))
    assert len(runs) == 1, runs
    assert list(runs[0].glob("*.wandb")), "the offline run holds no history file"
    assert summary["steps"] == 2


def test_schedule_free_evaluates_its_average_and_resumes_bit_exact(
    tmp_path: Path, cache_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every evaluation runs at the eval point (the optimizer in eval mode), every step and
    checkpoint at the train point, so a run resumed between evaluations ends bit for bit where
    the uninterrupted one did."""
    modes: list[bool] = []
    evaluate = LanguageModelRun.evaluate

    def watched(self: LanguageModelRun) -> float:
        modes.append(all(g["train_mode"] is False for g in self.optimizer.param_groups))
        return evaluate(self)

    monkeypatch.setattr(LanguageModelRun, "evaluate", watched)
    run = tmp_path / "run"
    config = micro(
        cache_dir,
        optimizer="schedule-free",
        steps=12,
        out=str(run),
        eval_every=3,
        checkpoint_every=7,
        keep_checkpoints=0,
        log_every=1,
    )
    full = train(config)
    assert modes == [True] * 4 and len(full["eval_curve"]) == 4  # steps 3, 6, 9, 12
    saved = torch.load(run / "checkpoints" / "step-00000007.pt", weights_only=True)
    assert all(g["train_mode"] for g in saved["optimizer"]["param_groups"])
    final_weights = torch.load(run / "checkpoints" / "step-00000012.pt", weights_only=True)
    losses = _losses(run)
    (run / "checkpoints" / "step-00000012.pt").unlink()
    (run / "summary.json").unlink()
    resumed = train({**config, "resume": True})
    assert resumed["resumed_from"].endswith("step-00000007.pt")
    assert _losses(run) == losses
    assert resumed["eval_curve"] == full["eval_curve"]
    again = torch.load(run / "checkpoints" / "step-00000012.pt", weights_only=True)
    for key, value in final_weights["model"].items():
        assert torch.equal(again["model"][key], value), key
