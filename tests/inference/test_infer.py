"""The inference job: reconciliation and work dirs without Ray, then the whole job on a real local Ray."""

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from mnist_ray.formats import predictions, shards
from mnist_ray.images import preprocess
from mnist_ray.inference import infer
from mnist_ray.model import runtimes
from mnist_ray.plumbing import cluster
from mnist_ray.errors import MnistRayError
from mnist_ray.inference.infer import InferConfig, run

cluster.configure_process_env()


def _digest(*chunks) -> shards.IdDigest:
    digest = shards.IdDigest()
    for chunk in chunks:
        digest.add(pa.array(chunk, pa.string()))
    return digest


def test_output_files_are_digested_one_by_one_and_a_stray_file_is_caught(tmp_path):
    from mnist_ray.plumbing import storage

    loc = storage.resolve(str(tmp_path))
    data = tmp_path / "run-x" / "data"
    data.mkdir(parents=True)
    rows = lambda ids, err=None: pa.table({"id": pa.array(ids, pa.string()), "path": pa.array([None] * len(ids), pa.string()),
                                           "error": pa.array([err] * len(ids), pa.string())})
    pq.write_table(rows(["a", "b"]), data / "0.parquet")
    pq.write_table(rows(["c"], "cannot decode"), data / "1.parquet")
    files, written, bad = infer.written_files(loc, "run-x")
    assert [f["rows"] for f in files] == [2, 1] and bad["id"].to_pylist() == ["c"]
    infer.reconcile(_digest(["c", "a", "b"]), written)
    pq.write_table(rows(["b"]), data / "2.parquet")  # a row written twice
    with pytest.raises(MnistRayError, match="3 input rows, 4 output rows"):
        infer.reconcile(_digest(["c", "a", "b"]), infer.written_files(loc, "run-x")[1])


# --- the whole job ---------------------------------------------------------------------------


def _predictions(uri: str) -> pa.Table:
    return predictions.read_predictions(uri)


@pytest.mark.e2e
def test_infer_on_shards_equals_in_process_predictions(trained_model, small_shards, tmp_path):
    model_dir, _ = trained_model
    out = str(tmp_path / "preds")
    summary = run(InferConfig(model=model_dir, input=small_shards, output=out, batch_size=128))
    table = _predictions(out).sort_by("id")
    source = shards.read_table(small_shards).sort_by("id")
    assert summary["rows"] == table.num_rows == source.num_rows and summary["errors"] == 0
    assert table["id"].equals(source["id"])
    assert table["label"].to_pylist() == source["label"].to_pylist()
    pixels, _ = preprocess.prepare_batch(source["image"].to_pylist())
    expected = runtimes.predict_batched(runtimes.load(model_dir, "tf"), pixels).argmax(1)
    assert (table["prediction"].to_numpy() == expected).mean() > 0.999
    manifest = json.loads((Path(out) / "_manifest.json").read_text())
    assert manifest["kind"] == "predictions" and manifest["rows"] == source.num_rows
    assert manifest["model"]["version"] == json.loads((Path(model_dir) / "metadata.json").read_text())["version"]
    assert manifest["input"]["fingerprint"].startswith("sha256:") and manifest["images_per_s"] > 0
    with pytest.raises(MnistRayError, match="--overwrite"):
        run(InferConfig(model=model_dir, input=small_shards, output=out))


