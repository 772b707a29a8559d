"""The plan of one inference run: what it reserves and how it scores, resolved once, up front.

``make`` turns the config and the cluster's resources into a frozen ``Plan`` (pool size, CPUs
and GPUs per actor, the read/write tasks' CPUs, batch size, runtime and why): printed at the
start of the run, recorded in the predictions' manifest, and pure (no Ray: the resources are an
argument), so every decision is unit-tested.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

from mnist_ray import compat, runtimes
from mnist_ray.errors import MnistRayError

if TYPE_CHECKING:
    from mnist_ray.infer import InferConfig

log = logging.getLogger(__name__)

# A GPU actor still feeds its GPU from the CPU, but half a core does that.
GPU_ACTOR_MAX_CPUS = 0.5
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
                f"{self.write_cpus:g} CPU, read-ahead {self.read_ahead_bytes >> 20} MiB"
                + (f", resuming after {self.resumed_rows:,} rows" if self.resumed_rows else ""))


def parse_actors(actors: str) -> tuple[int, int]:
    """``N`` or ``MIN..MAX`` -> (min, max) pool size."""
    return parse_range(actors, "--actors")


def parse_range(text: str, flag: str) -> tuple[int, int]:
    """A flag's ``N`` or ``MIN..MAX`` (actors, replicas) -> (min, max), both at least 1."""
    try:
        low, _, high = text.partition("..")
        lo, hi = int(low), int(high or low)
    except ValueError:
        raise MnistRayError(f"{flag} {text!r}: give N or MIN..MAX, e.g. 1..4") from None
    if not 1 <= lo <= hi:
        raise MnistRayError(f"{flag} {text!r}: need 1 <= MIN <= MAX")
    return lo, hi


def default_batch_size(runtime: str) -> int:
    """4096 for tf; 1024 for TFLite, whose int8 activations then stay in cache (mnist-ray bench)."""
    return 4096 if runtime == "tf" else 1024


def choose_runtime(cfg: InferConfig, model_dir: str, on_gpu: bool) -> tuple[str, str]:
    """The runtime the actors load, and why: the one given, or ``runtimes.resolve``'s for auto."""
    if cfg.runtime != runtimes.AUTO:
        return cfg.runtime, f"--runtime {cfg.runtime}"
    return runtimes.resolve(model_dir, on_gpu)


def make(cfg: InferConfig, resources: dict, model_dir: str,
         resumed_rows: Callable[[str], int] = lambda runtime: 0) -> Plan:
    """The plan for ``cfg`` on a cluster with ``resources`` (``ray.cluster_resources()``).

    ``resumed_rows(runtime)``: rows an earlier attempt of this job committed (the work dir
    depends on the runtime). Refuses a pool that would starve the read and write tasks.
    """
    lo, hi = parse_actors(cfg.actors)
    cpus, gpus = resources.get("CPU", 0), cfg.gpus_per_actor
    if cpus > 0 and gpus > 0 and resources.get("GPU", 0) == 0:
        if cfg.require_gpu:
            raise MnistRayError("--require-gpu: the cluster has no GPU")
        log.warning("the cluster has no GPU: running the predictor actors on CPU")
        gpus = 0.0
    runtime, reason = choose_runtime(cfg, model_dir, on_gpu=gpus > 0)
    resumed = resumed_rows(runtime)
    actor_cpus = cfg.cpus_per_actor if gpus == 0 else min(cfg.cpus_per_actor, GPU_ACTOR_MAX_CPUS)
    if cpus == 0:
        # An autoscaling cluster scaled to zero (cluster.yaml's head has CPU 0): nothing to
        # measure yet, so trust the flags and let the autoscaler bring the nodes they ask for.
        log.info("the cluster has no worker nodes yet: the actor pool will wait for the autoscaler")
    else:
        actor_cpus = fit_actor_cpus(cpus, hi, actor_cpus, resuming=resumed > 0)
    return Plan(runtime=runtime, runtime_reason=reason, batch_size=cfg.batch_size or default_batch_size(runtime),
                actors_min=lo, actors_max=hi, cpus_per_actor=actor_cpus, gpus_per_actor=gpus,
                prepare_cpus=actor_cpus if gpus == 0 else compat.IO_TASK_CPUS,
                read_cpus=compat.IO_TASK_CPUS, write_cpus=compat.IO_TASK_CPUS,
                read_ahead_bytes=max(READ_AHEAD_BYTES_MIN, hi * READ_AHEAD_BYTES_PER_ACTOR), resumed_rows=resumed)


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
