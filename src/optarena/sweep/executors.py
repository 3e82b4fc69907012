"""Where runs execute: a local process pool, Ray, or Slurm (submitit), behind one interface.

An executor only runs ``fn(config)`` somewhere and hands back what came out; it never touches
the results store (the driver does), so a backend cannot lose or duplicate a result. The
function travels as a ``"module:attr"`` path, imported where it runs, which keeps tasks small
and lets any backend run any importable function (``optarena.train:train`` by default).
"""

from __future__ import annotations

import contextlib
import importlib
import multiprocessing as mp
import multiprocessing.connection as mp_connection
import os
import signal
import sys
import threading
import time
import traceback
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from optarena.errors import UserError
from optarena.sweep.spec import Resources

DEFAULT_FUNCTION = "optarena.train:train"
BACKENDS = ("local", "ray", "slurm")


@dataclass
class Task:
    """One run to execute: its id and the config handed to the function."""

    run_id: str
    config: dict[str, Any]


@dataclass
class Outcome:
    """What came back: a summary, or an error message (one line) with its traceback."""

    task: Task
    summary: dict[str, Any] | None = None
    error: str | None = None
    detail: str | None = None


def resolve_function(path: str) -> Callable[[dict[str, Any]], dict[str, Any]]:
    """``"pkg.module:attr"`` -> the function (raises UserError with a fix when it is wrong)."""
    module_name, sep, attr = path.partition(":")
    if not sep or not module_name or not attr:
        raise UserError(f"--function {path!r}: expected 'package.module:function'")
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        raise UserError(f"--function {path!r}: cannot import {module_name!r} ({err})") from None
    except Exception as err:  # the module itself is broken: say how, in one line
        first = f"{type(err).__name__}: {err}".splitlines()[0]
        raise UserError(f"--function {path!r}: importing {module_name!r} fails: {first}") from None
    fn = getattr(module, attr, None)
    if not callable(fn):
        raise UserError(f"--function {path!r}: {module_name} has no function {attr!r}")
    return fn


def execute(function: str, config: dict[str, Any], threads: int | None = None) -> dict[str, Any]:
    """Run one task in a worker; exceptions come back as data so one bad run stops nothing."""
    try:
        if threads:
            _set_threads(threads)  # before the import: torch reads OMP_NUM_THREADS once
        fn = resolve_function(function)
        if threads:
            _set_threads(threads)  # importing the function may have loaded torch just now
        with _run_log(config.get("out")):
            summary = fn(config)
        return {"summary": dict(summary)}
    except BaseException as err:
        if isinstance(err, KeyboardInterrupt):
            raise
        message = f"{type(err).__name__}: {err}".splitlines()[0][:500]
        return {"error": message, "detail": traceback.format_exc()[-4000:]}


@contextlib.contextmanager
def _run_log(out: str | None) -> Iterator[None]:
    """Send what a run prints to ``OUT/log.txt``: the sweep's own display stays readable."""
    if not out:
        yield
        return
    Path(out).mkdir(parents=True, exist_ok=True)
    with (
        open(Path(out) / "log.txt", "a", encoding="utf-8") as log,
        contextlib.redirect_stdout(log),
        contextlib.redirect_stderr(log),
    ):
        yield


def _set_threads(threads: int) -> None:
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[var] = str(threads)
    torch = sys.modules.get("torch")
    if torch is not None and torch.get_num_threads() != threads:
        torch.set_num_threads(threads)


def _outcome(task: Task, payload: Any) -> Outcome:
    if isinstance(payload, dict) and "summary" in payload:
        return Outcome(task, summary=payload["summary"])
    if isinstance(payload, dict) and "error" in payload:
        return Outcome(task, error=payload["error"], detail=payload.get("detail"))
    return Outcome(task, error=f"worker returned {type(payload).__name__}, not a result")


def package_pythonpath() -> str:
    """PYTHONPATH that lets a fresh interpreter import this very copy of optarena."""
    root = str(Path(__file__).resolve().parents[2])
    parts = [root] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    return os.pathsep.join(dict.fromkeys(parts))


def execute_run(
    function: str, config: dict[str, Any], threads: int, resources: Resources | None = None
) -> dict[str, Any]:
    """One run on this node: in this process, or under ``torchrun`` with one process per GPU
    (or ``procs_per_node`` on CPU) when the run is distributed."""
    if resources is None or not resources.distributed:
        return execute(function, config, threads)
    if resources.nodes > 1:
        return {
            "error": f"a run on {resources.nodes} nodes needs --backend slurm; the local and Ray "
            "backends run each distributed run on one node (up to all of its GPUs)"
        }
    return run_torchrun(
        function,
        {**config, "parallel": resources.parallel},
        resources.processes_per_node,
        threads,
    )


