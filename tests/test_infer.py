"""Batch inference: the predictor without Ray, then the whole job on a real local Ray."""

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from mnist_ray import cluster, infer, preprocess, runtimes, shards
from mnist_ray.errors import MnistRayError
from mnist_ray.infer import InferConfig, Predictor, prepare_rows, run

cluster.configure_process_env()


def _rows(images: list, labels=None, paths=None) -> pa.Table:
    n = len(images)
    return pa.table({"id": [f"r{i}" for i in range(n)], "image": pa.array(images, pa.binary()),
                     "label": pa.array(labels if labels is not None else [None] * n, pa.int8()),
                     "path": pa.array(paths or [None] * n, pa.string())})


def _fake_model(x: np.ndarray) -> np.ndarray:
    """Class = the brightest row band: deterministic, no TensorFlow."""
    scores = x.reshape(len(x), -1)[:, :780].reshape(len(x), 10, 78).mean(axis=2) + 1e-3
    return (scores / scores.sum(1, keepdims=True)).astype(np.float32)


def test_predictor_scores_batches_and_keeps_error_rows(mnist_test_arrays):
    images, labels = mnist_test_arrays
    encoded = preprocess.encode_png(images[:6])
    encoded[2] = b"not an image"
    batch = prepare_rows(_rows(encoded, labels=[int(v) for v in labels[:6]]))
    calls = []
    predictor = Predictor(lambda: lambda x: calls.append(len(x)) or _fake_model(x), "m-1")
    out = predictor(batch)
    assert calls == [5]  # one model call per batch, only for the rows that decoded
    assert out.num_rows == 6 and out["id"].to_pylist() == [f"r{i}" for i in range(6)]
    assert out["error"][2].as_py() == "not an image (starts with 'not an ima')"
    assert out["prediction"][2].as_py() is None and out["confidence"][2].as_py() is None
    expected = _fake_model(preprocess.normalize(images[[0, 1, 3, 4, 5]]))
    assert [out["prediction"][i].as_py() for i in (0, 1, 3, 4, 5)] == expected.argmax(1).tolist()
    probs = np.array(out["probabilities"].to_pylist())
    np.testing.assert_allclose(probs[[0, 1, 3, 4, 5]], expected, rtol=1e-6)
    assert out["label"].to_pylist() == [int(v) for v in labels[:6]]
    assert set(out["model_version"].to_pylist()) == {"m-1"}
    assert out.schema.field("probabilities").type == pa.list_(pa.float32(), 10)


def test_a_model_failure_turns_the_batch_into_error_rows(mnist_test_arrays):
    images, _ = mnist_test_arrays

    def broken(x):
        raise RuntimeError("out of memory")

    out = Predictor(lambda: broken, "m")(prepare_rows(_rows(preprocess.encode_png(images[:3]))))
    assert all("scoring failed: RuntimeError: out of memory" in e for e in out["error"].to_pylist())


def test_prepare_rows_takes_stored_pixels_and_decodes_only_the_rows_without(mnist_test_arrays):
    images, _ = mnist_test_arrays
    rows = _rows(preprocess.encode_png(images[:4]))
    # v2 shards: pixels stored for every row -> passed through untouched (no decoding at all:
    # the image column is absent).
    stored = rows.drop_columns(["image"]).append_column("pixels", shards.pixels_column(images[:4]))
    out = prepare_rows(stored)
    np.testing.assert_array_equal(shards.pixels_numpy(out["pixels"]), images[:4])
    assert out["error"].null_count == 4
    # Rows stored without pixels (prepare could not make them) are decoded from their image,
    # and one that fails again becomes an error row.
    mixed = _rows([*preprocess.encode_png(images[:2]), b"garbage"]).append_column(
        "pixels", shards.pixels_column(np.stack([images[0], images[1], images[2]]), np.array([True, False, False])))
    out = prepare_rows(mixed)
    np.testing.assert_array_equal(shards.pixels_numpy(out["pixels"])[:2], images[:2])  # row 1 decoded
    assert out["error"].to_pylist()[:2] == [None, None] and out["error"][2].as_py() == "not an image (starts with 'garbage')"
    # v1 shards (image only) decode every row, to the same pixels.
    np.testing.assert_array_equal(shards.pixels_numpy(prepare_rows(rows)["pixels"]), images[:4])


