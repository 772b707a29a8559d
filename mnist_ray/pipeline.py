"""pipeline: prepare -> train -> infer -> evaluate in one command, skipping what is current.

    OUTPUT/shards        mnist-ray prepare --source SOURCE        (what training reads)
    OUTPUT/test-shards   mnist-ray prepare --source TEST_SOURCE   (what the report scores)
    OUTPUT/model         mnist-ray train
    OUTPUT/predictions   mnist-ray infer  (of the test shards)
    OUTPUT/report        mnist-ray evaluate
    OUTPUT/pipeline.json what each stage was last built from (the pipeline's own record)
    OUTPUT/_logs         every run's full log

The accuracy the pipeline reports is measured on data training did not see: the ``test``
split of the test source (by default the 10,000 digits of the MNIST test set).

Every stage is the ordinary job (same code, same outputs), run in one process on one Ray.
A stage is current when its output is complete, is the very output the pipeline recorded
(not replaced by hand), and was built from the same settings and the same upstream outputs.
Otherwise it runs, and every stage after it becomes stale, as in make: deleting the
predictions reruns infer and evaluate, never prepare or train. An interrupted stage resumes
where the job itself can (infer's Ray Data checkpoint, a training run's last epoch).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import posixpath
import time
from dataclasses import dataclass, field
from typing import Callable, ClassVar

import pyarrow.fs as pafs

from mnist_ray.plumbing import cluster, storage
from mnist_ray.errors import MnistRayError

log = logging.getLogger(__name__)

# The prepare settings that decide the shards' content (sharding itself does not).
PREPARE_KEYS = ("source", "val_fraction", "seed", "limit")


@dataclass(frozen=True)
class PipelineConfig:
    source: str = field(default="mnist-sample", metadata={"help": "what to train on (see mnist-ray prepare)"})
    test_source: str = field(default="mnist-test", metadata={
        "help": "what the report scores: a prepare source whose test split training never sees "
                "(mnist-test: the 10,000 MNIST test digits); the same as --source to use its own test split"})
    output: str = field(default="out/pipeline", metadata={
        "help": "root of the stages' outputs: shards/, test-shards/, model/, predictions/, report/ "
                "(local or s3://)"})
    limit: int | None = field(default=None, metadata={"help": "at most this many rows per split"})
    model: str = field(default="default", metadata={"help": "a registered model (mnist-ray train --list-models)"})
    epochs: int | None = field(default=None, metadata={"help": "epochs (default: the model's own)"})
    batch_size: int | None = field(default=None, metadata={"help": "global training batch (default: the model's own)"})
    workers: int | None = field(default=None, metadata={
        "help": "Ray Train workers (default: one per node, with all its cores)"})
    runtime: str = field(default="tf", metadata={"help": "inference runtime (see mnist-ray infer)"})
    actors: str = field(default="1", metadata={"help": "predictor actors: N or MIN..MAX"})
    force: bool = field(default=False, metadata={"help": "run every stage even when its output is current"})
    address: str | None = field(default=None, metadata={"help": "Ray address (default: RAY_ADDRESS, else local)"})
    shared_storage: bool = field(default=False, metadata={"help": cluster.SHARED_STORAGE_HELP})

    PRESETS: ClassVar[dict] = {
        "default": {},
        # The train smoke preset: a minute or two of training on 4,500 digits.
        "smoke": {"model": "cnn", "epochs": 2, "batch_size": 64},
    }

    def path(self, stage: str) -> str:
        return posixpath.join(self.output.rstrip("/"), stage)


LEDGER = "pipeline.json"
TEST_SPLIT = "test"


def _read_json(uri: str, name: str) -> dict | None:
    """``name`` of a complete dataset or dir at ``uri``; None when there is none (yet)."""
    loc = storage.resolve(uri)
    try:
        if not storage.is_complete(loc):
            return None
        return storage.read_json(loc, name)
    except (OSError, ValueError):
        return None


def _build_id(doc: dict | None) -> str | None:
    """What tells one build of an output from another (a rebuild gets a new one)."""
    if doc is None:
        return None
    return f"{doc.get('created_at')}/{doc.get('run_id') or doc.get('version') or doc.get('predictions_fingerprint')}"


class _Ledger:
    """OUTPUT/pipeline.json: per stage, the key it was built with and the build it produced."""

    def __init__(self, root: str):
        self.loc = storage.resolve(root)
        try:
            self.stages = storage.read_json(self.loc, LEDGER)["stages"]
        except (OSError, ValueError, KeyError):
            self.stages = {}

    def save(self) -> None:
        self.loc.fs.create_dir(self.loc.path, recursive=True)
        storage.write_bytes(self.loc, LEDGER, json.dumps({"stages": self.stages}, indent=2).encode())


class _Stages:
    """Runs stages in order, each only when it is not current, and records every build in the ledger."""

    def __init__(self, root: str, force: bool):
        self.ledger = _Ledger(root)
        self.force = force
        self.done: list[dict] = []
        self.upstream = ""  # the build ids of everything before the current stage

    def run(self, name: str, output: str, doc_name: str, settings: dict, job: Callable[[], dict],
            progress=None, lines: bool = True) -> dict:
        """The document ``doc_name`` of the stage's output, built by ``job`` unless current."""
        from mnist_ray.plumbing import logs

        key = json.dumps({"settings": settings, "upstream": self.upstream}, sort_keys=True)
        doc = _read_json(output, doc_name)
        recorded = self.ledger.stages.get(name, {})
        current = doc is not None and recorded == {"key": key, "build": _build_id(doc)}
        if current and not self.force:
            log.info("pipeline: %-12s current, skipped (%s)", name, output)
            self.done.append({"stage": name, "status": "skipped", "output": output})
        else:
            why = ("forced" if current else "missing" if doc is None
                   else "replaced by hand" if recorded.get("key") == key else "inputs changed")
            log.info("pipeline: %-12s running (%s) -> %s", name, why, output)
            t0 = time.perf_counter()
            with logs.stage(f"pipeline: {name:<12}", progress, lines=lines):
                summary = job()
            doc = _read_json(output, doc_name)
            if doc is None:
                raise MnistRayError(f"the {name} stage finished without a complete output at {output}")
            self.ledger.stages[name] = {"key": key, "build": _build_id(doc)}
            self.ledger.save()
            seconds = round(time.perf_counter() - t0, 1)
            log.info("pipeline: %-12s done in %s s", name, seconds)
            log.debug("pipeline: %s summary %s", name, json.dumps(summary))
            self.done.append({"stage": name, "status": "ran", "reason": why, "output": output, "seconds": seconds})
        self.upstream += "|" + _build_id(doc)
        return doc


