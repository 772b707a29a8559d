"""infer: any input infer reads -> a Ray Data actor pool with a preloaded model -> predictions."""

# Resume is Ray Data's own checkpointing (``ray.data.checkpoint``): each write task records the
# ids it wrote in OUTPUT/run-KEY/checkpoint (two-phase, so a killed task's file is deleted on
# the next start), and a rerun filters those rows out right after the read. KEY hashes the input
# fingerprint, the model version and the runtime (and the run being replaced, with --overwrite),
# so another model or input never reuses partial work. Readers only see the manifest's files.

from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import datetime
import hashlib
import json
import logging
import sys
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import ClassVar

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs

from mnist_ray import __version__
from mnist_ray.formats import predictions, shards
from mnist_ray.inputs import registry, sources
from mnist_ray.inputs.columns import ColumnChoice
from mnist_ray.model import export, runtimes
from mnist_ray.plumbing import cluster, compat, gpu, lock, storage
from mnist_ray.inference import checkpoint
from mnist_ray.inference import plan as planning
from mnist_ray.errors import MnistRayError, raised_in_worker
from mnist_ray.inference.predictor import PredictorActor, Progress, ProgressLines, prepare_rows

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class InferConfig:
    model: str = field(default="out/mnist-sample/model", metadata={"help": "model dir (mnist-ray train)"})
    input: str = field(default="out/mnist-sample/shards", metadata={
        "help": "image shards, any image Parquet (a file, directory or glob; parquet:PATH to insist), "
                "a .zip/.tar/.tar.gz of image folders (or a glob of WebDataset shards), or a folder of "
                "image files; local or s3://"})
    image_column: str | None = field(default=None, metadata={
        "help": "Parquet input: the image column (default: the only one, or the one named image)"})
    id_column: str | None = field(default=None, metadata={
        "help": "Parquet input: the id column (default: id if there is one, else FILE#ROW)"})
    label_column: str | None = field(default=None, metadata={
        "help": "Parquet input: the label column (default: a ClassLabel, or one named label/class/target)"})
    image_shape: str | None = field(default=None, metadata={
        "help": "Parquet input of flat pixel lists that are not square: HxW or HxWxC"})
    output: str = field(default="out/mnist-sample/predictions", metadata={"help": "where predictions go"})
    runtime: str = field(default=runtimes.AUTO, metadata={
        "help": " | ".join(runtimes.CHOICES) + " (auto: tf on GPU actors; on CPU the full-integer TFLite "
                "model when it agrees with the float model on >= 99.5%% of 5,000 images at export, else the "
                "fastest variant that does, else tf)"})
    batch_size: int | None = field(default=None, metadata={
        "help": "images per model call (default: 4096 for tf; 1024 for TFLite, whose int8 "
                "activations then stay in cache: measured by mnist-ray bench)"})
    actors: str = field(default="1", metadata={
        "help": "predictor actors: N, or MIN..MAX for an autoscaling pool"})
    cpus_per_actor: float = field(default=1.0, metadata={"help": "CPUs reserved per actor"})
    gpus_per_actor: float = field(default=0.0, metadata={
        "help": "GPUs per actor (fractions share a GPU); without GPUs the job runs on CPU"})
    require_gpu: bool = field(default=False, metadata={"help": "fail instead of running on CPU"})
    max_error_rate: float = field(default=0.05, metadata={
        "help": "fail (and publish nothing) when more than this fraction of rows cannot be scored"})
    rows_per_file: int = field(default=200_000, metadata={"help": "rows per output Parquet file"})
    overwrite: bool = field(default=False, metadata={"help": "replace existing predictions"})
    address: str | None = field(default=None, metadata={"help": "Ray address (default: RAY_ADDRESS, else local)"})
    shared_storage: bool = field(default=False, metadata={"help": cluster.SHARED_STORAGE_HELP})

    PRESETS: ClassVar[dict] = {"default": {}, "smoke": {"batch_size": 128, "actors": "1"}}

    def batch(self, runtime: str | None = None) -> int:
        """Images per model call with ``runtime`` (default: this config's, unless auto)."""
        return self.batch_size or planning.default_batch_size(runtime or self.runtime)

    def validate(self) -> None:
        planning.parse_actors(self.actors)
        runtimes.check_name(self.runtime)
        if (self.batch_size is not None and self.batch_size < 1) or self.rows_per_file < 1:
            raise MnistRayError("--batch-size and --rows-per-file must be positive")
        if not 0.0 <= self.max_error_rate <= 1.0:
            raise MnistRayError("--max-error-rate must be between 0 and 1")


