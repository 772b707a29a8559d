"""The one-command pipeline on a real local Ray: runs everything once, then only what changed;
reports on the test split; prints a few lines, and everything else goes to its log file."""

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from mnist_ray.pipeline import PipelineConfig, run

STAGES = ["prepare", "prepare-test", "train", "infer", "evaluate"]
# What a quiet run must never print: library banners, Ray's per-worker and per-operator output.
NOISE = re.compile(r"cuInit|cuda|oneDNN|absl|Failed to query|DeprecationWarning|FutureWarning|Warning:|"
                   r"logging_progress|Running Dataset|Execution plan|Total Progress|TrainController|"
                   r"RayTrainWorker|pid=|[IWE]0000 |Token authentication|Traceback", re.IGNORECASE)
MAX_LINES = 40  # the whole quiet smoke pipeline, as for `make quickstart`


@pytest.mark.e2e
def test_pipeline_runs_every_stage_then_skips_what_is_current(ray_local, tmp_path):
    cfg = PipelineConfig(output=str(tmp_path / "p"), limit=100, model="cnn", epochs=1, batch_size=32,
                         workers=1)
    first = run(cfg)
    assert first["ran"] == STAGES
    metrics = json.loads((tmp_path / "p" / "report" / "metrics.json").read_text())
    # Scored: 100 digits of the MNIST test set, none of which training saw (100 train + 100 val).
    assert metrics["rows"] == 100 and metrics["error_rows"] == 0
    assert set(metrics["accuracy_by_split"]) == {"test"} and 0 < first["test_accuracy"] <= 1
    assert first["test_set"] == {"source": "mnist-test", "split": "test", "rows": 100}
    assert first["trained_on"]["source"] == "mnist-sample" and first["trained_on"]["rows"] == 100

    second = run(cfg)
    assert second["ran"] == [] and second["model_version"] == first["model_version"]
    assert [s["status"] for s in second["stages"]] == ["skipped"] * 5

    # A lost stage output: that stage and the ones after it run, nothing before it.
    shutil.rmtree(tmp_path / "p" / "predictions")
    third = run(cfg)
    assert third["ran"] == ["infer", "evaluate"] and third["test_accuracy"] == first["test_accuracy"]

    # Other settings (another runtime) make infer and evaluate stale, not training.
    fourth = run(PipelineConfig(**{**cfg.__dict__, "runtime": "tflite-int8"}))
    assert fourth["ran"] == ["infer", "evaluate"]
    assert json.loads((Path(cfg.output) / "predictions" / "_manifest.json").read_text())["model"]["runtime"] \
        == "tflite-int8"


def test_a_test_source_without_a_test_split_is_refused_before_training(ray_local, tmp_path):
    from mnist_ray.errors import MnistRayError

    cfg = PipelineConfig(output=str(tmp_path / "p"), limit=20, test_source="mnist-sample", workers=1)
    with pytest.raises(MnistRayError, match="has no 'test' split"):
        run(cfg)
    assert not (tmp_path / "p" / "model").exists()


def _cli(*args, timeout=1200):
    return subprocess.run([sys.executable, "-m", "mnist_ray.cli", *args], capture_output=True, text=True,
                          timeout=timeout)


@pytest.mark.e2e
def test_the_smoke_pipeline_prints_a_few_lines_and_logs_everything_to_its_output(tmp_path):
    out = tmp_path / "quick"
    proc = _cli("pipeline", "--preset", "smoke", "--limit", "200", "--epochs", "1", "--workers", "1",
                "--output", str(out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = (proc.stdout + proc.stderr).splitlines()
    assert len(lines) <= MAX_LINES, "\n".join(lines)
    noisy = [line for line in lines if NOISE.search(line)]
    assert not noisy, "\n".join(noisy)
    summary = json.loads(proc.stdout)  # stdout is the summary and nothing else
    assert 0 < summary["test_accuracy"] <= 1 and summary["test_set"]["source"] == "mnist-test"
    for name in STAGES:  # one line as each stage starts, one as it ends
        assert sum(bool(re.search(rf"pipeline: {name}\s+(running \(|done in)", line)) for line in lines) == 2, name
    # The full detail is in the log file the summary names, inside the output.
    log = Path(summary["log"])
    assert log.parent == out / "_logs" and log.is_file()
    text = log.read_text()
    assert "pipeline: evaluate" in text and "epoch 1/1" in text  # ours, and the train workers' output


def test_verbose_brings_ray_datas_own_output_back(tmp_path):
    args = ("prepare", "--source", "mnist-test", "--limit", "50")
    quiet = _cli(*args, "--output", str(tmp_path / "quiet"), timeout=300)
    loud = _cli(*args, "--output", str(tmp_path / "loud"), "--verbose", timeout=300)
    assert quiet.returncode == 0 and loud.returncode == 0, loud.stderr[-3000:]
    operator = re.compile(r"MapBatches\(encode_array_batch\)")
    assert not operator.search(quiet.stderr) and operator.search(loud.stderr), loud.stderr[-3000:]
    assert json.loads(quiet.stdout)["rows"] == json.loads(loud.stdout)["rows"] == 50
