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

One module per part: `micro` (a, b), `jobs` (c, GPU mode), `throughput` (training, serving),
`fixedcost`, `resumecost`; `work` makes the data and models and runs the commands, `report`
writes the table. ``run`` below is the sequence of parts.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import logging
import os
import sys
import time
from dataclasses import dataclass, field
from typing import ClassVar

import pyarrow as pa

from mnist_ray.bench import fixedcost, jobs, micro, resumecost, throughput, work
from mnist_ray.bench import report as report_
from mnist_ray.formats import shards
from mnist_ray.model import runtimes
from mnist_ray.plumbing import cluster, gpu, storage
from mnist_ray.errors import MnistRayError

log = logging.getLogger(__name__)

PARTS = ("micro", "infer", "train", "feed", "serve", "submit", "resume")
# --quick: every part, on a few thousand images, so the benchmark cannot rot (CI runs it).
QUICK = {"sizes": "4000", "runtime_size": 4000, "runtimes": "tf,tflite-int8", "micro_images": 1000,
         "train_epochs": 2, "recipe_epochs": 2, "model_epochs": 2, "serve_requests": 150, "resume_size": 50_000}


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
    recipe_epochs: int = field(default=5, metadata={
        "help": "epochs of the training part's default-recipe runs (images/s over the second half)"})
    feed_source: str = field(default="fashion-mnist", metadata={
        "help": "a 60,000-image source for the feed part (memory of the in-memory and the streamed feed)"})
    serve_model: str = field(default="cnn", metadata={"help": "model of the serving part"})
    serve_requests: int = field(default=500, metadata={"help": "requests per concurrency level of the serving part"})
    serve_concurrency: str = field(default="1,8,32", metadata={"help": "concurrency levels of the serving part"})
    serve_replicas: str = field(default="1", metadata={"help": "Serve replicas of the serving part (N or MIN..MAX)"})
    submit_model: str = field(default="cnn", metadata={"help": "model of the submitted-job part"})
    resume_size: int = field(default=1_000_000, metadata={
        "help": "N of the resumed-run part: infer killed halfway, then the same command again"})
    resume_runtime: str = field(default="tflite-int8", metadata={"help": "runtime of the resumed-run part"})
    parts: str = field(default=",".join(p for p in PARTS if p != "feed"), metadata={
        "help": "which parts to run: " + ",".join(PARTS) + " (feed only when asked: it needs --feed-source)"})
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
        for runtime in self.runtimes.split(",") + self.scaling_runtimes.split(",") + [self.resume_runtime]:
            runtimes.check_name(runtime, tuple(runtimes.RUNTIME_FILES))
        if not set(self.part_list()) <= set(PARTS) or not self.part_list():
            raise MnistRayError(f"--parts {self.parts!r}: choose from {', '.join(PARTS)}")
        if min(self.size_list() + [self.runtime_size, self.micro_images, self.batch_size or 1, self.serve_requests,
                                   self.resume_size]
               + self.concurrency_list()) < 1 \
                or min(self.train_epochs, self.recipe_epochs) < 2:
            raise MnistRayError("sizes, --micro-images, --batch-size, --serve-requests and --serve-concurrency "
                                "must be positive, --train-epochs and --recipe-epochs >= 2 (the first epoch is warm-up)")


def run(cfg: BenchConfig) -> dict:
    cluster.configure_process_env()
    cfg = cfg.resolved()
    cfg.validate()
    gpus = gpu.gpus_for_bench() if cfg.gpu else 0  # refuses in seconds, before any data is made
    started = time.perf_counter()
    work_dir = os.path.join(cfg.output, "work")
    os.makedirs(work_dir, exist_ok=True)
    parts = cfg.part_list()
    seed_uri, seed = seed_shards(cfg, work_dir)
    train_data = os.path.join(work_dir, "train-data")

    report: dict = {"created_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                    "command": "mnist-ray bench " + " ".join(sys.argv[2:]) if sys.argv[1:2] == ["bench"]
                    else "mnist-ray bench", "machine": report_.machine(), "config": dataclasses.asdict(cfg),
                    "models": {}}
    for name in cfg.model_list() if ("micro" in parts or "infer" in parts) else []:
        report["models"][name] = model_part(cfg, name, parts, seed, gpus, train_data, work_dir)
    if "train" in parts:
        report["training"] = {"model": cfg.train_model, "batch_size": cfg.train_batch_size,
                              "epochs": cfg.train_epochs, "recipe_epochs": cfg.recipe_epochs,
                              "runs": throughput.train_runs(cfg, work.train_data_of(cfg, train_data), work_dir)}
    if "feed" in parts:
        report["feed"] = throughput.feed_memory(cfg, work_dir)
    if "serve" in parts:
        report["serving"] = throughput.serving(cfg, work.model_dir_of(cfg, cfg.serve_model, train_data, work_dir),
                                               seed, work_dir)
    if "submit" in parts:
        report["submit"] = fixedcost.measure(work.model_dir_of(cfg, cfg.submit_model, train_data, work_dir),
                                             seed_uri, work_dir)
    if "resume" in parts:
        n = cfg.resume_size
        data = replicated(seed, n, work_dir)
        report["resume"] = resumecost.measure(work.model_dir_of(cfg, cfg.submit_model, train_data, work_dir), data, n,
                                              cfg.resume_runtime, work_dir)
    report["gpus"] = gpus
    report["seconds"] = round(time.perf_counter() - started, 1)
    report_.check_sane(report)
    write_report(report, cfg.output)
    return summary(report, cfg.output)


