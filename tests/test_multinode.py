"""A Ray cluster of three real nodes on this machine, jobs submitted with `ray job submit`, data
on the S3 test server (the shared storage a real cluster has), and nodes lost mid-run.

Each node is its own `ray start` (a head, then two `--address` nodes): one CPU, its own temp
dir, its own ports (none shared, none Ray's defaults), a capped object store, token
authentication on, the dashboard and job server on 127.0.0.1. Started once for the module; a
lost node is replaced, and the training fault adds a spare. Killing a node's raylet with
SIGKILL is how a lost machine looks to Ray.
"""

import json
import os
import random
import secrets
import shutil
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import psutil
import pytest

pytestmark = pytest.mark.e2e

REPO = Path(__file__).resolve().parents[1]
RAY = str(Path(sys.executable).with_name("ray"))
OBJECT_STORE = 200 * 2**20
TRAIN = ["--model", "cnn", "--workers", "2", "--batch-size", "64", "--learning-rate", "2e-3", "--no-tflite",
         "--placement", "SPREAD"]
ACCURACY_TOLERANCE = 0.05  # of 500 val images: the same settings on one node and on three


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Cluster:
    """The nodes' processes, found by their temp dirs; the env `ray job` commands need."""

    def __init__(self, s3_env: dict):
        self.ports: set[int] = set()
        self.worker_base = random.randrange(20000, 30000)  # below the OS's random ports (32768+)
        self.temps: dict[str, Path] = {}
        self.env = {**os.environ, **s3_env, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(16),
                    "RAY_ADDRESS": "", "RAY_USAGE_STATS_ENABLED": "0",
                    # Ray's multi-node mode: in its single-machine mode (the one that binds only
                    # 127.0.0.1) Ray 2.60 refuses worker nodes. The nodes then take the machine's
                    # IP and their gRPC servers listen on every interface (token auth on).
                    "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "1",
                    "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}

    def port(self) -> int:
        while (port := free_port()) in self.ports:
            pass
        self.ports.add(port)
        return port

    def _node_args(self, name: str) -> list[str]:
        temp = Path("/tmp") / f"mnr-{name}-{secrets.token_hex(2)}"  # short: Unix socket paths
        self.temps[name] = temp
        low = self.worker_base + 100 * (len(self.temps) - 1)
        return ["--node-ip-address", "127.0.0.1", "--num-cpus", "1", "--object-store-memory", str(OBJECT_STORE),
                "--temp-dir", str(temp), "--disable-usage-stats",
                "--node-manager-port", str(self.port()), "--object-manager-port", str(self.port()),
                "--dashboard-agent-listen-port", str(self.port()), "--dashboard-agent-grpc-port", str(self.port()),
                "--metrics-export-port", str(self.port()), "--runtime-env-agent-port", str(self.port()),
                "--min-worker-port", str(low), "--max-worker-port", str(low + 99)]

    def start(self) -> None:
        self.gcs, dashboard = self.port(), self.port()
        env = {**self.env, "DASHBOARD_METRIC_PORT": str(self.port()), "AUTOSCALER_METRIC_PORT": str(self.port())}
        subprocess.run([RAY, "start", "--head", "--port", str(self.gcs), "--dashboard-host", "127.0.0.1",
                        "--dashboard-port", str(dashboard), "--ray-client-server-port", str(self.port()),
                        *self._node_args("head")], env=env, check=True, capture_output=True, timeout=300)
        self.env["RAY_ADDRESS"] = f"http://127.0.0.1:{dashboard}"
        self.add_node("w1")
        self.add_node("w2")
        deadline = time.monotonic() + 120
        while subprocess.run([RAY, "job", "list"], env=self.env, capture_output=True, timeout=60).returncode != 0:
            assert time.monotonic() < deadline, "the head's job server never came up"
            time.sleep(1)

    def add_node(self, name: str) -> None:
        subprocess.run([RAY, "start", "--address", f"127.0.0.1:{self.gcs}", *self._node_args(name)],
                       env=self.env, check=True, capture_output=True, timeout=300)

    def processes(self, name: str) -> list[psutil.Process]:
        temp = str(self.temps[name])
        return [p for p in psutil.process_iter(["cmdline"]) if any(temp in a for a in p.info["cmdline"] or [])]

    def raylet(self, name: str) -> psutil.Process:
        return next(p for p in self.processes(name) if p.info["cmdline"][0].endswith("/raylet"))

    def node_id(self, name: str) -> str:
        args = self.raylet(name).info["cmdline"]
        return next(a.split("=", 1)[1] for a in args if a.startswith("--node_id="))

    def kill(self, name: str) -> float:
        """SIGKILL the node's raylet (a lost machine); returns when it happened."""
        self.raylet(name).send_signal(signal.SIGKILL)
        return time.monotonic()

    def stop(self) -> None:
        """Only these nodes' processes (`ray stop` would stop every Ray on the machine)."""
        procs = [p for name in self.temps for p in self.processes(name)]
        procs += [c for p in procs for c in p.children(recursive=True)]
        for p in procs:
            try:
                p.terminate()
            except psutil.NoSuchProcess:
                pass
        _, alive = psutil.wait_procs(procs, timeout=20)
        for p in alive:
            p.kill()
        for temp in self.temps.values():
            shutil.rmtree(temp, ignore_errors=True)

    def alive_nodes(self) -> set[str]:
        out = subprocess.run([RAY, "list", "nodes", "--format", "json", "--filter", "state=ALIVE"], env=self.env,
                             capture_output=True, text=True, timeout=60, check=True)
        return {n["node_id"] for n in _json_list(out.stdout)}

    def actors(self, class_name: str) -> list[dict]:
        """Alive actors whose class name contains ``class_name`` (Ray Data's: ``...MapWorker``)."""
        out = subprocess.run([RAY, "list", "actors", "--format", "json", "--filter", "state=ALIVE", "--detail",
                              "--limit", "1000"], env=self.env, capture_output=True, text=True, timeout=60)
        actors = _json_list(out.stdout) if out.returncode == 0 else []
        return [a for a in actors if class_name in (a.get("class_name") or "")]

    def submit(self, job_id: str, *args: str) -> None:
        subprocess.run([RAY, "job", "submit", "--no-wait", "--submission-id", job_id, "--runtime-env",
                        "jobs/runtime_env.yaml", "--", "python", *args],
                       cwd=REPO, env=self.env, check=True, capture_output=True, timeout=300)

    def state(self, job_id: str) -> str:
        out = subprocess.run([RAY, "job", "status", job_id], env=self.env, capture_output=True, text=True, timeout=60)
        text = (out.stdout + out.stderr).lower()
        return next((w for w in ("succeeded", "failed", "stopped") if f"job '{job_id}' {w}" in text), "running")

    def wait(self, job_id: str, timeout: float = 600) -> tuple[str, str]:
        """The job's final state and its logs."""
        deadline = time.monotonic() + timeout
        while (state := self.state(job_id)) == "running":
            if time.monotonic() > deadline:
                subprocess.run([RAY, "job", "stop", job_id], env=self.env, capture_output=True, timeout=60)
                state = "timed out"
                break
            time.sleep(1)
        logs = subprocess.run([RAY, "job", "logs", job_id], env=self.env, capture_output=True, text=True, timeout=60)
        return state, logs.stdout

    def run(self, job_id: str, *args: str, timeout: float = 600) -> tuple[str, str, float]:
        started = time.monotonic()
        self.submit(job_id, *args)
        state, logs = self.wait(job_id, timeout)
        return state, logs, time.monotonic() - started


def _json_list(text: str) -> list:
    """The JSON list `ray list ... --format json` prints (after any notice lines)."""
    if "[" not in text:
        return []
    return json.loads(text[text.index("["):text.rindex("]") + 1])


def _summary(logs: str) -> dict:
    """The JSON summary a job prints last."""
    start = logs.rindex("\n{\n")
    return json.loads(logs[start:logs.index("\n}", start) + 2])


@pytest.fixture(scope="module")
def bucket(s3_server) -> str:
    import boto3

    name = f"multinode-{uuid.uuid4().hex[:8]}"
    boto3.client("s3").create_bucket(Bucket=name)
    return name


@pytest.fixture(scope="module")
def ray_cluster(s3_server):
    s3_env = {k: os.environ[k] for k in ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY",
                                         "AWS_REGION", "AWS_EC2_METADATA_DISABLED")}
    cluster = Cluster(s3_env)
    started = time.monotonic()
    try:
        cluster.start()
        print(f"\ncluster of 3 nodes up in {time.monotonic() - started:.1f} s")
        yield cluster
    finally:
        cluster.stop()


