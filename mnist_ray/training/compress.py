"""compress: a trained model dir -> smaller variants, each a model dir, compared in one table.

    MODEL_DIR --reuse tflite/{float16,dynamic,int8}--> ptq-float16/ ptq-dynamic/ ptq-int8/
              --quantize_model + fine-tune --> int8 TFLite -----> qat-int8/
              --prune_low_magnitude + fine-tune, strip_pruning --> pruned/     (export.export)
              --teacher soft targets (temperature) --> student --> distilled/  (export.export)
    every variant x runtime --measured in one run--> compression.json, compression.md

    OUTPUT/
      <variant>/             a model dir: `mnist-ray infer --model OUTPUT/<variant> --runtime R`
      compression.json       the table: sizes (raw, gzip), val/test accuracy, images/s, agreement
      compression.md         the same table for people
      _SUCCESS               written last: a failed run leaves no OUTPUT (or the old one)

Everything runs in this process with plain Keras ``fit``, no Ray: the data is the model's own
training shards (thousands of 28x28 images, decoded in a second) and each fine-tune takes
seconds to a minute on a CPU; a Ray Train job would cost more in start-up than it saves.
"""

from __future__ import annotations

import dataclasses
import datetime
import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from typing import ClassVar

import numpy as np

from mnist_ray.formats import shards
from mnist_ray.images import preprocess
from mnist_ray.model import export, models, runtimes
from mnist_ray.plumbing import cluster, storage
from mnist_ray.errors import MnistRayError
from mnist_ray.training.compress_methods import distill, prune, quantization_aware
from mnist_ray.training.compress_scoring import BENCH_BATCH, ModelInputs, format_markdown, score

log = logging.getLogger(__name__)

PRODUCER = "mnist-ray compress --model MODEL_DIR --output DIR"
# Post-training variants reused from the training export: runtime -> variant dir name.
PTQ_VARIANTS = {"tflite-fp16": "ptq-float16", "tflite-dynamic": "ptq-dynamic", "tflite-int8": "ptq-int8"}
METHODS = ("ptq", "qat", "prune", "distill")


@dataclass(frozen=True)
class CompressConfig:
    model: str = field(default="out/mnist-sample/model", metadata={"help": "the trained model dir to compress"})
    output: str = field(default="out/mnist-sample/compressed", metadata={
        "help": "where the variant model dirs and the comparison table go"})
    data: str | None = field(default=None, metadata={
        "help": "shards to fine-tune and validate on (default: the shards the model's metadata names)"})
    test_data: str | None = field(default=None, metadata={
        "help": "extra labelled shards scored as test data (default: the 'test' split of --data, if any)"})
    methods: str = field(default=",".join(METHODS), metadata={
        "help": "comma-separated subset of " + ", ".join(METHODS)})
    epochs: int = field(default=4, metadata={"help": "fine-tune epochs of quantization-aware training and pruning"})
    learning_rate: float = field(default=3e-4, metadata={
        "help": "fine-tune learning rate (small: the weights are already trained)"})
    batch_size: int = field(default=64, metadata={"help": "fine-tune and distillation batch size"})
    sparsity: float = field(default=0.8, metadata={"help": "pruning: fraction of kernel weights set to zero"})
    student: str = field(default="mlp", metadata={"help": "distillation: a registered model (train --list-models)"})
    student_epochs: int = field(default=10, metadata={"help": "distillation: student epochs"})
    student_learning_rate: float = field(default=1e-3, metadata={"help": "distillation: student learning rate"})
    temperature: float = field(default=4.0, metadata={"help": "distillation: softmax temperature of the soft targets"})
    alpha: float = field(default=0.1, metadata={
        "help": "distillation: weight of the hard-label loss (1 - alpha on the teacher's soft targets)"})
    seed: int = field(default=0, metadata={"help": "seed of weights and shuffling"})
    overwrite: bool = field(default=False, metadata={"help": "replace an existing output"})

    PRESETS: ClassVar[dict] = {
        "default": {},
        "smoke": {"epochs": 1, "student_epochs": 1, "batch_size": 64},
    }

    def method_list(self) -> list[str]:
        chosen = [m.strip() for m in self.methods.split(",") if m.strip()]
        unknown = [m for m in chosen if m not in METHODS]
        if unknown or not chosen:
            raise MnistRayError(f"--methods {self.methods!r}: choose from {', '.join(METHODS)}")
        return chosen

    def validate(self) -> None:
        self.method_list()
        if not 0.0 < self.sparsity < 1.0:
            raise MnistRayError(f"--sparsity {self.sparsity}: give a fraction strictly between 0 and 1, e.g. 0.8")
        try:
            models.get_spec(self.student)  # an unknown student fails here, before any work
        except MnistRayError as e:
            raise MnistRayError(f"--student: {e}") from None
        if self.epochs < 1 or self.student_epochs < 1 or self.batch_size < 1:
            raise MnistRayError("--epochs, --student-epochs and --batch-size must be at least 1")
        if self.learning_rate <= 0 or self.student_learning_rate <= 0 or self.temperature <= 0:
            raise MnistRayError("--learning-rate, --student-learning-rate and --temperature must be positive")
        if not 0.0 <= self.alpha <= 1.0:
            raise MnistRayError("--alpha must be between 0 and 1")


