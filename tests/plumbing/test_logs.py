"""Run logs: what reaches the console, what the log file keeps, and where the file goes."""

import json
import os
import subprocess
import sys
import textwrap

import pytest

from mnist_ray.plumbing import logs, storage
from mnist_ray.errors import MnistRayError


def _run(code: str, env=None):
    """A fresh interpreter (run_log repoints file descriptors 1 and 2: not inside pytest's capture)."""
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                          timeout=120, env={**os.environ, **(env or {})})


SCRIPT = """
    import logging, os, sys, warnings
    from mnist_ray.plumbing import logs
    logging.basicConfig(level=logging.WARNING)
    logging.getLogger("mnist_ray").setLevel(logging.INFO)
    out = sys.argv[1] if len(sys.argv) > 1 else {out!r}
    os.makedirs(out, exist_ok=True)
    with logs.run_log("demo", out):
        logging.getLogger("mnist_ray.demo").info("stage one done")
        logging.getLogger("mnist_ray.demo").warning("act on this")
        logging.getLogger("ray.data").warning("a library's own warning")
        print("a library's print")
        os.write(2, b"C++ banner on fd 2\\n")
        print(logs.current_log(), file=sys.__stderr__)
"""


def test_quiet_console_gets_ours_and_the_log_file_gets_everything(tmp_path):
    proc = _run(SCRIPT.format(out=str(tmp_path / "out")))
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == ""
    console = proc.stderr.splitlines()
    assert "mnist-ray: stage one done" in console and "mnist-ray: warning: act on this" in console
    assert not [line for line in console if "library" in line or "banner" in line]
    (log,) = (tmp_path / "out" / storage.LOGS_DIR).iterdir()
    text = log.read_text()
    for needle in ("stage one done", "act on this", "a library's own warning", "a library's print",
                   "C++ banner on fd 2"):
        assert needle in text, needle


def test_verbose_leaves_the_libraries_on_the_console(tmp_path):
    proc = _run(SCRIPT.format(out=str(tmp_path / "out")), env={logs.VERBOSE_ENV: "1"})
    assert proc.returncode == 0, proc.stderr
    assert "a library's print" in proc.stdout and "C++ banner on fd 2" in proc.stderr
    assert len(list((tmp_path / "out" / storage.LOGS_DIR).iterdir())) == 1


def test_a_failure_keeps_the_log_with_its_traceback_and_a_refused_command_leaves_none(tmp_path):
    proc = _run(f"""
        from mnist_ray.plumbing import logs
        import os
        os.makedirs({str(tmp_path / 'out')!r})
        with logs.run_log("demo", {str(tmp_path / 'out')!r}):
            raise RuntimeError("boom")
    """)
    assert proc.returncode == 1 and "boom" in proc.stderr  # the traceback reaches the console
    (log,) = (tmp_path / "out" / storage.LOGS_DIR).iterdir()
    assert "RuntimeError: boom" in log.read_text()

    proc = _run(f"""
        from mnist_ray.plumbing import logs
        from mnist_ray.errors import MnistRayError
        try:
            with logs.run_log("demo", {str(tmp_path / 'never')!r}):
                raise MnistRayError("bad flag")
        except MnistRayError:
            pass
    """)
    assert proc.returncode == 0 and proc.stderr == "" and not (tmp_path / "never").exists()


def test_an_output_with_only_logs_belongs_to_its_writer(tmp_path):
    (tmp_path / "model" / storage.LOGS_DIR).mkdir(parents=True)
    (tmp_path / "model" / storage.LOGS_DIR / "train-1.log").write_text("a failed first run")
    storage.prepare_directory_output(str(tmp_path / "model"), overwrite=False, marker="metadata.json",
                                     what="model dir")
    (tmp_path / "shards" / storage.LOGS_DIR).mkdir(parents=True)
    loc = storage.prepare_output(str(tmp_path / "shards"), overwrite=False, run_id="abc")
    storage.write_bytes(loc, "part-abc-0.parquet", b"x")
    storage.publish(loc, {"files": [{"path": "part-abc-0.parquet"}], "fingerprint": "f"}, run_id="abc")
    assert (tmp_path / "shards" / storage.LOGS_DIR).is_dir()  # publishing keeps it
    with pytest.raises(MnistRayError, match="not empty and not a model dir"):
        (tmp_path / "other").mkdir()
        (tmp_path / "other" / "notes.txt").write_text("someone else's")
        storage.prepare_directory_output(str(tmp_path / "other"), overwrite=True, marker="metadata.json",
                                         what="model dir")


def test_the_summary_is_json_with_one_key_per_line():
    summary = {"output": "out/x", "stages": [{"stage": "train", "seconds": 1.5}], "test_accuracy": 0.92}
    text = logs.format_summary(summary)
    assert json.loads(text) == summary and len(text.splitlines()) == len(summary) + 2


def test_progress_lines_give_rate_and_eta():
    beat = logs._Heartbeat("pipeline: train", lambda: (1, 4, "epoch"))
    beat.started -= 30
    line = beat.line()
    assert line.startswith("pipeline: train 1/4 epochs, 30 s, 30 s/epoch, ETA 1m30s"), line
    assert logs._Heartbeat("pipeline: infer", None).line().startswith("pipeline: infer running, ")


def test_on_object_storage_the_log_is_uploaded_into_the_output(s3_bucket):
    import boto3

    s3 = boto3.client("s3", endpoint_url=os.environ["AWS_ENDPOINT_URL"])
    s3.put_object(Bucket=s3_bucket, Key="out/_SUCCESS", Body=b"")  # an output the command wrote
    proc = _run(f"""
        import logging
        from mnist_ray.plumbing import logs
        logging.getLogger("mnist_ray").setLevel(logging.INFO)
        with logs.run_log("demo", "s3://{s3_bucket}/out"):
            logging.getLogger("mnist_ray.demo").info("uploaded at the end")
    """)
    assert proc.returncode == 0, proc.stderr
    keys = [o["Key"] for o in s3.list_objects_v2(Bucket=s3_bucket, Prefix="out/_logs/")["Contents"]]
    assert len(keys) == 1 and keys[0].startswith("out/_logs/demo-")
    assert b"uploaded at the end" in s3.get_object(Bucket=s3_bucket, Key=keys[0])["Body"].read()


def test_a_step_with_its_own_progress_lines_gets_no_heartbeat(monkeypatch):
    monkeypatch.setattr(logs, "PROGRESS_EVERY_S", 0.01)
    lines = []
    monkeypatch.setattr(logs.log, "info", lambda fmt, *args: lines.append(fmt % args))
    with logs.stage("pipeline: infer", lines=False):
        import time

        time.sleep(0.2)
    assert lines == []
    with logs.stage("pipeline: train"):
        time.sleep(0.2)
    assert lines and lines[0].startswith("pipeline: train running")


def test_an_output_that_is_one_file_keeps_its_log_in_its_folder(tmp_path):
    report = tmp_path / "reports" / "robustness.json"
    code = f"""
        import os
        from mnist_ray.plumbing import logs
        os.makedirs({str(report.parent)!r}, exist_ok=True)
        with logs.run_log("robustness", {str(report)!r}):
            open({str(report)!r}, "w").write("{{}}")
            print("in the log")
        print(logs.current_log())
    """
    proc = _run(code)
    assert proc.returncode == 0, proc.stderr
    (log,) = (report.parent / storage.LOGS_DIR).iterdir()
    assert "in the log" in log.read_text() and report.read_text() == "{}"
    assert logs.log_uri("s3://bucket/preds/", "infer").startswith("s3://bucket/preds/_logs/infer-")
