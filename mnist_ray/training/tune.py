"""tune: a hyperparameter search over the training job -> a results dir with the best model.

    shards --decode once (train.load_datasets)--> materialized train/val datasets, shared by trials
           --Ray Tune (OptunaSearch proposes, ASHAScheduler stops the weak early), one trial at a
             time--> every trial: a Ray Train TensorflowTrainer (train.train_loop_per_worker), val
             accuracy reported to Tune every epoch --> OUTPUT/

    OUTPUT/
      results.csv, results.json   one row per trial, best first: hyperparameters, best val
                                  accuracy, epochs run, seconds, status
      trials.png                  validation accuracy per epoch, one line per trial
      best/                       the best trial's best epoch, a model dir as `mnist-ray train` writes
      search.json                 the resolved config, search space and experiment path
      _SUCCESS                    written last: the dir is written aside and published whole

The Tune experiment lives beside the output (``tune-runs/search-KEY``, KEY hashes the data and the
search settings): rerunning the same command after an interruption restores it, so finished
trials are kept and the interrupted one continues from its last epoch checkpoint.
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import hashlib
import io
import json
import logging
import os
import posixpath
import shutil
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from typing import ClassVar

import pyarrow.fs as pafs

from mnist_ray.formats import shards
from mnist_ray.plumbing import cluster, storage
from mnist_ray.training import train, workers
from mnist_ray.errors import MnistRayError
from mnist_ray.training.tune_space import SPACE_KEYS, parse_space, to_param_space, values_of

log = logging.getLogger(__name__)

METRIC, MODE = "val_accuracy", "max"
# The trial itself only waits on its Ray Train run; its share keeps a CPU's worth for the
# training worker plus Ray Data's reserve (compat.data_cpu_reserve, half a CPU) on 2 CPUs.
TRIAL_CPU = 0.25
RESULT_FIELDS = ("rank", "trial_id", *SPACE_KEYS, "best_val_accuracy", "best_epoch", "epochs", "seconds",
                 "status", "error")


@dataclass(frozen=True)
class TuneConfig:
    data: str = field(default="out/mnist-sample/shards", metadata={"help": "image shards (mnist-ray prepare)"})
    output: str = field(default="out/mnist-sample/search", metadata={"help": "the results dir to write"})
    trials: int = field(default=8, metadata={"help": "trials to run (fewer if the time budget ends first)"})
    time_budget: float = field(default=1800.0, metadata={
        "help": "seconds for the whole search; running trials stop when it is spent"})
    epochs: int = field(default=5, metadata={"help": "epochs of a trial that is not stopped early"})
    models: str | None = field(default=None, metadata={
        "help": "comma-separated models to search over (shorthand for the space's 'model' key)"})
    space: str | None = field(default=None, metadata={
        "help": "JSON search space over " + ", ".join(SPACE_KEYS) + ": a list is a choice, a scalar is "
                "fixed, {\"loguniform\": [LO, HI]} or {\"uniform\": [LO, HI]} a range; keys left out keep "
                "the default space"})
    grace_period: int = field(default=1, metadata={"help": "epochs every trial runs before ASHA may stop it"})
    reduction_factor: float = field(default=2.0, metadata={
        "help": "ASHA keeps the best 1/FACTOR of the trials at each rung"})
    workers: int = field(default=1, metadata={"help": "Ray Train workers per trial"})
    use_gpu: bool = field(default=False, metadata={
        "help": "one GPU per Ray Train worker of every trial (a trial takes --workers GPUs)"})
    cpus_per_worker: float | None = field(default=None, metadata={
        "help": "CPUs reserved per worker (default: its share, leaving room for data tasks and the trial)"})
    seed: int = field(default=0, metadata={"help": "seed of the sampler, weights, shuffling and augmentation"})
    max_failures: int = field(default=1, metadata={"help": "worker failures a trial's training recovers from"})
    storage_path: str | None = field(default=None, metadata={
        "help": "where the Tune experiment and the trials' checkpoints live (default: beside the output)"})
    overwrite: bool = field(default=False, metadata={
        "help": "replace an existing results dir and start the search over"})
    tflite: bool = field(default=True, metadata={"help": "export TFLite variants of the best model"})
    address: str | None = field(default=None, metadata={"help": "Ray address (default: RAY_ADDRESS, else local)"})
    shared_storage: bool = field(default=False, metadata={"help": cluster.SHARED_STORAGE_HELP})

    PRESETS: ClassVar[dict] = {
        "default": {},
        "smoke": {"trials": 2, "epochs": 2, "time_budget": 600.0, "tflite": False,
                  "space": json.dumps({"model": ["mlp", "cnn"], "batch_size": [64], "augment": [False],
                                       "width": [0.5, 1.0]})},
    }

    def resolved(self) -> "TuneConfig":
        if self.storage_path is None:
            parent = posixpath.dirname(self.output.rstrip("/")) or "."
            return dataclasses.replace(self, storage_path=posixpath.join(parent, "tune-runs"))
        return self

    def validate(self) -> None:
        if self.trials < 1:
            raise MnistRayError(f"--trials {self.trials}: a search needs at least 1 trial")
        if not self.time_budget > 0:
            raise MnistRayError(f"--time-budget {self.time_budget:g}: give a positive number of seconds")
        if self.epochs < 1 or not 1 <= self.grace_period <= self.epochs:
            raise MnistRayError("--epochs must be at least 1 and --grace-period between 1 and --epochs")
        if not self.reduction_factor > 1:
            raise MnistRayError("--reduction-factor must be greater than 1")
        if self.workers < 1:
            raise MnistRayError("--workers must be at least 1")

    def experiment_name(self, data_fingerprint: str, space: dict) -> str:
        """The same data and search settings name the same experiment: rerunning resumes it.
        The time budget is left out: a rerun with another budget still resumes the search, which
        keeps what was left of its own budget (Tune saves it with the experiment)."""
        keys = ("trials", "epochs", "grace_period", "reduction_factor", "workers", "seed")
        h = hashlib.sha256(json.dumps([data_fingerprint, space] + [getattr(self, k) for k in keys],
                                      sort_keys=True).encode())
        return f"search-{h.hexdigest()[:12]}"

    def train_config(self, **overrides) -> train.TrainConfig:
        """The training job a trial runs (``overrides``: the trial's hyperparameters)."""
        return train.TrainConfig(data=self.data, output=posixpath.join(self.output, "best"), epochs=self.epochs,
                                 seed=self.seed, workers=self.workers, cpus_per_worker=self.cpus_per_worker,
                                 use_gpu=self.use_gpu,
                                 max_failures=self.max_failures, tflite=self.tflite, address=self.address,
                                 **overrides)


# --- one trial (runs in a Ray Tune trial actor) ----------------------------------------------------

def tune_trial(config: dict, *, tune_cfg: TuneConfig, datasets: dict, train_rows: int, cpus: float,
               feeds: dict, trials_uri: str) -> None:
    """One trial: the training job with this trial's hyperparameters, as a Ray Train run named by
    the trial id, so a restarted trial continues from that run's last epoch checkpoint."""
    import ray.train
    import ray.tune
    from ray.tune.integration.ray_train import TuneReportCallback

    trial_id = ray.tune.get_context().get_trial_id()
    cfg = tune_cfg.train_config(**config)
    trainer = train.make_trainer(
        cfg, train.loop_config(cfg, train_rows, cpus, feeds), datasets, name=trial_id,
        run_loc=storage.resolve(trials_uri),
        # Each epoch's metrics (and checkpoint path) go to Tune, where ASHA compares trials.
        callbacks=[TuneReportCallback()],
        # The best epoch (exported if this trial wins) and the latest (to resume) are kept.
        checkpoint_config=ray.train.CheckpointConfig(
            num_to_keep=1, checkpoint_score_attribute=METRIC, checkpoint_score_order=MODE))
    trainer.fit()


def trial_dirname(trial) -> str:
    return f"trial_{trial.trial_id}"


# --- results (driver side) -----------------------------------------------------------------------

def trial_rows(results, cfg: TuneConfig) -> tuple[list[dict], dict]:
    """One row per trial, best first, and the per-epoch history of every trial (for the plot and
    the best checkpoint)."""
    rows, histories = [], {}
    for result in results:
        config = {k: (result.config or {}).get(k) for k in SPACE_KEYS}
        trial_id = (result.metrics or {}).get("trial_id") or os.path.basename(result.path).removeprefix("trial_")
        df = result.metrics_dataframe
        history = []
        if df is not None and METRIC in df and "epoch" in df:
            # A restarted trial may report an epoch twice: the last report of each epoch counts.
            df = df.dropna(subset=[METRIC]).drop_duplicates("epoch", keep="last").sort_values("epoch")
            history = [{"epoch": int(r["epoch"]), METRIC: float(r[METRIC]),
                        "checkpoint_path": r.get("checkpoint_path"),
                        "time_total_s": float(r.get("time_total_s", 0.0))}
                       for _, r in df.iterrows()]
        histories[trial_id] = history
        best = max(history, key=lambda h: h[METRIC]) if history else None
        epochs = history[-1]["epoch"] if history else 0
        if result.error is not None:
            status = "error"
        elif epochs >= cfg.epochs:
            status = "completed"
        else:
            status = "stopped early"  # by ASHA, or by the time budget
        rows.append({
            "trial_id": trial_id, **config,
            "best_val_accuracy": round(best[METRIC], 5) if best else None,
            "best_epoch": best["epoch"] if best else None,
            "epochs": epochs,
            "seconds": round(history[-1]["time_total_s"], 1) if history else 0.0,  # the trial's wall time
            "status": status,
            "error": str(result.error).strip().splitlines()[0][:300] if result.error is not None else None,
            "_best_checkpoint": best["checkpoint_path"] if best else None,
        })
    rows.sort(key=lambda r: (r["best_val_accuracy"] is None, -(r["best_val_accuracy"] or 0.0), r["trial_id"]))
    for i, r in enumerate(rows):
        r["rank"] = i + 1
    return rows, histories


def write_csv(rows: list[dict], path: str) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=RESULT_FIELDS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)