def _s3_json(bucket: str, key: str) -> dict:
    import boto3

    return json.loads(boto3.client("s3").get_object(Bucket=bucket, Key=key)["Body"].read())


def _s3_text(bucket: str, key: str) -> str:
    import boto3

    return boto3.client("s3").get_object(Bucket=bucket, Key=key)["Body"].read().decode()


def _s3_keys(bucket: str, prefix: str) -> list[dict]:
    import boto3

    pages = boto3.client("s3").get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
    return [o for page in pages for o in page.get("Contents", [])]


@pytest.fixture(scope="module")
def data(ray_cluster, bucket, mnist_idx_dir) -> dict:
    """Shards on S3, prepared by jobs on the cluster: a small training set and the 10k MNIST test set."""
    s3 = f"s3://{bucket}"
    state, logs, _ = ray_cluster.run("prepare-train", "jobs/prepare.py", "--limit", "1000",
                                     "--output", f"{s3}/shards")
    assert state == "succeeded", logs[-3000:]
    # The IDX files are on this machine, which every node is on: shared, as the flag says.
    state, logs, _ = ray_cluster.run("prepare-test", "jobs/prepare.py", "--source", f"idx:{mnist_idx_dir}",
                                     "--rows-per-shard", "2000", "--output", f"{s3}/test-set", "--shared-storage")
    assert state == "succeeded", logs[-3000:]
    return {"train": f"{s3}/shards", "test": f"{s3}/test-set", "rows": 10_000}