def run(cfg: InferConfig) -> dict:
    """Score ``cfg.input`` with the model dir ``cfg.model``; publish predictions at ``cfg.output``."""
    cluster.configure_process_env()
    cfg.validate()
    started = time.perf_counter()
    marks = {"run": time.time()}  # wall-clock marks of the fixed cost: the summary's timeline
    model_local, metadata = export.open_model_dir(cfg.model)
    # The runtime as far as it is known before Ray: GPU actors may still fall back to CPU.
    expected_runtime, _ = planning.choose_runtime(cfg, model_local, on_gpu=cfg.gpus_per_actor > 0)
    runtimes.check(model_local, expected_runtime)
    with lock.output_lock(cfg.output):  # one writer per output: a second run is refused, naming this one
        loc = storage.prepare_output(cfg.output, overwrite=cfg.overwrite, run_id=uuid.uuid4().hex[:12])
        source = registry.open_input(cfg.input, registry.INFER, registry.Options(
            columns=ColumnChoice(cfg.image_column, cfg.id_column, cfg.label_column, cfg.image_shape),
            model_metadata=metadata))
        # Beside the main thread: the smoke test (it imports TensorFlow and loads the model) while
        # Ray starts, then the digest of the input ids (it reads every id once) while the job runs;
        # beside ray.init it held the GIL and slowed Ray's start-up.
        background = concurrent.futures.ThreadPoolExecutor(2, thread_name_prefix="infer")
        stop = threading.Event()
        scaling = contextlib.ExitStack()  # a standing request for GPU nodes, withdrawn at the end
        try:
            ray_startup = connect_beside_smoke_test(cfg, background, model_local, expected_runtime, source, marks)
            expected = background.submit(source.digest, stop)
            plan, work = plan_run(cfg, loc, source, model_local, metadata, expected_runtime, scaling)
            startup, marks["planned"] = time.perf_counter() - started, time.time()
            seconds, timing = score(cfg, loc, source, plan, work, metadata)
            marks["written"] = time.time()
            figures = check_and_publish(cfg, loc, work, plan, source, metadata, expected,
                                        (seconds, startup, ray_startup, timing, marks))
        finally:
            stop.set()  # a failed run does not wait for the digest of 100M ids
            scaling.close()
            background.shutdown(wait=False, cancel_futures=True)
        return {"output": cfg.output, **figures, "model_version": metadata["version"], "runtime": plan.runtime,
                "runtime_reason": plan.runtime_reason, "batch_size": plan.batch_size,
                "actors": f"{plan.actors_min}..{plan.actors_max}", "gpus_per_actor": plan.gpus_per_actor,
                "cpus_per_actor": plan.cpus_per_actor, "wall_seconds": round(time.perf_counter() - started, 2)}


def connect_beside_smoke_test(cfg: InferConfig, background, model_local: str, runtime: str, source, marks: dict) -> float:
    """Connect to Ray while the smoke test runs in ``background``: the seconds Ray took."""
    smoke = background.submit(lambda: smoke_test(model_local, runtime, source.sample(), cfg.model))
    connecting, marks["run_checks"] = time.perf_counter(), time.time()
    try:
        cluster.connect(cfg.address, paths=(cfg.model, cfg.input, cfg.output), shared_storage=cfg.shared_storage)
        ray_startup, marks["connected"] = time.perf_counter() - connecting, time.time()
    finally:
        smoke.result()
    return ray_startup


