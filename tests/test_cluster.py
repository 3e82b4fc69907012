"""Sweeps on clusters: ``[resources]`` in specs, distributed runs launched by each backend, Ray
retrying runs whose node dies, Slurm job arrays that a re-run re-attaches to.

Real engines throughout: Ray's own multi-node test cluster (``ray.cluster_utils.Cluster``, nodes
are processes that can be killed), submitit's local executor (jobs as local processes, several
tasks per job), and submitit's Slurm executor with ``sbatch``/``sacct`` mocked by submitit's own
test helper (the sbatch scripts it writes are the ones a cluster would run).
"""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import pytest

from optarena.cli import main as cli_main
from optarena.errors import UserError
from optarena.sweep import toy
from optarena.sweep.driver import run_sweep
from optarena.sweep.executors import (
    LocalExecutor,
    RayExecutor,
    SlurmExecutor,
    Task,
    execute_run,
)
from optarena.sweep.spec import Resources, parse_resources, parse_spec, run_id
from optarena.sweep.store import Store
from sweep_cases import SLOW_FIRST

TOY = "optarena.sweep.toy:train"
TRAIN = "optarena.train:train"
SRC = Path(__file__).resolve().parents[1] / "src"
TESTS = Path(__file__).resolve().parent


# --------------------------------------------------------------------------- [resources]


def test_resources_table_defaults_and_derived_counts():
    spec = parse_spec(
        '[resources]\ngpus_per_run = 8\nnodes = 2\n[[grid]]\noptimizer = "adamw"\nlr = 1e-3\n'
    )
    res = spec.resources
    assert (res.gpus_per_node, res.processes_per_node, res.world_size) == (4, 4, 8)
    assert res.distributed and res.parallel == "fsdp"
    assert not parse_spec('[[grid]]\noptimizer = "adamw"\nlr = 1e-3\n').resources.distributed
    cpu = parse_resources({"procs_per_node": 2, "parallel": "ddp"}, "x")
    assert (cpu.gpus_per_node, cpu.world_size, cpu.parallel) == (0, 2, "ddp")
    assert Resources().with_gpus(2).world_size == 2


@pytest.mark.parametrize(
    ("table", "message"),
    [
        ({"gpu_per_run": 1}, "unknown key 'gpu_per_run'"),
        ({"gpus_per_run": 3, "nodes": 2}, "not divisible by nodes"),
        ({"gpus_per_run": 4, "procs_per_node": 2}, "one process per GPU"),
        ({"nodes": 0}, "nodes must be an integer >= 1"),
        ({"gpus_per_run": 1.5}, "gpus_per_run must be an integer"),
        ({"parallel": "zero"}, "parallel must be 'ddp' or 'fsdp'"),
    ],
)
def test_bad_resources_are_one_line_user_errors(table, message):
    with pytest.raises(UserError, match=message):
        parse_resources(table, "spec.toml")


def test_how_a_run_is_spread_does_not_change_its_id():
    config = {"optimizer": "adamw", "lr": 1e-3, "steps": 10, "seed": 0}
    assert run_id(config) == run_id({**config, "parallel": "fsdp"})


def test_cli_gpus_flag_is_checked_against_the_spec(tmp_path, capsys):
    spec = tmp_path / "s.toml"
    spec.write_text('[resources]\nnodes = 2\n[[grid]]\noptimizer = "adamw"\nlr = 1e-3\n')
    args = ["sweep", str(spec), "--out", str(tmp_path / "o"), "--function", TOY]
    assert cli_main([*args, "--gpus-per-run", "3"]) == 2
    assert "not divisible by nodes 2" in capsys.readouterr().err
    assert cli_main([*args, "--gpus-per-run", "2", "--slurm-gpus", "4"]) == 2
    assert "disagree" in capsys.readouterr().err
    # nodes = 2 cannot run on one machine: each run fails with the reason, nothing hangs
    assert cli_main([*args, "--workers", "1"]) == 1
    assert (
        "needs --backend slurm"
        in (next((tmp_path / "o" / "runs").iterdir()) / "error.txt").read_text()
    )


def test_multi_node_runs_are_refused_outside_slurm():
    out = execute_run(
        TOY, {"optimizer": "adamw", "lr": 1e-3}, 1, Resources(nodes=2, procs_per_node=1)
    )
    assert "needs --backend slurm" in out["error"]


