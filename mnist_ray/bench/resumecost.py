"""What resuming costs: a run killed partway, then the same command again (`bench --parts resume`).

    mnist-ray infer N images --kill -9 (the driver and its local Ray) once a share of the rows
      is checkpointed--> mnist-ray infer, the same command --> the summary's resumed rows,
      the memory peaks of the rerun, and the output checked row by row against the input

Ray Data's checkpoint filter holds every checkpointed id in memory while the rerun reads the
input (``inference.checkpoint.hashed_checkpoint_classes`` keeps them as 8-byte hashes): the peaks of the
rerun, against a run that starts afresh, are what a resumed run of N images costs a node.
The kill is a crash, not a Ctrl-C: nothing gets to clean up.
"""

from __future__ import annotations

import glob
import logging
import os
import signal
import subprocess
import sys
import time

from mnist_ray.bench.work import run_command
from mnist_ray.formats import predictions
from mnist_ray.errors import MnistRayError

log = logging.getLogger(__name__)

POLL_S = 0.1


def checkpointed_rows(out: str) -> int:
    """Rows an attempt writing to ``out`` has committed to Ray's checkpoint (infer's own count,
    over its ``run-*`` work dirs)."""
    from mnist_ray.inference import infer
    from mnist_ray.plumbing import storage

    loc = storage.resolve(out)
    try:
        return sum(infer.checkpointed_rows(loc, os.path.basename(d)) for d in glob.glob(os.path.join(out, "run-*")))
    except (OSError, ValueError):  # a checkpoint file committed (renamed) while it was read
        return 0


def interrupted_run(argv: list[str], out: str, at_rows: int, timeout: float, log_path: str) -> tuple[int, float]:
    """Start ``mnist-ray infer`` and SIGKILL its whole process group (the driver and the local Ray
    it started) once ``at_rows`` rows are checkpointed: (rows checkpointed then, seconds)."""
    started = time.perf_counter()
    with open(log_path, "w") as log_file:
        proc = subprocess.Popen([sys.executable, "-m", "mnist_ray.cli", "infer", *argv], stdout=subprocess.DEVNULL,
                                stderr=log_file, start_new_session=True)
    try:
        while proc.poll() is None:
            if checkpointed_rows(out) >= at_rows:
                break
            if time.perf_counter() - started > timeout:
                raise MnistRayError(f"bench: infer checkpointed fewer than {at_rows:,} rows in {timeout:.0f} s")
            time.sleep(POLL_S)
        else:
            raise MnistRayError(f"bench: infer finished (exit {proc.returncode}) before {at_rows:,} rows were "
                                f"checkpointed: nothing to resume (its log: {log_path})")
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    _wait_gone(proc.pid)
    return checkpointed_rows(out), time.perf_counter() - started


def _wait_gone(pgid: int, timeout: float = 30) -> None:
    """Until no process of the killed group is left (Ray's workers die with their raylet)."""
    import psutil

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        left = []
        for p in psutil.process_iter(["pid"]):
            try:
                if os.getpgid(p.info["pid"]) == pgid:
                    left.append(p)
            except (ProcessLookupError, PermissionError):
                pass
        if not left:
            return
        for p in left:
            try:
                p.kill()
            except psutil.Error:
                pass
        time.sleep(POLL_S)


def measure(model_dir: str, data: str, n: int, runtime: str, work: str, at: float = 0.5) -> dict:
    """A run of ``data`` (``n`` rows) killed once ``at`` of its rows are checkpointed, then the same
    command again: the figures of the rerun (memory peaks sampled like the infer part's)."""
    out = os.path.join(work, "resumed")
    # At least ten checkpoint commits, so the kill lands mid-run even on a small N.
    argv = ["--model", model_dir, "--input", data, "--output", out, "--runtime", runtime,
            "--rows-per-file", str(max(1000, min(200_000, n // 10)))]
    log.info("bench: mnist-ray infer %s, killed once %.0f %% of %s rows are checkpointed",
             " ".join(argv), 100 * at, f"{n:,}")
    killed_at, first_seconds = interrupted_run([*argv, "--overwrite"], out, max(1, int(n * at)),
                                               timeout=max(600.0, n / 1000), log_path=os.path.join(work, "killed.log"))
    summary, wall, memory = run_command("infer", *argv, sample_memory=True)
    ids = predictions.read_predictions(out, columns=["id"])["id"]
    distinct = len(ids.unique())
    if summary["rows"] != n or len(ids) != n or distinct != n:
        raise MnistRayError(f"bench: the resumed run published {summary['rows']} rows ({distinct} "
                            f"distinct ids) for {n} input rows")
    log.info("bench: resumed %s of %s rows; rerun %.1f s, driver USS %s MB, largest worker USS %s MB",
             f"{summary['resumed_rows']:,}", f"{n:,}", wall, memory["driver_uss_peak_mb"], memory["worker_uss_peak_mb"])
    return {"n": n, "runtime": runtime, "killed_at_rows": killed_at, "killed_after_s": round(first_seconds, 1),
            "resumed_rows": summary["resumed_rows"], "scored_rows": summary["scored_rows"],
            "wall_seconds": round(wall, 1), "scoring_images_per_s": summary["images_per_s"],
            # The filter's own array: one uint64 hash per checkpointed id.
            "filter_bytes_per_id": 8, "filter_mb": round(8 * summary["resumed_rows"] / (1 << 20), 1), **memory}


def format_table(result: dict) -> list[str]:
    r = result
    return [f"## a resumed run ({r['n']:,} images, {r['runtime']}; killed with SIGKILL after "
            f"{r['killed_at_rows']:,} checkpointed rows, then rerun)", "",
            "| resumed rows | scored rows | rerun wall s | scoring images/s | filter MB (8 B per id) | "
            "driver MB RSS/USS | largest worker MB RSS/USS | workers USS MB |",
            "|---:|---:|---:|---:|---:|---:|---:|---:|",
            f"| {r['resumed_rows']:,} | {r['scored_rows']:,} | {r['wall_seconds']:.1f} | "
            f"{r['scoring_images_per_s']:,.0f} | {r['filter_mb']:,} | {r['driver_rss_peak_mb']:,}/"
            f"{r['driver_uss_peak_mb']:,} | {r['worker_rss_peak_mb']:,}/{r['worker_uss_peak_mb']:,} | "
            f"{r['workers_total_uss_peak_mb']:,} |", ""]
