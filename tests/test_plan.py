"""The plan of an inference run, without Ray: the cluster's resources are an argument."""

import pytest

from mnist_ray import plan as planning
from mnist_ray.errors import MnistRayError
from mnist_ray.infer import InferConfig

CPU2 = {"CPU": 2.0}


def _pool(cfg: InferConfig, resources: dict, resuming: bool = False) -> tuple:
    p = planning.make(cfg, resources, "unused-model-dir", resumed_rows=lambda runtime: 7 if resuming else 0)
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


def test_pool_resources_never_take_every_cpu_and_fall_back_to_cpu():
    assert _pool(InferConfig(), CPU2) == (1, 1, 0.0, 1.0)  # the default leaves a CPU to read
    # Resuming: Ray's checkpoint filter actor takes a CPU, so the predictor reserves less.
    assert _pool(InferConfig(), CPU2, resuming=True) == (1, 1, 0.0, 0.5)
    with pytest.raises(MnistRayError, match="starve"):
        _pool(InferConfig(actors="2"), CPU2)
    assert _pool(InferConfig(gpus_per_actor=0.5), CPU2)[2] == 0.0  # no GPU: runs on CPU
    with pytest.raises(MnistRayError, match="no GPU"):
        _pool(InferConfig(gpus_per_actor=1, require_gpu=True), CPU2)
    # A cluster scaled to zero (autoscaling from a CPU-0 head): the flags stand, GPUs may come.
    assert _pool(InferConfig(actors="1..8", gpus_per_actor=1), {"memory": 1e9}) == (1, 8, 1, 0.5)
    assert _pool(InferConfig(actors="2", gpus_per_actor=0.5), {"CPU": 2.0, "GPU": 1.0}) == (2, 2, 0.5, 0.5)


def test_the_plan_records_batch_size_tasks_and_read_ahead():
    p = planning.make(InferConfig(runtime="tflite-int8"), {"CPU": 8.0}, "unused")
    assert p.batch_size == 1024 and p.runtime == "tflite-int8"
    assert planning.make(InferConfig(), {"CPU": 8.0}, "unused").batch_size == 4096
    assert planning.make(InferConfig(batch_size=64), {"CPU": 8.0}, "unused").batch_size == 64
    # prepare_rows asks for the actor's CPUs (fused into it); beside a GPU actor, a task's share.
    assert p.prepare_cpus == p.cpus_per_actor == 1.0 and p.read_cpus == p.write_cpus == planning.IO_CPUS
    gpu = planning.make(InferConfig(gpus_per_actor=1), {"CPU": 8.0, "GPU": 1.0}, "unused")
    assert gpu.on_gpu and gpu.prepare_cpus == planning.IO_CPUS and gpu.cpus_per_actor == 0.5
    # Read-ahead: flat in the input's size, a few blocks per actor.
    assert p.read_ahead_bytes == planning.READ_AHEAD_BYTES_MIN
    big = planning.make(InferConfig(actors="1..6"), {"CPU": 8.0}, "unused")
    assert big.read_ahead_bytes == 6 * planning.READ_AHEAD_BYTES_PER_ACTOR
    assert p.as_dict()["batch_size"] == 1024 and "tflite-int8" in p.describe()


def test_resumed_rows_are_looked_up_for_the_planned_runtime():
    seen = []
    p = planning.make(InferConfig(runtime="tflite-fp16"), {"CPU": 4.0}, "unused",
                      resumed_rows=lambda runtime: seen.append(runtime) or 42)
    assert seen == ["tflite-fp16"] and p.resumed_rows == 42 and "resuming after 42 rows" in p.describe()