# --- data --------------------------------------------------------------------------------------

class ExportBatches:
    """Numpy arrays behind the one method export.export reads (``iter_batches``), so the variants
    that are Keras models go through the same export as a trained model, without Ray."""

    def __init__(self, split: ModelInputs):
        self.split = split

    def iter_batches(self, batch_size: int, batch_format: str = "numpy"):
        for i in range(0, len(self.split.labels), batch_size):
            yield {"image": self.split.images[i:i + batch_size], "label": self.split.labels[i:i + batch_size]}


def _decode(table) -> ModelInputs:
    labels = table["label"].to_numpy(zero_copy_only=False)
    keep = ~np.isnan(labels.astype(np.float64)) if labels.dtype.kind == "f" else np.ones(len(labels), bool)
    images = [b for b, k in zip(table["image"].to_pylist(), keep) if k]
    return ModelInputs(preprocess.to_model_input(images), labels[keep].astype(np.int32))


def load_data(cfg: CompressConfig, metadata: dict) -> tuple[str, dict, dict[str, ModelInputs]]:
    """The model's own train/val splits (as training assigned them) and test data, decoded."""
    from mnist_ray.training import train

    uri = cfg.data or metadata.get("data", {}).get("uri")
    if not uri:
        raise MnistRayError(f"{cfg.model} names no training data: pass --data SHARDS")
    try:
        _, manifest = shards.open_shards(uri)
    except MnistRayError as e:
        if cfg.data:
            raise
        raise MnistRayError(f"cannot open the model's training shards {uri} ({e}): pass --data SHARDS") from e
    if manifest["fingerprint"] != metadata.get("data", {}).get("fingerprint"):
        log.warning("%s is not the data %s was trained on (fingerprints differ): fine-tuning and "
                    "validating on it anyway", uri, cfg.model)
    tc = metadata.get("train_config", {})
    train_splits = [s.strip() for s in tc.get("train_splits", "train").split(",") if s.strip()]
    val_split = tc.get("val_split", "val")
    holdout = val_split not in manifest["splits"]
    table = shards.read_table(uri, columns=["id", "image", "label", "split"])
    assigned = train.assign_split(table["id"].to_pylist(), table["split"].to_pylist(), val_split, holdout)
    data = {}
    for name, wanted in (("train", train_splits), ("val", [val_split]), ("test", ["test"])):
        rows = np.flatnonzero(np.isin(assigned, wanted))
        if len(rows):
            data[name] = _decode(table.take(rows))
    for name in ("train", "val"):
        if name not in data or len(data[name].labels) == 0:
            raise MnistRayError(f"{uri} has no labelled {name} rows (splits {sorted(manifest['splits'])}): "
                                "pass --data with the shards the model was trained on")
    if cfg.test_data:
        test = _decode(shards.read_table(cfg.test_data, columns=["image", "label"]))
        if len(test.labels) == 0:
            raise MnistRayError(f"{cfg.test_data} has no labelled rows to test on")
        data["test"] = test
    return uri, manifest, data