@pytest.mark.e2e
def test_raw_image_files_with_corrupt_ones_and_the_error_rate_limit(trained_model, digit_folder, tmp_path):
    model_dir, _ = trained_model
    root, good = digit_folder
    out = str(tmp_path / "preds")
    summary = run(InferConfig(model=model_dir, input=str(root), output=out, runtime="tflite-int8",
                              max_error_rate=0.1))
    table = _predictions(out)
    assert summary["rows"] == table.num_rows == len(good) + 2 and summary["errors"] == 2
    errors = {i: e for i, e in zip(table["id"].to_pylist(), table["error"].to_pylist()) if e}
    assert set(errors) == {"3/broken.png", "5/truncated.jpg"}
    labels = dict(zip(table["id"].to_pylist(), table["label"].to_pylist()))
    assert all(labels[k] == v for k, v in good.items())
    manifest = json.loads((Path(out) / "_manifest.json").read_text())
    assert sorted(q["id"] for q in manifest["quarantine"]) == ["3/broken.png", "5/truncated.jpg"]
    strict = tmp_path / "strict"
    with pytest.raises(MnistRayError, match="could not be scored"):
        run(InferConfig(model=model_dir, input=str(root), output=str(strict), max_error_rate=0.01))
    assert not (strict / "_SUCCESS").exists()


@pytest.mark.e2e
def test_raw_image_files_on_s3(trained_model, digit_folder, s3_bucket):
    import boto3

    model_dir, _ = trained_model
    root, good = digit_folder
    s3 = boto3.client("s3")
    for rel in list(good)[:12]:
        s3.upload_file(str(root / rel), s3_bucket, f"photos/{rel}")
    out = f"s3://{s3_bucket}/predictions"
    summary = run(InferConfig(model=model_dir, input=f"s3://{s3_bucket}/photos", output=out))
    table = _predictions(out)
    assert summary["rows"] == table.num_rows == 12 and summary["errors"] == 0
    assert all(p.startswith(f"s3://{s3_bucket}/photos/") for p in table["path"].to_pylist())


@pytest.mark.e2e
def test_a_broken_model_dir_fails_before_the_pool_starts(trained_model, small_shards, tmp_path):
    import shutil

    model_dir, _ = trained_model
    with pytest.raises(MnistRayError, match="no model dir"):
        run(InferConfig(model=str(tmp_path / "nothing"), input=small_shards, output=str(tmp_path / "p")))
    broken = tmp_path / "broken"
    shutil.copytree(model_dir, broken)
    (broken / "tflite" / "int8.tflite").unlink()
    with pytest.raises(MnistRayError, match="no tflite-int8 variant"):
        run(InferConfig(model=str(broken), input=small_shards, output=str(tmp_path / "p"), runtime="tflite-int8"))
    assert not (tmp_path / "p").exists()


@pytest.mark.e2e
def test_a_killed_actor_still_gives_complete_output_without_duplicates(trained_model, small_shards, tmp_path):
    import os
    import signal
    import threading
    import time

    import psutil

    model_dir, _ = trained_model
    out = str(tmp_path / "preds")
    result: dict = {}
    errors: list = []

    def target():
        try:
            result.update(run(InferConfig(model=model_dir, input=small_shards, output=out, batch_size=16)))
        except Exception as e:  # noqa: BLE001 - reported by the assertion below
            errors.append(e)

    thread = threading.Thread(target=target)
    thread.start()
    deadline, killed = time.monotonic() + 120, None
    while killed is None and thread.is_alive() and time.monotonic() < deadline:
        actors = [p for p in psutil.process_iter(["cmdline"])
                  if p.info["cmdline"] and p.info["cmdline"][0].startswith("ray::MapWorker")]
        if actors and not list(tmp_path.glob("preds/run-*/data/*")) and _scored_some(actors[0]):
            killed = actors[0].pid
            os.kill(killed, signal.SIGKILL)
        time.sleep(0.05)
    thread.join(timeout=300)
    assert killed, "the predictor actor was never seen running"
    assert not errors, errors
    table = _predictions(out)
    assert result["rows"] == table.num_rows == shards.read_table(small_shards).num_rows
    assert len(set(table["id"].to_pylist())) == table.num_rows


