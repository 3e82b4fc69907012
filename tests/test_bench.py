"""``optarena bench step|train``: table and JSON structure on tiny shapes (no timing checks)."""

from __future__ import annotations

import json
import platform
import statistics
import sys
from pathlib import Path

import pytest
import torch

from optarena.bench import step
from optarena.bench.shapes import Shape, llama_layout, num_params, parse_shape
from optarena.cli import main
from optarena.optim.compiled import compile_available

TINY = "d_model=32,n_layers=1,n_heads=2,n_kv_heads=1,d_ff=64,vocab=256"


def test_shapes() -> None:
    assert num_params(Shape()) == 33_694_208  # the 33.7M Llama shape
    assert parse_shape("llama-34m") == Shape()
    assert parse_shape("d_model=64,n_layers=2").n_layers == 2
    with pytest.raises(ValueError, match="invalid shape"):
        parse_shape("width=3")
    with pytest.raises(ValueError, match="d_model must be a positive integer, not 'abc'"):
        parse_shape("d_model=abc")
    with pytest.raises(ValueError, match="vocab must be a positive integer, not '0'"):
        parse_shape("vocab=0")
    with pytest.raises(ValueError, match=r"d_model \(100\) must be a multiple of n_heads \(8\)"):
        parse_shape("d_model=100")


def test_ratios_pair_the_rounds() -> None:
    """A ratio is the median over rounds of two times taken back to back: a slow moment that
    hits both candidates of a round cancels (the ratio of the two medians would read 10)."""
    a = step.Candidate("a", "fused", lambda: None, times=[1.0, 10.0, 10.0])
    b = step.Candidate("b", "probe", lambda: None, times=[1.0, 1.0, 10.0])
    assert step.median_ratio(a.times, b.times) == 1.0
    assert a.median_ms / b.median_ms == 10.0


def test_bench_step_eager_with_references(tmp_path: Path, capsys) -> None:
    out = tmp_path / "step.json"
    rc = main(
        ["bench", "step", "--shape", TINY, "--optimizers", "adamw,lion,sophia,adam-mini",
         "--steps", "2", "--warmup", "1", "--modes", "eager", "--json", str(out)]
    )  # fmt: skip
    assert rc == 0
    printed = capsys.readouterr().out
    assert "optimizer step" in printed and "adamw" in printed
    report = json.loads(out.read_text())
    assert report["benchmark"] == "step" and report["params"] == num_params(parse_shape(TINY))
    glibc = sys.platform.startswith("linux") and platform.libc_ver()[0] == "glibc"
    assert report["allocator"] == ("steady" if glibc else "default (steady needs glibc)")
    rows = {r["optimizer"]: r for r in report["rows"]}
    assert list(rows) == ["adamw", "lion", "sophia", "adam-mini"]
    for row in rows.values():
        for key in ("eager_ms", "eager_vs_bound", "bytes_per_param", "bound_ms",
                    "bandwidth_gbps", "state_bytes_per_param", "references"):  # fmt: skip
            assert key in row, key
        assert "fused_ms" not in row
        rounds = row["eager_vs_bound_rounds"]  # one ratio a timed round, the row's its median
        assert len(rounds) == 2 and all(r > 0 for r in rounds)
        assert row["eager_vs_bound"] == pytest.approx(statistics.median(rounds), rel=1e-3)
    assert rows["adamw"]["bytes_per_param"] == pytest.approx(28.0)
    assert rows["adamw"]["state_bytes_per_param"] == pytest.approx(8.0, rel=1e-2)  # + step counters
    assert [r["name"] for r in rows["adamw"]["references"]] == [
        "torch-adamw-fused",
        "torch-adamw-foreach",
    ]
    for row in rows.values():
        for ref in row["references"]:
            assert "error" in ref or ("ms" in ref and "eager_ratio" in ref), ref


