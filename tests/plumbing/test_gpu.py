"""The GPU path on a CPU-only machine: a real Ray that declares 2 GPUs, a TensorFlow that sees
none. What is checked is the scheduling, the planning and the failure a GPU-less GPU actor must
give; nothing here ran on a GPU (docs/gpu.md)."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import subprocess
import sys
import threading
import time

import pytest
import yaml

from mnist_ray.inference import infer
from mnist_ray.plumbing import gpu
from mnist_ray.inference import plan as planning
from mnist_ray.errors import MnistRayError
from mnist_ray.inference.infer import InferConfig

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture(scope="module")
def ray_with_gpus(s3_server):
    """A local Ray with 2 CPUs and 2 declared GPUs (this machine has none), in place of the
    session's shared one, which is started again afterwards for the modules that follow."""
    import ray

    from mnist_ray.plumbing import cluster

    # This machine is no launcher head: the tests must not depend on what its home dir holds.
    patch = pytest.MonkeyPatch()
    patch.setattr(gpu, "AUTOSCALING_CONFIG", os.path.join(ROOT, "no-such-autoscaling-config.yaml"))
    shared = ray.is_initialized()
    if shared:
        cluster.shutdown()
        ray.shutdown()  # also a Ray that a library call started by itself (cluster.shutdown leaves those)
    try:
        cluster.use_token_auth()
        # A `ray start` node on free ports: ray.init's own start puts the dashboard agent on the
        # fixed port 52365, which another Ray on this machine may hold (cluster.LocalRay).
        node = cluster.LocalRay.start(2, num_gpus=2)
        ray.init(address=node.address, _node_ip_address=cluster.LOCALHOST, runtime_env=cluster.runtime_env(),
                 log_to_driver=False)
    except BaseException:
        if shared:  # the modules after this one still get the session's Ray
            cluster.connect(None, num_cpus=2)
        raise
    yield
    gpu.release_gpus()
    ray.shutdown()
    node.stop(wait=30)
    patch.undo()
    if shared:
        cluster.connect(None, num_cpus=2)


# --- pure planning ---------------------------------------------------------------------------

def test_the_memory_limit_is_the_share_less_the_cuda_context():
    assert gpu.memory_limit_mb(0.25, 24576) == 6144 - gpu.CUDA_CONTEXT_MB  # 4 actors on an A10G
    assert gpu.memory_limit_mb(0.5, 16000) == 8000 - gpu.CUDA_CONTEXT_MB
    assert gpu.memory_limit_mb(1.0, 24576) == 24576 - gpu.CUDA_CONTEXT_MB
    with pytest.raises(MnistRayError, match="larger --gpus-per-actor"):
        gpu.memory_limit_mb(0.1, 4096)  # 409 MiB share: less than the CUDA context
    for bad in (0, -0.5, 1.5):
        with pytest.raises(MnistRayError, match=r"\(0, 1\]"):
            gpu.memory_limit_mb(bad, 24576)


def test_the_collective_is_nccl_exactly_when_workers_have_gpus():
    import tensorflow as tf

    impl = tf.distribute.experimental.CommunicationImplementation
    assert gpu.communication_options(True).implementation == impl.NCCL
    assert gpu.communication_options(False).implementation == impl.RING
    assert gpu.communication_options(False).bytes_per_pack == 64 << 20


def test_what_the_autoscaler_can_add_comes_from_its_config(tmp_path):
    config = yaml.safe_load(open(os.path.join(ROOT, "cluster.yaml")))
    assert gpu.autoscaler_gpus(config) == 0  # as written: the launcher fills in each type's GPUs
    # As the launcher writes it on the head (~/ray_bootstrap_config.yaml): resources filled in.
    config["available_node_types"]["gpu-worker"]["resources"] = {"CPU": 4, "GPU": 1}
    config["available_node_types"]["cpu-worker"]["resources"] = {"CPU": 16}
    assert gpu.autoscaler_gpus(config) == 4
    config["max_workers"] = 2
    assert gpu.autoscaler_gpus(config) == 2
    path = tmp_path / "ray_bootstrap_config.yaml"
    path.write_text(yaml.safe_dump(config))
    assert gpu.gpus_the_cluster_can_get(str(path)) == 2
    assert gpu.gpus_the_cluster_can_get(str(tmp_path / "none.yaml")) == 0  # a local Ray: no autoscaler


