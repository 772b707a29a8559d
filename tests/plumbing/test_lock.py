"""One writer per output: local file locks and S3 leases, held by real processes."""

import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from mnist_ray.plumbing import lock, storage
from mnist_ray.errors import MnistRayError

REPO = Path(__file__).resolve().parents[2]
MNIST_RAY = str(Path(sys.executable).with_name("mnist-ray"))

# A run that takes the lock of argv[1] and keeps it until it is killed.
HOLD = """
import sys, time
from mnist_ray.plumbing import lock
with lock.output_lock(sys.argv[1], lease_seconds=float(sys.argv[2]), beside=sys.argv[3] == "beside"):
    print("held", flush=True)
    time.sleep(600)
"""


@pytest.fixture
def holder():
    """Start a process holding the lock of an output; all of them are killed at the end."""
    procs = []

    def start(uri: str, lease_seconds: float = lock.LEASE_SECONDS, beside: bool = False) -> subprocess.Popen:
        proc = subprocess.Popen([sys.executable, "-c", HOLD, uri, str(lease_seconds), "beside" if beside else "in"],
                                stdout=subprocess.PIPE, text=True)
        procs.append(proc)
        assert proc.stdout.readline().strip() == "held"
        return proc

    yield start
    for proc in procs:
        proc.kill()
        proc.wait()


def _refused_naming(uri: str, proc: subprocess.Popen) -> str:
    started = time.monotonic()
    with pytest.raises(MnistRayError, match="is being written by another run") as e:
        with lock.output_lock(uri):
            pass
    assert time.monotonic() - started < 5
    assert f"pid {proc.pid} on host" in str(e.value) and "since 20" in str(e.value)
    return str(e.value)


def _kill(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGKILL)
    proc.wait()


def test_a_local_output_has_one_writer_and_a_killed_one_frees_it_at_once(tmp_path, holder):
    out = str(tmp_path / "predictions")
    first = holder(out)
    _refused_naming(out, first)
    with lock.output_lock(str(tmp_path / "other")):  # another output: side by side
        pass
    _kill(first)
    with lock.output_lock(out):  # the kernel dropped the dead process's lock
        assert json.loads((tmp_path / "predictions" / "_lock").read_text())["pid"] == os.getpid()
    assert not (tmp_path / "predictions" / "_lock").exists()


def test_a_model_dir_is_locked_beside_it(tmp_path, holder):
    model = str(tmp_path / "model")
    first = holder(model + "/", beside=True)  # the same output however it is spelled
    assert (tmp_path / "model.lock").exists()
    with pytest.raises(MnistRayError, match=f"pid {first.pid} "):
        with lock.output_lock(model, beside=True):
            pass
    # ... and a model dir locked beside it holds nothing of the lock.
    _kill(first)
    with lock.output_lock(model, beside=True):
        assert (tmp_path / "model.lock").exists() and not (tmp_path / "model").exists()


def test_the_writer_does_not_take_its_own_lock_for_a_foreign_file(tmp_path):
    out = str(tmp_path / "ds")
    with lock.output_lock(out):
        loc = storage.prepare_output(out, overwrite=False, run_id="aaa")
        storage.write_bytes(loc, "part-aaa-0.parquet", b"data")
        storage.publish(loc, {"files": [{"path": "part-aaa-0.parquet"}], "fingerprint": "x"}, run_id="aaa")
        assert (tmp_path / "ds" / "_lock").exists()  # kept through publish
        storage.prepare_output(out, overwrite=True, run_id="bbb")
    assert sorted(p.name for p in (tmp_path / "ds").iterdir()) == ["_SUCCESS", "_manifest.json", "part-aaa-0.parquet"]


