"""bench's work dir: replicated image shards, the models, and the `mnist-ray` commands that make
and measure them (each in a fresh process, its memory sampled while it runs)."""

from __future__ import annotations

import json
import logging
import math
import os
import subprocess
import sys
import threading
import time
import uuid
from collections import Counter

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from mnist_ray.formats import shards
from mnist_ray.plumbing import storage
from mnist_ray.errors import MnistRayError

log = logging.getLogger(__name__)


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


def is_complete(uri: str, **expected) -> bool:
    loc = storage.resolve(uri)
    if not storage.is_complete(loc):
        return False
    manifest = storage.read_json(loc, storage.MANIFEST)
    return all(manifest.get(k) == v for k, v in expected.items())


# --- subprocess jobs --------------------------------------------------------------------------

class MemorySampler(threading.Thread):
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
        self.uss_by_kind: dict[str, int] = {}  # "RayTrainWorker", "MapBatches(...)", ...: the peak USS of each

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
                kind = proc.info["cmdline"][0].removeprefix("ray::").split(".")[0].split(" ")[0]
                self.uss_by_kind[kind] = max(self.uss_by_kind.get(kind, 0), mem.uss)
                self._peak("worker_rss", mem.rss)
                self._peak("worker_uss", mem.uss)
                total += mem.uss
            self._peak("workers_total_uss", total)

    def figures(self) -> dict:
        return {**{f"{k}_peak_mb": round(v / (1 << 20)) for k, v in self.peaks.items()},
                "worker_processes": len(self.worker_pids),
                "uss_peak_mb_by_kind": {k: round(v / (1 << 20)) for k, v in sorted(self.uss_by_kind.items())}}


def run_command(name: str, *args: str, sample_memory: bool = False) -> tuple[dict, float, dict]:
    """Run ``mnist-ray NAME ARGS`` in a fresh process (its own local Ray unless RAY_ADDRESS
    is set): (its JSON summary, wall seconds, memory peaks)."""
    argv = [sys.executable, "-m", "mnist_ray.cli", name, *args]
    log.info("bench: %s", " ".join(["mnist-ray", name, *args]))
    started = time.perf_counter()
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    sampler = MemorySampler(proc.pid) if sample_memory else None
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

def model_dir_of(cfg, name: str, train_data: str, work: str) -> str:
    """The benchmarked model ``name``, trained once and reused by later runs."""
    model_dir = os.path.join(work, "models", name)
    if not storage.is_complete(storage.resolve(model_dir)):
        epochs = ["--epochs", str(cfg.model_epochs)] if cfg.model_epochs else []
        run_command("train", "--data", train_data_of(cfg, train_data), "--model", name, "--output", model_dir,
                 "--workers", "1", "--overwrite", *epochs)
    return model_dir


def train_data_of(cfg, train_data: str) -> str:
    """The training shards, prepared the first time a part needs them (a run whose models exist
    and that skips the training part needs none)."""
    if not is_complete(train_data, source=cfg.train_source, schema_version=shards.SCHEMA_VERSION):
        run_command("prepare", "--source", cfg.train_source, "--output", train_data, "--overwrite")
    return train_data