@pytest.mark.e2e
def test_an_interrupted_job_resumes_and_never_reuses_another_jobs_work(trained_model, small_shards, tmp_path):
    import os
    import signal
    import subprocess
    import sys
    import time

    model_dir, _ = trained_model
    out = tmp_path / "preds"
    args = ["--model", model_dir, "--input", small_shards, "--output", str(out),
            "--batch-size", "50", "--rows-per-file", "100"]
    console = open(tmp_path / "console.txt", "w+")
    proc = subprocess.Popen([sys.executable, "-m", "mnist_ray.cli", "infer", *args],
                            env={**os.environ, "RAY_ADDRESS": ""}, start_new_session=True,
                            stdout=console, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 180
        while not [p for p in out.glob("run-*/checkpoint/*.parquet") if ".pending." not in p.name]:
            assert proc.poll() is None, "infer ended before it could be killed: " + \
                (tmp_path / "console.txt").read_text()[-2000:]
            assert time.monotonic() < deadline, "infer never committed a checkpoint"
            time.sleep(0.02)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the driver and the Ray it started, mid-run
        proc.wait()
    assert not (out / "_SUCCESS").exists()
    total = shards.read_table(small_shards).num_rows

    # The same command again: only the remaining rows are scored, each input exactly once.
    summary = run(InferConfig(model=model_dir, input=small_shards, output=str(out),
                              batch_size=50, rows_per_file=100))
    table = _predictions(str(out))
    assert 0 < summary["resumed_rows"] < total and summary["scored_rows"] == total - summary["resumed_rows"]
    assert table.num_rows == total == len(set(table["id"].to_pylist()))
    assert sorted(table["id"].to_pylist()) == sorted(shards.read_table(small_shards)["id"].to_pylist())
    assert len(list(out.glob("run-*"))) == 1 and not list(out.glob("run-*/checkpoint"))

    # Another runtime (another model, another input) never picks up this job's work.
    other = run(InferConfig(model=model_dir, input=small_shards, output=str(out), runtime="tflite-fp32",
                            overwrite=True))
    assert other["resumed_rows"] == 0 and other["scored_rows"] == total
    assert _predictions(str(out)).num_rows == total and len(list(out.glob("run-*"))) == 1


def test_work_dirs_differ_by_input_model_runtime_and_the_run_they_replace(tmp_path):
    from mnist_ray.plumbing import storage

    loc = storage.resolve(str(tmp_path))
    base = infer.work_dir(loc, "sha256:a", "m-1", "tf")
    assert base == infer.work_dir(loc, "sha256:a", "m-1", "tf")  # a rerun resumes
    assert base.startswith("run-") and len({
        base, infer.work_dir(loc, "sha256:b", "m-1", "tf"),
        infer.work_dir(loc, "sha256:a", "m-2", "tf"),
        infer.work_dir(loc, "sha256:a", "m-1", "tflite-int8")}) == 4
    storage.publish(loc, {"run_id": base[4:], "files": [], "fingerprint": "x"}, run_id=base[4:])
    # --overwrite of a published run: the new work never lands in the published run's directory.
    assert infer.work_dir(loc, "sha256:a", "m-1", "tf") != base


def _scored_some(process) -> bool:
    """The actor has been busy for a moment (its model is loaded and batches are flowing)."""
    try:
        return process.cpu_times().user > 3.0
    except Exception:  # noqa: BLE001 - it may be gone already
        return False


GPU_SCRIPT = """
import json, sys
import ray
from mnist_ray.plumbing import cluster
from mnist_ray.inference.infer import InferConfig, run

# A CPU-only machine that declares one GPU: the scheduling side of the GPU path, for real.
ray.init(address="local", num_cpus=2, num_gpus=1, include_dashboard=False,
         _node_ip_address="127.0.0.1", runtime_env=cluster.runtime_env())
summary = run(InferConfig(model=sys.argv[1], input=sys.argv[2], output=sys.argv[3],
                          actors="2", gpus_per_actor=0.5, require_gpu=True, batch_size=256))
print("SUMMARY " + json.dumps(summary))
"""


@pytest.mark.e2e
def test_gpu_actors_on_a_gpu_tensorflow_cannot_see_fail_in_words(trained_model, small_shards, tmp_path):
    """Ray places the actors on the declared GPU; TensorFlow on this CPU-only machine sees none,
    so the job must fail with that sentence (and publish nothing), not score on the CPU."""
    import os
    import subprocess
    import sys

    model_dir, _ = trained_model
    out = tmp_path / "preds"
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    proc = subprocess.run([sys.executable, "-c", GPU_SCRIPT, model_dir, small_shards, str(out)],
                          capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode != 0 and "SUMMARY " not in proc.stdout
    # One sentence, the project's error (the CLI prints it on one line), not Ray's actor traceback.
    assert ("MnistRayError: the predictor actors failed: Ray gave this process a GPU (CUDA_VISIBLE_DEVICES='0') "
            "but TensorFlow") in proc.stderr, proc.stderr[-3000:]
    assert "mnist-ray[gpu]" in proc.stderr
    assert not (out / "_SUCCESS").exists()


@pytest.mark.e2e
def test_shards_without_pixels_schema_1_give_the_same_predictions(trained_model, small_shards, tmp_path):
    """Readers accept both shard schemas: a v1 copy (image only) is decoded on the fly."""
    import shutil

    model_dir, _ = trained_model
    v1 = tmp_path / "v1"
    shutil.copytree(small_shards, v1)
    manifest = json.loads((v1 / "_manifest.json").read_text())
    manifest["schema_version"] = 1
    manifest.pop("pixels_missing")
    (v1 / "_manifest.json").write_text(json.dumps(manifest))
    for f in manifest["files"]:
        pq.write_table(pq.read_table(v1 / f["path"]).drop_columns(["pixels"]), v1 / f["path"])
    run(InferConfig(model=model_dir, input=str(v1), output=str(tmp_path / "p1")))
    run(InferConfig(model=model_dir, input=small_shards, output=str(tmp_path / "p2")))
    a, b = _predictions(str(tmp_path / "p1")).sort_by("id"), _predictions(str(tmp_path / "p2")).sort_by("id")
    assert a.num_rows == b.num_rows > 0 and a["id"].equals(b["id"])
    assert a["prediction"].equals(b["prediction"])
    np.testing.assert_allclose(np.array(a["probabilities"].to_pylist()), np.array(b["probabilities"].to_pylist()),
                               atol=1e-6)


@pytest.mark.e2e
def test_runtime_auto_is_planned_once_and_recorded(trained_model, small_shards, tmp_path):
    """The default runtime: tf for this small model dir (its agreement was measured on fewer
    than 5,000 images); the full-integer model once the model dir records enough agreement."""
    import shutil

    model_dir, _ = trained_model
    summary = run(InferConfig(model=model_dir, input=small_shards, output=str(tmp_path / "p1")))
    assert summary["runtime"] == "tf" and "fewer than 5,000" in summary["runtime_reason"]
    agreeing = tmp_path / "agreeing"
    shutil.copytree(model_dir, agreeing)
    metadata = json.loads((agreeing / "metadata.json").read_text())
    metadata["agreement"].update(images=5000, top1={**metadata["agreement"]["top1"], "tflite-int8": 0.998})
    (agreeing / "metadata.json").write_text(json.dumps(metadata))
    out = tmp_path / "p2"
    summary = run(InferConfig(model=str(agreeing), input=small_shards, output=str(out)))
    assert summary["runtime"] == "tflite-int8" and "99.80%" in summary["runtime_reason"]
    assert summary["batch_size"] == 1024 and summary["errors"] == 0
    manifest = json.loads((out / "_manifest.json").read_text())
    assert manifest["plan"]["runtime"] == manifest["model"]["runtime"] == "tflite-int8"
    assert manifest["plan"]["batch_size"] == 1024 and manifest["plan"]["runtime_reason"] == summary["runtime_reason"]
    assert manifest["config"]["runtime"] == "auto"
