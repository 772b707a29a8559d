"""The hyperparameter search: the space without Ray, then real searches (Ray Tune over Ray Train)."""

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from mnist_ray.formats import shards
from mnist_ray.images import preprocess
from mnist_ray.model import export, runtimes
from mnist_ray.plumbing import cluster
from mnist_ray.errors import MnistRayError
from mnist_ray.training.tune import TuneConfig, run
from mnist_ray.training.tune_space import SPACE_KEYS, parse_space

cluster.configure_process_env()

REPO = Path(__file__).resolve().parents[2]
# Tiny and quick: small models, one batch size, no augmentation; the search still has a choice.
TINY_SPACE = json.dumps({"model": ["mlp", "cnn"], "batch_size": [64], "augment": [False], "width": [0.5, 1.0],
                         "learning_rate": {"loguniform": [1e-3, 1e-2]}})


def test_space_defaults_restrictions_and_errors():
    space = parse_space(TuneConfig())
    assert set(space) == set(SPACE_KEYS) and "cnn" in space["model"]
    space = parse_space(TuneConfig(space='{"batch_size": [32], "augment": false}', models="mlp, cnn"))
    assert space["batch_size"] == [32] and space["augment"] is False and space["model"] == ["mlp", "cnn"]
    with pytest.raises(MnistRayError, match="unknown search space key.*'dropout'.*the keys are model"):
        parse_space(TuneConfig(space='{"dropout": [0.1]}'))
    with pytest.raises(MnistRayError, match="unknown model 'resnet'"):
        parse_space(TuneConfig(models="cnn,resnet"))
    with pytest.raises(MnistRayError, match="not valid JSON"):
        parse_space(TuneConfig(space="{model: cnn}"))
    with pytest.raises(MnistRayError, match="0 < LO < HI"):
        parse_space(TuneConfig(space='{"learning_rate": {"loguniform": [0.1, 0.01]}}'))
    with pytest.raises(MnistRayError, match="'batch_size'"):
        parse_space(TuneConfig(space='{"batch_size": [0.5]}'))


def test_experiment_name_follows_the_search_not_the_budget():
    space = parse_space(TuneConfig())
    a = TuneConfig(time_budget=60).experiment_name("sha256:a", space)
    assert a == TuneConfig(time_budget=600).experiment_name("sha256:a", space)
    assert a != TuneConfig(trials=3).experiment_name("sha256:a", space)
    assert a != TuneConfig().experiment_name("sha256:b", space)


def test_bad_input_fails_in_one_line_before_any_work(small_shards, tmp_path):
    out = str(tmp_path / "search")
    with pytest.raises(MnistRayError, match="--trials 0"):
        run(TuneConfig(data=small_shards, output=out, trials=0))
    with pytest.raises(MnistRayError, match="--time-budget 0"):
        run(TuneConfig(data=small_shards, output=out, time_budget=0))
    with pytest.raises(MnistRayError, match="--time-budget -5"):
        run(TuneConfig(data=small_shards, output=out, time_budget=-5))
    with pytest.raises(MnistRayError, match="unknown search space key"):
        run(TuneConfig(data=small_shards, output=out, space='{"optimizer": ["sgd"]}'))
    with pytest.raises(MnistRayError, match="no dataset"):
        run(TuneConfig(data=str(tmp_path / "nothing"), output=out))
    (tmp_path / "not-shards").mkdir()
    (tmp_path / "not-shards" / "a.txt").write_text("x")
    with pytest.raises(MnistRayError, match="not a complete dataset"):
        run(TuneConfig(data=str(tmp_path / "not-shards"), output=out))
    assert not (tmp_path / "search").exists()


def _val_images(data: str):
    table = shards.read_table(data, columns=["image", "label", "split"])
    val = [i for i, s in enumerate(table["split"].to_pylist()) if s == "val"]
    images = preprocess.to_model_input([table["image"][i].as_py() for i in val])
    return images, np.array([table["label"][i].as_py() for i in val])