def test_a_file_in_the_way_is_a_clear_error(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(MnistRayError, match="is \\(or lies under\\) a file, not a directory"):
        with lock.output_lock(str(tmp_path / "file")):
            pass


def test_a_job_refuses_an_output_another_job_is_writing(tmp_path, holder):
    """The real jobs take the lock before anything else touches the output."""
    from mnist_ray.preparation.prepare import PrepareConfig, run

    out = tmp_path / "shards"
    first = holder(str(out))
    with pytest.raises(MnistRayError, match=f"pid {first.pid} "):
        run(PrepareConfig(output=str(out), limit=20))
    assert sorted(p.name for p in out.iterdir()) == ["_lock"]  # nothing written


def _cli(*args: str) -> subprocess.Popen:
    return subprocess.Popen([MNIST_RAY, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "RAY_ADDRESS": ""})


@pytest.mark.e2e
def test_two_commands_into_one_output_at_once(tmp_path):
    """Two real `mnist-ray prepare` into one output: the second is refused in seconds, naming the
    first, which completes; a third into another output runs beside the first."""
    out, other = tmp_path / "shards", tmp_path / "other"
    first = _cli("prepare", "--limit", "200", "--output", str(out))
    deadline = time.monotonic() + 60
    while not (out / "_lock").exists() or not (out / "_lock").read_text():
        assert first.poll() is None and time.monotonic() < deadline, first.communicate()
        time.sleep(0.1)
    started = time.monotonic()
    second = subprocess.run([MNIST_RAY, "prepare", "--limit", "200", "--output", str(out)],
                            capture_output=True, text=True, timeout=120)
    refused_after = time.monotonic() - started
    print(f"refused after {refused_after:.1f} s")
    beside = _cli("prepare", "--limit", "100", "--output", str(other))
    assert second.returncode == 1, second.stderr
    last = second.stderr.strip().splitlines()[-1]
    assert last.startswith(f"mnist-ray prepare: error: {out} is being written by another run (pid {first.pid} ")
    assert "command: mnist-ray prepare --limit 200" in last
    assert refused_after < 30  # the interpreter's and the dataset's start-up: no Ray is started
    assert first.wait(timeout=300) == 0, first.communicate()[1][-3000:]
    assert beside.wait(timeout=300) == 0, beside.communicate()[1][-3000:]
    assert json.loads((out / "_manifest.json").read_text())["rows"] == 400  # --limit is per split: 200 train + 200 val
    assert json.loads((other / "_manifest.json").read_text())["rows"] == 200
    assert not (out / "_lock").exists() and not (other / "_lock").exists()


# --- object storage ------------------------------------------------------------------------------


def test_an_s3_output_has_one_writer_and_a_killed_ones_lease_lapses(s3_bucket, holder, caplog):
    import boto3

    out = f"s3://{s3_bucket}/predictions"
    first = holder(out, 2.0)
    time.sleep(4.5)  # past the lease term: only its renewals keep it
    message = _refused_naming(out, first)
    assert "lease renewed" in message
    with lock.output_lock(f"s3://{s3_bucket}/other"):  # another output: side by side
        pass
    _kill(first)
    with pytest.raises(MnistRayError, match=f"pid {first.pid} "):  # the lease has not lapsed yet
        with lock.output_lock(out):
            pass
    deadline = time.monotonic() + 10
    while True:
        try:
            with caplog.at_level(logging.WARNING, logger="mnist_ray"), lock.output_lock(out):
                body = boto3.client("s3").get_object(Bucket=s3_bucket, Key="predictions/_lock")["Body"].read()
                assert json.loads(body)["pid"] == os.getpid()
            break
        except MnistRayError:
            assert time.monotonic() < deadline, "the dead run's lease never lapsed"
            time.sleep(0.5)
    assert "took over the lock of a run that stopped renewing it" in caplog.text
    assert "Contents" not in boto3.client("s3").list_objects_v2(Bucket=s3_bucket, Prefix="predictions/")


def test_an_s3_lease_taken_over_fails_the_run_that_lost_it(s3_bucket):
    import boto3

    with pytest.raises(MnistRayError, match="lost its lock"):
        with lock.output_lock(f"s3://{s3_bucket}/out", lease_seconds=0.6):
            # Another run overwrites the lease (as after this one stalled past its term).
            boto3.client("s3").put_object(Bucket=s3_bucket, Key="out/_lock", Body=b"{}")
            time.sleep(1.0)


def test_an_s3_job_refuses_an_output_another_job_is_writing(s3_bucket, holder):
    from mnist_ray.preparation.prepare import PrepareConfig, run

    out = f"s3://{s3_bucket}/shards"
    first = holder(out)
    with pytest.raises(MnistRayError, match=f"pid {first.pid} "):
        run(PrepareConfig(output=out, limit=20))
    with pytest.raises(MnistRayError, match="bucket 'no-such-bucket' does not exist"):
        with lock.output_lock("s3://no-such-bucket/x"):
            pass