@pytest.fixture(scope="module")
def trained(ray_cluster, bucket, data) -> dict:
    """`train` with 2 workers spread over the nodes, checkpoints on S3; where its workers ran."""
    s3 = f"s3://{bucket}"
    ray_cluster.submit("train-spread", "jobs/train.py", "--data", data["train"], "--epochs", "2", *TRAIN,
                       "--output", f"{s3}/model", "--storage-path", f"{s3}/train-runs")
    placement, started = set(), time.monotonic()
    while ray_cluster.state("train-spread") == "running":
        placement |= {a["node_id"] for a in ray_cluster.actors("RayTrainWorker")}
        time.sleep(1)
    state, logs = ray_cluster.wait("train-spread")
    assert state == "succeeded", logs[-3000:]
    return {"model": f"{s3}/model", "placement": placement, "seconds": time.monotonic() - started,
            "summary": _summary(logs)}


def test_training_workers_spread_over_two_nodes_as_accurate_as_one_node(ray_cluster, bucket, data, trained,
                                                                        ray_local):
    assert len(trained["placement"]) == 2, trained["placement"]  # two workers, two nodes
    assert trained["placement"] <= ray_cluster.alive_nodes()
    checkpoints = {o["Key"].split("/")[2] for o in _s3_keys(bucket, "train-runs/") if "/checkpoint_" in o["Key"]}
    assert len(checkpoints) >= 1, "no checkpoint reached the shared storage"
    multi = _s3_json(bucket, "model/metadata.json")
    assert len(multi["metrics"]["history"]) == 2

    # The same settings on one node: the session's local Ray, the same shards.
    from mnist_ray.training.train import TrainConfig, run

    one = run(TrainConfig(data=data["train"], output=f"s3://{bucket}/model-one-node", model="cnn", epochs=2,
                          workers=2, batch_size=64, learning_rate=2e-3, tflite=False,
                          storage_path=f"s3://{bucket}/train-runs-one-node"))
    single = _s3_json(bucket, "model-one-node/metadata.json")
    a, b = multi["metrics"]["history"][-1]["val_accuracy"], single["metrics"]["history"][-1]["val_accuracy"]
    print(f"\nval accuracy: 3 nodes {a:.4f}, one node {b:.4f}; workers on nodes {sorted(trained['placement'])}; "
          f"train job {trained['seconds']:.0f} s, one-node run {one['train_seconds']} s")
    assert a > 0.75 and abs(a - b) <= ACCURACY_TOLERANCE


@pytest.fixture(scope="module")
def scored(ray_cluster, bucket, data, trained) -> dict:
    s3 = f"s3://{bucket}"
    state, logs, seconds = ray_cluster.run("infer-pool", "jobs/infer.py", "--model", trained["model"],
                                           "--input", data["test"], "--output", f"{s3}/predictions",
                                           "--actors", "2..3", "--cpus-per-actor", "0.5", "--batch-size", "256")
    assert state == "succeeded", logs[-3000:]
    return {"summary": _summary(logs), "seconds": seconds}


