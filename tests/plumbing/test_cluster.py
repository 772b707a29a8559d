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

from mnist_ray.plumbing import cluster
from mnist_ray.errors import MnistRayError

REPO = Path(__file__).resolve().parents[2]
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
                           "--output", str(tmp_path / "shards"), "--shared-storage"],
                          capture_output=True, text=True, timeout=60, env={**os.environ, "RAY_ADDRESS": ""})
    assert proc.returncode == 1
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("mnist-ray prepare: error: cannot reach the Ray cluster at 127.0.0.1:")
    assert "Traceback" not in proc.stderr


def test_local_paths_on_a_cluster_are_refused_unless_said_to_be_shared():
    with pytest.raises(MnistRayError, match="out/shards is a local path, but the job runs on the Ray cluster at "
                                            "10.0.0.5:6379 .*--shared-storage"):
        cluster.check_shared_storage("10.0.0.5:6379", ("s3://bucket/model", "out/shards"), False)
    with pytest.raises(MnistRayError, match="file:///data/x is a local path"):
        cluster.check_shared_storage("127.0.0.1:6379", ("file:///data/x",), False)  # a head on this machine too
    cluster.check_shared_storage("10.0.0.5:6379", ("out/shards", "/nfs/model"), True)
    cluster.check_shared_storage("ray://10.0.0.5:10001", ("s3://bucket/a", "gs://b/c", ""), False)


def test_a_job_with_a_local_path_on_a_cluster_fails_before_anything_is_written(tmp_path):
    """Refused in the time it takes to start Python: before Ray, and leaving no output behind."""
    port = _free_port()
    proc = subprocess.run([sys.executable, str(REPO / "jobs" / "prepare.py"), "--address", f"127.0.0.1:{port}",
                           "--output", str(tmp_path / "out" / "shards")],
                          capture_output=True, text=True, timeout=120, env={**os.environ, "RAY_ADDRESS": ""})
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines()[-1] == (
        f"mnist-ray prepare: error: {tmp_path / 'out' / 'shards'} is a local path, but the job runs on the Ray "
        f"cluster at 127.0.0.1:{port} whose other nodes cannot see it: use shared storage such as "
        "s3://bucket/prefix, or pass --shared-storage if every node mounts this path")
    assert not (tmp_path / "out" / "shards").exists()


def _listening(pids: set[int]) -> list:
    import psutil

    return [c for c in psutil.net_connections("tcp") if c.status == psutil.CONN_LISTEN and c.pid in pids]


def _tree(pids) -> set[int]:
    import psutil

    procs = [psutil.Process(p) for p in pids if psutil.pid_exists(p)]
    return {p.pid for p in procs} | {c.pid for p in procs for c in p.children(recursive=True)}


# Ports Ray takes by default: a head started later on this machine wants them.
RAY_DEFAULT_PORTS = {6379, 8265, 10001, 52365, 44217, 44227}
RAY_DEFAULT_WORKER_PORTS = range(10002, 20000)


def _ephemeral_ports() -> range:
    low, high = map(int, Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split())
    return range(low, high + 1)


def test_single_node_ray_listens_on_loopback_only_and_on_no_default_port(ray_local):
    import psutil
    import ray

    pids = _tree({cluster.local_ray().process.pid, os.getpid()})
    listening = _listening(pids)
    assert listening and all(c.laddr.ip in ("127.0.0.1", "::ffff:127.0.0.1") for c in listening), listening
    # A port outside the OS's ephemeral range is only ever held on purpose; inside it, a port
    # Ray was given 0 for may by chance be one of the defaults, so those are checked where
    # Ray records the ports it was told to use.
    ephemeral = _ephemeral_ports()
    fixed = {p for p in RAY_DEFAULT_PORTS | set(RAY_DEFAULT_WORKER_PORTS) if p not in ephemeral}
    held = {(c.laddr.port, psutil.Process(c.pid).name()) for c in listening if c.laddr.port in fixed}
    assert not held, held
    (node,) = ray.nodes()
    configured = {name: port for name, port in node.items() if name.endswith("Port")}
    assert len(configured) >= 5 and not set(configured.values()) & RAY_DEFAULT_PORTS, configured
    raylet = next(p for p in map(psutil.Process, pids) if p.name() == "raylet")
    metric_ports = {name: int(raylet.environ()[name]) for name in cluster.FIXED_PORT_ENV}
    assert not set(metric_ports.values()) & RAY_DEFAULT_PORTS, metric_ports
    assert fixed & RAY_DEFAULT_PORTS  # what the listening check covers is not empty
    assert cluster.RAY_DEFAULT_PORTS == RAY_DEFAULT_PORTS  # the ports free_port never returns


