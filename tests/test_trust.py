"""A results folder is data: a crafted DCP checkpoint's metadata or a planted Slurm result
pickle never runs code (docs/trust.md)."""

from __future__ import annotations

import builtins
import pickle
from pathlib import Path

import pytest
import torch

from optarena.distributed import read_dcp_metadata, verify_dcp


class _Payload:
    """Unpickles to ``open(marker, "w")``: a file appears if anything from the pickle runs."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (builtins.open, (self.marker, "w"))


def _saved_checkpoint(folder: Path) -> Path:
    import torch.distributed.checkpoint as dcp

    state = {"w": torch.arange(6.0).reshape(2, 3), "step": 3}
    dcp.save(state, checkpoint_id=folder)
    return folder


def test_a_real_checkpoint_passes_the_checks(tmp_path):
    folder = _saved_checkpoint(tmp_path / "step-3.dcp")
    verify_dcp(folder)
    assert "w" in read_dcp_metadata(folder).state_dict_metadata


def test_crafted_metadata_is_refused_without_running(tmp_path):
    folder = _saved_checkpoint(tmp_path / "step-3.dcp")
    marker = tmp_path / "ran"
    (folder / ".metadata").write_bytes(pickle.dumps(_Payload(marker)))
    # the file is a working exploit for a plain unpickler (what DCP itself uses) ...
    with (folder / ".metadata").open("rb") as fh:
        pickle.load(fh).close()
    assert marker.exists()
    marker.unlink()
    # ... and ours refuses it before anything in it runs
    with pytest.raises(ValueError, match=r"refused \.metadata: (io|builtins)\.open is not part"):
        verify_dcp(folder)
    assert not marker.exists()


def test_metadata_pointing_outside_the_checkpoint_is_refused(tmp_path):
    folder = _saved_checkpoint(tmp_path / "step-3.dcp")
    metadata = read_dcp_metadata(folder)
    for info in metadata.storage_data.values():
        info.relative_path = "../elsewhere.distcp"
    (folder / ".metadata").write_bytes(pickle.dumps(metadata))
    with pytest.raises(ValueError, match="is not inside the checkpoint"):
        verify_dcp(folder)


def test_a_crafted_non_tensor_entry_is_refused(tmp_path):
    folder = _saved_checkpoint(tmp_path / "step-3.dcp")
    metadata = read_dcp_metadata(folder)
    marker = tmp_path / "ran"
    evil = pickle.dumps(_Payload(marker))
    for index, info in metadata.storage_data.items():
        if index.fqn == "step":  # the non-tensor entry: replace its bytes with the payload
            path = folder / info.relative_path
            data = bytearray(path.read_bytes())
            data[info.offset : info.offset + info.length] = b""
            data[info.offset : info.offset] = evil
            path.write_bytes(bytes(data))
            info.length = len(evil)
    (folder / ".metadata").write_bytes(pickle.dumps(metadata))
    with pytest.raises(ValueError, match="refused entry 'step'"):
        verify_dcp(folder)
    assert not marker.exists()


# --------------------------------------------------------------------------- Slurm results


@pytest.fixture
def mocked_slurm():
    submitit_tests = pytest.importorskip("submitit.slurm.test_slurm")
    with submitit_tests.mocked_slurm() as mock:
        yield mock


@pytest.mark.parametrize("state", ["COMPLETED", "RUNNING"])
def test_a_crafted_slurm_result_pickle_never_runs(tmp_path, mocked_slurm, state):
    """submitit writes each job's return value to ``*_result.pkl``; a driver re-attaching to a
    job (or collecting one) reads only the JSON result carrying the job's recorded nonce, so a
    pickle planted in the Slurm folder runs nothing and forges no result."""
    from submitit.core import submission

    from optarena.sweep.executors import SlurmExecutor, Task

    folder = tmp_path / "slurm"
    first = SlurmExecutor("optarena.sweep.toy:train", folder, workers=1, cluster="slurm")
    first.submit(Task("run0", {"optimizer": "adamw", "lr": 1e-3, "steps": 5}))
    assert first.wait(0) == []
    ((job, (_, nonce)),) = first._jobs.items()
    with mocked_slurm.job_context(job.job_id):
        submission.process_job(job.paths.folder)
    result_json = folder / "results" / f"run0-{nonce}.json"
    assert job.paths.result_pickle.is_file() and result_json.is_file()
    del first  # the driver dies before collecting the run

    # an attacker with write access to the folder plants a pickle and removes the JSON result
    marker = tmp_path / "pwned"
    job.paths.result_pickle.write_bytes(pickle.dumps(("success", _Payload(marker))))
    result_json.unlink()
    mocked_slurm.set_job_state(job.job_id, state)

    second = SlurmExecutor("optarena.sweep.toy:train", folder, workers=1, cluster="slurm")
    second.submit(Task("run0", {"optimizer": "adamw", "lr": 1e-3, "steps": 5}))
    outcomes = second.wait(0)
    assert not marker.exists()
    if state == "COMPLETED":  # a finished job without its JSON result: the run goes out again
        assert outcomes == []
        ((again, _),) = second._jobs.items()
        assert again.job_id != job.job_id
    else:  # a live job is re-attached; once it ends, its planted pickle is no result
        (outcome,) = outcomes
        assert outcome.error is not None and "without a result" in outcome.error
    # ... and the planted file is a working exploit for a plain unpickler (submitit's own)
    pickle.loads(job.paths.result_pickle.read_bytes())[1].close()
    assert marker.exists()