def test_config_checks():
    assert InferConfig(actors="2..4").pool() == (2, 4) and InferConfig(actors="3").pool() == (3, 3)
    for bad in ("0", "4..2", "x"):
        with pytest.raises(MnistRayError, match="--actors"):
            InferConfig(actors=bad).pool()
    with pytest.raises(MnistRayError, match="unknown runtime"):
        InferConfig(runtime="onnx").validate()


def _digest(*chunks) -> infer.IdDigest:
    digest = infer.IdDigest()
    for chunk in chunks:
        digest.add(pa.array(chunk, pa.string()))
    return digest


def test_the_id_digest_ignores_order_and_files_but_not_a_lost_or_repeated_id():
    ids = [f"test-{i:05d}" for i in range(1000)]
    whole = _digest(ids)
    assert _digest(ids[600:], ids[:600][::-1]) == whole  # other files, other order
    assert whole.rows == 1000
    infer.reconcile(whole, _digest(ids[::-1]))
    with pytest.raises(MnistRayError, match="1,000 input rows, 999 output rows"):
        infer.reconcile(whole, _digest(ids[1:]))
    # the same count, one id lost and another written twice
    with pytest.raises(MnistRayError, match="as many rows, but not the same ids"):
        infer.reconcile(whole, _digest(ids[1:] + ids[5:6]))


def test_output_files_are_digested_one_by_one_and_a_stray_file_is_caught(tmp_path):
    from mnist_ray import storage

    loc = storage.resolve(str(tmp_path))
    data = tmp_path / "run-x" / "data"
    data.mkdir(parents=True)
    rows = lambda ids, err=None: pa.table({"id": pa.array(ids, pa.string()), "path": pa.array([None] * len(ids), pa.string()),
                                           "error": pa.array([err] * len(ids), pa.string())})
    pq.write_table(rows(["a", "b"]), data / "0.parquet")
    pq.write_table(rows(["c"], "cannot decode"), data / "1.parquet")
    files, written, bad = infer._written_files(loc, "run-x")
    assert [f["rows"] for f in files] == [2, 1] and bad["id"].to_pylist() == ["c"]
    infer.reconcile(_digest(["c", "a", "b"]), written)
    pq.write_table(rows(["b"]), data / "2.parquet")  # a row written twice
    with pytest.raises(MnistRayError, match="3 input rows, 4 output rows"):
        infer.reconcile(_digest(["c", "a", "b"]), infer._written_files(loc, "run-x")[1])


def test_pool_resources_never_take_every_cpu_and_fall_back_to_cpu(monkeypatch):
    import ray

    monkeypatch.setattr(ray, "cluster_resources", lambda: {"CPU": 2.0})
    assert infer._pool_resources(InferConfig()) == (1, 1, 0.0, 1.0)  # the default leaves a CPU to read
    # Resuming: Ray's checkpoint filter actor takes a CPU, so the predictor reserves less.
    assert infer._pool_resources(InferConfig(), resuming=True) == (1, 1, 0.0, 0.5)
    with pytest.raises(MnistRayError, match="starve"):
        infer._pool_resources(InferConfig(actors="2"))
    assert infer._pool_resources(InferConfig(gpus_per_actor=0.5))[2] == 0.0  # no GPU: runs on CPU
    with pytest.raises(MnistRayError, match="no GPU"):
        infer._pool_resources(InferConfig(gpus_per_actor=1, require_gpu=True))
    # A cluster scaled to zero (autoscaling from a CPU-0 head): the flags stand, GPUs may come.
    monkeypatch.setattr(ray, "cluster_resources", lambda: {"memory": 1e9})
    assert infer._pool_resources(InferConfig(actors="1..8", gpus_per_actor=1)) == (1, 8, 1, 0.5)
    monkeypatch.setattr(ray, "cluster_resources", lambda: {"CPU": 2.0, "GPU": 1.0})
    assert infer._pool_resources(InferConfig(actors="2", gpus_per_actor=0.5)) == (2, 2, 0.5, 0.5)


# --- the whole job ---------------------------------------------------------------------------


