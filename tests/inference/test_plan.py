"""The plan of an inference run, without Ray: the cluster's resources are an argument."""

import json

import pytest

from mnist_ray.model import runtimes
from mnist_ray.plumbing import compat
from mnist_ray.inference import plan as planning
from mnist_ray.errors import MnistRayError
from mnist_ray.inference.infer import InferConfig

CPU2 = {"CPU": 2.0}


@pytest.fixture
def model_dir(tmp_path) -> str:
    """What the plan reads of a model dir: its variant files and the agreement measured at export."""
    for rel in runtimes.RUNTIME_FILES.values():
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_bytes(b"")
    (tmp_path / "metadata.json").write_text(json.dumps({
        "variants": {}, "agreement": {"reference": "tf", "images": 5000,
                                      "top1": {name: 0.999 for name in runtimes.RUNTIME_FILES if name != "tf"}}}))
    return str(tmp_path)


def _pool(cfg: InferConfig, resources: dict, model_dir: str, resuming: bool = False, autoscaler_gpus: float = 0.0) -> tuple:
    p = planning.make(cfg, resources, model_dir, resumed_rows=lambda runtime: 7 if resuming else 0,
                      autoscaler_gpus=autoscaler_gpus)
    return p.actors_min, p.actors_max, p.gpus_per_actor, p.cpus_per_actor


def test_config_checks():
    assert planning.parse_actors("2..4") == (2, 4) and planning.parse_actors("3") == (3, 3)
    for bad in ("0", "4..2", "x"):
        with pytest.raises(MnistRayError, match="--actors"):
            InferConfig(actors=bad).validate()
    with pytest.raises(MnistRayError, match="unknown runtime"):
        InferConfig(runtime="onnx").validate()
    with pytest.raises(MnistRayError, match="--batch-size"):
        InferConfig(batch_size=0).validate()


def test_pool_resources_never_take_every_cpu_and_fall_back_to_cpu(model_dir):
    assert _pool(InferConfig(), CPU2, model_dir) == (1, 1, 0.0, 1.0)  # the default leaves a CPU to read
    # Resuming: Ray's checkpoint filter actor takes a CPU, so the predictor reserves less.
    assert _pool(InferConfig(), CPU2, model_dir, resuming=True) == (1, 1, 0.0, 0.5)
    with pytest.raises(MnistRayError, match="starve"):
        _pool(InferConfig(actors="2"), CPU2, model_dir)
    assert _pool(InferConfig(gpus_per_actor=0.5), CPU2, model_dir)[2] == 0.0  # no GPU: runs on CPU
    with pytest.raises(MnistRayError, match="no GPU"):
        _pool(InferConfig(gpus_per_actor=1, require_gpu=True), CPU2, model_dir)
    # A cluster scaled to zero (autoscaling from a CPU-0 head): the flags stand, GPUs may come.
    assert _pool(InferConfig(actors="1..8", gpus_per_actor=1), {"memory": 1e9}, model_dir) == (1, 8, 1, 1.0)
    # GPU actors keep --cpus-per-actor where it fits, else share what Ray Data's tasks leave.
    assert _pool(InferConfig(actors="2", gpus_per_actor=0.5), {"CPU": 2.0, "GPU": 1.0}, model_dir) == (2, 2, 0.5, 0.75)
    assert _pool(InferConfig(actors="2", gpus_per_actor=0.5, cpus_per_actor=2), {"CPU": 8.0, "GPU": 1.0},
                 model_dir) == (2, 2, 0.5, 2.0)


def test_gpu_pools_are_capped_by_the_gpus_the_cluster_can_have_and_tflite_asks_for_none(model_dir):
    gpus = {"CPU": 16.0, "GPU": 2.0}
    assert _pool(InferConfig(actors="1..8", gpus_per_actor=1), gpus, model_dir) == (1, 2, 1, 1.0)
    assert _pool(InferConfig(actors="4", gpus_per_actor=1), gpus, model_dir)[:2] == (2, 2)  # min follows max
    # What the autoscaler can add counts: GPU nodes on their way, or none up yet.
    assert _pool(InferConfig(actors="1..8", gpus_per_actor=1), gpus, model_dir, autoscaler_gpus=4)[:2] == (1, 6)
    assert _pool(InferConfig(actors="1..8", gpus_per_actor=0.5), {"CPU": 16.0}, model_dir,
                 autoscaler_gpus=1)[:3] == (1, 2, 0.5)
    with pytest.raises(MnistRayError, match="lower --gpus-per-actor"):
        _pool(InferConfig(gpus_per_actor=4), gpus, model_dir)
    # --require-gpu fails fast on a cluster that can never have one.
    with pytest.raises(MnistRayError, match="no GPU and no autoscaler"):
        _pool(InferConfig(gpus_per_actor=1, require_gpu=True), {"CPU": 16.0}, model_dir)
    # TFLite runs on the CPU: its actors ask for no GPU, and --require-gpu has nothing to refuse.
    lite = planning.make(InferConfig(runtime="tflite-int8", gpus_per_actor=0.5, require_gpu=True), gpus, model_dir)
    assert not lite.on_gpu and lite.cpus_per_actor == 1.0 and lite.prepare_cpus == 1.0
    # auto on GPU actors is tf.
    assert planning.make(InferConfig(gpus_per_actor=0.5), gpus, model_dir).runtime == "tf"


