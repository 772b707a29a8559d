"""Connecting to Ray, and the jobs submitted to a real Ray head with `ray job submit`."""

import json
import os
import secrets
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from mnist_ray import cluster
from mnist_ray.errors import MnistRayError

REPO = Path(__file__).resolve().parents[1]
RAY = str(Path(sys.executable).with_name("ray"))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_an_unreachable_address_fails_in_seconds_naming_it():
    port = _free_port()  # nothing listens there once the socket is closed
    started = time.monotonic()
    with pytest.raises(MnistRayError, match=f"cannot reach the Ray cluster at 127.0.0.1:{port}"):
        cluster.check_reachable(f"127.0.0.1:{port}")
    assert time.monotonic() - started < 10
    with pytest.raises(MnistRayError, match="HOST:PORT"):
        cluster.check_reachable("not an address")
    assert cluster._host_port("ray://10.0.0.5:10001") == ("10.0.0.5", 10001)


def test_a_job_given_an_unreachable_address_exits_1_with_one_line(tmp_path):
    port = _free_port()
    proc = subprocess.run([sys.executable, str(REPO / "jobs" / "prepare.py"), "--address", f"127.0.0.1:{port}",
                           "--output", str(tmp_path / "shards")],
                          capture_output=True, text=True, timeout=60, env={**os.environ, "RAY_ADDRESS": ""})
    assert proc.returncode == 1
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("mnist-ray prepare: error: cannot reach the Ray cluster at 127.0.0.1:")
    assert "Traceback" not in proc.stderr


def test_local_paths_on_a_cluster_of_several_machines_get_a_warning(monkeypatch, caplog):
    import ray

    monkeypatch.setattr(ray, "nodes", lambda: [{"Alive": True}, {"Alive": True}])
    monkeypatch.setattr(ray.util, "get_node_ip_address", lambda: "10.0.0.7")
    with caplog.at_level("WARNING", logger="mnist_ray"):
        cluster._warn_local_paths("10.0.0.5:6379", ("out/shards", "s3://bucket/model"))
    assert "out/shards" in caplog.text and "s3://bucket/model" not in caplog.text
    caplog.clear()
    monkeypatch.setattr(ray, "nodes", lambda: [{"Alive": True}])
    with caplog.at_level("WARNING", logger="mnist_ray"):
        cluster._warn_local_paths("ray://10.0.0.5:10001", ("out/shards",))  # a head elsewhere
    assert "out/shards" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="mnist_ray"):
        cluster._warn_local_paths("127.0.0.1:6379", ("out/shards",))  # one machine: nothing to say
        cluster._warn_local_paths("10.0.0.7:6379", ("out/shards",))  # this machine's own address
    assert caplog.text == ""


def _listening(pids: set[int]) -> list:
    import psutil

    return [c for c in psutil.net_connections("tcp") if c.status == psutil.CONN_LISTEN and c.pid in pids]


def _tree(pids) -> set[int]:
    import psutil

    procs = [psutil.Process(p) for p in pids if psutil.pid_exists(p)]
    return {p.pid for p in procs} | {c.pid for p in procs for c in p.children(recursive=True)}


def test_single_node_ray_listens_on_loopback_only(ray_local):
    import ray

    node = ray._private.worker._global_node
    pids = _tree({info.process.pid for infos in node.all_processes.values() for info in infos} | {os.getpid()})
    listening = _listening(pids)
    assert listening and all(c.laddr.ip in ("127.0.0.1", "::ffff:127.0.0.1") for c in listening), listening


# --- a real head -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ray_head(tmp_path_factory):
    """`ray start --head` on 127.0.0.1 with token authentication, stopped at the end.

    The token is the test's own (never whatever an earlier run left in ~/.ray), and the head
    keeps its files in its own temp dir, apart from the session's in-process Ray.
    """
    temp = Path("/tmp") / f"mnist-ray-head-{secrets.token_hex(3)}"  # short: Unix socket paths
    env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(16),
           "RAY_ADDRESS": "", "RAY_USAGE_STATS_ENABLED": "0",
           # Without it `ray start` replaces --node-ip-address 127.0.0.1 by the machine's
           # reachable IP and its servers listen on every interface.
           "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    gcs, dashboard = _free_port(), _free_port()
    # Ports of its own: the session's Ray also listens on 127.0.0.1, and Ray's fixed defaults
    # (e.g. the dashboard agent's 52365, the client server's 10001) would collide.
    ports = [f"--{name}={_free_port()}" for name in (
        "dashboard-agent-listen-port", "dashboard-agent-grpc-port", "metrics-export-port",
        "runtime-env-agent-port", "ray-client-server-port")]
    subprocess.run([RAY, "start", "--head", "--node-ip-address", "127.0.0.1", "--dashboard-host", "127.0.0.1",
                    "--port", str(gcs), "--dashboard-port", str(dashboard), *ports, "--num-cpus", "2",
                    "--temp-dir", str(temp), "--disable-usage-stats"],
                   env=env, check=True, capture_output=True, timeout=120)
    env["RAY_ADDRESS"] = f"http://127.0.0.1:{dashboard}"  # what `ray job` commands talk to
    env["_TEMP"] = str(temp)
    deadline = time.monotonic() + 60
    while subprocess.run([RAY, "job", "list"], env=env, capture_output=True, timeout=60).returncode != 0:
        assert time.monotonic() < deadline, "the head's job server never came up"
        time.sleep(1)  # `ray start` returns before the dashboard's job server listens
    try:
        yield env
    finally:
        _stop_head(str(temp))
        shutil.rmtree(temp, ignore_errors=True)