def seed_shards(cfg: BenchConfig, work_dir: str) -> tuple[str, pa.Table]:
    """Real digits (and the shards format's pixels) for every part, made once and reused."""
    seed_uri = cfg.seed_data
    if seed_uri == "mnist-test" or not storage.is_complete(storage.resolve(seed_uri)):
        seed_source = "mnist-test" if cfg.seed_data == "mnist-test" else f"idx:{cfg.seed_data}"
        seed_uri = os.path.join(work_dir, "seed")
        if not work.is_complete(seed_uri, source=seed_source, schema_version=shards.SCHEMA_VERSION):
            work.run_command("prepare", "--source", seed_source, "--output", seed_uri, "--overwrite")
    seed = shards.read_table(seed_uri)
    if "pixels" not in seed.column_names or seed["pixels"].null_count:
        raise MnistRayError(f"{cfg.seed_data}: bench needs shards with pixels for every row "
                            f"(schema {shards.SCHEMA_VERSION}): rerun mnist-ray prepare")
    return seed_uri, seed


def replicated(seed: pa.Table, n: int, work_dir: str) -> str:
    """The shards of ``n`` copies of the seed's rows, made the first time a part needs them."""
    data = os.path.join(work_dir, "data", f"n{n}")
    if not work.is_complete(data, source=f"replicated:{n}", rows=n, schema_version=shards.SCHEMA_VERSION):
        work.replicate_shards(seed, data, n)
    return data


def model_part(cfg: BenchConfig, name: str, parts: list[str], seed: pa.Table, gpus: int, train_data: str,
               work_dir: str) -> dict:
    """One model's (a), (b) and forward rates, (c) at every N and runtime, and GPU mode."""
    model_dir = work.model_dir_of(cfg, name, train_data, work_dir)
    entry: dict = {"model_dir": model_dir}
    if "micro" in parts:
        entry["micro"] = micro.micro(cfg, model_dir, seed)
    if "infer" in parts:
        plan = [(n, r) for r in cfg.scaling_runtimes.split(",") if r for n in cfg.size_list()]
        plan += [(cfg.runtime_size, r) for r in cfg.runtimes.split(",") if (cfg.runtime_size, r) not in plan]
        entry["jobs"] = []
        for n, runtime in plan:
            job = jobs.infer_job(cfg, model_dir, replicated(seed, n, work_dir), n, runtime,
                                 os.path.join(work_dir, "predictions"))
            if "micro" in entry:
                job["c_over_a"] = report_.sig(job["images_per_s"] / entry["micro"]["naive_images_per_s"])
                job["c_over_b"] = report_.sig(job["images_per_s"] / entry["micro"]["ceiling_images_per_s"])
            entry["jobs"].append(job)
            log.info("bench: %s %s N=%s: %.0f images/s (whole command)", name, runtime, f"{n:,}",
                     job["images_per_s"])
    if cfg.gpu:
        entry["gpu"] = jobs.gpu_part(cfg, model_dir, seed, gpus, work_dir)
    return entry


def write_report(report: dict, output: str) -> None:
    """OUTPUT/bench.json, OUTPUT/bench.md and the table on stderr."""
    with open(os.path.join(output, "bench.json"), "w") as f:
        json.dump(report, f, indent=2)
    text = report_.format_report(report)
    with open(os.path.join(output, "bench.md"), "w") as f:
        f.write(text + "\n")
    print(text, file=sys.stderr)


def summary(report: dict, output: str) -> dict:
    """The command's summary: where the report is, and its headline figures."""
    return {"output": output, "bench_json": os.path.join(output, "bench.json"), "seconds": report["seconds"],
            **({f"serving_{k}": v for k, v in report["serving"].items() if k.startswith("batching_")}
               if "serving" in report else {}),
            **({f"submit_{which}_first_prediction_s": report["submit"][which]["first_prediction_after_submit_s"]
                for which in ("cold", "warm")} if "submit" in report else {}),
            **{f"{name}_{j['runtime']}_{j['n']}_images_per_s": j["images_per_s"]
               for name, e in report["models"].items() for j in e.get("jobs", [])}}