def test_the_local_rays_start_log_has_no_name_a_killed_command_could_leave(ray_local):
    local = cluster.local_ray()
    assert local.READY in local.output()  # read back whole, the shared file offset untouched
    assert local.READY in local.output()
    stdout = os.readlink(f"/proc/{local.process.pid}/fd/1")
    assert stdout.startswith(local.temp_dir) and stdout.endswith("(deleted)"), stdout


def test_the_local_ray_runs_no_usage_poller(ray_local):
    """Ray Data's usage poller would query a Prometheus on localhost:9090 from the driver every few
    seconds (and log a traceback when it outlives the command's streams at exit)."""
    import ray
    from ray.data._internal.usage import collector, poller

    ray.data.range(10).materialize()
    assert os.environ[cluster.USAGE_STATS] == "0" and collector.usage_collection_disabled()
    assert poller._poller is None


# --- a real head -------------------------------------------------------------------------------


def _start_head(temp: Path, *, agent_port: int | None = None) -> dict:
    """`ray start --head` on 127.0.0.1 with token authentication; the env `ray job` commands need.

    The token is the test's own (never whatever an earlier run left in ~/.ray), and the head
    keeps its files in its own temp dir, apart from the session's local Ray.
    """
    env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(16),
           "RAY_ADDRESS": "", "RAY_USAGE_STATS_ENABLED": "0",
           # Without it `ray start` replaces --node-ip-address 127.0.0.1 by the machine's
           # reachable IP and its servers listen on every interface.
           "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    gcs, dashboard = _free_port(), _free_port()
    # Ports of its own: Ray's fixed defaults (the dashboard agent's 52365, the client server's
    # 10001) may be taken on a shared machine by other people's Rays.
    ports = [f"--dashboard-agent-listen-port={agent_port or _free_port()}"] + [
        f"--{name}={_free_port()}" for name in (
            "dashboard-agent-grpc-port", "metrics-export-port", "runtime-env-agent-port", "ray-client-server-port")]
    subprocess.run([RAY, "start", "--head", "--node-ip-address", "127.0.0.1", "--dashboard-host", "127.0.0.1",
                    "--port", str(gcs), "--dashboard-port", str(dashboard), *ports, "--num-cpus", "2",
                    "--temp-dir", str(temp), "--disable-usage-stats"],
                   env=env, check=True, capture_output=True, timeout=180)
    env["RAY_ADDRESS"] = f"http://127.0.0.1:{dashboard}"  # what `ray job` commands talk to
    env["_TEMP"] = str(temp)
    deadline = time.monotonic() + 90
    while subprocess.run([RAY, "job", "list"], env=env, capture_output=True, timeout=60).returncode != 0:
        if time.monotonic() > deadline:
            _stop_head(str(temp))
            pytest.fail("the head's job server never came up")
        time.sleep(1)  # `ray start` returns before the dashboard's job server listens
    return env


@pytest.fixture(scope="module")
def ray_head():
    """A head for the module, stopped at the end."""
    temp = Path("/tmp") / f"mnist-ray-head-{secrets.token_hex(3)}"  # short: Unix socket paths
    env = _start_head(temp)
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
    return state, (logs.stdout or submit.stdout) + submit.stderr  # stderr: why a submission failed