def _head_processes(temp: str) -> list:
    """The head's processes: those started with its temp dir, and all their children."""
    import psutil

    roots = [p for p in psutil.process_iter(["cmdline"]) if any(temp in a for a in p.info["cmdline"] or [])]
    return roots + [c for p in roots for c in p.children(recursive=True)]


def _stop_head(temp: str) -> None:
    """`ray stop` would also kill the session's Ray (and with its GCS, this pytest process):
    stop only the head's processes."""
    import psutil

    procs = _head_processes(temp)
    for p in procs:
        try:
            p.terminate()
        except psutil.NoSuchProcess:
            pass
    _, alive = psutil.wait_procs(procs, timeout=15)
    for p in alive:
        p.kill()


def _submit(env: dict, job_id: str, *args: str) -> tuple[str, str]:
    """`ray job submit` from the repo root with the project's runtime env; (final state, logs)."""
    submit = subprocess.run([RAY, "job", "submit", "--submission-id", job_id, "--runtime-env",
                             "jobs/runtime_env.yaml", "--", "python", *args],
                            cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    deadline, state = time.monotonic() + 60, "unknown"
    while state == "unknown" and time.monotonic() < deadline:
        # `submit` returns when the logs end, a moment before the state is final.
        out = subprocess.run([RAY, "job", "status", job_id], env=env, capture_output=True, text=True, timeout=60)
        text = (out.stdout + out.stderr).lower()  # "Job 'x' succeeded" / "Job 'x' failed"
        state = next((w for w in ("succeeded", "failed", "stopped") if f"job '{job_id}' {w}" in text), "unknown")
        time.sleep(0 if state != "unknown" else 1)
    logs = subprocess.run([RAY, "job", "logs", job_id], env=env, capture_output=True, text=True, timeout=60)
    return state, logs.stdout or submit.stdout + submit.stderr


@pytest.mark.e2e
def test_jobs_submitted_to_a_real_head(ray_head, tmp_path):
    listening = _listening({p.pid for p in _head_processes(ray_head["_TEMP"])})
    assert listening and all(c.laddr.ip in ("127.0.0.1", "::ffff:127.0.0.1") for c in listening), listening
    out = tmp_path / "mnist"
    state, logs = _submit(ray_head, "prepare-1", "jobs/prepare.py", "--source", "mnist-sample", "--limit", "100",
                          "--output", str(out / "shards"))
    assert state == "succeeded", logs[-3000:]
    state, logs = _submit(ray_head, "train-1", "jobs/train.py", "--data", str(out / "shards"), "--model", "cnn",
                          "--epochs", "1", "--workers", "1", "--batch-size", "32", "--no-tflite",
                          "--output", str(out / "model"))
    assert state == "succeeded", logs[-3000:]
    state, logs = _submit(ray_head, "infer-1", "jobs/infer.py", "--model", str(out / "model"),
                          "--input", str(out / "shards"), "--output", str(out / "predictions"))
    assert state == "succeeded", logs[-3000:]
    manifest = json.loads((out / "predictions" / "_manifest.json").read_text())
    assert manifest["rows"] == 200 and manifest["error_rows"] == 0 and (out / "predictions" / "_SUCCESS").exists()

    # Wrong arguments and a user error: FAILED, with the reason in the job's logs.
    state, logs = _submit(ray_head, "bad-args", "jobs/infer.py", "--batch-size", "many")
    assert state == "failed" and "invalid int value: 'many'" in logs
    state, logs = _submit(ray_head, "bad-model", "jobs/infer.py", "--model", str(out / "nothing"),
                          "--input", str(out / "shards"), "--output", str(out / "p2"))
    assert state == "failed" and "mnist-ray infer: error: no model dir" in logs