# --------------------------------------------------------------------------- distributed runs


def _micro(out: Path, cache_dir: Path) -> dict:
    return dict(
        optimizer="adam-mini",
        lr=3e-3,
        steps=4,
        batch_size=4,
        seq_len=32,
        eval_windows=4,
        progress=False,
        cache_dir=str(cache_dir),
        out=str(out),
        model_overrides={"d_model": 48, "n_head": 6, "n_kv_head": 3},
    )


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.getbasetemp() / "optarena-cache"


def _wait(executor, timeout: float = 300.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        outcomes = executor.wait(2.0)
        if outcomes:
            return outcomes
    raise AssertionError("no outcome in time")


@pytest.fixture(scope="module")
def local_ddp_run(tmp_path_factory, cache_dir):
    """A 2-process DDP run launched by the local backend (torchrun inside the worker)."""
    out = tmp_path_factory.mktemp("local-ddp")
    executor = LocalExecutor(
        TRAIN, workers=1, threads=1, resources=Resources(procs_per_node=2, parallel="ddp")
    )
    executor.submit(Task("r", _micro(out / "run", cache_dir)))
    (outcome,) = _wait(executor)
    executor.close()
    assert outcome.error is None, outcome.detail
    return outcome.summary


@pytest.mark.slow
def test_local_backend_runs_a_distributed_run_under_torchrun(local_ddp_run):
    assert local_ddp_run["parallel"] == {"mode": "ddp", "world_size": 2}
    assert local_ddp_run["steps"] == 4


@pytest.mark.slow
def test_slurm_tasks_of_one_job_make_one_distributed_run(tmp_path, cache_dir, local_ddp_run):
    """submitit's local executor runs a job of 2 tasks; each exports its rank from the job
    environment and joins one FSDP2 run, which ends where the DDP run ended."""
    executor = SlurmExecutor(
        TRAIN, tmp_path / "slurm", workers=1, cluster="local", resources=Resources(procs_per_node=2)
    )
    executor.submit(Task("r", _micro(tmp_path / "run", cache_dir)))
    (outcome,) = _wait(executor)
    assert outcome.error is None, outcome.detail
    assert outcome.summary["parallel"] == {"mode": "fsdp", "world_size": 2}
    assert outcome.summary["final_val_loss"] == pytest.approx(
        local_ddp_run["final_val_loss"], rel=1e-5
    )


# --------------------------------------------------------------------------- Slurm (mocked)


@pytest.fixture
def mocked_slurm():
    submitit_tests = pytest.importorskip("submitit.slurm.test_slurm")
    with submitit_tests.mocked_slurm() as mock:
        yield mock


def _sbatch_scripts(folder: Path) -> list[str]:
    """The sbatch scripts submitit wrote (one per ``sbatch`` call), oldest first."""
    scripts = sorted(folder.rglob("*_submission.sh"), key=os.path.getmtime)
    return [p.read_text() for p in scripts]


def _run_job(mock, job) -> None:
    """What Slurm would do: run the job's pickled function in a job environment."""
    from submitit.core import submission

    with mock.job_context(job.job_id):
        submission.process_job(job.paths.folder)


def test_slurm_runs_go_out_as_one_job_array_and_a_rerun_reattaches(tmp_path, mocked_slurm):
    folder = tmp_path / "slurm"
    tasks = [
        Task(f"run{i}", {"optimizer": "adamw", "lr": lr, "steps": 5})
        for i, lr in enumerate((1e-4, 1e-3, 1e-2))
    ]
    first = SlurmExecutor(TOY, folder, workers=2, cluster="slurm")
    for task in tasks:
        first.submit(task)
    assert first.wait(0) == []  # submitted, all running
    (script,) = _sbatch_scripts(folder)
    assert "#SBATCH --array=0-2%2" in script
    jobs = {task.run_id: job for job, (task, _) in first._jobs.items()}
    array = jobs["run0"].job_id.split("_")[0]
    assert [jobs[t.run_id].job_id for t in tasks] == [f"{array}_{i}" for i in range(3)]

    # run0 finishes, run2's job fails without a result, then the driver dies (no wait())
    _run_job(mocked_slurm, jobs["run0"])
    mocked_slurm.set_job_state(jobs["run2"].job_id, "FAILED")
    del first

    second = SlurmExecutor(TOY, folder, workers=2, cluster="slurm")
    for task in tasks:  # the new driver hands over every run without a stored result
        second.submit(task)
    outcomes = second.wait(0)
    # run0's result is collected, run1's job is still running, only run2 is submitted again
    assert [o.task.run_id for o in outcomes] == ["run0"]
    assert outcomes[0].summary["final_val_loss"] == pytest.approx(toy.expected_loss("adamw", 1e-4))
    scripts = _sbatch_scripts(folder)
    assert len(scripts) == 2 and "--array" not in scripts[1]
    reattached = {task.run_id: job for job, (task, _) in second._jobs.items()}
    assert reattached["run1"].job_id == jobs["run1"].job_id
    assert reattached["run2"].job_id != jobs["run2"].job_id
    _run_job(mocked_slurm, reattached["run1"])
    assert [o.task.run_id for o in second.wait(0)] == ["run1"]
    # collected results are forgotten: retrying a run later submits a fresh job
    assert set(second.records.all()) == {"run2"}


def test_slurm_distributed_run_asks_for_nodes_tasks_and_gpus(tmp_path, mocked_slurm):
    resources = Resources(gpus_per_run=8, nodes=2)
    executor = SlurmExecutor(
        TOY, tmp_path / "slurm", threads=6, cluster="slurm", resources=resources
    )
    executor.submit(Task("big", {"optimizer": "adamw", "lr": 1e-3}))
    executor.wait(0)
    (script,) = _sbatch_scripts(tmp_path / "slurm")
    for line in ("--nodes=2", "--ntasks-per-node=4", "--gpus-per-node=4", "--cpus-per-task=6"):
        assert f"#SBATCH {line}" in script
    assert "srun" in script  # one task per GPU, started by Slurm on both nodes


# --------------------------------------------------------------------------- Ray


@pytest.mark.slow
def test_ray_retries_a_run_whose_node_dies_and_the_driver_stores_it(tmp_path, monkeypatch):
    """A 2-node Ray cluster (processes on this machine); the node running the run is removed
    mid-run; Ray retries the task on the other node and the result reaches the store. The run
    is the toy's, slow on its first attempt only (``sweep_cases.slow_first_attempt``)."""
    cluster_utils = pytest.importorskip("ray.cluster_utils")
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(SRC), str(TESTS)]))
    cluster = cluster_utils.Cluster(initialize_head=True, head_node_args={"num_cpus": 0})
    try:
        nodes = [cluster.add_node(num_cpus=1) for _ in range(2)]
        cluster.wait_for_nodes()
        executor = RayExecutor(SLOW_FIRST, threads=1, address=cluster.address, max_retries=2)
        assert executor.resources.gpus_per_run == 0  # no GPUs in this cluster: none per run
        assert executor.capacity == 2
        with pytest.raises(UserError, match="asks for 1 GPUs"):
            RayExecutor(TOY, address=cluster.address, resources=Resources(gpus_per_run=1))
        spec = parse_spec('[base]\ntoy_seconds = 15\n[[grid]]\noptimizer = "adamw"\nlr = 1e-3\n')
        store = Store(tmp_path)
        result: dict = {}
        driver = threading.Thread(
            target=lambda: result.update(r=run_sweep(store, spec.runs(), executor))
        )
        driver.start()
        marker = store.run_dir(spec.runs()[0].id) / "toy_started"
        deadline = time.monotonic() + 120
        while not marker.exists():
            assert time.monotonic() < deadline, "the run never started"
            time.sleep(0.2)
        pid = int(marker.read_text())
        parent = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
        (victim,) = [n for n in nodes if n.all_processes["raylet"][0].process.pid == parent]
        marker.unlink()
        cluster.remove_node(victim)
        driver.join(timeout=180)
        assert not driver.is_alive()
        assert (result["r"].done, result["r"].failed) == (1, 0)
        (record,) = store.runs()
        assert record.status == "done" and record.final_val_loss == pytest.approx(3.05, abs=0.01)
        assert int(marker.read_text()) != pid  # a second attempt ran, in another process
    finally:
        cluster.shutdown()
