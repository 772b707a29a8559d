"""Where a training run's workers go: how many, with how many CPUs and threads, from the cluster."""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import os
from dataclasses import dataclass
from typing import Protocol

from mnist_ray.errors import MnistRayError
from mnist_ray.plumbing import compat, gpu
from mnist_ray.training import train_worker

log = logging.getLogger(__name__)


class WorkerFlags(Protocol):
    """The flags of a training run that place its workers (``train.TrainConfig`` has them)."""
    workers: int | None
    cpus_per_worker: float | None
    use_gpu: bool
    placement: str
    batch_size: int


MIN_CPUS_PER_WORKER = 0.25


@dataclass(frozen=True)
class Layout:
    """Where the training runs: ``workers`` Ray Train workers of ``cpus_per_worker`` CPUs each."""
    workers: int
    cpus_per_worker: float
    placement: str
    why: str

    @property
    def threads(self) -> int:
        """TF threads per worker (``train_worker.set_worker_threads``) on a node of the driver's size."""
        return train_worker.worker_threads(self.cpus_per_worker, len(os.sched_getaffinity(0)))

    def describe(self) -> str:
        return (f"{self.workers} worker{'s' * (self.workers > 1)} x {self.cpus_per_worker:g} CPUs "
                f"({self.threads} TF thread{'s' * (self.threads > 1)} each), {self.placement}: {self.why}")


def choose_layout(cfg: WorkerFlags, reserved: float = 0.0) -> Layout:
    """The workers of ``cfg`` (``--workers``, else chosen from the cluster) and their CPUs.

    Measured on one 2-core node (`mnist-ray bench --parts train`): one worker computing on both
    cores trains faster than two workers sharing them, which pay an all-reduce every step for
    nothing the one does not have. So by default: one worker per node (SPREAD), or one per
    GPU with --use-gpu; ``--workers N`` keeps any data-parallel layout.
    """
    import ray

    nodes = [n["Resources"] for n in ray.nodes() if n.get("Alive") and n["Resources"].get("CPU", 0) > 0]
    if cfg.workers is not None:
        workers, placement, why = cfg.workers, cfg.placement, "--workers"
    elif cfg.use_gpu:
        gpus = int(ray.cluster_resources().get("GPU", 0))
        workers, placement, why = max(1, gpus), cfg.placement, "one per GPU"
    elif len(nodes) > 1:
        workers, placement, why = len(nodes), "SPREAD", f"one per node ({len(nodes)} nodes)"
    else:
        workers, placement, why = 1, cfg.placement, "one node: one worker with its cores"
    cpus = cpus_per_worker(dataclasses.replace(cfg, workers=workers), reserved, nodes)
    return Layout(workers, cpus, placement, why)


def cpus_per_worker(cfg: WorkerFlags, reserved: float = 0.0, nodes: list[dict] | None = None) -> float:
    """CPUs per worker: an even share of the cluster (at most a node's), less the reserve of Ray
    Data's tasks (``compat.data_cpu_reserve``) and ``reserved`` CPUs held elsewhere (a Tune
    trial's). Fails in seconds when the workers can never be placed."""
    import ray

    resources = ray.cluster_resources()
    total = resources.get("CPU", 0)
    if nodes is None:
        nodes = [n["Resources"] for n in ray.nodes() if n.get("Alive") and n["Resources"].get("CPU", 0) > 0]
    if cfg.use_gpu and cfg.workers > resources.get("GPU", 0):
        raise MnistRayError(f"{cfg.workers} GPU workers need {cfg.workers} GPUs but the cluster has "
                            f"{resources.get('GPU', 0):g} and its autoscaler can add none: lower --workers "
                            "or drop --use-gpu")
    keep = compat.data_cpu_reserve() + reserved
    if cfg.cpus_per_worker is not None:
        need = cfg.cpus_per_worker
    elif cfg.use_gpu:
        # A GPU worker's input pipeline needs more than one core to keep its GPU busy: the CPUs
        # its node has per GPU, less the data tasks' share.
        per_gpu = gpu.cpus_per_gpu(nodes)
        need = max(MIN_CPUS_PER_WORKER, math.floor((per_gpu - keep) * 20) / 20)
    else:
        largest = max((n.get("CPU", 0) for n in nodes), default=total)
        need = math.floor(min(largest - keep, (total - keep) / cfg.workers) * 20) / 20
        need = max(need, MIN_CPUS_PER_WORKER)
    if need * cfg.workers + keep > total:
        raise MnistRayError(
            f"{cfg.workers} workers need {need * cfg.workers:g} CPUs ({need:g} each) plus "
            f"{keep:g} for data tasks, but the cluster has {total:g} CPUs: lower --workers "
            "or --cpus-per-worker, or add nodes")
    return need


def gpus_for(cfg: WorkerFlags):
    """With --use-gpu on a cluster short of GPUs that its autoscaler can add: a context that asks
    for one GPU (and the worker's CPUs) per worker, waits for them, and withdraws the request."""
    if not cfg.use_gpu:
        return contextlib.nullcontext()
    bundles = [{"GPU": 1, "CPU": cfg.cpus_per_worker or 1}] * cfg.workers
    return gpu.gpus_for(bundles, cfg.workers, gpu.gpus_the_cluster_can_get())


GPU_MIN_BATCH_PER_WORKER = 128


def warn_small_gpu_batches(cfg: WorkerFlags) -> None:
    """--batch-size is global: split over many GPUs it can leave each one a few images a step."""
    per_gpu = cfg.batch_size // cfg.workers
    if cfg.use_gpu and per_gpu < GPU_MIN_BATCH_PER_WORKER:
        log.warning("each GPU gets %d images a step (--batch-size %d over %d workers): a GPU is mostly idle "
                    "below ~%d; consider --batch-size %d and a learning rate scaled with it", per_gpu,
                    cfg.batch_size, cfg.workers, GPU_MIN_BATCH_PER_WORKER, GPU_MIN_BATCH_PER_WORKER * cfg.workers)
