"""The benchmark: its data builder, its checks, and a whole `--quick` run (CI keeps it from rotting).

Figures are printed and written, never asserted against targets: these tests only check that
every part completes with complete rows and sane (positive) numbers.
"""

import json
import subprocess
import sys

import numpy as np
import pytest

from mnist_ray.bench import work
from mnist_ray.formats import shards
from mnist_ray.bench.bench import BenchConfig
from mnist_ray.errors import MnistRayError


def test_replicated_shards_have_exactly_n_unique_rows_of_the_seed(small_shards, tmp_path):
    seed = shards.read_table(small_shards)
    n = 2 * seed.num_rows + 123
    manifest = work.replicate_shards(seed, str(tmp_path / "n"), n, rows_per_file=700)
    table = shards.read_table(str(tmp_path / "n"))
    assert manifest["rows"] == table.num_rows == n and len(manifest["files"]) == -(-n // 700)
    ids = table["id"].to_pylist()
    assert len(set(ids)) == n and ids[seed.num_rows] == "c0001-" + seed["id"][0].as_py()
    # Row k is seed row k mod |seed|, pixels and labels included.
    k = np.arange(n) % seed.num_rows
    np.testing.assert_array_equal(shards.pixels_numpy(table["pixels"]), shards.pixels_numpy(seed["pixels"])[k])
    np.testing.assert_array_equal(table["label"].to_numpy(), seed["label"].to_numpy()[k])
    assert sum(s["rows"] for s in manifest["splits"].values()) == n and manifest["pixels_missing"] == 0


def test_bad_settings_are_clear_errors():
    for bad, match in [(dict(models="mlp,resnet"), "unknown model"), (dict(runtimes="tf,onnx"), "unknown runtime"),
                       (dict(parts="micro,gpu"), "--parts"), (dict(sizes="1e6"), "--sizes"),
                       (dict(train_epochs=1), "train-epochs")]:
        with pytest.raises(MnistRayError, match=match):
            BenchConfig(**bad).resolved().validate()


@pytest.mark.e2e
def test_quick_bench_completes_with_sane_figures(tmp_path):
    out = tmp_path / "bench"
    proc = subprocess.run([sys.executable, "-m", "mnist_ray.cli", "bench", "--quick", "--output", str(out)],
                          capture_output=True, text=True, timeout=1500)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((out / "bench.json").read_text())
    assert set(report["models"]) == {"mlp", "cnn"}
    for name, entry in report["models"].items():
        micro = entry["micro"]
        assert micro["naive_images_per_s"] > 0 and micro["ceiling_images_per_s"] > 0
        assert set(micro["forward_images_per_s"]) == {"tf", "tflite-int8"}
        assert [(j["runtime"], j["n"]) for j in entry["jobs"]] == [("tf", 4000), ("tflite-int8", 4000)]
        for job in entry["jobs"]:
            assert job["images_per_s"] > 0 and job["ray_startup_seconds"] > 0
            assert job["driver_uss_peak_mb"] > 0 and job["worker_uss_peak_mb"] > 0 and job["worker_processes"] >= 1
            assert job["worker_rss_peak_mb"] >= job["worker_uss_peak_mb"]
            assert job["c_over_b"] == pytest.approx(job["images_per_s"] / micro["ceiling_images_per_s"], rel=0.01)
            assert 0.5 < job["accuracy"] <= 1.0  # two quick epochs on 4,500 digits: far above chance
    runs = report["training"]["runs"]  # each Ray Train run against a plain fit of its own recipe
    assert [(r["model"], r.get("layout", "plain fit")[:8]) for r in runs] == [
        ("cnn", "plain fi"), ("cnn", "1 worker"), ("cnn", "2 worker"), ("default", "plain fi"), ("default", "1 worker")]
    assert all(r["images_per_s"] > 0 and r["vs_plain_fit"] > 0 for r in runs)
    assert all(0 < r["beyond_epochs_seconds"] < r["wall_seconds"] for r in runs if "layout" in r)
    for which in ("cold", "warm"):  # jobs submitted to a running head with `ray job submit`
        row = report["submit"][which]
        assert row["rows"] == 10_000 and row["first_prediction_after_submit_s"] > 0
        assert len(row["parts"]) == 10 and all(v >= 0 for v in row["parts"].values())
        assert row["done_after_submit_s"] > row["first_prediction_after_submit_s"]
    resumed = report["resume"]  # killed with SIGKILL partway, then the same command: every row once
    assert resumed["n"] == 50_000 and 0 < resumed["killed_at_rows"] <= resumed["resumed_rows"] < 50_000
    assert resumed["resumed_rows"] + resumed["scored_rows"] == 50_000 and resumed["worker_uss_peak_mb"] > 0
    text = (out / "bench.md").read_text()
    assert "(c) the whole `mnist-ray infer` command" in text and "training throughput" in text
    assert "fixed cost of a submitted job" in text and "a resumed run" in text