def test_the_plan_records_batch_size_tasks_and_read_ahead():
    p = planning.make(InferConfig(runtime="tflite-int8"), {"CPU": 8.0}, "unused")
    assert p.batch_size == 1024 and p.runtime == "tflite-int8"
    assert planning.make(InferConfig(runtime="tf"), {"CPU": 8.0}, "unused").batch_size == 4096
    assert planning.make(InferConfig(runtime="tf", batch_size=64), {"CPU": 8.0}, "unused").batch_size == 64
    # prepare_rows asks for the actor's CPUs (fused into it); beside a GPU actor, a task's share.
    assert p.prepare_cpus == p.cpus_per_actor == 1.0 and p.read_cpus == p.write_cpus == compat.IO_TASK_CPUS
    gpu = planning.make(InferConfig(runtime="tf", gpus_per_actor=1), {"CPU": 8.0, "GPU": 1.0}, "unused")
    assert gpu.on_gpu and gpu.prepare_cpus == compat.IO_TASK_CPUS and gpu.cpus_per_actor == 1.0
    # Read-ahead: flat in the input's size, a few blocks per actor.
    assert p.read_ahead_bytes == planning.READ_AHEAD_BYTES_MIN
    big = planning.make(InferConfig(runtime="tf", actors="1..6"), {"CPU": 8.0}, "unused")
    assert big.read_ahead_bytes == 6 * planning.READ_AHEAD_BYTES_PER_ACTOR
    assert p.as_dict()["batch_size"] == 1024 and "tflite-int8" in p.describe()


def test_resumed_rows_are_looked_up_for_the_planned_runtime():
    seen = []
    p = planning.make(InferConfig(runtime="tflite-fp16"), {"CPU": 4.0}, "unused",
                      resumed_rows=lambda runtime: seen.append(runtime) or 42)
    assert seen == ["tflite-fp16"] and p.resumed_rows == 42 and "resuming after 42 rows" in p.describe()


def test_runtime_auto_is_the_default_and_follows_where_the_actors_run(model_dir):
    assert InferConfig().runtime == "auto"
    cpu = planning.make(InferConfig(), CPU2, model_dir)
    assert cpu.runtime == "tflite-int8" and "99.90%" in cpu.runtime_reason and cpu.batch_size == 1024
    gpu = planning.make(InferConfig(gpus_per_actor=1), {"CPU": 2.0, "GPU": 1.0}, model_dir)
    assert gpu.runtime == "tf" and "GPU" in gpu.runtime_reason and gpu.batch_size == 4096
    # GPUs asked for but none there: the actors run on CPU, and so does the choice.
    fallback = planning.make(InferConfig(gpus_per_actor=1), CPU2, model_dir)
    assert not fallback.on_gpu and fallback.runtime == "tflite-int8"
    given = planning.make(InferConfig(runtime="tflite-fp32"), CPU2, model_dir)
    assert given.runtime == "tflite-fp32" and given.runtime_reason == "--runtime tflite-fp32"
    assert "tflite-int8" in cpu.describe() and cpu.as_dict()["runtime_reason"] == cpu.runtime_reason


def test_tflite_threads_are_the_actors_share_of_the_cluster_and_at_least_its_cpus(model_dir):
    """One actor alone on 2 CPUs runs 2 interpreter threads (1 thread halved int8 scoring);
    a pool shares the cores; reserving more CPUs than the share keeps them all."""
    threads = lambda actors, cpus, resources: planning.make(  # noqa: E731
        InferConfig(actors=actors, cpus_per_actor=cpus, runtime="tflite-int8"), resources, model_dir).model_threads
    assert threads("1", 1.0, CPU2) == 2 and threads("2", 0.5, CPU2) == 1
    assert threads("1..4", 1.0, {"CPU": 8.0}) == 2 and threads("2", 3.0, {"CPU": 8.0}) == 4
    assert threads("1", 1.0, {"CPU": 0}) == 1  # scaled to zero: the flags, nothing more