def test_an_autoscaling_pool_scores_on_several_nodes_and_says_where(ray_cluster, bucket, data, scored):
    manifest = _s3_json(bucket, "predictions/_manifest.json")
    nodes = manifest["figures"]["nodes"]
    assert manifest["rows"] == data["rows"] and manifest["error_rows"] == 0
    assert len([n for n in nodes.values() if n["rows"] > 0]) >= 2, nodes  # more than one node scored
    assert sum(n["rows"] for n in nodes.values()) == data["rows"], nodes  # every row attributed once
    assert set(nodes) <= {ray_cluster.node_id(name) for name in ray_cluster.temps}
    assert scored["summary"]["nodes"] == nodes
    print(f"\ninfer 2..3 actors: {json.dumps(nodes)}; job {scored['seconds']:.0f} s")


def _committed_checkpoints(bucket: str, output: str) -> int:
    return len([o for o in _s3_keys(bucket, f"{output}/run-") if "/checkpoint/" in o["Key"]
                and o["Key"].endswith(".parquet") and not o["Key"].endswith(".pending.parquet")])


def test_a_node_lost_while_scoring(ray_cluster, bucket, data, trained, scored):
    """SIGKILL the raylet of a worker node as soon as a predictor actor runs there.
    Either the job completes with every input row exactly once, or it fails and the same
    command resumes it: the published predictions hold each input id exactly once."""
    s3 = f"s3://{bucket}"
    args = ["jobs/infer.py", "--model", trained["model"], "--input", data["test"], "--output", f"{s3}/lost-node",
            "--actors", "2..3", "--cpus-per-actor", "0.5", "--batch-size", "256"]
    started = time.monotonic()
    ray_cluster.submit("infer-lost-node", *args)
    victim = None
    while ray_cluster.state("infer-lost-node") == "running" and victim is None:
        on = {a["node_id"] for a in ray_cluster.actors("MapWorker")}
        candidates = [n for n in ("w1", "w2") if ray_cluster.node_id(n) in on]
        if candidates:  # a predictor actor is up there: the pool is scoring, or about to
            victim = candidates[-1]
            committed = _committed_checkpoints(bucket, "lost-node")
            killed_at = ray_cluster.kill(victim)
        time.sleep(0.2)
    assert victim is not None, "the job ended before a node could be killed mid-run"
    # The lost machine is replaced, as an autoscaler or an operator would: a rerun then has the
    # CPUs it planned for, and the next test has its spare node whatever happens here.
    ray_cluster.add_node(f"{victim}b")
    state, logs = ray_cluster.wait("infer-lost-node")
    outcome = {"first_attempt": state, "seconds_after_kill": round(time.monotonic() - killed_at, 1),
               "checkpoint_files_at_kill": committed}
    if state != "succeeded":
        assert "mnist-ray infer: error:" in logs or "Error" in logs, logs[-3000:]
        state, logs, _ = ray_cluster.run("infer-lost-node-rerun", *args)
        outcome["rerun"] = state
        assert state == "succeeded", logs[-3000:]
        assert _summary(logs)["resumed_rows"] > 0, "the rerun scored everything again"
    total = time.monotonic() - started
    outcome["time_lost_s"] = round(total - scored["seconds"], 1)
    from mnist_ray.formats import predictions

    table = predictions.read_predictions(f"{s3}/lost-node", columns=["id", "error"])
    ids = table["id"].to_pylist()
    assert len(ids) == len(set(ids)) == data["rows"] and table["error"].null_count == data["rows"]
    from mnist_ray.formats import shards

    assert set(ids) == set(shards.read_table(data["test"], columns=["id"])["id"].to_pylist())
    print(f"\nlost node {victim} while scoring: {json.dumps(outcome)} (no-fault run {scored['seconds']:.0f} s)")