def _predictions(uri: str) -> pa.Table:
    return infer.read_predictions(uri)


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
    proc = subprocess.Popen([sys.executable, "-m", "mnist_ray.cli", "infer", *args],
                            env={**os.environ, "RAY_ADDRESS": ""}, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 180
        while not [p for p in out.glob("run-*/checkpoint/*.parquet") if ".pending." not in p.name]:
            assert proc.poll() is None, "infer ended before it could be killed"
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
    from mnist_ray import storage

    loc = storage.resolve(str(tmp_path))
    base = infer.work_dir(loc, {"fingerprint": "sha256:a"}, "m-1", "tf")
    assert base == infer.work_dir(loc, {"fingerprint": "sha256:a"}, "m-1", "tf")  # a rerun resumes
    assert base.startswith("run-") and len({
        base, infer.work_dir(loc, {"fingerprint": "sha256:b"}, "m-1", "tf"),
        infer.work_dir(loc, {"fingerprint": "sha256:a"}, "m-2", "tf"),
        infer.work_dir(loc, {"fingerprint": "sha256:a"}, "m-1", "tflite-int8")}) == 4
    storage.publish(loc, {"run_id": base[4:], "files": [], "fingerprint": "x"}, run_id=base[4:])
    # --overwrite of a published run: the new work never lands in the published run's directory.
    assert infer.work_dir(loc, {"fingerprint": "sha256:a"}, "m-1", "tf") != base


def test_the_resume_filter_matches_files_by_uri(ray_local, tmp_path):
    """Raw files are checkpointed by the URI written (s3://b/k); Ray's read yields b/k."""
    import ray

    from mnist_ray import storage

    source = {"resume_key": "path", "scheme": "s3://"}
    config = infer._checkpoint_config(storage.resolve(str(tmp_path)), "run-0", source)
    done = ray.put(np.array(["s3://b/x/1.png", "s3://b/x/3.png"], dtype=object))
    keep = config.checkpoint_filter_cls(config, done).filter_rows_for_block(
        pa.table({"path": ["b/x/1.png", "b/x/2.png", "b/x/3.png"], "bytes": [b"1", b"2", b"3"]}))
    assert keep["path"].to_pylist() == ["b/x/2.png"] and keep["bytes"].to_pylist() == [b"2"]
    # Local files: the written path is the reader's path, Ray's own comparison applies.
    local = infer._checkpoint_config(storage.resolve(str(tmp_path)), "run-0", {**source, "scheme": ""})
    keep = local.checkpoint_filter_cls(local, ray.put(np.array(["/d/1.png"], dtype=object))).filter_rows_for_block(
        pa.table({"path": ["/d/1.png", "/d/2.png"]}))
    assert keep["path"].to_pylist() == ["/d/2.png"]


def _scored_some(process) -> bool:
    """The actor has been busy for a moment (its model is loaded and batches are flowing)."""
    try:
        return process.cpu_times().user > 3.0
    except Exception:  # noqa: BLE001 - it may be gone already
        return False


GPU_SCRIPT = """
import json, sys
import ray
from mnist_ray import cluster
from mnist_ray.infer import InferConfig, run

# A CPU-only machine that declares one GPU: the scheduling side of the GPU path, for real.
ray.init(address="local", num_cpus=2, num_gpus=1, include_dashboard=False,
         _node_ip_address="127.0.0.1", runtime_env=cluster.runtime_env())
summary = run(InferConfig(model=sys.argv[1], input=sys.argv[2], output=sys.argv[3],
                          actors="2", gpus_per_actor=0.5, require_gpu=True, batch_size=256))
print("SUMMARY " + json.dumps(summary))
"""


@pytest.mark.e2e
def test_gpu_actors_are_placed_on_a_declared_gpu(trained_model, small_shards, tmp_path):
    import os
    import subprocess
    import sys

    model_dir, _ = trained_model
    out = tmp_path / "preds"
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    proc = subprocess.run([sys.executable, "-c", GPU_SCRIPT, model_dir, small_shards, str(out)],
                          capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads(next(line for line in proc.stdout.splitlines() if line.startswith("SUMMARY "))[8:])
    # Two actors at 0.5 GPU each share the one GPU; on CPU-only hardware they run the model on CPU.
    assert summary["gpus_per_actor"] == 0.5 and summary["actors"] == "2..2"
    assert summary["rows"] == shards.read_table(small_shards).num_rows and summary["errors"] == 0
    assert (out / "_SUCCESS").exists()


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
