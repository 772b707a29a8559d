"""The one-command pipeline on a real local Ray: runs everything once, then only what changed."""

import json
import shutil
from pathlib import Path

import pytest

from mnist_ray.pipeline import PipelineConfig, run


@pytest.mark.e2e
def test_pipeline_runs_every_stage_then_skips_what_is_current(ray_local, tmp_path):
    cfg = PipelineConfig(output=str(tmp_path / "p"), limit=100, model="cnn", epochs=1, batch_size=32,
                         workers=1)
    first = run(cfg)
    assert first["ran"] == ["prepare", "train", "infer", "evaluate"]
    metrics = json.loads((tmp_path / "p" / "report" / "metrics.json").read_text())
    assert metrics["rows"] == 200 and metrics["error_rows"] == 0  # 100 train + 100 val digits
    assert set(metrics["accuracy_by_split"]) == {"train", "val"} and 0 < first["accuracy"] <= 1

    second = run(cfg)
    assert second["ran"] == [] and second["model_version"] == first["model_version"]
    assert [s["status"] for s in second["stages"]] == ["skipped"] * 4

    # A lost stage output: that stage and the ones after it run, nothing before it.
    shutil.rmtree(tmp_path / "p" / "predictions")
    third = run(cfg)
    assert third["ran"] == ["infer", "evaluate"] and third["accuracy"] == first["accuracy"]

    # Other settings (another runtime) make infer and evaluate stale, not training.
    fourth = run(PipelineConfig(**{**cfg.__dict__, "runtime": "tflite-int8"}))
    assert fourth["ran"] == ["infer", "evaluate"]
    assert json.loads((Path(cfg.output) / "predictions" / "_manifest.json").read_text())["model"]["runtime"] \
        == "tflite-int8"