def test_a_node_lost_while_training_resumes_from_the_last_checkpoint(ray_cluster, bucket, data):
    """Two workers spread over the nodes, a spare node beside them: SIGKILL the raylet of a worker
    node hosting a training worker once the first checkpoint is registered; Ray Train restarts
    the group on the nodes left, restores that checkpoint and ends with every epoch."""
    s3, job, runs = f"s3://{bucket}", "train-lost-node", "runs-lost-node"
    epochs = 3
    # A spare node: the kill must leave 2 CPUs for the restarted workers and 1 for Ray Data's
    # tasks, which rebuild the dataset blocks the lost node held (with none free they never run).
    # Counted by their raylet processes: the GCS still lists a node killed seconds ago (the test
    # before this one kills one) as alive until its health checks time out, and with that node
    # counted no spare was added, the kill left 2 CPUs, both held by the restarted workers, and
    # the data tasks never ran.
    spares = 0
    while len(_alive_names(ray_cluster)) < 4:
        spares += 1
        ray_cluster.add_node(f"spare{spares}")
    ray_cluster.submit(job, "jobs/train.py", "--data", data["train"], "--epochs", str(epochs), *TRAIN,
                       "--output", f"{s3}/model-lost-node", "--storage-path", f"{s3}/{runs}")
    checkpoint_times, victim, killed_at = {}, None, None
    started = time.monotonic()
    # Bounded, with room for a loaded machine: at load average 67 on 2 cores an epoch of 900
    # images took 60 s and data loading 4.5 min; the job was stopped at 600 s while it trained.
    deadline = started + 1200
    while ray_cluster.state(job) == "running" and time.monotonic() < deadline:
        keys = [o["Key"] for o in _s3_keys(bucket, f"{runs}/")]
        # RUNS/RUN/checkpoint_TIME/FILE (not RUNS/RUN/checkpoint_manager_snapshot.json); Ray
        # Train keeps 2 at a time, so older ones go.
        names = {p[2] for p in (k.split("/") for k in keys) if len(p) > 3 and p[2].startswith("checkpoint_")}
        for name in names - set(checkpoint_times):
            checkpoint_times[name] = time.monotonic() - started
        # Registered: Ray Train writes its snapshot once a reported checkpoint is on the storage.
        registered = any(k.endswith("/checkpoint_manager_snapshot.json") for k in keys)
        if victim is None and registered:
            on = {a["node_id"] for a in ray_cluster.actors("RayTrainWorker")}
            workers = [n for n in _alive_names(ray_cluster) if n != "head" and ray_cluster.node_id(n) in on]
            if workers:
                victim = workers[0]
                killed_at = ray_cluster.kill(victim) - started
        time.sleep(0.5)
    state, logs = ray_cluster.wait(job, timeout=max(deadline - time.monotonic(), 1))
    seconds = time.monotonic() - started
    assert victim is not None, "training ended before a node could be killed: " + logs[-3000:]
    assert state == "succeeded", f"{state} after killing {victim} at {killed_at:.0f} s: " + logs[-5000:]
    # The workers' output is in the run's log file (the job's console is quiet: logs.py).
    run_log = _s3_text(bucket, _summary(logs)["log"].removeprefix(f"s3://{bucket}/"))
    history = _s3_json(bucket, "model-lost-node/metadata.json")["metrics"]["history"]
    times = sorted(checkpoint_times.values())
    before, after = [t for t in times if t < killed_at], [t for t in times if t > killed_at]
    # Time lost: kill to the next checkpoint, less the share of an epoch already done at the kill
    # and one normal epoch (the interval between the checkpoints after recovery).
    epoch_s = after[1] - after[0] if len(after) > 1 else float("nan")
    lost = after[0] - before[-1] - epoch_s if after and before else float("nan")
    print(f"\nlost node {victim} while training: checkpoints at {[round(t) for t in times]} s, killed at "
          f"{killed_at:.0f} s, next checkpoint {after[0] - killed_at if after else float('nan'):.0f} s later, "
          f"an epoch {epoch_s:.0f} s: {lost:.0f} s lost; resumed at epoch {history[-1]['resumed_at_epoch']}; "
          f"job {seconds:.0f} s")
    assert "resuming from the checkpoint of epoch" in run_log, run_log[-5000:]
    assert [h["epoch"] for h in history] == list(range(1, epochs + 1)), history
    assert history[-1]["resumed_at_epoch"] >= 1, history
    assert after, f"no checkpoint after the kill at {killed_at:.0f} s: {times}"


def _alive_names(cluster: Cluster) -> set[str]:
    names = set()
    for name in cluster.temps:
        try:
            cluster.raylet(name)
            names.add(name)
        except StopIteration:
            pass
    return names