def plot_trials(path: str, rows: list[dict], histories: dict) -> None:
    """Validation accuracy per epoch, one line per trial (a ``Figure``: no global pyplot state)."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(8, 5), dpi=100, layout="tight")
    ax = fig.subplots()
    for r in rows:
        h = histories.get(r["trial_id"]) or []
        if not h:
            continue
        label = (f"#{r['rank']} {r['model']} lr={r['learning_rate']:.2g} bs={r['batch_size']} "
                 f"w={r['width']:g}{' aug' if r['augment'] else ''}")
        ax.plot([x["epoch"] for x in h], [x[METRIC] for x in h], "o-",
                linewidth=2.5 if r["rank"] == 1 else 1.0, label=label)
    ax.set(title="validation accuracy per trial (best first)", xlabel="epoch", ylabel="val accuracy")
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.grid(alpha=0.3)
    if ax.lines:
        ax.legend(fontsize=7)
    fig.savefig(path)


# --- driver ----------------------------------------------------------------------------------

def _experiment(cfg: TuneConfig, name: str) -> tuple[storage.Location, bool]:
    """The storage of the Tune experiment; whether an earlier run of it can be restored."""
    from ray import tune

    loc = storage.resolve(cfg.storage_path)
    try:
        if cfg.overwrite:
            for d in (name, f"{name}-trials"):
                if loc.fs.get_file_info(loc.join(d)).type != pafs.FileType.NotFound:
                    loc.fs.delete_dir(loc.join(d))
        loc.fs.create_dir(loc.path, recursive=True)
        restore = tune.Tuner.can_restore(loc.join(name), storage_filesystem=loc.fs)
    except OSError as e:
        raise MnistRayError(storage.describe_error(e, cfg.storage_path)) from e
    return loc, restore


def run(cfg: TuneConfig) -> dict:
    """Search hyperparameters of the training job on ``cfg.data``; results and best model to ``cfg.output``."""
    cluster.configure_process_env()
    cfg = cfg.resolved()
    cfg.validate()
    space = parse_space(cfg)
    _, manifest = shards.open_shards(cfg.data)
    base = cfg.train_config(model=values_of(space["model"])[0]).resolved()
    train_splits, holdout, train_rows = train.check_data(base, manifest)
    out_loc = storage.prepare_directory_output(cfg.output, overwrite=cfg.overwrite, marker="results.json",
                                               what="search results dir")
    name = cfg.experiment_name(manifest["fingerprint"], space)
    cluster.connect(cfg.address, paths=(cfg.data, cfg.output, cfg.storage_path), shared_storage=cfg.shared_storage)
    loc, restore = _experiment(cfg, name)
    with workers.gpus_for(base):  # scale from zero: the autoscaler is asked for the trials' GPUs
        # Each worker's share of the CPUs (GPU workers: their node's CPUs per GPU), leaving the
        # trial's share and Ray Data's reserve free.
        cpus = workers.cpus_per_worker(base, reserved=TRIAL_CPU)
        # Tune saves the experiment state at most every 10 s by default: a search killed in that
        # window would forget a finished trial and run it again.
        os.environ.setdefault("TUNE_GLOBAL_CHECKPOINT_S", "1")
        started = time.perf_counter()
        train_ds, val_ds = train.load_datasets(base, train_splits, holdout)
        datasets = {"train": train_ds, "val": val_ds}
        tuner = make_tuner(cfg, space, name, loc, restore, datasets=datasets, train_rows=train_rows, cpus=cpus,
                           feeds=train.feed_plans(base, datasets, cfg.workers))
        results = tuner.fit()
    search_seconds = time.perf_counter() - started
    rows, histories = trial_rows(results, cfg)
    check_a_trial_reported(rows, name)
    best = rows[0]
    summary = _publish(cfg, out_loc, rows, histories, space, name, loc, datasets, manifest, search_seconds)
    counts = {key: sum(r["status"] == s for r in rows)
              for key, s in (("completed", "completed"), ("stopped_early", "stopped early"), ("errors", "error"))}
    return {"output": cfg.output, "experiment": loc.uri_of(name), "trials": len(rows), **counts,
            "search_seconds": round(search_seconds, 1),
            "best": {k: best[k] for k in ("trial_id", *SPACE_KEYS, "best_val_accuracy", "best_epoch")},
            "best_model": posixpath.join(cfg.output, "best"), **summary}


def make_tuner(cfg: TuneConfig, space: dict, name: str, loc: storage.Location, restore: bool, *,
               datasets: dict, train_rows: int, cpus: float, feeds: dict):
    """The Tuner of the search: the earlier run of this experiment restored, or a new one."""
    import ray.tune
    from optuna.samplers import TPESampler
    from ray.tune.schedulers import ASHAScheduler
    from ray.tune.search.optuna import OptunaSearch

    from mnist_ray.training.tune_callbacks import ReleaseTrainWorkers

    trials_uri = loc.scheme + loc.join(f"{name}-trials")
    trainable = ray.tune.with_resources(
        ray.tune.with_parameters(tune_trial, tune_cfg=cfg, datasets=datasets, train_rows=train_rows,
                                 cpus=cpus, feeds=feeds, trials_uri=trials_uri),
        {"CPU": TRIAL_CPU})
    if restore:
        log.info("tune: resuming the search %s", loc.uri_of(name))
        return ray.tune.Tuner.restore(loc.join(name), trainable, resume_unfinished=True,
                                      storage_filesystem=loc.fs)
    # TPE starts modelling after a third of the trials (Optuna's default is 10: random search
    # for every small search); seeded, so a search is repeatable.
    sampler = TPESampler(seed=cfg.seed, n_startup_trials=max(1, cfg.trials // 3))
    return ray.tune.Tuner(
        trainable,
        param_space=to_param_space(space),
        tune_config=ray.tune.TuneConfig(
            metric=METRIC, mode=MODE, num_samples=cfg.trials, time_budget_s=cfg.time_budget,
            # One trial at a time: trials share the machine's CPUs with their own data tasks,
            # and Optuna proposes each trial knowing every earlier result.
            max_concurrent_trials=1,
            search_alg=OptunaSearch(sampler=sampler),
            # max_t one past the last epoch: ASHA stops any trial that reaches max_t, which
            # would end a trial's actor at its final report, before its Ray Train run returns
            # and releases its workers (see ReleaseTrainWorkers); so trials that run to the
            # end return normally.
            scheduler=ASHAScheduler(time_attr="epoch", max_t=cfg.epochs + 1, grace_period=cfg.grace_period,
                                    reduction_factor=cfg.reduction_factor),
            trial_dirname_creator=trial_dirname),
        run_config=ray.tune.RunConfig(
            name=name, storage_path=loc.path, storage_filesystem=loc.fs, verbose=1,
            # A trial whose actor died (a node lost, a crash in Ray's own threads) runs again
            # and its Ray Train run continues from the last epoch checkpoint.
            failure_config=ray.tune.FailureConfig(max_failures=cfg.max_failures),
            callbacks=[ReleaseTrainWorkers(
                {"CPU": cpus, **({"GPU": 1.0} if cfg.use_gpu else {})}, cfg.workers)]),
    )


def check_a_trial_reported(rows: list[dict], name: str) -> None:
    """Fails in words when no trial reported a validation accuracy (there is no best model)."""
    if not rows or rows[0]["best_val_accuracy"] is None:
        errors = [r["error"] for r in rows if r["error"]]
        raise MnistRayError(f"no trial of the search {name} reported a validation accuracy"
                            + (f"; first error: {errors[0]}" if errors else "")
                            + ": check the data and settings, then rerun with --overwrite")


def _publish(cfg: TuneConfig, out_loc: storage.Location, rows: list[dict], histories: dict, space: dict,
             name: str, loc: storage.Location, datasets: dict, manifest: dict, search_seconds: float) -> dict:
    """Results, figure and the best model written aside, then published whole (``_SUCCESS`` last)."""
    import ray.train

    best = rows[0]
    staging = tempfile.mkdtemp(prefix=f".{os.path.basename(out_loc.path.rstrip('/'))}.staging-",
                               dir=os.path.dirname(out_loc.path) if out_loc.is_local else None)
    try:
        public = [{k: r[k] for k in RESULT_FIELDS} for r in rows]
        with open(os.path.join(staging, "results.json"), "w") as f:
            json.dump(public, f, indent=2)
        write_csv(public, os.path.join(staging, "results.csv"))
        plot_trials(os.path.join(staging, "trials.png"), rows, histories)
        train_cfg = cfg.train_config(**{k: best[k] for k in SPACE_KEYS}).resolved()
        checkpoint = ray.train.Checkpoint(best["_best_checkpoint"], filesystem=loc.fs)
        # Quiet: export prints its table of variants, which belongs to `mnist-ray train`.
        with contextlib.redirect_stdout(io.StringIO()):
            exported, _ = train.export_checkpoint(
                checkpoint, train_cfg, output=os.path.join(staging, "best"), manifest=manifest, datasets=datasets,
                run_name=f"{name}/{best['trial_id']}", train_seconds=best["seconds"], overwrite=False)
        with open(os.path.join(staging, "search.json"), "w") as f:
            json.dump({"config": dataclasses.asdict(cfg), "space": space, "experiment": loc.uri_of(name),
                       "metric": METRIC, "mode": MODE, "search_seconds": round(search_seconds, 1),
                       "best": {k: best[k] for k in RESULT_FIELDS}, "best_model_version": exported["version"]},
                      f, indent=2)
        storage.publish_directory(staging, out_loc, run_id=uuid.uuid4().hex[:12])
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return {"best_model_version": exported["version"], "best_model_val_accuracy": exported["val_accuracy"]}