def test_the_cpu_clock_times_one_cpu_thread(tmp_path: Path, monkeypatch, capsys) -> None:
    """``--clock cpu`` reads the timing thread's CPU time: the report says so, every round is
    timed, and it is refused in one line where one thread's CPU time is not the step's."""
    threads = torch.get_num_threads()
    out = tmp_path / "step.json"
    try:
        argv = ["bench", "step", "--shape", TINY, "--optimizers", "sgd", "--steps", "2",
                "--warmup", "1", "--modes", "eager", "--no-references",
                "--device", "cpu"]  # fmt: skip
        assert main([*argv, "--clock", "cpu", "--threads", "1", "--json", str(out)]) == 0
        report = json.loads(out.read_text())
        assert report["clock"] == "cpu" and "cpu clock" in capsys.readouterr().out
        (row,) = report["rows"]
        assert len(row["eager_vs_bound_rounds"]) == 2 and row["eager_ms"] > 0
        assert main([*argv, "--clock", "cpu", "--threads", "2"]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "--device cpu --threads 1" in err, err
    finally:
        torch.set_num_threads(threads)
    with pytest.raises(ValueError, match="--device cpu --threads 1"):
        monkeypatch.setattr(torch, "get_num_threads", lambda: 1)
        step.check_clock("cpu", torch.device("cuda"))
    with pytest.raises(ValueError, match="unknown clock 'sundial'"):
        step.check_clock("sundial", torch.device("cpu"))


@pytest.mark.skipif(not compile_available("cpu"), reason="no compiler")
def test_bench_step_fused(tmp_path: Path) -> None:
    out = tmp_path / "step.json"
    rc = main(
        ["bench", "step", "--shape", TINY, "--optimizers", "lion", "--steps", "1",
         "--warmup", "1", "--modes", "fused", "--no-references", "--json", str(out)]
    )  # fmt: skip
    assert rc == 0
    (row,) = json.loads(out.read_text())["rows"]
    assert row["fused_ms"] > 0 and row["compile_s"] >= 0 and row["references"] == []


def test_bench_train(tmp_path: Path) -> None:
    out = tmp_path / "train.json"
    rc = main(
        ["bench", "train", "--shape", TINY.replace("vocab=256", "vocab=512"),
         "--optimizers", "lion", "--steps", "1",
         "--warmup", "1", "--batch-size", "2", "--seq-len", "16", "--device", "cpu",
         "--modes", "eager", "--rounds", "3", "--json", str(out)]
    )  # fmt: skip
    assert rc == 0
    report = json.loads(out.read_text())
    assert report["benchmark"] == "train" and report["rounds"] == 3
    (row,) = report["rows"]
    assert row["optimizer"] == "lion" and row["mode"] == "eager"
    assert row["plain_tokens_per_second"] > 0 and row["harness_tokens_per_second"] > 0
    # each ratio is the median of its rounds' (the three candidates of a round back to back)
    for key in ("harness_vs_plain", "plain_vs_torch_adamw"):
        assert len(row[f"{key}_rounds"]) == 3
        assert row[key] == statistics.median(row[f"{key}_rounds"])


def test_unwritable_json_is_refused_before_the_benchmark(tmp_path: Path, capsys) -> None:
    (tmp_path / "afile").write_text("")
    argv = ["bench", "step", "--optimizers", "nope", "--json", str(tmp_path / "afile" / "x.json")]
    assert main(argv) == 2  # the path is checked first: the unknown optimizer is not reached
    assert "cannot write --json" in capsys.readouterr().err


@pytest.mark.parametrize(
    "argv",
    [
        ["bench", "step", "--optimizers", "nope"],
        ["bench", "step", "--shape", "width=3"],
        ["bench", "step", "--modes", "fast"],
        ["bench", "step", "--device", "cuda:99", "--optimizers", "sgd"],
        ["bench", "train", "--device", "cude"],
        ["bench", "train", "--steps", "0"],
        ["bench", "train", "--rounds", "0"],
        ["bench", "train", "--batch-size", "0"],
        ["bench", "train", "--seq-len", "-3"],
        ["bench", "step", "--shape", "d_model=abc"],
        ["bench", "step", "--shape", "d_model=100,n_heads=8"],
    ],
)
def test_bench_errors(argv: list[str], capsys) -> None:
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("optarena: error:") and err.count("\n") == 1, err


NEW = ["muon", "normuon", "soap", "kron", "mars", "ademamix", "adopt", "nadamw", "schedule-free"]


def test_bench_step_pairs_every_new_optimizer_with_its_reference(tmp_path: Path) -> None:
    out = tmp_path / "step.json"
    rc = main(
        ["bench", "step", "--shape", TINY, "--optimizers", ",".join(NEW), "--steps", "1",
         "--warmup", "1", "--modes", "eager", "--json", str(out)]
    )  # fmt: skip
    assert rc == 0
    rows = {r["optimizer"]: r for r in json.loads(out.read_text())["rows"]}
    assert list(rows) == NEW
    for name, row in rows.items():
        assert row["references"], name  # Muon: torch's Muon with fused and foreach AdamW
        for ref in row["references"]:
            assert "error" not in ref and ref["eager_ratio"] > 0, (name, ref)
        matrix = name in ("muon", "normuon", "soap", "kron")
        assert ("matrix_gflop" in row) == matrix, name
        if matrix:
            assert row["matrix_gflop"] > 0 and 0 < row["share_of_training_step"] < 1
    # Newton-Schulz on every hidden matrix: 5 x (4 m^2 n + 2 m^3) each
    shape = parse_shape(TINY)
    want = sum(
        5 * (4 * min(d) ** 2 * max(d) + 2 * min(d) ** 3)
        for n, d, _ in llama_layout(shape)
        if len(d) == 2 and "embed" not in n and "lm_head" not in n
    )
    assert rows["muon"]["matrix_gflop"] == pytest.approx(want / 1e9)
    assert rows["normuon"]["matrix_gflop"] == pytest.approx(want / 1e9)


def test_a_reference_that_fails_to_step_is_reported_in_one_line(monkeypatch) -> None:
    """A reference that raises while stepping (pytorch-optimizer's Kron on some shapes asks for
    a terabyte) is reported as that reference's error; ours are still timed."""

    class Broken:
        state: dict = {}

        def step(self) -> None:
            raise RuntimeError("cannot allocate\nthe allocator's second line")

    monkeypatch.setattr(step, "_reference", lambda ref, named, shape: Broken())
    row = step.bench_optimizer(
        "muon", parse_shape(TINY), steps=1, warmup=1, modes=("eager",), references=True
    )
    assert row["references"] == [
        {"name": name, "error": "RuntimeError: cannot allocate"}
        for name in ("torch-muon+adamw", "torch-muon+adamw-foreach")
    ]
    assert row["eager_ms"] > 0