def plan_run(cfg: InferConfig, loc: storage.Location, source: sources.Source, model_local: str, metadata: dict,
             expected_runtime: str, scaling: contextlib.ExitStack) -> tuple[planning.Plan, str]:
    """The plan on this cluster and the run's work directory (where an earlier attempt left off)."""
    def work(runtime: str) -> str:
        return work_dir(loc, source.fingerprint, metadata["version"], runtime)

    resources, autoscaler_gpus = cluster_resources(cfg, scaling)
    plan = planning.make(cfg, resources, model_local, autoscaler_gpus=autoscaler_gpus,
                         resumed_rows=lambda runtime: checkpointed_rows(loc, work(runtime)))
    log.info("infer: plan: %s", plan.describe())
    if plan.runtime != expected_runtime:  # no GPU after all: auto chose a CPU runtime
        runtimes.check(model_local, plan.runtime)
        smoke_test(model_local, plan.runtime, source.sample(), cfg.model)
    if plan.resumed_rows:
        log.info("resuming: %s of %s rows were scored by an earlier attempt (%s)",
                 f"{plan.resumed_rows:,}", f"{source.rows:,}", loc.uri_of(work(plan.runtime)))
    return plan, work(plan.runtime)


def score(cfg: InferConfig, loc: storage.Location, source: sources.Source, plan: planning.Plan, work: str,
          metadata: dict) -> tuple[float, dict]:
    """Run the scoring dataset into ``work``'s data files, with its progress actor: (seconds, timings)."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    # On the driver's node: a zero-CPU actor could land on any node, and a lost worker
    # node would take the job's progress (and its summary) with it.
    here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
    progress = ray.remote(num_cpus=0)(Progress).options(scheduling_strategy=here).remote()
    try:
        scored = build_dataset(source, plan, cfg.model, metadata["version"], progress, metadata.get("class_names"))
        scored.context.checkpoint_config = checkpoint.checkpoint_config(
            source.resume_key, loc.join(work, "checkpoint"), loc.fs, source.scheme)
        return execute(scored, plan, loc.join(work, "data"), loc, cfg, progress, todo=source.rows - plan.resumed_rows)
    finally:
        ray.kill(progress)  # also when the write fails: the driver may live on (tests, notebooks)


def check_and_publish(cfg: InferConfig, loc: storage.Location, work: str, plan: planning.Plan,
                      source: sources.Source, metadata: dict, expected, times: tuple) -> dict:
    """Reconcile the written rows with the input's ids, check the error rate, publish: the figures."""
    seconds, startup, ray_startup, timing, marks = times
    files, written, bad = written_files(loc, work)
    try:
        reconcile(expected.result(), written)
    except OSError as e:
        raise MnistRayError(storage.describe_error(e, cfg.input)) from e
    check_error_rate(bad, written.rows, cfg.max_error_rate)
    figures = run_figures(written.rows, bad.num_rows, plan.resumed_rows, seconds, startup, ray_startup, timing)
    figures["timeline"] = timeline(marks, timing)
    publish(loc, work, cfg, plan, source, metadata, files, bad, figures)
    figures["timeline"]["published"] = round(time.time() - figures["timeline"]["process_started_at"], 2)
    return figures


# --- the steps ------------------------------------------------------------------------------

def cluster_resources(cfg: InferConfig, scaling: contextlib.ExitStack) -> tuple[dict, float]:
    """The cluster's resources to plan with, and the GPUs its autoscaler can still add. When GPU
    actors are asked for and the cluster is short of GPUs it can get, the autoscaler is asked
    for the pool's nodes and this waits for them (the request is withdrawn when ``scaling``
    closes); a cluster that can never have them is left to the plan (CPU, or --require-gpu)."""
    import ray

    gpus = planning.actor_gpus(cfg.runtime, cfg.gpus_per_actor)
    if gpus == 0:
        return ray.cluster_resources(), 0.0
    lo, hi = planning.parse_actors(cfg.actors)
    can_get = gpu.gpus_the_cluster_can_get()
    scaling.enter_context(gpu.gpus_for([{"GPU": gpus, "CPU": cfg.cpus_per_actor}] * hi, lo * gpus, can_get))
    return ray.cluster_resources(), can_get


