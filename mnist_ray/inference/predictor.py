"""The worker side of inference: row preparation, the predictor, its Ray actor, and progress.

    rows (sources) --prepare_rows (tasks, or fused into the actor)--> id, pixels, label, path, error
         --PredictorActor (one model load per actor, whole batches)--> predictions rows

Everything here runs inside Ray workers and takes what it needs as arguments; ``Predictor`` and
``prepare_rows`` are plain Python, tested without Ray.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from typing import Callable

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from mnist_ray.formats import predictions, shards
from mnist_ray.images import preprocess
from mnist_ray.model import export, runtimes
from mnist_ray.plumbing import gpu

log = logging.getLogger(__name__)


def prepare_rows(batch: pa.Table) -> pa.Table:
    """Input rows -> the model's 28x28 uint8 pixels and per-row errors (no model here).

    Shards of schema 2 carry ``pixels`` already: they pass through without a copy, and only
    rows stored without pixels (or raw files, v1 shards) are decoded. Pixels stay uint8
    (fixed_size_binary(784)) until the predictor: 4x less to move between operators than
    float32. Typed Arrow columns throughout: an all-null column must stay a string column.
    """
    n = batch.num_rows
    # Rows that failed in the read (a corrupt archive member, pixels of the wrong size) keep
    # their error and are not decoded.
    failed = batch["error"] if "error" in batch.column_names else pa.nulls(n, pa.string())
    if "pixels" in batch.column_names and batch["pixels"].null_count == 0 and failed.null_count == n:
        pixels, errors = batch["pixels"], pa.nulls(n, pa.string())
    else:
        todo = np.ones(n, bool) if failed.null_count == n else failed.is_null().to_numpy(zero_copy_only=False)
        pixels = np.zeros((n, preprocess.MODEL_SIZE, preprocess.MODEL_SIZE), np.uint8)
        if "pixels" in batch.column_names:
            stored = batch["pixels"].is_valid().to_numpy(zero_copy_only=False)
            pixels[stored] = shards.pixels_numpy(batch["pixels"])[stored]
            todo &= ~stored
        todo = np.flatnonzero(todo)
        decoded, decode_errors = preprocess.prepare_pixels(batch["image"].take(todo).to_pylist())
        pixels[todo] = decoded
        error_list: list[str | None] = failed.to_pylist()
        for i, e in zip(todo, decode_errors):
            error_list[i] = e
        pixels, errors = shards.pixels_column(pixels), pa.array(error_list, pa.string())
    return pa.table({"id": batch["id"], "pixels": pixels,
                     "label": batch["label"].cast(pa.int8()), "path": batch["path"].cast(pa.string()),
                     "error": errors})


class Predictor:
    """Scores whole batches with a model loaded once; rows that failed earlier keep their error.

    The model loader is injected, so the batch logic is tested without Ray or a model dir.
    """

    def __init__(self, load_model: Callable[[], Callable[[np.ndarray], np.ndarray]], model_version: str,
                 class_names: list[str] | None = None):
        self.model = load_model()
        self.model_cpu_s = 0.0  # CPU of the model calls alone (all threads): the breakdown of a run's cost
        self.model_version = pa.scalar(model_version, pa.string())
        names = list(class_names or [str(i) for i in range(predictions.NUM_CLASSES)])
        self.class_names = pa.array(names + [None] * (predictions.NUM_CLASSES - len(names)), pa.string())

    def __call__(self, batch: pa.Table) -> pa.Table:
        n = batch.num_rows
        errors = batch["error"]
        ok = np.ones(n, bool) if errors.null_count == n else errors.is_null().to_numpy(zero_copy_only=False)
        probs = np.zeros((n, predictions.NUM_CLASSES), np.float32)
        if ok.any():
            pixels = shards.pixels_numpy(batch["pixels"])
            try:
                cpu = time.process_time()
                probs[ok] = runtimes.predict_pixels(self.model, pixels if ok.all() else pixels[ok])
                self.model_cpu_s += time.process_time() - cpu
            except Exception as e:  # noqa: BLE001 - a batch the model rejects becomes error rows
                message = f"scoring failed: {type(e).__name__}: {e}"
                errors = pc.coalesce(errors, pa.scalar(message, pa.string()))
                ok[:] = False
        return pa.table({
            "id": batch["id"],
            "prediction": pa.array(probs.argmax(1).astype(np.int8), pa.int8(), mask=~ok),
            "class_name": pa.array(self.class_names.take(pa.array(probs.argmax(1))).to_numpy(zero_copy_only=False),
                                   pa.string(), mask=~ok),
            "confidence": pa.array(probs.max(1), pa.float32(), mask=~ok),
            "probabilities": pa.FixedSizeListArray.from_arrays(pa.array(probs.reshape(-1)), predictions.NUM_CLASSES),
            "label": batch["label"],
            "path": batch["path"],
            "model_version": pa.repeat(self.model_version, n),
            "error": errors,
        })


class PredictorActor(Predictor):
    """The Ray actor: opens the model dir (downloading it when remote) and loads it once."""

    # Rows scored are reported at most once a second (and at once for the first batch, the
    # figure "first prediction"): one call per batch cost the progress actor ~3 % of a core.
    REPORT_EVERY_S = 1.0

    def __init__(self, model_uri: str, runtime: str, model_version: str, gpus: float = 0.0, cpus: float = 1.0,
                 progress=None, class_names: list[str] | None = None, threads: int | None = None):
        import ray

        started = time.perf_counter()
        self.progress, self.unreported, self.reported_at, self.reported_cpu = progress, 0, 0.0, 0.0
        self.node = ray.get_runtime_context().get_node_id()  # rows are counted by node
        if gpus > 0:
            # A GPU actor whose TensorFlow cannot use the GPU fails here, in words; a fractional
            # one is capped at its share of the GPU's memory before the model loads.
            gpu.configure_tf_for_actor(gpus)

        def load():
            local, _ = export.open_model_dir(model_uri)
            # The plan's share of the cluster, never more threads than this node has cores.
            count = min(threads, os.cpu_count() or 1) if threads else runtimes.tflite_threads(cpus)
            return runtimes.load(local, runtime, num_threads=count)

        super().__init__(load, model_version, class_names)
        if progress is not None:
            progress.actor_ready.remote(time.time(), time.perf_counter() - started, self.node)

    def __call__(self, batch: pa.Table) -> pa.Table:
        out = super().__call__(batch)
        if self.progress is not None:
            self.unreported += out.num_rows
            now = time.time()
            if now - self.reported_at >= self.REPORT_EVERY_S:
                self.progress.scored.remote(self.unreported, now, self.node, self._cpu())  # fire and forget
                self.unreported, self.reported_at = 0, now
        return out

    def _cpu(self) -> float:
        """Model-call CPU seconds since the last report."""
        cpu, self.reported_cpu = self.model_cpu_s - self.reported_cpu, self.model_cpu_s
        return cpu

    def __del__(self):
        """The rows not reported yet (Ray Data calls this when the pool ends): waited for, since
        the process exits next."""
        if getattr(self, "progress", None) is not None and self.unreported:
            import ray

            try:
                ray.get(self.progress.scored.remote(self.unreported, time.time(), self.node, self._cpu()), timeout=10)
            except Exception:  # noqa: BLE001 - the driver may be gone already
                pass


# --- progress ---------------------------------------------------------------------------------

class Progress:
    """A zero-CPU actor the predictors report to: when each became ready, rows scored so far.

    The driver turns it into periodic progress lines and the start-up figures of the summary.
    """

    def __init__(self):
        self.rows, self.ready, self.load_seconds, self.first_at, self.model_cpu_s = 0, [], [], None, 0.0
        self.nodes: dict[str, dict] = {}  # node id -> actors started there, rows scored there

    def _node(self, node: str | None) -> dict:
        return self.nodes.setdefault(node or "unknown", {"actors": 0, "rows": 0})

    def actor_ready(self, at: float, load_seconds: float, node: str | None = None) -> None:
        self.ready.append(at)
        self.load_seconds.append(load_seconds)
        self._node(node)["actors"] += 1

    def scored(self, rows: int, at: float, node: str | None = None, model_cpu_s: float = 0.0) -> None:
        self.rows += rows
        self.model_cpu_s += model_cpu_s
        self.first_at = self.first_at or at
        self._node(node)["rows"] += rows

    def state(self) -> dict:
        return {"rows": self.rows, "ready": self.ready, "load_seconds": self.load_seconds,
                "first_at": self.first_at, "nodes": self.nodes, "model_cpu_s": self.model_cpu_s}


class ProgressLines(threading.Thread):
    """Driver side: plain ``rows done, rate, ETA`` lines for logs (``ray job submit``, CI) every
    ``every_s`` seconds from the ``Progress`` actor; a terminal gets Ray's own progress bars."""

    def __init__(self, progress, todo: int, every_s: float = 30.0):
        super().__init__(daemon=True, name="infer-progress")
        self.progress, self.todo, self.every_s, self.stopped = progress, todo, every_s, threading.Event()

    def run(self) -> None:
        import ray

        started = time.time()
        while not self.stopped.wait(self.every_s):
            try:
                done = ray.get(self.progress.state.remote(), timeout=5)["rows"]
            except Exception:  # noqa: BLE001 - progress must never break the job
                continue
            if not done:  # actors still starting: a line of zeros says nothing
                continue
            rate = done / (time.time() - started)
            eta = f"{(self.todo - done) / rate:.0f} s" if rate > 0 else "?"
            log.info("infer: %s of %s rows (%.0f%%), %.0f images/s, ETA %s",
                     f"{done:,}", f"{self.todo:,}", 100 * done / max(self.todo, 1), rate, eta)