@pytest.mark.e2e
def test_jobs_submitted_to_a_real_head(ray_head, tmp_path):
    listening = _listening({p.pid for p in _head_processes(ray_head["_TEMP"])})
    assert listening and all(c.laddr.ip in ("127.0.0.1", "::ffff:127.0.0.1") for c in listening), listening
    out = tmp_path / "mnist"
    # Local paths on a cluster are refused, unless said to be shared (this head is on this machine).
    state, logs = _submit(ray_head, "local-path", "jobs/prepare.py", "--limit", "100", "--output", str(out / "shards"))
    assert state == "failed" and f"{out / 'shards'} is a local path, but the job runs on the Ray cluster" in logs
    state, logs = _submit(ray_head, "prepare-1", "jobs/prepare.py", "--source", "mnist-sample", "--limit", "100",
                          "--output", str(out / "shards"), "--shared-storage")
    assert state == "succeeded", logs[-3000:]
    state, logs = _submit(ray_head, "train-1", "jobs/train.py", "--data", str(out / "shards"), "--model", "cnn",
                          "--epochs", "1", "--workers", "1", "--batch-size", "32", "--no-tflite",
                          "--output", str(out / "model"), "--shared-storage")
    assert state == "succeeded", logs[-3000:]
    state, logs = _submit(ray_head, "infer-1", "jobs/infer.py", "--model", str(out / "model"),
                          "--input", str(out / "shards"), "--output", str(out / "predictions"), "--shared-storage")
    assert state == "succeeded", logs[-3000:]
    manifest = json.loads((out / "predictions" / "_manifest.json").read_text())
    assert manifest["rows"] == 200 and manifest["error_rows"] == 0 and (out / "predictions" / "_SUCCESS").exists()

    # Wrong arguments and a user error: FAILED, with the reason in the job's logs.
    state, logs = _submit(ray_head, "bad-args", "jobs/infer.py", "--batch-size", "many")
    assert state == "failed" and "invalid int value: 'many'" in logs
    state, logs = _submit(ray_head, "bad-model", "jobs/infer.py", "--model", str(out / "nothing"),
                          "--input", str(out / "shards"), "--output", str(out / "p2"), "--shared-storage")
    assert state == "failed" and "mnist-ray infer: error: no model dir" in logs


# --- a local run beside a local head ------------------------------------------------------------

# A local run that holds its Ray until its stdin closes: the ports it listens on, its cluster.
LOCAL_RUN = """
import json, os, sys
import psutil, ray
from mnist_ray.plumbing import cluster
cluster.connect(None, num_cpus=1)
ray.get(ray.remote(num_cpus=0)(lambda: os.getpid()).remote())  # a worker process too
pids = {os.getpid(), cluster.local_ray().process.pid}
pids |= {c.pid for p in list(pids) for c in psutil.Process(p).children(recursive=True)}
ports = sorted({c.laddr.port for c in psutil.net_connections("tcp") if c.status == psutil.CONN_LISTEN and c.pid in pids})
print(json.dumps({"gcs": ray.get_runtime_context().gcs_address, "ports": ports, "nodes": len(ray.nodes())}), flush=True)
sys.stdin.read()
cluster.shutdown()
"""


@pytest.mark.e2e
def test_local_runs_beside_a_local_head_take_none_of_its_ports(tmp_path):
    """A local run is up first (with `ray.init()` it took Ray's default ports, which a head
    started next wants), then a user's `ray start --head`, then a second local run at the same
    time as a job submitted to the head: the job succeeds, and no local run joined the head."""
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    first = subprocess.Popen([sys.executable, "-c", LOCAL_RUN], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                             text=True, env=env)
    temp = Path("/tmp") / f"mnist-ray-head-{secrets.token_hex(3)}"
    try:
        local = json.loads(first.stdout.readline())
        assert local["nodes"] == 1
        ports = set(local["ports"])
        assert not ports & RAY_DEFAULT_PORTS and not [p for p in ports if p in RAY_DEFAULT_WORKER_PORTS], ports
        # The head's own ports: on a shared machine other people's `ray.init()` take Ray's
        # default agent port 52365 at any moment (seen here, from the very bug of the issue).
        head = _start_head(temp)
        second = subprocess.Popen([str(Path(sys.executable).with_name("mnist-ray")), "prepare", "--limit", "50",
                                   "--output", str(tmp_path / "shards")], stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True, env=env)
        state, logs = _submit(head, "beside-1", "-c", "import ray; ray.init(); print('nodes', len(ray.nodes()))")
        assert state == "succeeded", logs[-3000:]
        assert "nodes 1" in logs  # the local runs are clusters of their own
        assert second.wait(timeout=300) == 0, second.communicate()[1][-3000:]
        assert local["gcs"] != head["RAY_ADDRESS"]
    finally:
        first.stdin.close()
        assert first.wait(timeout=120) == 0
        _stop_head(str(temp))
        shutil.rmtree(temp, ignore_errors=True)