def smoke_test(model_local: str, runtime: str, sample: pa.Table | None, model_uri: str) -> None:
    """Score a few real rows in the driver: a broken model fails in seconds, not in the pool."""
    if sample is None or sample.num_rows == 0:
        return
    rows = prepare_rows(sample)
    if runtime == "tf":
        gpu.hide_gpus_from_driver()  # before TensorFlow maps every GPU's memory in the driver
    try:
        probs = runtimes.predict_pixels(runtimes.load(model_local, runtime), shards.pixels_numpy(rows["pixels"]))
    except MnistRayError:
        raise
    except Exception as e:  # noqa: BLE001
        raise MnistRayError(f"the model in {model_uri} fails on real input: {type(e).__name__}: {e}") from e
    # A full-integer model's softmax comes out in steps of 1/256: its sums are off by up to ~0.02.
    if probs.shape != (rows.num_rows, predictions.NUM_CLASSES) or not np.allclose(probs.sum(1), 1, atol=0.05):
        raise MnistRayError(f"the model in {model_uri} returns {probs.shape}, not class probabilities")


def build_dataset(source: sources.Source, plan: planning.Plan, model_uri: str, model_version: str, progress,
                  class_names: list[str] | None = None):
    """The lazy dataset of prediction rows: read, prepare_rows tasks, the predictor actor pool."""
    import ray

    # prepare_rows asks for what the actor asks for, so Ray fuses it into the actor (no copy of
    # the decoded pixels between processes); a GPU actor's decoding stays in CPU tasks instead.
    return source.dataset(plan.read_cpus).map_batches(
        prepare_rows, batch_format="pyarrow", batch_size=plan.batch_size, num_cpus=plan.prepare_cpus).map_batches(
        PredictorActor, batch_size=plan.batch_size, batch_format="pyarrow",
        compute=ray.data.ActorPoolStrategy(min_size=plan.actors_min, max_size=plan.actors_max),
        num_cpus=plan.cpus_per_actor, num_gpus=plan.gpus_per_actor,
        fn_constructor_kwargs={"model_uri": model_uri, "runtime": plan.runtime, "progress": progress,
                               "model_version": model_version, "gpus": plan.gpus_per_actor,
                               "cpus": plan.cpus_per_actor, "threads": plan.model_threads,
                               "class_names": class_names})


def execute(scored, plan: planning.Plan, data_path: str, loc: storage.Location, cfg: InferConfig, progress,
            todo: int) -> tuple[float, dict]:
    """Run the dataset into Parquet files under ``data_path``: (seconds, the actors' timings)."""
    import ray
    from ray.data import ExecutionResources

    scored.context.execution_options.resource_limits = ExecutionResources.for_limits(
        object_store_memory=plan.read_ahead_bytes)
    lines = ProgressLines(progress, todo)
    if not sys.stderr.isatty():
        lines.start()
    started, wall, driver_cpu = time.perf_counter(), time.time(), time.process_time()
    try:
        scored.write_parquet(data_path, filesystem=loc.fs, min_rows_per_file=cfg.rows_per_file,
                             **compat.write_task_args(plan.write_cpus))
        seconds = time.perf_counter() - started
        driver_cpu = time.process_time() - driver_cpu
        timing = final_progress(progress, todo)
        timing["cpu_us_per_image"] = cpu_breakdown(scored, timing, driver_cpu)
    except OSError as e:
        raise MnistRayError(storage.describe_error(e, cfg.output)) from e
    except ray.exceptions.RayError as e:
        reason = raised_in_worker(e)  # e.g. a GPU actor whose TensorFlow sees no GPU
        if reason is None:
            raise
        raise MnistRayError(f"the predictor actors failed: {reason}") from e
    finally:
        lines.stopped.set()
    return seconds, {**timing, "started_at": wall}


def final_progress(progress, rows: int, wait_s: float = 5.0) -> dict:
    """The progress actor's state once the actors reported their last rows (they do as the pool
    shuts down, a moment after the write returns), or after ``wait_s`` what has arrived."""
    import ray

    deadline = time.monotonic() + wait_s
    while True:
        try:
            state = ray.get(progress.state.remote(), timeout=30)
        except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError) as e:
            # The figures are lost, not the predictions: the reconciliation still checks every row.
            log.warning("infer: no start-up figures (the progress actor is gone: %s)", type(e).__name__)
            return {"rows": 0, "ready": [], "load_seconds": [], "first_at": None, "nodes": {}, "model_cpu_s": 0.0}
        if state["rows"] >= rows or time.monotonic() > deadline:
            return state
        time.sleep(0.1)