def stage_configs(cfg: PipelineConfig) -> tuple:
    """The configs of the stages' jobs (prepare, prepare-test, train, infer, evaluate), every flag checked."""
    from mnist_ray.evaluation import evaluate
    from mnist_ray.inference import infer
    from mnist_ray.preparation import prepare
    from mnist_ray.training import train

    test_shards = cfg.path("shards") if cfg.test_source == cfg.source else cfg.path("test-shards")
    prepare_cfg = prepare.PrepareConfig(source=cfg.source, output=cfg.path("shards"), limit=cfg.limit,
                                        overwrite=True, address=cfg.address,
                                        shared_storage=cfg.shared_storage)
    test_cfg = prepare.PrepareConfig(source=cfg.test_source, output=test_shards, limit=cfg.limit,
                                     overwrite=True, address=cfg.address, shared_storage=cfg.shared_storage)
    train_cfg = train.TrainConfig(data=cfg.path("shards"), output=cfg.path("model"), model=cfg.model,
                                  epochs=cfg.epochs, batch_size=cfg.batch_size, workers=cfg.workers,
                                  overwrite=True, address=cfg.address,
                                  shared_storage=cfg.shared_storage).resolved()
    infer_cfg = infer.InferConfig(model=cfg.path("model"), input=test_shards, output=cfg.path("predictions"),
                                  runtime=cfg.runtime, actors=cfg.actors, overwrite=True, address=cfg.address,
                                  shared_storage=cfg.shared_storage)
    evaluate_cfg = evaluate.EvaluateConfig(predictions=cfg.path("predictions"), output=cfg.path("report"),
                                           overwrite=True)
    # Every flag is checked before the first stage starts, not an hour into the run.
    prepare_cfg.validate()
    test_cfg.validate()
    train_cfg.validate()
    infer_cfg.validate()
    if TEST_SPLIT in train_cfg.train_splits.split(","):
        raise MnistRayError(f"the pipeline reports on the {TEST_SPLIT!r} split, so training must not use it")
    return prepare_cfg, test_cfg, train_cfg, infer_cfg, evaluate_cfg


