"""GPUs: what a Ray actor or Train worker that was given one sets up, how the driver keeps off
the GPUs itself, asking the autoscaler for GPU nodes, and the training collective.

Everything here runs on CPU too: the TensorFlow calls are made only when a GPU was asked for.
The pool's GPU planning is ``plan``'s. Checked on a CPU-only machine with a Ray that declares
GPUs (docs/gpu.md says what no real GPU has run yet).
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import subprocess
import time

from mnist_ray.errors import MnistRayError

log = logging.getLogger(__name__)

# TensorFlow's memory limit covers its own allocator only: each process also holds a CUDA
# context with cuDNN/cuBLAS workspaces outside it (a few hundred MiB on recent drivers).
CUDA_CONTEXT_MB = 512
MIN_MEMORY_MB = 256


# --- inside an actor or Train worker that was given a GPU ------------------------------------

def memory_limit_mb(fraction: float, device_total_mb: int) -> int:
    """TensorFlow's memory limit for a process given ``fraction`` of a device of
    ``device_total_mb``: its share, less the CUDA context it also holds (CUDA_CONTEXT_MB)."""
    if not 0 < fraction <= 1:
        raise MnistRayError(f"a GPU fraction must be in (0, 1], got {fraction:g}")
    limit = math.floor(fraction * device_total_mb) - CUDA_CONTEXT_MB
    if limit < MIN_MEMORY_MB:
        raise MnistRayError(f"{fraction:g} of a {device_total_mb} MiB GPU leaves {limit} MiB for TensorFlow "
                            f"after its CUDA context: give each actor a larger --gpus-per-actor")
    return limit


def check_tf_sees_gpu() -> list:
    """TensorFlow's physical GPUs, or a worded error: a process Ray gave a GPU to must not
    silently compute on the CPU."""
    import tensorflow as tf

    gpus = tf.config.list_physical_devices("GPU")
    if gpus:
        return gpus
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    cuda_build = tf.sysconfig.get_build_info().get("is_cuda_build", False)
    why = ("TensorFlow's CUDA libraries are missing: install the gpu extra on GPU nodes "
           "(pip install 'mnist-ray[gpu]', i.e. tensorflow[and-cuda])" if cuda_build else
           "this TensorFlow build has no CUDA support")
    raise MnistRayError(f"Ray gave this process a GPU (CUDA_VISIBLE_DEVICES={visible!r}) but TensorFlow "
                        f"{tf.__version__} sees none: {why}, and check the NVIDIA driver with nvidia-smi")


def device_total_mb(index: int = 0) -> int:
    """Total memory of the ``index``-th GPU this process may use, from nvidia-smi (TensorFlow
    can only tell after it has initialized the device, when the limit can no longer be set)."""
    visible = [v for v in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if v.strip()]
    device = visible[index] if index < len(visible) else str(index)
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=memory.total", "--format=csv,noheader,nounits",
                              "-i", device], capture_output=True, text=True, timeout=30, check=True).stdout
        return int(out.split()[0])
    except (OSError, subprocess.SubprocessError, ValueError, IndexError) as e:
        raise MnistRayError(f"cannot read the memory of GPU {device} with nvidia-smi ({e}): "
                            "is the NVIDIA driver installed on this node?") from None


def configure_tf_for_actor(gpu_fraction: float, total_mb: int | None = None) -> int | None:
    """Before the model loads: check that TensorFlow sees the GPU, and cap a fractional actor's
    memory at its share (a logical device with a memory limit; growth alone lets the first
    actors on a GPU take what the later ones need). Returns the limit in MiB (None: whole GPUs)."""
    import tensorflow as tf

    gpus = check_tf_sees_gpu()
    if gpu_fraction >= 1:
        return None  # the process has its GPUs to itself: TensorFlow's default is right
    limit = memory_limit_mb(gpu_fraction, total_mb if total_mb is not None else device_total_mb())
    for device in gpus:
        tf.config.set_logical_device_configuration(device, [tf.config.LogicalDeviceConfiguration(memory_limit=limit)])
    return limit


# --- the driver --------------------------------------------------------------------------------

def hide_gpus_from_driver() -> None:
    """Keep the driver's TensorFlow (the smoke test) off every GPU: by default it would map all
    GPU memory, which the actors on this machine then lack.

    TensorFlow's own setting rather than CUDA_VISIBLE_DEVICES="": a local Ray started by this
    process inherits its environment, and would then see no GPU to give the actors.
    """
    import tensorflow as tf

    try:
        tf.config.set_visible_devices([], "GPU")
    except RuntimeError:  # TensorFlow already initialized its devices in this process
        if tf.config.get_visible_devices("GPU"):
            log.warning("TensorFlow was initialized before the driver could hide the GPUs: "
                        "the driver holds GPU memory")


# --- scaling from zero -------------------------------------------------------------------------

# Where the cluster launcher starts the head's autoscaler from (`ray start --head
# --autoscaling-config=~/ray_bootstrap_config.yaml` in cluster.yaml); the launcher has filled
# in each node type's resources (GPUs of the instance type) there.
AUTOSCALING_CONFIG = "~/ray_bootstrap_config.yaml"


def autoscaler_gpus(config: dict) -> float:
    """GPUs the autoscaler of ``config`` (a launcher config) can bring: max_workers x GPUs per
    node over the worker node types, within the cluster's max_workers."""
    head = config.get("head_node_type")
    gpu_types = sorted(((t.get("resources") or {}).get("GPU", 0), t.get("max_workers", 0))
                       for name, t in (config.get("available_node_types") or {}).items() if name != head)
    nodes_left, total = config.get("max_workers", math.inf), 0.0
    for per_node, max_workers in reversed(gpu_types):  # the autoscaler may fill the cap with the largest
        n = min(max_workers, nodes_left) if per_node else 0
        total, nodes_left = total + n * per_node, nodes_left - n
    return total