# --- the driver ------------------------------------------------------------------------------

HIDE_SCRIPT = """
import json, os
from mnist_ray.plumbing import gpu
gpu.hide_gpus_from_driver()
import tensorflow as tf
print(json.dumps({"gpus": [d.name for d in tf.config.get_visible_devices("GPU")],
                  "cpus": len(tf.config.get_visible_devices("CPU")),
                  "env": os.environ.get("CUDA_VISIBLE_DEVICES")}))
"""


def test_the_driver_hides_the_gpus_from_its_tensorflow_but_not_from_ray():
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "0,1", "TF_CPP_MIN_LOG_LEVEL": "3"}
    proc = subprocess.run([sys.executable, "-c", HIDE_SCRIPT], capture_output=True, text=True, env=env,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    seen = json.loads(proc.stdout.strip().splitlines()[-1])
    assert seen["gpus"] == [] and seen["cpus"] >= 1
    # The environment a local Ray started by the driver inherits still names the GPUs.
    assert seen["env"] == "0,1"


def test_infer_plans_gpu_actors_on_a_ray_that_declares_gpus(ray_with_gpus):
    cfg = InferConfig(actors="1..8", gpus_per_actor=1, runtime="tf")
    with contextlib.ExitStack() as scaling:
        resources, can_get = infer.cluster_resources(cfg, scaling)
    assert resources["GPU"] == 2 and can_get == 0 and _autoscaler_requests() == []  # enough: nothing asked
    plan = planning.make(cfg, resources, "unused", autoscaler_gpus=can_get)
    assert (plan.actors_min, plan.actors_max, plan.gpus_per_actor) == (1, 2, 1)  # capped by the 2 GPUs
    assert plan.cpus_per_actor == pytest.approx(0.75)  # 2 x 1 CPU do not fit beside Ray Data's tasks
    one = planning.make(InferConfig(actors="1", gpus_per_actor=0.5, cpus_per_actor=1.5, runtime="tf"),
                        resources, "unused")
    assert one.cpus_per_actor == 1.5 and one.gpus_per_actor == 0.5  # --cpus-per-actor kept where it fits
    # TFLite asks for no GPU whatever --gpus-per-actor says, and --require-gpu does not refuse it.
    lite = InferConfig(runtime="tflite-int8", gpus_per_actor=0.5, require_gpu=True)
    with contextlib.ExitStack() as scaling:
        assert infer.cluster_resources(lite, scaling)[1] == 0
    assert planning.make(lite, resources, "unused").gpus_per_actor == 0


# --- actors ----------------------------------------------------------------------------------

def test_an_actor_given_a_gpu_tensorflow_cannot_see_fails_in_words(ray_with_gpus):
    import ray

    @ray.remote(num_gpus=1, num_cpus=0.25)
    class GpuActor:
        def __init__(self):
            gpu.configure_tf_for_actor(0.5, total_mb=24576)

        def ping(self):
            return ray.get_gpu_ids()

    actor = GpuActor.remote()
    with pytest.raises(ray.exceptions.RayActorError) as caught:
        ray.get(actor.ping.remote(), timeout=120)
    message = str(caught.value)
    assert "Ray gave this process a GPU (CUDA_VISIBLE_DEVICES='0')" in message or "='1'" in message, message
    assert "TensorFlow" in message and "sees none" in message and "mnist-ray[gpu]" in message


# --- scaling from zero -----------------------------------------------------------------------

def _autoscaler_requests() -> list:
    """The standing request as Ray's autoscaler sees it (v1: the KV entry its monitor reads;
    v2: the GCS's cluster resource constraints)."""
    import ray
    from ray.autoscaler.v2.utils import is_autoscaler_v2

    if is_autoscaler_v2():
        from ray.autoscaler.v2.sdk import get_cluster_status

        status = get_cluster_status(ray.get_runtime_context().gcs_address)
        return [(d.bundles_by_count) for d in status.resource_demands.cluster_constraint_demand]
    from ray.experimental.internal_kv import _internal_kv_get

    return json.loads(_internal_kv_get("autoscaler_resource_request") or b"[]")


def _monitor_request_demand(timeout: float = 30.0, want=None) -> list:
    """The request demand Ray's autoscaler monitor last reported (`ray status`' source)."""
    from ray.experimental.internal_kv import _internal_kv_get

    deadline = time.monotonic() + timeout
    while True:
        raw = _internal_kv_get("__autoscaling_status")
        demand = json.loads(raw)["load_metrics_report"]["request_demand"] if raw else None
        if demand == want or time.monotonic() > deadline:
            return demand
        time.sleep(0.5)


def test_gpus_are_requested_from_the_autoscaler_with_the_pools_shape(ray_with_gpus):
    bundles = [{"GPU": 0.5, "CPU": 1}] * 3
    gpu.request_gpus(bundles)
    assert _autoscaler_requests() == bundles
    # Ray's own autoscaler monitor picked it up: what `ray status` shows as pending requests.
    assert _monitor_request_demand(want=[[{"GPU": 0.5, "CPU": 1.0}, 3]]) == [[{"GPU": 0.5, "CPU": 1.0}, 3]]
    gpu.release_gpus()
    assert _autoscaler_requests() == []
    assert _monitor_request_demand(want=[]) == []


def test_enough_gpus_are_not_requested_and_missing_ones_are_waited_for_then_released(ray_with_gpus, caplog,
                                                                                     monkeypatch):
    with gpu.gpus_for([{"GPU": 1}] * 2, 2, can_get=0) as have:
        assert have == 2 and _autoscaler_requests() == []
    with gpu.gpus_for([{"GPU": 1}] * 4, 4, can_get=0) as have:  # can never have 4: not asked
        assert have == 2 and _autoscaler_requests() == []
    # Can get them: asked for with the pool's shape, waited for (progress lines), withdrawn.
    monkeypatch.setattr(gpu, "PROGRESS_EVERY_S", 0.5)
    seen = []
    watcher = threading.Timer(1.0, lambda: seen.append(_autoscaler_requests()))
    watcher.start()
    with caplog.at_level(logging.INFO, logger="mnist_ray.plumbing.gpu"):
        with pytest.raises(MnistRayError, match="brought 2 of 4 GPUs in 3 s"):
            with gpu.gpus_for([{"GPU": 1, "CPU": 0.5}] * 4, 4, can_get=4, timeout_s=3.0, ):
                pass
    watcher.join()
    assert seen == [[{"GPU": 1, "CPU": 0.5}] * 4]  # the request stood while it waited
    assert "waiting for the autoscaler: 2 of 4 GPUs" in caplog.text
    assert _autoscaler_requests() == []  # a timed-out request is withdrawn


def test_a_gpu_train_worker_reserves_its_nodes_cpus_per_gpu():
    nodes = [{"CPU": 0}, {"CPU": 4, "GPU": 1}, {"CPU": 16}, {"CPU": 8, "GPU": 4}]
    assert gpu.cpus_per_gpu(nodes) == 2.0  # the 4-GPU node is the tightest
    assert gpu.cpus_per_gpu([{"CPU": 2}]) == 0.0


def test_bench_gpu_mode_refuses_on_a_machine_without_a_gpu(tmp_path):
    from mnist_ray.bench.bench import BenchConfig
    from mnist_ray.bench.bench import run as bench

    started = time.perf_counter()
    with pytest.raises(MnistRayError, match="bench --gpu needs a GPU: TensorFlow .* sees none"):
        bench(BenchConfig(gpu=True, output=str(tmp_path / "bench")))
    assert time.perf_counter() - started < 60 and not (tmp_path / "bench").exists()  # nothing was made


# --- training --------------------------------------------------------------------------------

def test_train_use_gpu_places_workers_on_the_declared_gpus_and_fails_in_words_without_cuda(ray_with_gpus, tmp_path):
    """Not refused (the cluster has the GPUs): the Train worker gets one, and its TensorFlow,
    which sees none here, stops the run with the worded error instead of training on the CPU."""
    from mnist_ray.preparation import prepare
    from mnist_ray.training import train

    data = str(tmp_path / "shards")
    prepare.run(prepare.PrepareConfig(source="mnist-sample", limit=200, output=data))
    cfg = train.TrainConfig(data=data, output=str(tmp_path / "model"), model="mlp", epochs=1, workers=1,
                            use_gpu=True, max_failures=0, tflite=False)
    with pytest.raises(MnistRayError) as caught:
        train.run(cfg)
    message = str(caught.value)
    assert "training failed" in message and "Ray gave this process a GPU" in message, message
    assert not (tmp_path / "model").exists()