# --- model dirs ----------------------------------------------------------------------------------

def _sha(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()[:12]


def _link_or_copy(src: str, dst: str) -> None:
    """Reuse the training export's file: a hard link on the same filesystem, else a copy."""
    os.makedirs(os.path.dirname(dst), exist_ok=True)
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def write_tflite_model_dir(out_dir: str, runtime: str, teacher_meta: dict, compression: dict, row: dict) -> None:
    """Finish a model dir holding one TFLite file: the teacher's metadata (same input and
    preprocessing spec), a version of its own, and _SUCCESS last."""
    rel = runtimes.RUNTIME_FILES[runtime]
    variant = {runtime: {"file": rel, "bytes": row["bytes"], "val_accuracy": row["val_accuracy"],
                         "images_per_s": row["images_per_s"], "agreement": row["agreement"]}}
    metadata = {
        **teacher_meta,
        "version": f"{teacher_meta['model']}-{compression['variant']}-{_sha(os.path.join(out_dir, rel))}",
        "metrics": {"val_accuracy": row["val_accuracy"], "test_accuracy": row["test_accuracy"],
                    "val_rows": row["val_rows"]},
        "variants": variant,
        "compression": compression,
        "created_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    with open(os.path.join(out_dir, "variants.json"), "w") as f:
        json.dump(variant, f, indent=2)
    with open(os.path.join(out_dir, "metadata.json"), "w") as f:
        json.dump(metadata, f, indent=2)
    with open(os.path.join(out_dir, storage.SUCCESS), "w") as f:
        json.dump({"run_id": metadata["version"]}, f)


def export_keras_variant(keras_path: str, out_dir: str, *, model_name: str, manifest: dict, data_uri: str,
                         data: dict[str, ModelInputs], history: list[dict], compression: dict, seconds: float) -> dict:
    """A Keras variant through the training export: model.keras, SavedModel, all TFLite variants."""
    train_config = {"model": model_name, "data": data_uri, "compression": compression}
    return export.export(keras_path, out_dir, history=history, manifest=manifest,
                         val_dataset=ExportBatches(data["val"]), calibration_dataset=ExportBatches(data["train"]),
                         train_config=train_config, run_name=f"compress-{compression['variant']}",
                         train_seconds=seconds)


# --- driver --------------------------------------------------------------------------------------

# A row of the plan: (variant, runtime, model dir, compression facts, write a tflite-only dir after scoring).
PlanRow = tuple[str, str, str, dict, bool]
KERAS_VARIANT_RUNTIMES = ("tf", "tflite-fp32", "tflite-int8")  # int8: compressed and quantized


@dataclass(frozen=True)
class CompressRun:
    """What every step of one compress run reads: the teacher, its data and the staging dir."""
    cfg: CompressConfig
    model_local: str
    teacher_meta: dict
    source: dict
    data_uri: str
    manifest: dict
    data: dict[str, ModelInputs]
    staging: str


def run(cfg: CompressConfig) -> dict:
    """Compress the model dir ``cfg.model`` into variant model dirs and a table at ``cfg.output``."""
    cluster.configure_process_env()  # tf-keras: tfmot needs Keras 2, like the training job
    cfg.validate()
    methods = cfg.method_list()
    model_local, teacher_meta = export.open_model_dir(cfg.model)
    runtimes.check(model_local, "tf")
    loc = storage.prepare_directory_output(cfg.output, overwrite=cfg.overwrite, marker="compression.json",
                                           what="compression output")
    data_uri, manifest, data = load_data(cfg, teacher_meta)
    started = time.perf_counter()
    staging = tempfile.mkdtemp(prefix=f".{os.path.basename(loc.path.rstrip('/'))}.staging-",
                               dir=os.path.dirname(loc.path.rstrip("/")) if loc.is_local else None)
    job = CompressRun(cfg, model_local, teacher_meta, {"uri": cfg.model, "version": teacher_meta["version"]},
                      data_uri, manifest, data, staging)
    try:
        plan, skipped = plan_variants(job, methods)
        rows = score_plan(job, plan, loc)
        summary = write_table(job, rows, skipped, started)
        storage.publish_directory(staging, loc, run_id=teacher_meta["version"])
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    keys = ("bytes", "gzip_bytes", "val_accuracy", "test_accuracy", "images_per_s", "agreement")
    return {"output": cfg.output, "model_version": teacher_meta["version"], "seconds": summary["seconds"],
            "variants": {f"{r['variant']}/{r['runtime']}": {k: r[k] for k in keys} for r in rows},
            "skipped": skipped}


def plan_variants(job: CompressRun, methods: list[str]) -> tuple[list[PlanRow], dict]:
    """Every variant of ``methods`` made in the staging dir: the plan of what to score, and the
    variants skipped (with why)."""
    plan: list[PlanRow] = [("original", "tf", job.model_local, {"method": "none"}, False)]
    if os.path.exists(os.path.join(job.model_local, runtimes.RUNTIME_FILES["tflite-fp32"])):
        plan.append(("original", "tflite-fp32", job.model_local, {"method": "none"}, False))
    skipped = {}
    if "ptq" in methods:
        ptq_plan, skipped = ptq_variants(job)
        plan += ptq_plan
    if "qat" in methods:
        plan.append(qat_variant(job))
    work = tempfile.mkdtemp(prefix="mnist-ray-compress-")
    try:
        if "prune" in methods:
            plan += pruned_variant(job, work)
        if "distill" in methods:
            plan += distilled_variant(job, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return plan, skipped


def ptq_variants(job: CompressRun) -> tuple[list[PlanRow], dict]:
    """The training export's post-training quantized TFLite files, each linked into a dir of its own."""
    plan, skipped = [], {}
    for runtime, name in PTQ_VARIANTS.items():
        src = os.path.join(job.model_local, runtimes.RUNTIME_FILES[runtime])
        if not os.path.exists(src):
            skipped[name] = f"{job.cfg.model} has no {runtime} variant (trained with --no-tflite?)"
            continue
        out = os.path.join(job.staging, name)
        _link_or_copy(src, os.path.join(out, runtimes.RUNTIME_FILES[runtime]))
        plan.append((name, runtime, out, {"method": "post-training quantization",
                                          "reused": runtimes.RUNTIME_FILES[runtime]}, True))
    return plan, skipped


def qat_variant(job: CompressRun) -> PlanRow:
    """Quantization-aware training into a full-integer TFLite file (``qat-int8``)."""
    cfg = job.cfg
    t = time.perf_counter()
    out = os.path.join(job.staging, "qat-int8")
    facts = quantization_aware(cfg, job.model_local, job.data, out)
    log.info("quantization-aware training: %.0f s", time.perf_counter() - t)
    return ("qat-int8", "tflite-int8", out, {
        "method": "quantization-aware training", "epochs": cfg.epochs, "learning_rate": cfg.learning_rate,
        "history": facts["history"], "seconds": round(time.perf_counter() - t, 1)}, True)


def pruned_variant(job: CompressRun, work: str) -> list[PlanRow]:
    """The teacher pruned during a fine-tune, exported as the model dir ``pruned``."""
    cfg = job.cfg
    t = time.perf_counter()
    keras_path = os.path.join(work, "pruned.keras")
    facts = prune(cfg, job.model_local, job.data, keras_path)
    compression = {"variant": "pruned", "method": "magnitude pruning", "from": job.source,
                   "target_sparsity": cfg.sparsity, "kernel_sparsity": facts["sparsity"],
                   "epochs": cfg.epochs, "learning_rate": cfg.learning_rate}
    plan = keras_variant(job, keras_path, job.teacher_meta["model"], facts["history"], compression, t)
    log.info("pruning to %.0f%% sparsity: %.0f s", 100 * facts["sparsity"], time.perf_counter() - t)
    return plan


def distilled_variant(job: CompressRun, work: str) -> list[PlanRow]:
    """A student distilled from the teacher, exported as the model dir ``distilled``."""
    cfg = job.cfg
    t = time.perf_counter()
    keras_path = os.path.join(work, "student.keras")
    facts = distill(cfg, runtimes.load(job.model_local, "tf"), job.data, keras_path)
    compression = {"variant": "distilled", "method": "knowledge distillation", "from": job.source,
                   "student": cfg.student, "params": facts["params"],
                   "teacher_params": job.teacher_meta.get("params"),
                   "temperature": cfg.temperature, "alpha": cfg.alpha, "epochs": cfg.student_epochs,
                   "learning_rate": cfg.student_learning_rate}
    plan = keras_variant(job, keras_path, cfg.student, facts["history"], compression, t)
    log.info("distillation into %s: %.0f s", cfg.student, time.perf_counter() - t)
    return plan


def keras_variant(job: CompressRun, keras_path: str, model_name: str, history: list[dict], compression: dict,
                  started: float) -> list[PlanRow]:
    """A Keras model a method wrote, exported as the model dir of its variant: its plan rows."""
    out = os.path.join(job.staging, compression["variant"])
    export_keras_variant(keras_path, out, model_name=model_name, manifest=job.manifest, data_uri=job.data_uri,
                         data=job.data, history=history, compression=compression,
                         seconds=time.perf_counter() - started)
    return [(compression["variant"], runtime, out, compression, False) for runtime in KERAS_VARIANT_RUNTIMES]


def score_plan(job: CompressRun, plan: list[PlanRow], loc: storage.Location) -> list[dict]:
    """A row per plan entry, each against the original on the tf runtime; TFLite-only dirs finished."""
    # Every row measured here, one after the other in one process: comparable images/s.
    rows, reference = [], None
    for variant, runtime, model_dir, compression, tflite_dir in plan:
        row, top1 = score(model_dir, runtime, job.data, reference)
        if reference is None:
            reference = top1  # the original model on the tf runtime
        rel = "" if model_dir == job.model_local else os.path.relpath(model_dir, job.staging)
        rows.append({"variant": variant, "model_dir": loc.uri_of(rel) if rel else job.cfg.model, **row})
        if tflite_dir:
            write_tflite_model_dir(model_dir, runtime, job.teacher_meta,
                                   {"variant": variant, "from": job.source, **compression}, row)
    for r in rows:
        r["size_vs_original"] = round(r["bytes"] / rows[0]["bytes"], 4)
    return rows


def write_table(job: CompressRun, rows: list[dict], skipped: dict, started: float) -> dict:
    """compression.json and compression.md in the staging dir (and the table printed): the summary."""
    cfg, data = job.cfg, job.data
    table = format_markdown(rows)
    summary = {
        "model": job.source, "data": job.data_uri,
        "test_data": cfg.test_data or ("split 'test'" if "test" in data else None),
        "rows": {s: int(len(v.labels)) for s, v in data.items()}, "batch_size": BENCH_BATCH,
        "config": dataclasses.asdict(cfg), "skipped": skipped, "variants": rows,
        "seconds": round(time.perf_counter() - started, 1),
        "created_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    with open(os.path.join(job.staging, "compression.json"), "w") as f:
        json.dump(summary, f, indent=2)
    with open(os.path.join(job.staging, "compression.md"), "w") as f:
        f.write(f"Compression of `{cfg.model}` ({job.teacher_meta['version']}); images/s at batch {BENCH_BATCH}, "
                f"agreement = same top-1 as the original on the tf runtime.\n\n{table}\n")
    print(table, flush=True)
    return summary
