"""bench: how fast batch inference is, against the naive loop and against the hardware.

For each model (mlp, cnn), in one run:

    (a) naive    the seed-000 way: one process, images decoded one by one with Pillow,
                 ``model.predict`` on batches of 32
    (b) ceiling  the model as one compiled function (``tf.function``) on already-decoded
                 tensors, large batches, one process: what the hardware can do
    (c) job      the whole ``mnist-ray infer`` command in a fresh process, from reading the
                 shards to published predictions; Ray start-up included, and reported on its own

(a) and (b), and every runtime's own forward-pass rate, are measured on a few thousand of the
same images. (c) runs for every runtime at one N and for the default and the fastest runtime
(tf, tflite-int8) at several N, on
N images made by replicating real shards (the MNIST test set) with ids made unique, with the
peak memory of the job's driver and of Ray's worker processes sampled while it runs. Training
throughput: a plain ``model.fit`` against 1 and 2 Ray Train workers, same model, data and batch.
Online serving (``--parts serve``): a bounded load test (`mnist_ray.serving.loadtest`) of `mnist-ray serve`
with and without dynamic batching against a naive one-image-per-``model.predict`` server.
The fixed cost on a running cluster (``--parts submit``, `mnist_ray.bench.fixedcost`): `ray job submit`
of infer on the seed digits to a head started for it, cold and then warm, part by part.
A resumed run (``--parts resume``, `mnist_ray.bench.resumecost`): infer killed halfway through N
images, then the same command again, with the rerun's memory peaks.

Everything goes to OUTPUT/bench.json and a table on stdout (and OUTPUT/bench.md). Data, models
and predictions are kept under OUTPUT/work so a rerun reuses the data and models.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import logging
import math
import os
import platform
import subprocess
import sys
import threading
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from typing import ClassVar

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from mnist_ray.formats import shards
from mnist_ray.images import preprocess
from mnist_ray.model import runtimes
from mnist_ray.plumbing import cluster, gpu, storage
from mnist_ray.errors import MnistRayError

log = logging.getLogger(__name__)

PARTS = ("micro", "infer", "train", "serve", "submit", "resume")
# --quick: every part, on a few thousand images, so the benchmark cannot rot (CI runs it).
QUICK = {"sizes": "4000", "runtime_size": 4000, "runtimes": "tf,tflite-int8", "micro_images": 1000,
         "train_epochs": 2, "model_epochs": 2, "serve_requests": 150, "resume_size": 50_000}


@dataclass(frozen=True)
class BenchConfig:
    output: str = field(default="out/bench", metadata={"help": "bench.json, bench.md and the work dir"})
    seed_data: str = field(default="mnist-test", metadata={
        "help": "real digits to replicate to N images: mnist-test (the shipped MNIST test set), "
                "an IDX folder or image shards"})
    train_source: str = field(default="mnist-sample", metadata={
        "help": "what the benchmarked models are trained on (a mnist-ray prepare source)"})
    models: str = field(default="mlp,cnn", metadata={"help": "registered models to benchmark"})
    model_epochs: int | None = field(default=None, metadata={
        "help": "epochs of the benchmarked models' training (default: each model's own)"})
    sizes: str = field(default="70000,300000,1000000", metadata={"help": "N for the default runtime"})
    runtime_size: int = field(default=300_000, metadata={"help": "N at which every runtime runs"})
    runtimes: str = field(default=",".join(runtimes.RUNTIME_FILES), metadata={"help": "runtimes to compare"})
    scaling_runtimes: str = field(default="tf,tflite-int8", metadata={
        "help": "runtimes measured at every N: the default one, and the fastest"})
    batch_size: int | None = field(default=None, metadata={
        "help": "images per model call in (b) and (c) (default: infer's own per runtime)"})
    micro_images: int = field(default=5000, metadata={"help": "images for (a), (b) and the forward rates"})
    train_model: str = field(default="cnn", metadata={"help": "model of the training-throughput part"})
    train_epochs: int = field(default=3, metadata={"help": "epochs per training run (the first is warm-up)"})
    train_batch_size: int = field(default=64, metadata={"help": "global batch size of the training part"})
    serve_model: str = field(default="cnn", metadata={"help": "model of the serving part"})
    serve_requests: int = field(default=500, metadata={"help": "requests per concurrency level of the serving part"})
    serve_concurrency: str = field(default="1,8,32", metadata={"help": "concurrency levels of the serving part"})
    serve_replicas: str = field(default="1", metadata={"help": "Serve replicas of the serving part (N or MIN..MAX)"})
    submit_model: str = field(default="cnn", metadata={"help": "model of the submitted-job part"})
    resume_size: int = field(default=1_000_000, metadata={
        "help": "N of the resumed-run part: infer killed halfway, then the same command again"})
    resume_runtime: str = field(default="tflite-int8", metadata={"help": "runtime of the resumed-run part"})
    parts: str = field(default=",".join(PARTS), metadata={"help": "which parts to run: " + ",".join(PARTS)})
    gpu: bool = field(default=False, metadata={
        "help": "GPU mode: also the forward-pass ceiling on the GPU and the whole infer command with 1, 2 and 4 "
                "actors per GPU (refuses on a machine without a GPU)"})
    quick: bool = field(default=False, metadata={
        "help": f"a few thousand images, two runtimes, short training: checks the bench works ({QUICK})"})

    PRESETS: ClassVar[dict] = {"default": {}, "smoke": {"quick": True}}

    def resolved(self) -> "BenchConfig":
        return dataclasses.replace(self, **QUICK, quick=False) if self.quick else self

    def model_list(self) -> list[str]:
        return [m for m in self.models.split(",") if m]

    def size_list(self) -> list[int]:
        try:
            return [int(n) for n in self.sizes.split(",") if n]
        except ValueError:
            raise MnistRayError(f"--sizes {self.sizes!r}: give comma-separated image counts") from None

    def concurrency_list(self) -> list[int]:
        try:
            return [int(c) for c in self.serve_concurrency.split(",") if c]
        except ValueError:
            raise MnistRayError(f"--serve-concurrency {self.serve_concurrency!r}: give comma-separated "
                                "numbers, e.g. 1,8,32") from None

    def part_list(self) -> list[str]:
        return [p for p in self.parts.split(",") if p]

    def validate(self) -> None:
        from mnist_ray.model import models

        for m in self.model_list() + [self.train_model, self.serve_model, self.submit_model]:
            models.get_spec(m)
        asked = self.runtimes.split(",") + self.scaling_runtimes.split(",") + [self.resume_runtime]
        unknown = set(asked) - set(runtimes.RUNTIME_FILES)
        if unknown:
            raise MnistRayError(f"unknown runtime {sorted(unknown)}: choose from "
                                f"{', '.join(runtimes.RUNTIME_FILES)}")
        if not set(self.part_list()) <= set(PARTS) or not self.part_list():
            raise MnistRayError(f"--parts {self.parts!r}: choose from {', '.join(PARTS)}")
        if min(self.size_list() + [self.runtime_size, self.micro_images, self.batch_size or 1, self.serve_requests,
                                   self.resume_size]
               + self.concurrency_list()) < 1 \
                or self.train_epochs < 2:
            raise MnistRayError("sizes, --micro-images, --batch-size, --serve-requests and --serve-concurrency "
                                "must be positive, --train-epochs >= 2 (the first epoch is warm-up)")


# --- data -------------------------------------------------------------------------------------

def replicate_shards(seed: pa.Table, uri: str, n: int, rows_per_file: int = 50_000) -> dict:
    """Image shards of exactly ``n`` rows: copies of ``seed`` with ids ``cNNNN-<id>``.

    Written with pyarrow straight from the driver (no Ray: it is a copy), with the manifest
    ``mnist-ray prepare`` writes, so the job under test cannot tell the difference.
    """
    run_id = uuid.uuid4().hex[:12]
    loc = storage.prepare_output(uri, overwrite=True, run_id=run_id)
    seed = shards.stored_form(seed)  # the current shard schema, whichever version the seed was read from
    schema = seed.schema
    files, reports = [], []
    writer, name, in_file = None, None, 0
    for copy in range(math.ceil(n / seed.num_rows)):
        part = seed.slice(0, min(seed.num_rows, n - copy * seed.num_rows))
        part = part.set_column(0, "id", pc.binary_join_element_wise(f"c{copy:04d}-", part["id"], "")) \
            .cast(schema)
        counts = Counter(zip(part["split"].to_pylist(), part["label"].to_pylist()))
        reports.append({"counts": [(s, l, k) for (s, l), k in counts.items()], "rejected": [],
                        "xor": shards.xor_digest([shards.row_digests(part)]).tobytes(),
                        "pixels_missing": part["pixels"].null_count})
        while part.num_rows:
            if writer is None:
                name = f"part-{run_id}-{len(files):05d}.parquet"
                writer, in_file = pq.ParquetWriter(loc.join(name), schema, filesystem=loc.fs), 0
            piece = part.slice(0, rows_per_file - in_file)
            writer.write_table(piece)
            in_file += piece.num_rows
            part = part.slice(piece.num_rows)
            if in_file == rows_per_file:
                writer.close()
                files.append({"path": name, "rows": in_file, "bytes": loc.fs.get_file_info(loc.join(name)).size})
                writer = None
    if writer is not None:
        writer.close()
        files.append({"path": name, "rows": in_file, "bytes": loc.fs.get_file_info(loc.join(name)).size})
    summary = shards.summarize(files, reports)
    manifest = shards.build_manifest(run_id, f"replicated:{n}", summary)
    storage.publish(loc, manifest, run_id=run_id)
    return manifest


def _complete(uri: str, **expected) -> bool:
    loc = storage.resolve(uri)
    if not storage.is_complete(loc):
        return False
    manifest = storage.read_json(loc, storage.MANIFEST)
    return all(manifest.get(k) == v for k, v in expected.items())


# --- subprocess jobs --------------------------------------------------------------------------

class _MemorySampler(threading.Thread):
    """Peak memory of a job's driver and of the Ray worker processes that appear while it runs.

    Workers are found by their command line (``ray::...`` or ``default_worker.py``) among
    processes that did not exist before the job started, so a Ray already running here (a test
    session's) is not counted. Two measures: RSS, which also counts the pages of Ray's shared
    object store a process has touched (bounded by the store's size, not by the job), and USS,
    the memory only that process holds: USS is what must stay flat as N grows.
    """

    def __init__(self, pid: int, every_s: float = 1.0):
        import psutil

        super().__init__(daemon=True, name="bench-memory")
        self.psutil, self.every_s, self.stopped = psutil, every_s, threading.Event()
        self.driver = psutil.Process(pid)
        self.before = set(psutil.pids())
        self.peaks = {"driver_rss": 0, "driver_uss": 0, "worker_rss": 0, "worker_uss": 0, "workers_total_uss": 0}
        self.worker_pids: set[int] = set()

    def _workers(self):
        for proc in self.psutil.process_iter(["pid", "cmdline"]):
            if proc.info["pid"] in self.before or not proc.info["cmdline"]:
                continue
            # A worker renames itself ("ray::PredictorActor...") once it runs a task or actor.
            cmdline = proc.info["cmdline"]
            if cmdline[0].startswith("ray::") or any("default_worker.py" in part for part in cmdline):
                yield proc

    def _peak(self, key: str, value: int) -> None:
        self.peaks[key] = max(self.peaks[key], value)

    def run(self) -> None:
        while not self.stopped.wait(self.every_s):
            try:
                mem = self.driver.memory_full_info()
                self._peak("driver_rss", mem.rss)
                self._peak("driver_uss", mem.uss)
            except self.psutil.Error:
                pass
            total = 0
            for proc in self._workers():
                try:
                    mem = proc.memory_full_info()
                except self.psutil.Error:
                    continue
                self.worker_pids.add(proc.pid)
                self._peak("worker_rss", mem.rss)
                self._peak("worker_uss", mem.uss)
                total += mem.uss
            self._peak("workers_total_uss", total)

    def figures(self) -> dict:
        return {**{f"{k}_peak_mb": round(v / (1 << 20)) for k, v in self.peaks.items()},
                "worker_processes": len(self.worker_pids)}


def _command(name: str, *args: str, sample_memory: bool = False) -> tuple[dict, float, dict]:
    """Run ``mnist-ray NAME ARGS`` in a fresh process (its own local Ray unless RAY_ADDRESS
    is set): (its JSON summary, wall seconds, memory peaks)."""
    argv = [sys.executable, "-m", "mnist_ray.cli", name, *args]
    log.info("bench: %s", " ".join(["mnist-ray", name, *args]))
    started = time.perf_counter()
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    sampler = _MemorySampler(proc.pid) if sample_memory else None
    if sampler:
        sampler.start()
    stdout, stderr = proc.communicate()
    wall = time.perf_counter() - started
    if sampler:
        sampler.stopped.set()
        sampler.join()
    if proc.returncode != 0:
        tail = "\n".join(stderr.strip().splitlines()[-15:])
        raise MnistRayError(f"`mnist-ray {name} {' '.join(args)}` failed (exit {proc.returncode}):\n{tail}")
    # The summary is the last JSON object on stdout (Ray may print before it).
    summary = json.loads(stdout[stdout.rindex("\n{") + 1:] if "\n{" in stdout else stdout)
    return summary, wall, sampler.figures() if sampler else {}


# --- (a), (b), forward rates --------------------------------------------------------------------

def _rate(fn, images: int, min_seconds: float = 2.0) -> float:
    """images/s of ``fn()`` (which processes ``images`` images), after one warm-up call."""
    fn()
    runs, started = 0, time.perf_counter()
    while True:
        fn()
        runs += 1
        elapsed = time.perf_counter() - started
        if elapsed >= min_seconds:
            return runs * images / elapsed


def naive_rate(model_path: str, encoded: list[bytes]) -> float:
    """(a) The seed-000 loop: decode each PNG with Pillow, ``model.predict`` on batches of 32."""
    from mnist_ray.model import models

    model = models.keras().models.load_model(model_path, compile=False)

    def loop():
        for i in range(0, len(encoded), 32):
            batch = np.stack([preprocess.decode_gray(b) for b in encoded[i:i + 32]]).astype("float32") / 255.0
            model.predict(batch[..., None], verbose=0)

    return _rate(loop, len(encoded), min_seconds=0)  # one timed pass: it is slow enough


def forward_rate(model_dir: str, runtime: str, pixels: np.ndarray, batch_size: int) -> float:
    """(b) for ``tf``: the compiled forward pass (traced once) on decoded float32 tensors."""
    model = runtimes.load(model_dir, runtime)
    x = preprocess.normalize(pixels)
    return _rate(lambda: runtimes.predict_batched(model, x, batch_size), len(x))


def _batch(cfg: BenchConfig, runtime: str) -> int:
    """The batch size of ``runtime``: the flag, else what ``mnist-ray infer`` uses by default."""
    from mnist_ray.inference.infer import InferConfig

    return cfg.batch_size or InferConfig(runtime=runtime).batch()


def micro(cfg: BenchConfig, model_dir: str, seed: pa.Table) -> dict:
    take = seed.slice(0, cfg.micro_images)
    pixels = shards.pixels_numpy(take["pixels"])
    labels = take["label"].to_numpy()
    forward = {}
    for runtime in cfg.runtimes.split(","):
        forward[runtime] = round(forward_rate(model_dir, runtime, pixels, _batch(cfg, runtime)))
    naive = naive_rate(os.path.join(model_dir, runtimes.RUNTIME_FILES["tf"]), take["image"].to_pylist())
    accuracy = {r: round(float((runtimes.predict_batched(runtimes.load(model_dir, r), preprocess.normalize(pixels))
                                .argmax(1) == labels).mean()), 4) for r in cfg.runtimes.split(",")}
    return {"images": take.num_rows, "naive_images_per_s": round(naive), "ceiling_images_per_s": forward["tf"]
            if "tf" in forward else round(forward_rate(model_dir, "tf", pixels, _batch(cfg, "tf"))),
            "forward_images_per_s": forward, "accuracy": accuracy,
            "batch_sizes": {r: _batch(cfg, r) for r in {*cfg.runtimes.split(","), "tf"}}}


# --- (c) --------------------------------------------------------------------------------------

def infer_job(cfg: BenchConfig, model_dir: str, data: str, n: int, runtime: str, out: str,
              extra: tuple[str, ...] = ()) -> dict:
    batch = ["--batch-size", str(cfg.batch_size)] if cfg.batch_size else []
    summary, wall, memory = _command("infer", "--model", model_dir, "--input", data, "--output", out,
                                     "--runtime", runtime, *batch, *extra, "--overwrite", sample_memory=True)
    table = _predictions(out)
    if summary["rows"] != n or table.num_rows != n or summary["errors"]:
        raise MnistRayError(f"bench: infer on {n} rows published {summary['rows']} rows, "
                            f"{summary['errors']} errors")
    accuracy = float(pc.mean(pc.equal(table["prediction"], table["label"]).cast(pa.int8())).as_py())
    storage.resolve(out).fs.delete_dir(storage.resolve(out).path)  # 1M predictions: don't keep them
    return {"n": n, "runtime": runtime, "wall_seconds": round(wall, 2),
            "images_per_s": round(n / wall, 1),  # c: the whole command
            "scoring_images_per_s": summary["images_per_s"],
            "ray_startup_seconds": summary["ray_startup_seconds"], "startup_seconds": summary["startup_seconds"],
            "actor_startup_seconds": summary["actor_startup_seconds"],
            "first_prediction_seconds": summary["first_prediction_seconds"],
            "cpu_us_per_image": summary.get("cpu_us_per_image", {}),
            "accuracy": round(accuracy, 4), **memory}


def gpu_part(cfg: BenchConfig, model_dir: str, seed: pa.Table, gpus: int, work: str) -> dict:
    """GPU mode: (b) on the GPU (uint8 in), then (c) at the largest N with 1, 2 and 4 actors per GPU."""
    pixels = shards.pixels_numpy(seed.slice(0, cfg.micro_images)["pixels"])
    model = runtimes.load(model_dir, "tf")
    ceiling = round(_rate(lambda: runtimes.predict_pixels_batched(model, pixels, _batch(cfg, "tf")), len(pixels)))
    n = max(cfg.size_list())
    data = os.path.join(work, "data", f"n{n}")
    if not _complete(data, source=f"replicated:{n}", rows=n, schema_version=shards.SCHEMA_VERSION):
        replicate_shards(seed, data, n)
    jobs = []
    for per_gpu in gpu.BENCH_ACTORS_PER_GPU:
        extra = ("--actors", str(per_gpu * gpus), "--gpus-per-actor", f"{1 / per_gpu:g}", "--require-gpu")
        job = infer_job(cfg, model_dir, data, n, "tf", os.path.join(work, "predictions"), extra)
        jobs.append({"actors_per_gpu": per_gpu, **job, "c_over_b": _sig(job["images_per_s"] / ceiling)})
    return {"gpus": gpus, "ceiling_images_per_s": ceiling, "jobs": jobs}


def _predictions(uri: str) -> pa.Table:
    from mnist_ray.formats import predictions

    return predictions.read_predictions(uri, columns=["prediction", "label"])


# --- training throughput ----------------------------------------------------------------------

def _epoch_rates(history: list[dict]) -> float:
    """images/s over the epochs after the first (the first pays for tracing and warm-up)."""
    later = history[1:]
    return round(sum(h["images_per_s"] for h in later) / len(later), 1)


def plain_fit_rate(cfg: BenchConfig, train_data: str) -> dict:
    """The same model, data and batch size as the Ray Train runs, in one process: ``model.fit``."""
    import tensorflow as tf

    from mnist_ray.model import models

    table = shards.read_table(train_data, columns=["pixels", "label", "split"])
    table = table.filter(pc.equal(table["split"], "train"))
    x, y = preprocess.normalize(shards.pixels_numpy(table["pixels"])), table["label"].to_numpy().astype("int64")
    model = models.create_model(cfg.train_model, seed=0)
    model.compile(optimizer=models.keras().optimizers.Adam(1e-3),
                  loss="sparse_categorical_crossentropy", metrics=["accuracy"])
    ds = tf.data.Dataset.from_tensor_slices((x, y)).shuffle(len(x), seed=0).batch(cfg.train_batch_size).prefetch(2)
    history = []
    for epoch in range(cfg.train_epochs):
        started = time.perf_counter()
        model.fit(ds, epochs=1, verbose=0)
        history.append({"epoch": epoch + 1, "images_per_s": len(x) / (time.perf_counter() - started)})
    return {"how": "model.fit, one process", "workers": 0, "images_per_s": _epoch_rates(history), "rows": len(x)}


def train_runs(cfg: BenchConfig, train_data: str, work: str) -> list[dict]:
    results = [plain_fit_rate(cfg, train_data)]
    for workers in (1, 2):
        out = os.path.join(work, f"train-{workers}w")
        summary, wall, _ = _command("train", "--data", train_data, "--model", cfg.train_model, "--output", out,
                                    "--epochs", str(cfg.train_epochs), "--batch-size", str(cfg.train_batch_size),
                                    "--workers", str(workers), "--no-tflite", "--overwrite", "--no-augment")
        with open(os.path.join(out, "metadata.json")) as f:
            history = json.load(f)["metrics"]["history"]
        results.append({"how": f"Ray Train, {workers} worker{'s' * (workers > 1)}", "workers": workers,
                        "images_per_s": _epoch_rates(history), "wall_seconds": round(wall, 1)})
    return results


# --- online serving -------------------------------------------------------------------------------

def serving(cfg: BenchConfig, model_dir: str, seed: pa.Table, work: str) -> dict:
    """The load test of `mnist-ray serve` (with and without batching) against the naive server."""
    from mnist_ray.serving import loadtest

    image_dir = os.path.join(work, "serve-images")
    os.makedirs(image_dir, exist_ok=True)
    for i, data in enumerate(seed["image"].slice(0, 200).to_pylist()):  # real test digits, PNG
        with open(os.path.join(image_dir, f"{i:03d}.png"), "wb") as f:
            f.write(data)
    return {"model": cfg.serve_model, **loadtest.compare(model_dir, image_dir, cfg.serve_requests,
                                                          cfg.concurrency_list(), replicas=cfg.serve_replicas)}


def _model_dir(cfg: BenchConfig, name: str, train_data: str, work: str) -> str:
    """The benchmarked model ``name``, trained once and reused by later runs."""
    model_dir = os.path.join(work, "models", name)
    if not storage.is_complete(storage.resolve(model_dir)):
        epochs = ["--epochs", str(cfg.model_epochs)] if cfg.model_epochs else []
        _command("train", "--data", _train_data(cfg, train_data), "--model", name, "--output", model_dir,
                 "--workers", "1", "--overwrite", *epochs)
    return model_dir


def _train_data(cfg: BenchConfig, train_data: str) -> str:
    """The training shards, prepared the first time a part needs them (a run whose models exist
    and that skips the training part needs none)."""
    if not _complete(train_data, source=cfg.train_source, schema_version=shards.SCHEMA_VERSION):
        _command("prepare", "--source", cfg.train_source, "--output", train_data, "--overwrite")
    return train_data


# --- report -----------------------------------------------------------------------------------

def _machine() -> dict:
    import psutil

    return {"cpus": os.cpu_count(), "memory_gb": round(psutil.virtual_memory().total / (1 << 30), 1),
            "platform": platform.platform(), "processor": platform.processor() or platform.machine(),
            "python": platform.python_version()}


def format_report(report: dict) -> str:
    m = report["machine"]
    lines = [f"# mnist-ray bench ({report['created_at']})", "",
             f"Machine: {m['cpus']} CPUs, {m['memory_gb']} GiB, {m['platform']}, no GPU" if not report.get("gpus")
             else f"Machine: {m['cpus']} CPUs, {m['memory_gb']} GiB, {m['platform']}", "",
             f"Command: `{report['command']}`", ""]
    for name, r in report["models"].items():
        mi = r.get("micro")
        lines.append(f"## {name}")
        lines.append("")
        if r.get("gpu"):
            g = r["gpu"]
            lines += [f"GPU ({g['gpus']} GPUs): compiled forward pass on the GPU (uint8 in) "
                      f"**{g['ceiling_images_per_s']:,} images/s**", "",
                      "| actors per GPU | N | images/s (whole command) | c/b |", "|---:|---:|---:|---:|"]
            lines += [f"| {j['actors_per_gpu']} | {j['n']:,} | {j['images_per_s']:,.0f} | {j['c_over_b']} |"
                      for j in g["jobs"]]
            lines.append("")
        if mi:
            lines.append(f"(a) naive loop (Pillow one by one, predict batch 32): "
                         f"**{mi['naive_images_per_s']:,} images/s**; (b) compiled forward pass (batch "
                         f"{mi['batch_sizes']['tf']}, decoded tensors): **{mi['ceiling_images_per_s']:,} images/s**")
            lines.append("")
            lines.append(f"| runtime | batch | forward pass images/s | top-1 on the first {mi['images']:,} test images |")
            lines.append("|---|---:|---:|---:|")
            for rt, rate in mi["forward_images_per_s"].items():
                lines.append(f"| {rt} | {mi['batch_sizes'][rt]} | {rate:,} | {100 * mi['accuracy'][rt]:.2f} % |")
            lines.append("")
        if r.get("jobs"):
            lines.append("(c) the whole `mnist-ray infer` command, Ray start-up included:")
            lines.append("")
            lines.append("| runtime | N | wall s | Ray start s | c images/s | scoring images/s | c/a | c/b | "
                         "accuracy | driver MB RSS/USS | largest worker MB RSS/USS | workers USS MB |")
            lines.append("|---|" + "---:|" * 11)
            for j in r["jobs"]:
                lines.append(f"| {j['runtime']} | {j['n']:,} | {j['wall_seconds']:.1f} | {j['ray_startup_seconds']:.1f} | "
                             f"{j['images_per_s']:,.0f} | {j['scoring_images_per_s']:,.0f} | "
                             f"{j.get('c_over_a', float('nan')):.1f} | {j.get('c_over_b', float('nan')):.2f} | "
                             f"{100 * j['accuracy']:.2f} % | {j['driver_rss_peak_mb']:,}/{j['driver_uss_peak_mb']:,} | "
                             f"{j['worker_rss_peak_mb']:,}/{j['worker_uss_peak_mb']:,} | {j['workers_total_uss_peak_mb']:,} |")
            lines.append("")
            lines.append("CPU per scored image, µs (Ray Data's per-operator task CPU; the model calls are part of "
                         "the predictor operator's):")
            lines.append("")
            lines.append("| runtime | N | " + " | ".join(_OPS) + " |")
            lines.append("|---|---:|" + "---:|" * len(_OPS))
            for j in r["jobs"]:
                lines.append(f"| {j['runtime']} | {j['n']:,} | " + " | ".join(
                    _op_cpu(j.get("cpu_us_per_image", {}), key) for key in _OPS) + " |")
            lines.append("")
    if report.get("serving"):
        from mnist_ray.serving import loadtest

        lines += loadtest.format_table(report["serving"])
    if report.get("submit"):
        from mnist_ray.bench import fixedcost

        lines += fixedcost.format_table(report["submit"])
    if report.get("resume"):
        from mnist_ray.bench import resumecost

        lines += resumecost.format_table(report["resume"])
    if report.get("training"):
        t = report["training"]
        lines += [f"## training throughput ({t['model']}, batch {t['batch_size']}, epochs after the first)", "",
                  "| how | images/s |", "|---|---:|"]
        lines += [f"| {r['how']} | {r['images_per_s']:,.0f} |" for r in t["runs"]]
        lines.append("")
    return "\n".join(lines)


# Columns of the CPU table: a prefix of Ray Data's operator names, or infer's own figures.
_OPS = ("Read", "MapBatches(prepare_rows)", "model calls", "Write", "driver")


def _op_cpu(figures: dict, prefix: str) -> str:
    values = [v for k, v in figures.items() if k.startswith(prefix)]
    return f"{sum(values):.1f}" if values else "-"


def run(cfg: BenchConfig) -> dict:
    cluster.configure_process_env()
    cfg = cfg.resolved()
    cfg.validate()
    gpus = gpu.gpus_for_bench() if cfg.gpu else 0  # refuses in seconds, before any data is made
    started = time.perf_counter()
    work = os.path.join(cfg.output, "work")
    os.makedirs(work, exist_ok=True)
    parts = cfg.part_list()

    # Real digits (and the shards format's pixels) for every part, made once and reused.
    seed_uri = cfg.seed_data
    if seed_uri == "mnist-test" or not storage.is_complete(storage.resolve(seed_uri)):
        seed_source = "mnist-test" if cfg.seed_data == "mnist-test" else f"idx:{cfg.seed_data}"
        seed_uri = os.path.join(work, "seed")
        if not _complete(seed_uri, source=seed_source, schema_version=shards.SCHEMA_VERSION):
            _command("prepare", "--source", seed_source, "--output", seed_uri, "--overwrite")
    seed = shards.read_table(seed_uri)
    if "pixels" not in seed.column_names or seed["pixels"].null_count:
        raise MnistRayError(f"{cfg.seed_data}: bench needs shards with pixels for every row "
                            f"(schema {shards.SCHEMA_VERSION}): rerun mnist-ray prepare")
    train_data = os.path.join(work, "train-data")

    report: dict = {"created_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                    "command": "mnist-ray bench " + " ".join(sys.argv[2:]) if sys.argv[1:2] == ["bench"]
                    else "mnist-ray bench", "machine": _machine(), "config": dataclasses.asdict(cfg),
                    "models": {}}
    for name in cfg.model_list() if ("micro" in parts or "infer" in parts) else []:
        model_dir = _model_dir(cfg, name, train_data, work)
        entry: dict = {"model_dir": model_dir}
        if "micro" in parts:
            entry["micro"] = micro(cfg, model_dir, seed)
        if "infer" in parts:
            plan = [(n, r) for r in cfg.scaling_runtimes.split(",") if r for n in cfg.size_list()]
            plan += [(cfg.runtime_size, r) for r in cfg.runtimes.split(",") if (cfg.runtime_size, r) not in plan]
            entry["jobs"] = []
            for n, runtime in plan:
                data = os.path.join(work, "data", f"n{n}")
                if not _complete(data, source=f"replicated:{n}", rows=n, schema_version=shards.SCHEMA_VERSION):
                    replicate_shards(seed, data, n)
                job = infer_job(cfg, model_dir, data, n, runtime, os.path.join(work, "predictions"))
                if "micro" in entry:
                    job["c_over_a"] = _sig(job["images_per_s"] / entry["micro"]["naive_images_per_s"])
                    job["c_over_b"] = _sig(job["images_per_s"] / entry["micro"]["ceiling_images_per_s"])
                entry["jobs"].append(job)
                log.info("bench: %s %s N=%s: %.0f images/s (whole command)", name, runtime, f"{n:,}",
                         job["images_per_s"])
        if cfg.gpu:
            entry["gpu"] = gpu_part(cfg, model_dir, seed, gpus, work)
        report["models"][name] = entry
    if "train" in parts:
        report["training"] = {"model": cfg.train_model, "batch_size": cfg.train_batch_size,
                              "epochs": cfg.train_epochs, "runs": train_runs(cfg, _train_data(cfg, train_data), work)}
    if "serve" in parts:
        report["serving"] = serving(cfg, _model_dir(cfg, cfg.serve_model, train_data, work), seed, work)
    if "submit" in parts:
        from mnist_ray.bench import fixedcost

        report["submit"] = fixedcost.measure(_model_dir(cfg, cfg.submit_model, train_data, work), seed_uri, work)
    if "resume" in parts:
        from mnist_ray.bench import resumecost

        n = cfg.resume_size
        data = os.path.join(work, "data", f"n{n}")
        if not _complete(data, source=f"replicated:{n}", rows=n, schema_version=shards.SCHEMA_VERSION):
            replicate_shards(seed, data, n)
        report["resume"] = resumecost.measure(_model_dir(cfg, cfg.submit_model, train_data, work), data, n,
                                              cfg.resume_runtime, work)
    report["gpus"] = gpus
    report["seconds"] = round(time.perf_counter() - started, 1)
    _check_sane(report)
    with open(os.path.join(cfg.output, "bench.json"), "w") as f:
        json.dump(report, f, indent=2)
    text = format_report(report)
    with open(os.path.join(cfg.output, "bench.md"), "w") as f:
        f.write(text + "\n")
    print(text, file=sys.stderr)
    return {"output": cfg.output, "bench_json": os.path.join(cfg.output, "bench.json"), "seconds": report["seconds"],
            **({f"serving_{k}": v for k, v in report["serving"].items() if k.startswith("batching_")}
               if "serving" in report else {}),
            **({f"submit_{which}_first_prediction_s": report["submit"][which]["first_prediction_after_submit_s"]
                for which in ("cold", "warm")} if "submit" in report else {}),
            **{f"{name}_{j['runtime']}_{j['n']}_images_per_s": j["images_per_s"]
               for name, e in report["models"].items() for j in e.get("jobs", [])}}


def _sig(x: float) -> float:
    """Four significant digits: ratios span 0.0003 (a tiny quick run) to 100."""
    return float(f"{x:.4g}")


def _check_sane(report: dict) -> None:
    """Every figure positive and every job complete, or the bench fails (it is CI's smoke test)."""
    bad = []
    for name, entry in report["models"].items():
        mi = entry.get("micro") or {}
        rates = {k: v for k, v in mi.items() if k.endswith("images_per_s") and not isinstance(v, dict)}
        rates.update({f"forward {k}": v for k, v in mi.get("forward_images_per_s", {}).items()})
        bad += [f"{name} {k}={v}" for k, v in rates.items() if not v > 0]
        for job in entry.get("jobs", []):
            for key in ("images_per_s", "scoring_images_per_s", "driver_uss_peak_mb", "worker_uss_peak_mb"):
                if not job[key] > 0:
                    bad.append(f"{name} {job['runtime']} N={job['n']} {key}={job[key]}")
    for r in (report.get("serving") or {}).get("rows", []):
        if not (r["requests_per_s"] > 0 and r["p50_ms"] > 0) or r["failed"]:
            bad.append(f"serving {r['server']} c={r['concurrency']}: {r['requests_per_s']} requests/s, "
                       f"{r['failed']} failed {r['errors']}")
    for which, row in (report.get("submit") or {}).items():
        if isinstance(row, dict) and not (row["first_prediction_after_submit_s"] > 0
                                          and all(v >= 0 for v in row["parts"].values())):
            bad.append(f"submit {which}: {row}")
    resumed = report.get("resume")
    if resumed and not (0 < resumed["resumed_rows"] <= resumed["n"]
                        and resumed["resumed_rows"] + resumed["scored_rows"] == resumed["n"]):
        bad.append(f"resume: {resumed['resumed_rows']} resumed + {resumed['scored_rows']} scored rows of {resumed['n']}")
    for r in (report.get("training") or {}).get("runs", []):
        if not r["images_per_s"] > 0:
            bad.append(f"training {r['how']} images_per_s={r['images_per_s']}")
    if bad:
        raise MnistRayError("bench figures are not sane: " + "; ".join(bad))
