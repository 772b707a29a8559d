"""The plan of one inference run: what it reserves and how it scores, resolved once, up front.

``make`` turns the config and the cluster's resources into a frozen ``Plan`` (pool size, CPUs
and GPUs per actor, the read/write tasks' CPUs, batch size, runtime and why): printed at the
start of the run, recorded in the predictions' manifest, and pure (no Ray: the resources are an
argument), so every decision is unit-tested.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from dataclasses import dataclass
from typing import Callable, Protocol

from mnist_ray.model import runtimes
from mnist_ray.plumbing import cluster, compat
from mnist_ray.errors import MnistRayError


class PlanFlags(Protocol):
    """The flags of a run that its plan reads (``infer.InferConfig`` has them)."""
    actors: str
    runtime: str
    batch_size: int | None
    cpus_per_actor: float
    gpus_per_actor: float
    require_gpu: bool

log = logging.getLogger(__name__)

# Smallest CPU share a predictor actor is squeezed to on a resumed run of a small node.
MIN_ACTOR_CPUS = 0.25
# Blocks in flight, whatever N: Ray Data's default budget is a fraction of the object store
# (GiBs), and reads are far faster than scoring, so at 1M images ~600 MB of pixels sat queued in
# front of one actor (memory grew with N) and the reads competed with the actor's start-up.
# A few blocks per actor keep it fed (a block is ~10 MB of pixels).
READ_AHEAD_BYTES_PER_ACTOR = 96 * 2**20
READ_AHEAD_BYTES_MIN = 256 * 2**20


@dataclass(frozen=True)
class Plan:
    runtime: str
    runtime_reason: str
    batch_size: int
    actors_min: int
    actors_max: int
    cpus_per_actor: float
    gpus_per_actor: float
    prepare_cpus: float  # each prepare_rows task: the actor's own CPUs, so Ray fuses it into the actor
    read_cpus: float
    write_cpus: float
    read_ahead_bytes: int
    resumed_rows: int = 0
    model_threads: int = 1  # TFLite interpreter threads per actor (capped at its node's cores)

    @property
    def on_gpu(self) -> bool:
        return self.gpus_per_actor > 0

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)

    def describe(self) -> str:
        """One line for the log."""
        gpu = f", {self.gpus_per_actor:g} GPU" if self.on_gpu else ""
        pool = f"{self.actors_min}" if self.actors_min == self.actors_max else f"{self.actors_min}..{self.actors_max}"
        return (f"{pool} actor(s) x {self.cpus_per_actor:g} CPU{gpu}, runtime {self.runtime} "
                f"({self.runtime_reason}), batch {self.batch_size}, read/write tasks {self.read_cpus:g}/"
                f"{self.write_cpus:g} CPU, {self.model_threads} model thread(s) per actor, read-ahead "
                f"{self.read_ahead_bytes >> 20} MiB"
                + (f", resuming after {self.resumed_rows:,} rows" if self.resumed_rows else ""))


def parse_actors(actors: str) -> tuple[int, int]:
    """``N`` or ``MIN..MAX`` -> (min, max) pool size."""
    return cluster.parse_range(actors, "--actors")


def default_batch_size(runtime: str) -> int:
    """4096 for tf; 1024 for TFLite, whose int8 activations then stay in cache (mnist-ray bench)."""
    return 4096 if runtime == "tf" else 1024


def choose_runtime(cfg: PlanFlags, model_dir: str, on_gpu: bool) -> tuple[str, str]:
    """The runtime the actors load, and why (``runtimes.choose``)."""
    return runtimes.choose(cfg.runtime, model_dir, on_gpu)


def make(cfg: PlanFlags, resources: dict, model_dir: str,
         resumed_rows: Callable[[str], int] = lambda runtime: 0, autoscaler_gpus: float = 0.0) -> Plan:
    """The plan for ``cfg`` on a cluster with ``resources`` (``ray.cluster_resources()``) whose
    autoscaler can add ``autoscaler_gpus`` GPUs (``gpu.gpus_the_cluster_can_get``).

    ``resumed_rows(runtime)``: rows an earlier attempt of this job committed (the work dir
    depends on the runtime). Refuses a pool that would starve the read and write tasks.
    """
    lo, hi = parse_actors(cfg.actors)
    cpus, gpus = resources.get("CPU", 0), actor_gpus(cfg.runtime, cfg.gpus_per_actor)
    if gpus > 0:
        have = resources.get("GPU", 0)
        if have == 0 and autoscaler_gpus == 0 and cpus == 0:
            # An autoscaling cluster scaled to zero whose config is not on this machine (a
            # ray:// driver): nothing to measure, so trust the flags.
            pass
        elif have == 0 and autoscaler_gpus == 0:
            if cfg.require_gpu:
                raise MnistRayError("--require-gpu: the cluster has no GPU and no autoscaler that can add one")
            log.warning("the cluster has no GPU: running the predictor actors on CPU")
            gpus = 0.0
        else:
            hi = cap_pool_by_gpus(hi, gpus, have + autoscaler_gpus)
            lo = min(lo, hi)
    runtime, reason = choose_runtime(cfg, model_dir, on_gpu=gpus > 0)
    resumed = resumed_rows(runtime)
    actor_cpus = cfg.cpus_per_actor
    if cpus == 0:
        # An autoscaling cluster scaled to zero (cluster.yaml's head has CPU 0): nothing to
        # measure yet, so trust the flags and let the autoscaler bring the nodes they ask for.
        log.info("the cluster has no worker nodes yet: the actor pool will wait for the autoscaler")
    else:
        if gpus > 0:
            actor_cpus = fit_gpu_actor_cpus(cpus, hi, actor_cpus, resuming=resumed > 0)
        actor_cpus = fit_actor_cpus(cpus, hi, actor_cpus, resuming=resumed > 0)
    return Plan(runtime=runtime, runtime_reason=reason, batch_size=cfg.batch_size or default_batch_size(runtime),
                actors_min=lo, actors_max=hi, cpus_per_actor=actor_cpus, gpus_per_actor=gpus,
                prepare_cpus=actor_cpus if gpus == 0 else compat.IO_TASK_CPUS,
                read_cpus=compat.IO_TASK_CPUS, write_cpus=compat.IO_TASK_CPUS,
                read_ahead_bytes=max(READ_AHEAD_BYTES_MIN, hi * READ_AHEAD_BYTES_PER_ACTOR), resumed_rows=resumed,
                model_threads=model_threads(cpus, hi, actor_cpus))


def model_threads(cpus: float, actors: int, actor_cpus: float) -> int:
    """TFLite threads per actor: its share of the cluster's CPUs, at least the CPUs it reserved.

    The interpreter is ~90 % of a scored image's CPU (read, prepare and write tasks ~5 µs of
    ~80), so one actor alone on a 2-CPU node runs 2 threads beside those light tasks: with 1
    thread for its 1 reserved CPU, int8 scoring ran at half the rate (12.5k against ~26k
    images/s). Several actors share the cores instead of each taking them all.
    """
    share = math.floor(cpus / max(actors, 1) + 1e-9) if cpus else 0
    return max(1, math.floor(actor_cpus + 1e-9), share)


def actor_gpus(runtime: str, gpus_per_actor: float) -> float:
    """GPUs a predictor actor asks for: none for TFLite, whose Python interpreter runs on the CPU
    (``auto`` picks tf on GPU actors)."""
    if gpus_per_actor > 0 and runtime.startswith("tflite"):
        log.warning("--runtime %s runs on the CPU (TFLite's Python interpreter has no GPU delegate here): "
                    "its actors ask for no GPU; use --runtime tf or auto for GPU actors", runtime)
        return 0.0
    return gpus_per_actor


def cap_pool_by_gpus(actors: int, gpus_per_actor: float, gpus: float) -> int:
    """The largest pool that ``gpus`` GPUs (those the cluster has, plus what its autoscaler can
    add) can hold; one actor that can never fit is an error."""
    fits = math.floor(gpus / gpus_per_actor + 1e-9)  # 3 x 1/3 is one GPU, whatever the rounding
    if fits < 1:
        raise MnistRayError(f"one actor needs {gpus_per_actor:g} GPU but the cluster can have only {gpus:g}: "
                            "lower --gpus-per-actor")
    if fits < actors:
        log.info("%d actors x %g GPU do not fit on %g GPUs: the pool is capped at %d", actors, gpus_per_actor,
                 gpus, fits)
    return min(actors, fits)


def fit_gpu_actor_cpus(cpus: float, actors: int, actor_cpus: float, resuming: bool) -> float:
    """A GPU actor keeps its --cpus-per-actor (the host side of every batch needs it), lowered to
    an even share of what Ray Data's tasks leave only where the pool would not fit otherwise."""
    room = cpus - compat.data_cpu_reserve(resuming)
    if actors * actor_cpus > room and room / actors >= MIN_ACTOR_CPUS:
        log.info("%d GPU actors x %g CPU do not fit on %g CPUs beside Ray Data's tasks: %.2g CPU each",
                 actors, actor_cpus, cpus, room / actors)
        return room / actors
    return actor_cpus


def fit_actor_cpus(cpus: float, actors: int, actor_cpus: float, resuming: bool) -> float:
    """CPUs per actor that leave Ray Data's own tasks their reserve beside the pool
    (``compat.data_cpu_reserve``), or one of them waits for a CPU that never frees."""
    reserve = compat.data_cpu_reserve(resuming)
    if actors * actor_cpus + reserve > cpus and resuming:
        # Small nodes only: make room for the filter actor rather than hang.
        fitted = (cpus - reserve) / actors
        if fitted >= MIN_ACTOR_CPUS:
            log.info("resuming: Ray's checkpoint filter actor takes %g CPU, so each predictor actor "
                     "reserves %.2g CPU instead of %g", compat.checkpoint_filter_cpus(), fitted, actor_cpus)
            actor_cpus = fitted
    if actors * actor_cpus + reserve > cpus:
        raise MnistRayError(
            f"{actors} actors x {actor_cpus:g} CPU would leave less than {reserve:g} of {cpus:g} CPUs to "
            "Ray Data's own tasks and starve the read and write tasks: lower --actors or --cpus-per-actor")
    return actor_cpus
