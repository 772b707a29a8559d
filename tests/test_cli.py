"""The command line: help, flags from the config, and bad input as one line, fast, exit 1."""

import subprocess
import sys
import time

import pytest

from mnist_ray import cli, config
from mnist_ray.plumbing import storage
from mnist_ray.preparation.prepare import PrepareConfig


def _run(*args, env=None, timeout=60):
    started = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "mnist_ray.cli", *args], capture_output=True,
                          text=True, env=env, timeout=timeout)
    return proc, time.monotonic() - started


def test_help_lists_the_subcommands_without_importing_them():
    proc, _ = _run("--help")
    assert proc.returncode == 0 and "prepare" in proc.stdout
    proc, _ = _run("prepare", "--help")
    assert proc.returncode == 0 and "--rows-per-shard" in proc.stdout and "--preset" in proc.stdout


def test_flags_and_presets_build_the_config():
    parser, _, cls = cli.command_parser("prepare")
    cfg = config.from_args(cls, parser.parse_args(["--preset", "smoke", "--limit", "7", "--overwrite"]))
    assert cfg == PrepareConfig(limit=7, rows_per_shard=400, overwrite=True)
    assert config.from_args(cls, parser.parse_args([])) == PrepareConfig()
    with pytest.raises(SystemExit):
        parser.parse_args(["--no-such-flag", "1"])


def _assert_user_error(proc, elapsed, *needles):
    assert proc.returncode == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    errors = [line for line in proc.stderr.splitlines() if "error:" in line]
    assert len(errors) == 1, proc.stderr
    for needle in needles:
        assert needle in errors[0]
    assert elapsed < 20  # fails before any Ray work starts


def test_bad_input_fails_fast_with_one_line(tmp_path, mnist_idx_dir):
    out = str(tmp_path / "out")
    _assert_user_error(*_run("prepare", "--source", "cifar10", "--output", out), "unknown source", "mnist-sample")
    _assert_user_error(*_run("prepare", "--source", f"idx:{tmp_path}/nowhere", "--output", out), "no folder")
    _assert_user_error(*_run("prepare", "--source", f"idx:{tmp_path}", "--output", out), "no complete pair")
    (tmp_path / "empty").mkdir()
    _assert_user_error(*_run("prepare", "--source", f"images:{tmp_path}/empty", "--output", out), "no image files")
    _assert_user_error(*_run("prepare", "--source", f"idx:{mnist_idx_dir}", "--output", "/proc/mnist-ray"),
                       "/proc/mnist-ray")
    loc = storage.prepare_output(out, overwrite=False, run_id="abc")
    storage.write_bytes(loc, "part-abc-0.parquet", b"x")
    storage.publish(loc, {"kind": "image-shards", "files": [{"path": "part-abc-0.parquet"}],
                          "fingerprint": "f"}, run_id="abc")
    _assert_user_error(*_run("prepare", "--output", out), "--overwrite")
    proc, _ = _run("prepare", "--no-such-flag")
    assert proc.returncode == 2 and "unrecognized arguments" in proc.stderr


def test_missing_bucket_fails_fast(s3_server):
    import os

    proc, elapsed = _run("prepare", "--output", "s3://no-such-bucket/shards", env=dict(os.environ))
    _assert_user_error(proc, elapsed, "bucket 'no-such-bucket' does not exist")


def test_the_job_entrypoint_takes_the_same_flags():
    from pathlib import Path

    job = Path(__file__).resolve().parents[1] / "jobs" / "prepare.py"
    proc = subprocess.run([sys.executable, str(job), "--help"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and "--rows-per-shard" in proc.stdout