def gpus_the_cluster_can_get(path: str | None = None) -> float:
    """GPUs an autoscaler could add to this cluster: from its config on this head node, 0 when
    there is none (a local Ray, or a fixed cluster)."""
    import yaml

    path = path or AUTOSCALING_CONFIG

    try:
        with open(os.path.expanduser(path)) as f:
            config = yaml.safe_load(f)
    except FileNotFoundError:
        return 0.0
    except (OSError, yaml.YAMLError) as e:
        log.warning("cannot read the autoscaler config %s (%s): assuming no GPU nodes can be added", path, e)
        return 0.0
    return autoscaler_gpus(config or {})


WAIT_FOR_GPUS_S = 900.0  # a spot GPU node boots and installs the gpu extra in ~5-10 minutes
PROGRESS_EVERY_S = 30.0


def wait_for_gpus(need: float, timeout_s: float = WAIT_FOR_GPUS_S, poll_s: float = 2.0) -> float:
    """Block until the cluster has ``need`` GPUs, with a progress line every PROGRESS_EVERY_S;
    the GPUs it has, or a worded error after ``timeout_s``."""
    import ray

    started = last_line = time.monotonic()
    while (have := ray.cluster_resources().get("GPU", 0.0)) < need:
        now = time.monotonic()
        if now - started >= timeout_s:
            raise MnistRayError(f"the autoscaler brought {have:g} of {need:g} GPUs in {timeout_s:.0f} s: check "
                                "`ray status` and the autoscaler log (monitor.log) for failed launches")
        if now - last_line >= PROGRESS_EVERY_S:
            log.info("waiting for the autoscaler: %g of %g GPUs after %.0f s", have, need, now - started)
            last_line = now
        time.sleep(poll_s)
    return have


def request_gpus(bundles: list[dict]) -> None:
    """Ask the autoscaler for nodes that fit ``bundles`` (e.g. 4 x {"GPU": 0.25, "CPU": 1})."""
    from ray.autoscaler.sdk import request_resources

    request_resources(bundles=[dict(b) for b in bundles])


def release_gpus() -> None:
    """Withdraw the cluster's standing request (Ray keeps one until the next replaces it), so
    idle GPU nodes are given back."""
    from ray.autoscaler.sdk import request_resources

    request_resources(bundles=[])


@contextlib.contextmanager
def gpus_for(bundles: list[dict], need: float, can_get: float, timeout_s: float = WAIT_FOR_GPUS_S):
    """Yields the GPUs the cluster has: when it has fewer than ``need`` and its autoscaler can
    add ``can_get``, after asking for ``bundles`` and waiting until ``need`` are there. A cluster
    that never can is not asked (the caller falls back or refuses). A request made here is
    withdrawn on exit, when the job ends or fails."""
    import ray

    have = ray.cluster_resources().get("GPU", 0.0)
    if need <= 0 or have >= need or have + can_get < need:
        yield have
        return
    log.info("asking the autoscaler for %g GPUs (%d x %s)", need, len(bundles), bundles[0])
    request_gpus(bundles)
    try:
        yield wait_for_gpus(need, timeout_s)
    finally:
        release_gpus()


# --- bench ---------------------------------------------------------------------------------------

BENCH_ACTORS_PER_GPU = (1, 2, 4)


def gpus_for_bench() -> int:
    """The GPUs `mnist-ray bench --gpu` measures on, or a worded refusal on a machine without
    one. The driver's TensorFlow then grows its memory rather than mapping it all, so the
    infer jobs' actors it starts afterwards still find room."""
    import tensorflow as tf

    gpus = tf.config.list_physical_devices("GPU")
    if not gpus:
        raise MnistRayError(f"bench --gpu needs a GPU: TensorFlow {tf.__version__} sees none on this machine "
                            "(nothing was measured); run it on a GPU node with the gpu extra installed "
                            "(pip install 'mnist-ray[gpu]'), or drop --gpu")
    for device in gpus:
        tf.config.experimental.set_memory_growth(device, True)
    return len(gpus)


# --- training ----------------------------------------------------------------------------------

def cpus_per_gpu(nodes: list[dict]) -> float:
    """The fewest CPUs per GPU over the nodes (resource dicts) that have GPUs: what one GPU
    worker can reserve wherever it lands (0 when no node has a GPU yet)."""
    shares = [n.get("CPU", 0) / n["GPU"] for n in nodes if n.get("GPU", 0) > 0]
    return min(shares, default=0.0)


def collective_implementation(use_gpu: bool) -> str:
    """MultiWorkerMirroredStrategy's all-reduce: NCCL between GPU workers (TensorFlow's AUTO
    resolves to RING, gRPC through the hosts), RING between CPU workers (NCCL needs GPUs)."""
    return "NCCL" if use_gpu else "RING"


def communication_options(use_gpu: bool, bytes_per_pack: int = 64 << 20):
    """The strategy's CommunicationOptions: the collective above, and one all-reduce per step
    for all gradients (per-collective latency, not bandwidth, is what costs on CPU clusters)."""
    import tensorflow as tf

    implementation = getattr(tf.distribute.experimental.CommunicationImplementation,
                             collective_implementation(use_gpu))
    return tf.distribute.experimental.CommunicationOptions(bytes_per_pack=bytes_per_pack,
                                                           implementation=implementation)