def _train_job(train_cfg, run_name: str, force: bool) -> dict:
    """The train stage's job."""
    from mnist_ray.training import train

    # A run of these very settings on this data that stopped before exporting continues
    # from its last checkpoint; anything else starts over.
    runs = storage.resolve(train_cfg.storage_path)
    interrupted = runs.fs.get_file_info(runs.join(run_name)).type != pafs.FileType.NotFound
    return train.run(dataclasses.replace(train_cfg, resume=interrupted and not force))


def run(cfg: PipelineConfig) -> dict:
    """prepare -> train -> infer -> evaluate under ``cfg.output``; returns what each stage did."""
    from mnist_ray.evaluation import evaluate
    from mnist_ray.inference import infer
    from mnist_ray.preparation import prepare

    cluster.configure_process_env()
    started = time.perf_counter()
    same_source = cfg.test_source == cfg.source
    prepare_cfg, test_cfg, train_cfg, infer_cfg, evaluate_cfg = stage_configs(cfg)
    cluster.connect(cfg.address, paths=(cfg.output,), shared_storage=cfg.shared_storage)
    stages = _Stages(cfg.output, cfg.force)
    shards_manifest = stages.run("prepare", prepare_cfg.output, storage.MANIFEST,
                                 {k: getattr(prepare_cfg, k) for k in PREPARE_KEYS}, lambda: prepare.run(prepare_cfg))
    test_manifest = shards_manifest if same_source else stages.run(
        "prepare-test", test_cfg.output, storage.MANIFEST, {k: getattr(test_cfg, k) for k in PREPARE_KEYS},
        lambda: prepare.run(test_cfg))
    test_rows = test_manifest["splits"].get(TEST_SPLIT, {}).get("rows", 0)
    if not test_rows:
        raise MnistRayError(f"--test-source {cfg.test_source} has no {TEST_SPLIT!r} split (it has "
                            f"{sorted(test_manifest['splits'])}): give a source with one, such as mnist-test")
    run_name = train_cfg.run_name(shards_manifest["fingerprint"])
    metadata = stages.run("train", train_cfg.output, "metadata.json", {"run_name": run_name},
                          lambda: _train_job(train_cfg, run_name, cfg.force),
                          lines=False)  # train prints epochs done, time per epoch and ETA itself
    stages.run("infer", infer_cfg.output, storage.MANIFEST, {"runtime": cfg.runtime}, lambda: infer.run(infer_cfg),
               lines=False)  # infer prints rows, images/s and ETA itself
    metrics = stages.run("evaluate", evaluate_cfg.output, "metrics.json", {"samples": evaluate_cfg.samples},
                         lambda: evaluate.run(evaluate_cfg))
    by_split = metrics.get("accuracy_by_split") or {}
    return {"output": cfg.output, "ran": [s["stage"] for s in stages.done if s["status"] == "ran"],
            "test_accuracy": by_split.get(TEST_SPLIT),
            "test_set": {"source": cfg.test_source, "split": TEST_SPLIT, "rows": test_rows},
            "trained_on": {"source": cfg.source, "rows": shards_manifest["splits"].get("train", {}).get("rows"),
                           "val_accuracy": metadata["metrics"]["val_accuracy"]},
            "accuracy_by_split": by_split, "model_version": metadata["version"], "report": evaluate_cfg.output,
            "stages": stages.done, "wall_seconds": round(time.perf_counter() - started, 1)}