def run_torchrun(function: str, config: dict[str, Any], nproc: int, threads: int) -> dict[str, Any]:
    """``torchrun --standalone --nproc_per_node=nproc -m optarena.sweep.launch``: rank 0's result,
    or the launcher's error (with the end of its output)."""
    import json
    import subprocess
    import tempfile

    with tempfile.TemporaryDirectory(prefix="optarena-run-") as tmp:
        config_path, result_path = Path(tmp) / "config.json", Path(tmp) / "result.json"
        config_path.write_text(json.dumps(config, default=str), encoding="utf-8")
        cmd = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            f"--nproc_per_node={nproc}",
            "-m",
            "optarena.sweep.launch",
            function,
            str(config_path),
            str(result_path),
        ]
        env = {**os.environ, "PYTHONPATH": package_pythonpath(), "OMP_NUM_THREADS": str(threads)}
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if result_path.is_file():
            return json.loads(result_path.read_text(encoding="utf-8"))
        tail = (proc.stdout[-2000:] + proc.stderr[-6000:]).strip()
        return {
            "error": f"torchrun with {nproc} processes exited with code {proc.returncode}",
            "detail": tail,
        }


def _positive(flag: str, value: int | None) -> None:
    """A count of workers or threads must be at least 1 (0 would stall the driver)."""
    if value is not None and value < 1:
        raise UserError(f"{flag} {value}: give at least 1")


class Executor(ABC):
    """Runs tasks; ``capacity`` of them at a time is what the driver keeps in flight."""

    capacity: int = 1

    @abstractmethod
    def submit(self, task: Task) -> None: ...

    @abstractmethod
    def wait(self, timeout: float) -> list[Outcome]:
        """Outcomes of tasks that finished, waiting up to ``timeout`` s for at least one."""

    @abstractmethod
    def close(self, cancel: bool = False) -> None: ...

    def attach(self, store: Any) -> None:  # noqa: B027 (a hook: most backends need nothing)
        """Called by the sweep driver with its results store before the first task; backends
        that record what they submitted keep those records there."""

    def __enter__(self) -> Executor:
        return self

    def __exit__(self, exc_type: object, *exc: object) -> None:
        self.close(cancel=exc_type is not None)


# -------------------------------------------------------------------------------- local


def _child(
    function: str,
    config: dict[str, Any],
    threads: int,
    parent: int,
    conn: Any,
    resources: Resources | None = None,
) -> None:
    """A worker process: one run, its result sent back through ``conn``."""
    # Ctrl-C reaches the whole process group; the driver decides, and terminates its workers
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _set_threads(threads)

    def watch() -> None:  # SIGKILL of the driver leaves no one to collect the result, and a
        while True:  # resumed sweep would race this run: exit as soon as the driver is gone
            if os.getppid() != parent:
                os._exit(3)
            time.sleep(0.5)

    threading.Thread(target=watch, daemon=True, name="optarena-parent-watch").start()
    conn.send(execute_run(function, config, threads, resources))
    conn.close()


@dataclass
class _Running:
    task: Task
    process: Any
    conn: Any


