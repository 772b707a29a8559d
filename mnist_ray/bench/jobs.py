"""bench's (c): the whole `mnist-ray infer` command on N replicated images, on CPU and in GPU mode."""

from __future__ import annotations

import os

import pyarrow as pa
import pyarrow.compute as pc

from mnist_ray.bench import micro
from mnist_ray.bench.report import sig
from mnist_ray.bench.work import is_complete, replicate_shards, run_command
from mnist_ray.formats import shards
from mnist_ray.model import runtimes
from mnist_ray.plumbing import gpu, storage
from mnist_ray.errors import MnistRayError


def infer_job(cfg, model_dir: str, data: str, n: int, runtime: str, out: str,
              extra: tuple[str, ...] = ()) -> dict:
    batch = ["--batch-size", str(cfg.batch_size)] if cfg.batch_size else []
    summary, wall, memory = run_command("infer", "--model", model_dir, "--input", data, "--output", out,
                                     "--runtime", runtime, *batch, *extra, "--overwrite", sample_memory=True)
    table = read_predictions(out)
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


def gpu_part(cfg, model_dir: str, seed: pa.Table, gpus: int, work: str) -> dict:
    """GPU mode: (b) on the GPU (uint8 in), then (c) at the largest N with 1, 2 and 4 actors per GPU."""
    pixels = shards.pixels_numpy(seed.slice(0, cfg.micro_images)["pixels"])
    model = runtimes.load(model_dir, "tf")
    ceiling = round(micro.rate(lambda: runtimes.predict_pixels_batched(model, pixels, micro.runtime_batch(cfg, "tf")), len(pixels)))
    n = max(cfg.size_list())
    data = os.path.join(work, "data", f"n{n}")
    if not is_complete(data, source=f"replicated:{n}", rows=n, schema_version=shards.SCHEMA_VERSION):
        replicate_shards(seed, data, n)
    jobs = []
    for per_gpu in gpu.BENCH_ACTORS_PER_GPU:
        extra = ("--actors", str(per_gpu * gpus), "--gpus-per-actor", f"{1 / per_gpu:g}", "--require-gpu")
        job = infer_job(cfg, model_dir, data, n, "tf", os.path.join(work, "predictions"), extra)
        jobs.append({"actors_per_gpu": per_gpu, **job, "c_over_b": sig(job["images_per_s"] / ceiling)})
    return {"gpus": gpus, "ceiling_images_per_s": ceiling, "jobs": jobs}


def read_predictions(uri: str) -> pa.Table:
    from mnist_ray.formats import predictions

    return predictions.read_predictions(uri, columns=["prediction", "label"])
