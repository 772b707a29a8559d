"""The fixed cost of a job submitted to a running Ray head, part by part (`bench --parts submit`).

    ray start --head (a head of the bench's own: free ports, token auth, the dashboard's job server)
      --> ray job submit -- python jobs/infer.py ...   twice: on the cold head, then on the warm one
      --> the job's summary (its timeline) + the submission's clock --> one row of parts per job

A user on a cluster pays this on every job, however few images it scores: the time from
`ray job submit` to the first prediction, and to published output. The parts come from the
job's own timeline (``infer.timeline``), anchored to this process's clock at submission: the
head runs on this machine, so both clocks are the same.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import time
from pathlib import Path

from mnist_ray.plumbing import cluster
from mnist_ray.errors import MnistRayError

log = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parents[2]  # jobs/ and jobs/runtime_env.yaml: what `ray job submit` ships

# (label, from, to): the parts of the fixed cost, as points of the job's timeline. "submitted"
# is this process's clock when `ray job submit` ran; "process" is the driver's process start.
PARTS = (
    ("job start (submit, package, driver process)", "submitted", "process"),
    ("driver: imports, model and input checks", "process", "run_checks"),
    ("connect to the cluster", "run_checks", "connected"),
    ("read planning and the plan", "connected", "planned"),
    ("dataset build", "planned", "executing"),
    ("actor start (worker process, imports)", "executing", "first_actor_init"),
    ("model load", "first_actor_init", "first_actor_ready"),
    ("first call", "first_actor_ready", "first_prediction"),
    ("the rest of the scoring", "first_prediction", "written"),
    ("reconcile and publish", "written", "published"),
)


def start_head(num_cpus: int | None = None) -> tuple[cluster.LocalRay, str, float]:
    """A head with a job server: (the head, its dashboard URL, seconds until it takes jobs)."""
    from ray.job_submission import JobSubmissionClient

    cluster.use_token_auth()  # the head, the `ray job` CLI and the SDK client share this token
    # A job's `python` is the first on the head's PATH: this Python, with mnist-ray's packages.
    bin_dir = os.path.dirname(sys.executable)
    if os.environ.get("PATH", "").split(os.pathsep)[0] != bin_dir:
        os.environ["PATH"] = bin_dir + os.pathsep + os.environ.get("PATH", "")
    started = time.perf_counter()
    port = cluster.free_port()
    head = cluster.LocalRay.start(num_cpus, dashboard_port=port)
    url = f"http://{cluster.LOCALHOST}:{port}"
    deadline = time.monotonic() + 120
    while True:  # `ray start` reports the node up before the job server listens
        try:
            JobSubmissionClient(url).list_jobs()
            return head, url, time.perf_counter() - started
        except Exception as e:  # noqa: BLE001 - connection refused until it listens
            if time.monotonic() > deadline:
                head.stop(wait=20)
                raise MnistRayError(f"the bench's Ray head never took jobs at {url}: {e}") from e
            time.sleep(0.2)


def submit(url: str, name: str, args: list[str], timeout: float = 900) -> dict:
    """``ray job submit`` of ``jobs/NAME.py ARGS``, as a user types it; its summary and timeline
    with the submission's time added, or an error with the job's last log lines."""
    from ray.job_submission import JobStatus, JobSubmissionClient

    if not (REPO / "jobs" / f"{name}.py").exists():
        raise MnistRayError(f"bench --parts submit ships {REPO / 'jobs'} with the job: run it from a clone of mnist-ray")
    job_id = f"bench-{name}-{os.getpid()}-{time.time_ns() % 10**9}"
    env = {**os.environ, "RAY_ADDRESS": url}
    submitted = time.time()
    done = subprocess.run([sys.executable, "-m", "ray.scripts.scripts", "job", "submit", "--no-wait",
                           "--submission-id", job_id, "--runtime-env", "jobs/runtime_env.yaml", "--",
                           "python", f"jobs/{name}.py", *args],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    if done.returncode != 0:
        raise MnistRayError(f"`ray job submit` failed: {done.stderr.strip()[-800:]}")
    submit_seconds = time.time() - submitted
    client = JobSubmissionClient(url)
    deadline = time.monotonic() + timeout
    while (status := client.get_job_status(job_id)) not in {JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED}:
        if time.monotonic() > deadline:
            client.stop_job(job_id)
            raise MnistRayError(f"bench: job {job_id} still {status} after {timeout:.0f} s")
        time.sleep(0.2)
    logs = client.get_job_logs(job_id)
    if status != JobStatus.SUCCEEDED:
        raise MnistRayError(f"bench: job {job_id} {status}: " + " | ".join(logs.strip().splitlines()[-8:]))
    summary = json.loads(logs[logs.rindex("\n{") + 1:])  # the summary is the last JSON object printed
    return {"summary": summary, "submitted_at": submitted, "submit_command_seconds": round(submit_seconds, 2)}


def parts(job: dict) -> dict:
    """Seconds of each part of the fixed cost and the totals, from one submitted job."""
    line = job["summary"]["timeline"]
    points = {**{k: v for k, v in line.items() if k != "process_started_at"}, "process": 0.0,
              "submitted": job["submitted_at"] - line["process_started_at"]}
    out = {label: round(points[b] - points[a], 2) for label, a, b in PARTS if a in points and b in points}
    return {"parts": out,
            "first_prediction_after_submit_s": round(points["first_prediction"] - points["submitted"], 2),
            "done_after_submit_s": round(points["published"] - points["submitted"], 2),
            "submit_command_s": job["submit_command_seconds"], "rows": job["summary"]["rows"],
            "runtime": job["summary"]["runtime"]}


def measure(model_dir: str, data: str, work: str) -> dict:
    """Two infer jobs on a head started for the purpose: the first finds it cold (just started,
    no worker processes, the job's package not uploaded yet), the second warm."""
    head, url, head_seconds = start_head()
    try:
        rows = {}
        for which in ("cold", "warm"):
            out = os.path.join(work, f"submit-{which}")
            job = submit(url, "infer", ["--model", model_dir, "--input", data, "--output", out, "--overwrite",
                                        "--shared-storage"])
            rows[which] = parts(job)
            log.info("bench: %s head: first prediction %.1f s after `ray job submit`", which,
                     rows[which]["first_prediction_after_submit_s"])
        return {"head_start_seconds": round(head_seconds, 2), **rows}
    finally:
        head.stop(wait=30)


def format_table(result: dict) -> list[str]:
    labels = [label for label, _, _ in PARTS]
    lines = [f"## fixed cost of a submitted job (`ray job submit` to a running head; {result['cold']['rows']:,} "
             f"rows, {result['cold']['runtime']})", "",
             f"Head start (`ray start --head` until its job server answers): {result['head_start_seconds']:.1f} s", "",
             "| part | cold head s | warm head s |", "|---|---:|---:|"]
    lines += [f"| {label} | {result['cold']['parts'].get(label, float('nan')):.2f} | "
              f"{result['warm']['parts'].get(label, float('nan')):.2f} |" for label in labels]
    lines += [f"| **first prediction after submit** | **{result['cold']['first_prediction_after_submit_s']:.2f}** | "
              f"**{result['warm']['first_prediction_after_submit_s']:.2f}** |",
              f"| done (published) after submit | {result['cold']['done_after_submit_s']:.2f} | "
              f"{result['warm']['done_after_submit_s']:.2f} |", ""]
    return lines