class LocalExecutor(Executor):
    """One spawned process per run, ``workers`` at a time, the cores split between them.

    A process per run (rather than a reused pool) costs a second of start-up and buys two
    things: a run that crashes its process (out of memory, a segfault) is told apart from the
    runs beside it, and every run starts from a clean interpreter.
    """

    def __init__(
        self,
        function: str,
        workers: int = 1,
        threads: int | None = None,
        resources: Resources | None = None,
    ) -> None:
        _positive("--workers", workers)
        _positive("--threads", threads)
        self.function = function
        self.capacity = workers
        self.resources = resources
        procs = resources.processes_per_node if resources else 1
        cores = os.cpu_count() or 1
        self.threads = threads or max(1, cores // (workers * procs))
        self._ctx = mp.get_context("spawn")
        self._running: list[_Running] = []

    def submit(self, task: Task) -> None:
        receive, send = self._ctx.Pipe(duplex=False)
        process = self._ctx.Process(
            target=_child,
            args=(self.function, task.config, self.threads, os.getpid(), send, self.resources),
            name=f"optarena-run-{task.run_id}",
            daemon=False,
        )
        process.start()
        send.close()
        self._running.append(_Running(task, process, receive))

    def wait(self, timeout: float) -> list[Outcome]:
        if not self._running:
            return []
        handles = [r.conn for r in self._running] + [r.process.sentinel for r in self._running]
        mp_connection.wait(handles, timeout=timeout)
        outcomes = []
        for run in list(self._running):
            payload: Any = None
            if run.conn.poll():
                try:
                    payload = run.conn.recv()
                except (EOFError, OSError):
                    payload = None
            elif run.process.is_alive():
                continue
            run.process.join(timeout=30)
            run.conn.close()
            self._running.remove(run)
            if payload is None:
                code = run.process.exitcode
                message = (
                    f"worker process died (exit code {code}: killed, out of memory or crashed)"
                )
                outcomes.append(Outcome(run.task, error=message))
            else:
                outcomes.append(_outcome(run.task, payload))
        return outcomes

    def close(self, cancel: bool = False) -> None:
        for run in self._running:
            if cancel:
                run.process.terminate()
            run.process.join(timeout=30)
            run.conn.close()
        self._running.clear()


# ---------------------------------------------------------------------------------- ray


class RayExecutor(Executor):
    """Runs as Ray tasks: a local Ray instance, or a cluster at ``address``.

    Each run asks for ``gpus_per_run`` GPUs (default: one where the cluster has GPUs, none
    otherwise) and ``threads`` CPUs per process; a distributed run (``resources``) runs
    ``torchrun`` inside its task, on one node. A task whose worker process or node dies is
    retried up to ``max_retries`` times by Ray (the run resumes from its last checkpoint when its
    directory is on storage every node sees); exceptions of the run itself are results, not
    retried. Results come back to the driver, which alone writes the store.
    """

    def __init__(
        self,
        function: str,
        workers: int | None = None,
        threads: int = 1,
        address: str | None = None,
        resources: Resources | None = None,
        max_retries: int = 3,
    ) -> None:
        try:
            import ray
        except ImportError:
            raise UserError(
                "--backend ray needs Ray: pip install 'optarena[cluster]' (or pip install ray)"
            ) from None
        _positive("--workers", workers)
        _positive("--threads", threads)
        if max_retries < 0:
            raise UserError(f"--max-retries {max_retries}: give 0 or more")
        resources = resources or Resources()
        if resources.nodes > 1:
            raise UserError(
                f"[resources] nodes = {resources.nodes}: Ray runs each distributed run on one "
                "node; use --backend slurm for runs across nodes"
            )
        self._ray = ray
        self.function = function
        self.threads = threads
        if not ray.is_initialized():
            kwargs: dict[str, Any] = {
                "include_dashboard": False,
                "log_to_driver": False,
                "runtime_env": {"env_vars": {"PYTHONPATH": package_pythonpath()}},
            }
            if address:
                kwargs["address"] = address
            elif workers:
                kwargs["num_cpus"] = workers * threads * resources.processes_per_node
            try:
                ray.init(**kwargs)
            except ConnectionError as err:
                raise UserError(
                    f"--address {address}: cannot reach a Ray cluster ({err})"
                ) from None
        total = ray.cluster_resources()
        gpus = resources.gpus_per_run
        if gpus is None:  # one GPU per run by default, where there are GPUs
            gpus = 1 if total.get("GPU", 0) >= 1 else 0
        self.resources = resources.with_gpus(gpus)
        cpus = threads * self.resources.processes_per_node
        if gpus > total.get("GPU", 0):
            raise UserError(
                f"each run asks for {gpus} GPUs but the Ray cluster has "
                f"{int(total.get('GPU', 0))}; lower --gpus-per-run"
            )
        by_cpu = int(total.get("CPU", 1)) // cpus
        by_gpu = int(total.get("GPU", 0)) // gpus if gpus else by_cpu
        self.capacity = workers or max(1, min(by_cpu, by_gpu))
        self.max_retries = max_retries
        self._remote = ray.remote(
            num_cpus=cpus, num_gpus=gpus, max_retries=max_retries, retry_exceptions=False
        )(execute_run)
        self._refs: dict[Any, Task] = {}

    def submit(self, task: Task) -> None:
        ref = self._remote.remote(self.function, task.config, self.threads, self.resources)
        self._refs[ref] = task

    def wait(self, timeout: float) -> list[Outcome]:
        if not self._refs:
            return []
        done, _ = self._ray.wait(list(self._refs), num_returns=1, timeout=timeout)
        outcomes = []
        for ref in done:
            task = self._refs.pop(ref)
            try:
                outcomes.append(_outcome(task, self._ray.get(ref)))
            except Exception as err:  # retries exhausted: the worker or its node kept dying
                message = f"{type(err).__name__}: {err}".splitlines()[0]
                if self.max_retries:
                    message = f"after {self.max_retries} retries: {message}"
                outcomes.append(Outcome(task, error=message[:500]))
        return outcomes

    def close(self, cancel: bool = False) -> None:
        if cancel:
            for ref in self._refs:
                self._ray.cancel(ref, force=True)
        self._refs.clear()
        self._ray.shutdown()


# -------------------------------------------------------------------------------- slurm


# Slurm states in which a job may still produce its result (``sacct``).
_SLURM_LIVE = {
    "PENDING",
    "RUNNING",
    "REQUEUED",
    "CONFIGURING",
    "COMPLETING",
    "RESIZING",
    "SUSPENDED",
    "STAGE_OUT",
}


class JobRecords:
    """Which Slurm job runs which run, and the nonce its result must carry: ``FOLDER/jobs.json``
    for an executor on its own; the results store (:meth:`Executor.attach`) under a sweep."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def all(self) -> dict[str, dict[str, str]]:
        import json

        try:
            records = json.loads(self.path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return {}
        if not isinstance(records, dict):
            return {}
        return {k: v for k, v in records.items() if isinstance(v, dict) and "job" in v}

    def get(self, run_id: str) -> dict[str, str] | None:
        return self.all().get(run_id)

    def record(self, jobs: list[tuple[str, str, str]]) -> None:
        records = self.all()
        records.update({run_id: {"job": job, "nonce": nonce} for run_id, job, nonce in jobs})
        self._write(records)

    def forget(self, run_ids: list[str]) -> None:
        records = self.all()
        for run_id in run_ids:
            records.pop(run_id, None)
        self._write(records)

    def _write(self, records: dict[str, Any]) -> None:
        from optarena import atomic

        with atomic.storage_errors(self.path):
            self.path.parent.mkdir(parents=True, exist_ok=True)
        atomic.write_json(self.path, records, indent=1)


def slurm_entry(
    function: str, config: dict[str, Any], threads: int, result: str, distributed: bool
) -> None:
    """What a Slurm job runs: the run (:func:`execute`, or :func:`~optarena.sweep.launch.
    slurm_task` for each task of a distributed run), its outcome written as JSON to ``result``
    by rank 0. The driver reads that file and never unpickles what submitit keeps."""
    from optarena import atomic

    if distributed:
        from optarena.sweep.launch import slurm_task

        payload = slurm_task(function, config, threads)
    else:
        payload = execute(function, config, threads)
    if int(os.environ.get("RANK", "0")) == 0:
        atomic.write_json(result, {"config_out": config.get("out"), **payload}, default=str)


class SlurmExecutor(Executor):
    """Runs as Slurm jobs through submitit; ``cluster="local"`` runs them as local processes
    (submitit's own local executor), which is how the tests run this path end to end.

    Runs submitted together go out as one job array (at most ``workers`` of its jobs at once,
    ``--array=...%workers``). The job of every run is recorded with a random nonce (in the
    results store under a sweep, else ``FOLDER/jobs.json``); a sweep started again (after its
    driver was killed, a login node rebooted...) re-attaches to the recorded jobs that are still
    queued or running and collects the results of those that finished, so only runs without a
    live or finished job are submitted again. A job's result is the JSON file
    ``FOLDER/results/RUN-NONCE.json`` it writes, taken only when it names the recorded run; the
    pickles submitit keeps are never read (a results folder is data, see docs/trust.md). A
    distributed run (``resources``) is one job of ``nodes`` x ``procs_per_node`` tasks, one per
    GPU.
    """

    def __init__(
        self,
        function: str,
        folder: Path,
        workers: int = 64,
        threads: int = 1,
        cluster: str | None = None,
        parameters: dict[str, Any] | None = None,
        resources: Resources | None = None,
    ) -> None:
        try:
            import submitit
        except ImportError:
            raise UserError(
                "--backend slurm needs submitit: pip install 'optarena[cluster]'"
            ) from None
        _positive("--workers", workers)
        _positive("--threads", threads)
        self._submitit = submitit
        self.function = function
        self.threads = threads
        self.capacity = workers
        self.folder = Path(folder)
        self.resources = resources or Resources()
        self._executor = submitit.AutoExecutor(folder=self.folder, cluster=cluster)
        self.cluster = self._executor.cluster
        res = self.resources
        params: dict[str, Any] = {
            "timeout_min": 24 * 60,
            "cpus_per_task": threads,
            "name": "optarena",
            "nodes": res.nodes,
            "tasks_per_node": res.processes_per_node,
            "slurm_array_parallelism": workers,
        }
        if res.gpus_per_node:
            params["gpus_per_node"] = res.gpus_per_node
        params.update(parameters or {})
        self._executor.update_parameters(**params)
        self._tasks_per_job = int(params["nodes"]) * int(params["tasks_per_node"])
        self._jobs: dict[Any, tuple[Task, str]] = {}  # job -> (task, nonce)
        self._pending: list[Task] = []
        self.records: Any = JobRecords(self.folder / "jobs.json")

    def attach(self, store: Any) -> None:
        """Keep the job records in the sweep's results store."""
        self.records = store.slurm_jobs()

    def _result_path(self, run_id: str, nonce: str) -> Path:
        return self.folder / "results" / f"{run_id}-{nonce}.json"

    def _reattach(self, job_id: str, run_id: str, nonce: str) -> Any | None:
        """The job of an earlier driver, if it finished with a result or may still make one."""
        tasks = list(range(self._tasks_per_job))
        if self._result_path(run_id, nonce).is_file():
            return self._submitit.LocalJob(folder=self.folder, job_id=job_id, tasks=tasks)
        if self.cluster == "slurm":
            job = self._submitit.SlurmJob(folder=self.folder, job_id=job_id, tasks=tasks)
            state = job.watcher.get_state(job_id, mode="force").split(" ")[0]
            return job if state in _SLURM_LIVE else None
        return None  # local / debug jobs die with their driver's session

    # ----------------------------------------------------------------- executor

    def submit(self, task: Task) -> None:
        known = self.records.get(task.run_id)
        job = self._reattach(known["job"], task.run_id, known["nonce"]) if known else None
        if job is not None:
            self._jobs[job] = (task, known["nonce"])
        else:
            self._pending.append(task)

    def _flush(self) -> None:
        """Submit the pending runs, together: one job array on Slurm."""
        if not self._pending:
            return
        import secrets

        pending, self._pending = self._pending, []
        distributed = self.resources.distributed
        nonces = [secrets.token_hex(8) for _ in pending]
        (self.folder / "results").mkdir(parents=True, exist_ok=True)
        old = os.environ.get("PYTHONPATH")
        os.environ["PYTHONPATH"] = package_pythonpath()  # local jobs inherit the environment
        try:
            with self._executor.batch():
                jobs = []
                for task, nonce in zip(pending, nonces, strict=True):
                    config = task.config
                    if distributed:
                        config = {**config, "parallel": self.resources.parallel}
                    result = str(self._result_path(task.run_id, nonce))
                    jobs.append(
                        self._executor.submit(
                            slurm_entry, self.function, config, self.threads, result, distributed
                        )
                    )
        finally:
            if old is None:
                os.environ.pop("PYTHONPATH", None)
            else:
                os.environ["PYTHONPATH"] = old
        records = zip(pending, jobs, nonces, strict=True)
        self.records.record([(task.run_id, job.job_id, nonce) for task, job, nonce in records])
        for task, job, nonce in zip(pending, jobs, nonces, strict=True):
            self._jobs[job] = (task, nonce)

    def _finished(self, job: Any) -> bool:
        task, nonce = self._jobs[job]
        return self._result_path(task.run_id, nonce).is_file() or job.done()

    def _outcome(self, job: Any) -> Outcome:
        """The run's result from the JSON its job wrote, or why there is none."""
        import json

        task, nonce = self._jobs[job]
        path = self._result_path(task.run_id, nonce)
        try:
            payload = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            state = getattr(job, "state", "UNKNOWN")
            return Outcome(
                task,
                error=f"slurm job {job.job_id} ended without a result (state {state}); its "
                f"output is in {self.folder}/{job.job_id}_*",
            )
        except (OSError, ValueError) as err:
            return Outcome(task, error=f"slurm job {job.job_id}: unreadable result {path}: {err}")
        if not isinstance(payload, dict) or payload.get("config_out") != task.config.get("out"):
            return Outcome(task, error=f"slurm job {job.job_id}: {path} is not this run's result")
        return _outcome(task, payload)

    def wait(self, timeout: float) -> list[Outcome]:
        self._flush()
        deadline = time.monotonic() + timeout
        while True:
            done = [job for job in self._jobs if self._finished(job)]
            if done or not self._jobs or time.monotonic() >= deadline:
                break
            time.sleep(min(0.5, max(0.0, deadline - time.monotonic())))
        outcomes = [self._outcome(job) for job in done]
        # the driver stores these now: a later sweep must not collect them again
        self.records.forget([self._jobs[job][0].run_id for job in done])
        for job in done:
            del self._jobs[job]
        return outcomes

    def close(self, cancel: bool = False) -> None:
        if cancel:
            for job in self._jobs:
                job.cancel(check=False)
        self._jobs.clear()
        self._pending.clear()