def cpu_breakdown(scored, timing: dict, driver_cpu_s: float) -> dict:
    """µs of CPU per scored image: each Ray Data operator's tasks (Ray's own stats), the model
    calls inside the predictor (its share of the predictor operator), and the driver."""
    rows = timing["rows"]
    if not rows:
        return {}
    out, operators = {}, []
    try:
        todo = [scored.get_stats_summary()]
        while todo:  # a tree: each summary's parents hold the operators before it
            summary = todo.pop()
            operators = summary.operators_stats + operators
            todo += summary.parents
    except Exception as e:  # noqa: BLE001 - figures, never a reason to fail a finished run
        log.info("infer: no per-operator CPU figures (%s)", e)
    for op in operators:
        if op.cpu_time is not None and op.cpu_time.sum:
            out[op.operator_name] = round(1e6 * op.cpu_time.sum / rows, 1)
    out["model calls (in the predictor)"] = round(1e6 * timing["model_cpu_s"] / rows, 1)
    out["driver (planning, executor, id digest, progress)"] = round(1e6 * driver_cpu_s / rows, 1)
    return out


def check_error_rate(bad: pa.Table, rows: int, max_error_rate: float) -> None:
    """Refuse to publish when too many rows could not be scored."""
    if rows and bad.num_rows / rows > max_error_rate:
        examples = "; ".join(f"{i}: {e}" for i, e in zip(bad["id"].to_pylist()[:3], bad["error"].to_pylist()[:3]))
        raise MnistRayError(f"{bad.num_rows} of {rows} rows could not be scored (> --max-error-rate "
                            f"{max_error_rate:g}), nothing was published (rerun with a higher limit to "
                            f"publish without scoring again); e.g. {examples}")


def run_figures(rows: int, error_rows: int, resumed: int, seconds: float, startup: float, ray_startup: float,
                timing: dict) -> dict:
    """Rows, rates and start-up times of a run (summary and manifest)."""
    wall = timing["started_at"]
    scored = rows - resumed
    return {
        "rows": rows, "errors": error_rows, "resumed_rows": resumed, "scored_rows": scored,
        "scoring_seconds": round(seconds, 2), "images_per_s": round(scored / seconds, 1),
        "startup_seconds": round(startup, 2), "ray_startup_seconds": round(ray_startup, 2),
        "actor_startup_seconds": round(max(timing["ready"]) - wall, 2) if timing["ready"] else None,
        "model_load_seconds": round(max(timing["load_seconds"]), 2) if timing["load_seconds"] else None,
        "first_prediction_seconds": round(timing["first_at"] - wall, 2) if timing["first_at"] else None,
        # Where the predictor actors ran: node id -> actors started, rows scored (retried work included).
        "nodes": timing["nodes"],
        "cpu_us_per_image": timing.get("cpu_us_per_image", {}),
    }


def timeline(marks: dict, timing: dict) -> dict:
    """When each part of the fixed cost ended, in seconds since this process started (its
    absolute start too, so a submitter can add the time before it: ``ray job submit``'s)."""
    import psutil

    born = psutil.Process().create_time()
    points = {**marks, "executing": timing["started_at"]}
    if timing["ready"]:
        # An actor began its __init__ load_seconds before it reported ready (its model loaded).
        first = min(range(len(timing["ready"])), key=lambda i: timing["ready"][i])
        points["first_actor_init"] = timing["ready"][first] - timing["load_seconds"][first]
        points["first_actor_ready"] = timing["ready"][first]
    if timing["first_at"]:
        points["first_prediction"] = timing["first_at"]
    return {"process_started_at": round(born, 3), **{k: round(v - born, 2) for k, v in points.items()}}