@pytest.mark.e2e
def test_a_tiny_search_ranks_its_trials_and_exports_the_best(small_shards, tmp_path):
    out = tmp_path / "search"
    summary = run(TuneConfig(data=small_shards, output=str(out), trials=2, epochs=2, space=TINY_SPACE,
                             time_budget=600, tflite=False))
    assert summary["trials"] == 2 and summary["errors"] == 0
    rows = json.loads((out / "results.json").read_text())
    assert len(rows) == 2 and len({r["trial_id"] for r in rows}) == 2
    assert [r["rank"] for r in rows] == [1, 2]
    assert rows[0]["best_val_accuracy"] >= rows[1]["best_val_accuracy"]
    for r in rows:
        assert r["status"] in ("completed", "stopped early") and 1 <= r["epochs"] <= 2
        assert r["model"] in ("mlp", "cnn") and r["batch_size"] == 64 and r["width"] in (0.5, 1.0)
        assert 1e-3 <= r["learning_rate"] <= 1e-2 and r["seconds"] > 0
    with open(out / "results.csv", newline="") as f:
        assert [r["trial_id"] for r in csv.DictReader(f)] == [r["trial_id"] for r in rows]
    png = (out / "trials.png").read_bytes()
    assert png.startswith(b"\x89PNG") and len(png) > 10_000
    # The best trial's best epoch, exported as `mnist-ray train` would: scored independently here.
    best = rows[0]
    local, metadata = export.open_model_dir(str(out / "best"))
    assert metadata["model"] == best["model"] and metadata["train_config"]["width"] == best["width"]
    assert metadata["metrics"]["final"]["epoch"] == best["best_epoch"]
    images, labels = _val_images(small_shards)
    accuracy = float((runtimes.load(local)(images).argmax(1) == labels).mean())
    assert accuracy == pytest.approx(best["best_val_accuracy"], abs=0.005)  # the right checkpoint
    assert accuracy > 0.6  # 900 digits, 2 epochs: it learned
    assert not list(tmp_path.glob(".*staging*"))
    with pytest.raises(MnistRayError, match="--overwrite"):
        run(TuneConfig(data=small_shards, output=str(out), trials=2, epochs=2, space=TINY_SPACE))


def _command(data: str, out: Path) -> list[str]:
    return [sys.executable, "-m", "mnist_ray.cli", "tune", "--data", data, "--output", str(out), "--trials", "2",
            "--epochs", "1", "--time-budget", "600", "--no-tflite", "--space",
            json.dumps({"model": ["mlp"], "batch_size": [64], "augment": [False], "width": [0.5, 1.0]})]


def _finished_trials(experiment_root: Path) -> dict[str, bytes]:
    """Trial id -> its result.json, for the trials the saved experiment state lists as finished."""
    states = sorted(experiment_root.glob("search-*/experiment_state-*.json"))
    if not states:
        return {}
    try:
        data = json.loads(states[-1].read_text())
    except (json.JSONDecodeError, OSError):
        return {}  # being written
    done = [t["trial_id"] for t in (json.loads(x[0]) for x in data["trial_data"]) if t["status"] == "TERMINATED"]
    return {t: (experiment_root.glob(f"search-*/trial_{t}/result.json").__next__()).read_bytes() for t in done}


def _kill_session(leader: int) -> None:
    """SIGKILL the driver's process group and anything else of its session (Ray's own processes)."""
    import psutil

    os.killpg(leader, signal.SIGKILL)
    for p in psutil.process_iter():
        try:
            if os.getsid(p.pid) == leader:
                p.kill()
        except (ProcessLookupError, psutil.Error):
            pass


@pytest.mark.e2e
def test_an_interrupted_search_resumes_without_redoing_finished_trials(small_shards, tmp_path):
    out = tmp_path / "search"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    env.pop("RAY_ADDRESS", None)  # its own Ray, like a user's run: the kill takes it down too
    log = open(tmp_path / "first.log", "wb")
    first = subprocess.Popen(_command(small_shards, out), cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT,
                             start_new_session=True)
    deadline = time.monotonic() + 240
    finished: dict = {}
    try:
        while not finished:
            assert first.poll() is None, (tmp_path / "first.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "no trial finished in time"
            time.sleep(0.5)
            finished = _finished_trials(tmp_path / "tune-runs")
    finally:
        _kill_session(first.pid)
        first.wait()
    assert not (out / "_SUCCESS").exists()
    second = subprocess.run(_command(small_shards, out), cwd=REPO, env=env, capture_output=True, text=True,
                            timeout=300)
    assert second.returncode == 0, second.stderr[-3000:]
    assert "resuming the search" in second.stdout + second.stderr
    rows = json.loads((out / "results.json").read_text())
    assert len(rows) == 2 and len({r["trial_id"] for r in rows}) == 2
    assert set(finished) <= {r["trial_id"] for r in rows}
    after = _finished_trials(tmp_path / "tune-runs")
    for trial_id, result in finished.items():
        assert after[trial_id] == result, f"trial {trial_id} ran again"
    assert (out / "best" / "_SUCCESS").exists()
