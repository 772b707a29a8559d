"""A test per workaround in mnist_ray.plumbing.compat, on the real Ray and TensorFlow: each probes the
upstream behaviour it works around (what Ray requests, plans or warns; what Keras does) and
fails when that behaviour changes, naming the workaround to revisit."""

import inspect
import os
import socket
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest
import yaml

from mnist_ray.inference import checkpoint
from mnist_ray.inputs import registry
from mnist_ray.plumbing import cluster, compat
from mnist_ray.training import train

ROOT = Path(__file__).resolve().parents[2]


def _physical_ops(ds) -> list:
    """The operators Ray Data would run for ``ds`` (optimized physical plan), without running it."""
    from ray.data._internal.logical.optimizers import LogicalOptimizer, PhysicalOptimizer
    from ray.data._internal.planner import create_planner

    plan, _ = create_planner().plan(LogicalOptimizer().optimize(ds._logical_plan))
    ops, todo = [], [PhysicalOptimizer().optimize(plan).dag]
    while todo:
        op = todo.pop()
        ops.append(op)
        todo.extend(op.input_dependencies)
    return ops


def _cpus(op) -> float:
    return op.incremental_resource_usage().cpu


@pytest.fixture(scope="module")
def parquet_file(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("compat") / "ids.parquet"
    pq.write_table(pa.table({"id": ["a", "b", "c"]}), path)
    return str(path)


def test_the_checkpoint_filter_actor_takes_a_whole_cpu_and_a_gib(ray_local, tmp_path):
    """compat.checkpoint_filter_cpus and checkpoint.CHECKPOINT_FILTER_ACTORS: Ray's filter operator as planned
    on a resumed run (a committed checkpoint file exists)."""
    import ray
    from ray.data._internal.execution.operators.input_data_buffer import InputDataBuffer
    from ray.data._internal.planner.checkpoint import create_checkpoint_filter_op

    pq.write_table(pa.table({"id": ["a"]}), tmp_path / "done.parquet")
    context = ray.data.DataContext.get_current().copy()
    context.checkpoint_config = checkpoint.checkpoint_config("id", str(tmp_path), pafs.LocalFileSystem())
    op = create_checkpoint_filter_op(InputDataBuffer(context, input_data=[]), context, None, None)
    assert op.name == "CheckpointFilter"
    low, high = op.min_max_resource_requirements()
    assert low.cpu == compat.checkpoint_filter_cpus() == 1, f"the filter now asks for {low}"
    assert high.cpu == checkpoint.CHECKPOINT_FILTER_ACTORS * compat.checkpoint_filter_cpus()
    assert low.memory == 2**30  # Ray's reservation per filter actor: why the pool is kept small
    from ray.data.checkpoint import CheckpointConfig

    assert CheckpointConfig.CHECKPOINT_ACTOR_POOL_MAX_SIZE == 10


def test_rays_checkpoint_filter_holds_ids_as_python_strings_and_compares_them_verbatim(ray_local, tmp_path):
    """checkpoint.hashed_checkpoint_classes: Ray's own filter keeps every checkpointed id as a Python
    string (an object array, ~73 bytes per id) and compares ids verbatim, so raw files, written
    by URI (s3://b/k) and read as b/k, would never be filtered."""
    import ray
    from ray.data.checkpoint.checkpoint_filter import (NumpyArrayBasedCheckpointFilter,
                                                       convert_and_sort_checkpointed_ids, _numpy_size)

    table = pa.table({"id": [f"c{i:04d}-t10k-{i:05d}" for i in range(1000)]})
    ids, size = ray.get(convert_and_sort_checkpointed_ids.options(num_returns=2).remote(table, "id"))
    assert ids.dtype == object and size / len(ids) > 60, \
        f"Ray now keeps ids in {ids.dtype} ({size / len(ids):.0f} B each): compare with checkpoint's 8-byte hashes"
    assert _numpy_size(np.zeros(1000, np.uint64)) == 8000
    done = ray.put(np.array(["s3://b/x/1.png", "s3://b/x/3.png"], dtype=object))
    block = pa.table({"path": ["b/x/1.png", "b/x/2.png", "b/x/3.png"], "bytes": [b"1", b"2", b"3"]})
    config = checkpoint.checkpoint_config("path", str(tmp_path), pafs.LocalFileSystem(), "s3://")
    assert NumpyArrayBasedCheckpointFilter(config, done).filter_rows_for_block(block).num_rows == 3, \
        "Ray now matches URIs itself: the scheme in checkpoint's filter may go"


def _load_checkpoint(config, tmp_path, ids: list[str]):
    """What a resumed run's filter actors get: Ray's manager (with checkpoint's classes) over real
    committed checkpoint files."""
    import ray

    pq.write_table(pa.table({config.id_column: ids[: len(ids) // 2]}), tmp_path / "a.parquet")
    pq.write_table(pa.table({config.id_column: ids[len(ids) // 2:]}), tmp_path / "b.parquet")
    manager = config.checkpoint_manager_cls(checkpoint_config=config, data_context=ray.data.DataContext.get_current())
    return manager.load_checkpoint()


def test_resumed_runs_filter_by_8_byte_hashes_of_ids_and_of_uris(ray_local, tmp_path):
    import ray

    config = checkpoint.checkpoint_config("id", str(tmp_path / "ids"), pafs.LocalFileSystem())
    (tmp_path / "ids").mkdir()
    ref, size = _load_checkpoint(config, tmp_path / "ids", [f"c{i:04d}-x" for i in range(0, 2000, 2)])
    done = ray.get(ref)
    assert done.dtype == np.uint64 and size == 8 * 1000 and np.all(np.diff(done.astype(np.float64)) >= 0)
    block = pa.table({"id": [f"c{i:04d}-x" for i in range(2000)], "n": list(range(2000))})
    keep = config.checkpoint_filter_cls(config, ref).filter_rows_for_block(block)
    assert keep["n"].to_pylist() == list(range(1, 2000, 2))
    # Files: checkpointed by the URI written, filtered on the path the read yields.
    s3 = checkpoint.checkpoint_config("path", str(tmp_path / "uris"), pafs.LocalFileSystem(), "s3://")
    (tmp_path / "uris").mkdir()
    ref, _ = _load_checkpoint(s3, tmp_path / "uris", ["s3://b/x/1.png", "s3://b/x/3.png"])
    block = pa.table({"path": ["b/x/1.png", "b/x/2.png", "b/x/3.png"], "bytes": [b"1", b"2", b"3"]})
    keep = s3.checkpoint_filter_cls(s3, ref).filter_rows_for_block(block)
    assert keep["path"].to_pylist() == ["b/x/2.png"] and keep["bytes"].to_pylist() == [b"2"]
    assert not hasattr(s3, "path_scheme")  # nothing bolted onto Ray's config


class _Identity:
    def __call__(self, batch):
        return batch


def test_ray_plans_an_actor_pool_that_takes_every_cpu_without_a_word(ray_local, parquet_file):
    """compat.data_cpu_reserve (ray-project/ray#44687): on a 2-CPU Ray, a pool of 2 one-CPU actors is
    planned and started at full size before any read, with no error or warning; the issue
    proposes refusing or warning about it. (Running it would hang; planning takes milliseconds.)"""
    import ray

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ds = ray.data.read_parquet([parquet_file], num_cpus=0.25).map_batches(
            _Identity, compute=ray.data.ActorPoolStrategy(size=2), num_cpus=1)
        pool = next(op for op in _physical_ops(ds) if type(op).__name__ == "ActorPoolMapOperator")
    assert ray.cluster_resources()["CPU"] == 2
    assert pool.min_max_resource_requirements()[0].cpu == 2  # every CPU of the cluster
    assert pool._actor_pool.initial_size() == 2  # started whole, at operator start
    assert compat.data_cpu_reserve() == 2 * compat.IO_TASK_CPUS == 0.5
    assert compat.data_cpu_reserve(resuming=True) == 0.5 + compat.checkpoint_filter_cpus()


def test_write_parquet_takes_task_cpus_only_through_ray_remote_args():
    """compat.write_task_args: reads and maps have a named num_cpus (their ray_remote_args is
    deprecated); write_parquet has none, and its ray_remote_args is not deprecated."""
    import ray

    write = inspect.signature(ray.data.Dataset.write_parquet).parameters
    assert "num_cpus" not in write and "ray_remote_args" in write, "write_parquet changed: revisit write_task_args"
    assert "num_cpus" in inspect.signature(ray.data.read_parquet).parameters
    assert "num_cpus" in inspect.signature(ray.data.Dataset.map_batches).parameters


def test_no_deprecated_ray_arguments_in_the_jobs(ray_local, small_shards, tmp_path):
    """Inference's dataset and write, and training's trainer, raise no Ray deprecation warning."""
    import ray
    from ray.util.annotations import RayDeprecationWarning

    from mnist_ray.inference import infer
    from mnist_ray.plumbing import storage
    from mnist_ray.inference import plan as planning

    cfg = infer.InferConfig(model="m", input=small_shards, runtime="tf")
    plan = planning.make(cfg, ray.cluster_resources(), "unused")
    with warnings.catch_warnings():
        warnings.simplefilter("error", RayDeprecationWarning)
        warnings.simplefilter("error", FutureWarning)
        ds = infer.build_dataset(registry.open_input(small_shards, registry.INFER), plan, "m", "v", progress=None)
        ray.data.range(3).write_parquet(str(tmp_path / "w"), **compat.write_task_args(plan.write_cpus))
        tcfg = train.TrainConfig(data=small_shards, model="cnn", workers=1).resolved()
        train.make_trainer(tcfg, train.loop_config(tcfg, 100, 1.0, {}), {"train": ray.data.range(2)}, name="probe",
                           run_loc=storage.resolve(str(tmp_path / "runs")))
    assert ds is not None


@pytest.fixture
def ask_state_api():
    """A task that asks Ray Train's question (is this actor alive?) from inside the cluster, as
    Train's PlacementGroupCleaner does, of this test's own Ray: the exception's class, or None."""
    import ray

    @ray.remote(num_cpus=0)
    def ask(actor_id: str, gcs_address: str):
        os.environ["RAY_ADDRESS"] = gcs_address  # this Ray, not another one on the machine
        from ray.train.v2._internal.state.util import is_actor_alive
        from ray.util.state.exception import RayStateApiException

        try:
            is_actor_alive(actor_id=actor_id, timeout=5)
        except RayStateApiException as e:
            return type(e).__name__
        return None

    return lambda actor_id: ray.get(ask.remote(actor_id, ray.get_runtime_context().gcs_address))


def test_train_cleans_up_placement_groups_through_the_state_api(ray_local, ask_state_api):
    """tune_callbacks.ReleaseTrainWorkers: Ray Train's PlacementGroupCleaner asks the state API
    whether the controller lives; a Ray without a dashboard cannot answer, and the cleaner then
    waits forever instead of removing the workers' placement group."""
    import ray
    from ray.train.v2._internal.execution.controller import placement_group_cleaner

    assert "is_actor_alive" in inspect.getsource(placement_group_cleaner), "Train's cleaner changed"
    actor = ray.remote(num_cpus=0)(_Identity).remote()
    try:
        assert ask_state_api(actor._actor_id.hex()) is not None, \
            "the state API answers without a dashboard: tune_callbacks.ReleaseTrainWorkers may go"
    finally:
        ray.kill(actor)
    from mnist_ray.training.tune_callbacks import ReleaseTrainWorkers

    assert ReleaseTrainWorkers({"CPU": 1}, 2).workers == 2


# --- TensorFlow: the Keras 2 switch -------------------------------------------------------------

def test_the_runtime_env_file_sets_what_the_workers_get():
    """jobs/runtime_env.yaml (for `ray job submit`) declares the same variables as cluster.runtime_env."""
    env = yaml.safe_load((ROOT / "jobs" / "runtime_env.yaml").read_text())["env_vars"]
    workers = cluster.runtime_env()["env_vars"]
    assert compat.keras2_env().items() <= env.items()
    assert {k: v for k, v in workers.items() if k not in cluster.FORWARDED_ENV} == env


def test_ray_train_still_polls_its_workers_every_2_s_by_default():
    """train_poll_env sets the variable Ray Train's controller reads for its poll interval."""
    from ray.train.v2._internal import constants

    assert constants.DEFAULT_HEALTH_CHECK_INTERVAL_S == 2.0  # when it is ~0.5, drop the workaround
    assert set(compat.train_poll_env()) == {constants.HEALTH_CHECK_INTERVAL_S_ENV_VAR}
    assert float(compat.train_poll_env()[constants.HEALTH_CHECK_INTERVAL_S_ENV_VAR]) < 1
    assert compat.train_poll_env().items() <= cluster.runtime_env()["env_vars"].items()


MWMS_FIT = """
import json, os, sys
os.environ["TF_CONFIG"] = json.dumps({"cluster": {"worker": sys.argv[2:4]}, "task": {"type": "worker", "index": int(sys.argv[1])}})
import numpy as np, tensorflow as tf
strategy = tf.distribute.MultiWorkerMirroredStrategy()
with strategy.scope():
    model = tf.keras.Sequential([tf.keras.Input((4,)), tf.keras.layers.Dense(2, activation="softmax")])
    model.compile("sgd", "sparse_categorical_crossentropy")
data = tf.data.Dataset.from_tensor_slices((np.zeros((8, 4), "float32"), np.zeros(8, "int64"))).batch(4)
try:
    model.fit(data, epochs=1, verbose=0)
    print("FIT OK")
except ValueError as e:
    print("FIT FAILED", str(e).splitlines()[0][:120])
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.e2e
def test_keras_3_still_fails_under_two_worker_mirrored_strategy():
    """compat.keras2_env: Keras 3 (TF_USE_LEGACY_KERAS=0) fails model.fit with 2 workers (~20 s)."""
    peers = [f"127.0.0.1:{_free_port()}", f"127.0.0.1:{_free_port()}"]
    env = {**os.environ, "TF_USE_LEGACY_KERAS": "0", "TF_CPP_MIN_LOG_LEVEL": "3", "CUDA_VISIBLE_DEVICES": ""}
    procs = [subprocess.Popen([sys.executable, "-c", MWMS_FIT, str(i), *peers], env=env, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.DEVNULL) for i in range(2)]
    try:
        outs = [p.communicate(timeout=180)[0] for p in procs]
    finally:
        for p in procs:
            p.kill()
    assert all("FIT FAILED Attempt to convert a value (PerReplica" in o for o in outs), \
        f"Keras 3 now trains under MultiWorkerMirroredStrategy ({outs}): compat.keras2_env may go"


def test_rays_haproxy_config_binds_stats_and_metrics_to_every_interface_and_the_wrapper_rebinds_them(tmp_path):
    from ray.serve._private import constants, haproxy_templates

    template = haproxy_templates.HAPROXY_CONFIG_TEMPLATE
    # What compat.haproxy_loopback_env exists for: when these change, it can go.
    assert "bind *:{{ config.stats_port }}" in template and "bind :{{ config.metrics_port }}" in template
    assert (constants.RAY_SERVE_HAPROXY_STATS_PORT, constants.RAY_SERVE_HAPROXY_METRICS_PORT) == (8404, 9101)
    env = compat.haproxy_loopback_env("127.0.0.1", str(tmp_path), (50001, 50002))
    assert env["RAY_SERVE_HAPROXY_STATS_PORT"] == "50001" and env["RAY_SERVE_HAPROXY_METRICS_PORT"] == "50002"
    config = tmp_path / "haproxy.cfg"
    config.write_text("defaults\n    timeout client 1s\n    timeout server 1s\n    timeout connect 1s\n"
                      "frontend prometheus\n    bind :50002\n    mode http\n"
                      "frontend http_frontend\n    bind 127.0.0.1:8000\n    mode http\n"
                      "listen stats\n  bind *:50001\n  stats enable\n")
    # The real HAProxy binary checks the rewritten config (-c: parse only, nothing listens).
    proc = subprocess.run([env["RAY_SERVE_HAPROXY_BINARY_PATH"], "-c", "-f", str(config)], capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    binds = [line.split()[1] for line in config.read_text().splitlines() if line.strip().startswith("bind")]
    assert binds == ["127.0.0.1:50002", "127.0.0.1:8000", "127.0.0.1:50001"]


# Minor page faults of 50 allocations, each written through: one a page when glibc maps and
# unmaps them, none when they come from the heap. A free chunk at the heap's top serves a
# request whatever the threshold, so the pinned one is measured with a size the heap never held.
GENERATOR_FAULTS = """
import ctypes, resource
import numpy as np, tensorflow as tf
from mnist_ray.plumbing import compat

libc = ctypes.CDLL("libc.so.6")
libc.malloc.restype, libc.free.argtypes = ctypes.c_void_p, [ctypes.c_void_p]

def faults(size):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(50):
        p = libc.malloc(size)
        ctypes.memset(p, 1, size)
        libc.free(p)
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before

faults(2 << 20)  # glibc raises its own threshold past 2 MiB on the first free
dynamic = faults(2 << 20)
list(tf.data.Dataset.from_generator(lambda: iter([np.zeros(3)]), output_signature=tf.TensorSpec((3,), tf.float64)))
pinned = faults(8 << 20)
restored = compat.restore_mmap_threshold()
faults(8 << 20)
print(dynamic, pinned, restored, faults(8 << 20))
"""


def test_from_generator_still_pins_glibcs_mmap_threshold_and_the_workaround_lifts_it():
    """compat.restore_mmap_threshold: after a generator dataset, every 8 MiB buffer faults in
    page by page until the threshold is restored (~5 s, TensorFlow in a fresh process)."""
    env = {**os.environ, **compat.keras2_env(), "TF_CPP_MIN_LOG_LEVEL": "3", "CUDA_VISIBLE_DEVICES": ""}
    out = subprocess.run([sys.executable, "-c", GENERATOR_FAULTS], env=env, capture_output=True, text=True,
                         timeout=180)
    assert out.returncode == 0, out.stderr[-2000:]
    dynamic, pinned, restored, after = out.stdout.split()
    assert int(dynamic) < 500, out.stdout
    assert int(pinned) > 50 * 1000, f"TensorFlow no longer pins the mmap threshold ({out.stdout}): " \
                                   "compat.restore_mmap_threshold may go"
    assert restored == "True" and int(after) < 500, out.stdout


def test_letting_go_of_an_autotuned_iterator_can_still_wait_out_its_optimizer_and_without_autotune_never_does():
    """compat.without_autotune: an autotuned iterator deleted 3 s into its input can wait ~2 s for
    tf.data's autotune thread, whose sleep then runs from 2.56 s to 5.12 s (3 times in 8 here, so
    up to 12 tries: ~10 s); an iterator without autotuning goes at once."""
    import time

    import tensorflow as tf

    def endless():
        while True:
            time.sleep(0.005)
            yield np.zeros((8, 28, 28, 1), np.float32)

    def seconds_to_let_go(autotune: bool) -> float:
        ds = tf.data.Dataset.from_generator(endless, output_signature=tf.TensorSpec((8, 28, 28, 1), tf.float32))
        ds = ds.map(lambda x: x * 2, num_parallel_calls=tf.data.AUTOTUNE).prefetch(tf.data.AUTOTUNE)
        it = iter(ds if autotune else compat.without_autotune(ds))
        started = time.perf_counter()
        while time.perf_counter() - started < 3:
            next(it)
        started = time.perf_counter()
        del it
        return time.perf_counter() - started

    autotuned = []
    while len(autotuned) < 12 and max(autotuned, default=0) < 1:
        autotuned.append(seconds_to_let_go(True))
    assert max(autotuned) > 1, f"no autotuned iterator waited in {len(autotuned)} tries: " \
                               "compat.without_autotune may go"
    plain = [seconds_to_let_go(False) for _ in range(2)]
    assert max(plain) < 0.5, f"without autotuning, letting go took {plain} s"


def test_a_multi_device_iterators_device_datasets_still_autotune_and_the_workaround_turns_it_off(monkeypatch):
    """compat.without_device_autotune: the datasets MultiWorkerMirroredStrategy feeds each device
    through ignore the input pipeline's options until it is applied (and applying it twice is fine)."""
    import tensorflow as tf
    from tensorflow.python.data.ops import multi_device_iterator_ops

    def device_autotune():
        it = multi_device_iterator_ops.OwnedMultiDeviceIterator(
            compat.without_autotune(tf.data.Dataset.range(4)), ["/cpu:0"])
        return it._device_iterators[0]._dataset.options().autotune.enabled

    assert device_autotune() is not False, \
        "TensorFlow's per-device datasets now follow the input's options: compat.without_device_autotune may go"
    monkeypatch.setattr(multi_device_iterator_ops, "_create_device_dataset",
                        multi_device_iterator_ops._create_device_dataset)  # undone after the test
    compat.without_device_autotune()
    compat.without_device_autotune()
    assert device_autotune() is False
    assert multi_device_iterator_ops._create_device_dataset.without_autotune