def publish(loc: storage.Location, work: str, cfg: InferConfig, plan: planning.Plan, source: sources.Source,
            metadata: dict, files: list[dict], bad: pa.Table, figures: dict) -> None:
    """The manifest (files, input, model, plan, figures), then ``_SUCCESS``; the checkpoint goes."""
    manifest = {
        "kind": predictions.KIND, "schema_version": predictions.SCHEMA_VERSION, "run_id": work.removeprefix("run-"),
        "created_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "input": source.describe(),
        "model": {"uri": cfg.model, "version": metadata["version"], "runtime": plan.runtime},
        "config": dataclasses.asdict(cfg), "plan": plan.as_dict(), "mnist_ray_version": __version__,
        "rows": figures["rows"], "error_rows": bad.num_rows, "figures": figures,
        "quarantine": bad.to_pylist(),
        "files": files, "seconds": figures["scoring_seconds"], "images_per_s": figures["images_per_s"],
        "fingerprint": f"{source.fingerprint}/{metadata['version']}/{plan.runtime}",
    }
    try:
        storage.publish(loc, manifest, run_id=manifest["run_id"])
        loc.fs.delete_dir(loc.join(work, "checkpoint"))
    except OSError as e:
        raise MnistRayError(storage.describe_error(e, cfg.output)) from e


# --- resuming and reconciling -----------------------------------------------------------------

def work_dir(loc: storage.Location, input_fingerprint: str, model_version: str, runtime: str) -> str:
    """``run-KEY``: where this job's data files and checkpoint live until published.

    Only a rerun of the same job (same input, model and runtime) lands in the same directory;
    with --overwrite the published run is part of the key, so the data being replaced is
    never mistaken for finished work.
    """
    replacing = storage.read_json(loc, storage.MANIFEST).get("run_id") if storage.is_complete(loc) else None
    key = json.dumps([input_fingerprint, model_version, runtime, replacing])
    return "run-" + hashlib.sha256(key.encode()).hexdigest()[:16]


def checkpointed_rows(loc: storage.Location, work: str) -> int:
    """Rows an earlier attempt of this job committed (Ray's committed checkpoint files)."""
    import pyarrow.parquet as pq

    selector = pafs.FileSelector(loc.join(work, "checkpoint"), allow_not_found=True)
    rows = 0
    for info in loc.fs.get_file_info(selector):
        if info.path.endswith(".parquet") and not info.path.endswith(".pending.parquet"):
            with loc.fs.open_input_file(info.path) as f:
                rows += pq.ParquetFile(f).metadata.num_rows
    return rows


def written_files(loc: storage.Location, work: str) -> tuple[list[dict], shards.IdDigest, pa.Table]:
    """The data files of ``work`` (manifest entries), the digest of their ids, and the failed rows.

    One file at a time over two small columns; the failed rows' paths are read (with a
    pushed-down filter) only from files that have some.
    """
    import pyarrow.parquet as pq

    quarantine = predictions.schema_of(["id", "path", "error"])
    selector = pafs.FileSelector(loc.join(work, "data"), allow_not_found=True)
    files, ids, bad = [], shards.IdDigest(), []
    for info in sorted(loc.fs.get_file_info(selector), key=lambda i: i.path):
        if info.type != pafs.FileType.File or not info.base_name.endswith(".parquet"):
            continue
        table = pq.read_table(info.path, columns=["id", "error"], filesystem=loc.fs)
        files.append({"path": f"{work}/data/{info.base_name}", "rows": table.num_rows, "bytes": info.size})
        ids.add(table["id"])
        if table["error"].null_count < table.num_rows:
            bad.append(pq.read_table(info.path, columns=quarantine.names, filesystem=loc.fs,
                                     filters=pc.field("error").is_valid()).cast(quarantine))
    return files, ids, pa.concat_tables(bad) if bad else quarantine.empty_table()


def reconcile(expected: shards.IdDigest, written: shards.IdDigest) -> None:
    """Every input id exactly once in the output, or nothing is published."""
    if written != expected:
        why = "" if written.rows != expected.rows else " (as many rows, but not the same ids: some are missing, some twice)"
        raise MnistRayError(f"reconciliation failed: {expected.rows:,} input rows, {written.rows:,} output rows"
                            f"{why}; nothing was published")
