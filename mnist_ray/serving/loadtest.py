"""loadtest: a bounded HTTP load test of an image endpoint, and the naive server it is compared with.

    client        N requests at concurrency C (asyncio + aiohttp, one process of its own): each
                  POSTs one image (raw body, image/png) and times it; -> requests/s, p50/p99, errors
    naive server  one process (FastAPI on uvicorn, sync handlers in its thread pool, as Flask
                  does), ``model.predict`` on one image per request: the way the articles serve

Both run as ``python -m mnist_ray.serving.loadtest {client,naive-server} ...``, so the client never
shares a core's GIL with the server it measures; `mnist-ray bench --parts serve` drives them.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request

import numpy as np

from mnist_ray.plumbing import cluster
from mnist_ray.errors import MnistRayError

log = logging.getLogger(__name__)


# --- client ---------------------------------------------------------------------------------------

async def _send(session, url: str, images: list[bytes], indices, concurrency: int) -> tuple[list, dict, list]:
    """POST images[i] for every i of ``indices``, ``concurrency`` at a time: latencies (s), statuses, errors."""
    import aiohttp

    todo = iter(indices)  # shared by the workers: each takes the next request when it is free
    latencies: list[float] = []
    statuses: dict[int, int] = {}
    errors: list[str] = []

    async def worker() -> None:
        for i in todo:
            started = time.perf_counter()
            try:
                async with session.post(url, data=images[i % len(images)],
                                        headers={"Content-Type": "image/png"}) as response:
                    await response.read()
                    status = response.status
            except (aiohttp.ClientError, asyncio.TimeoutError) as e:
                status = 0  # no answer at all
                if len(errors) < 5:
                    errors.append(f"{type(e).__name__}: {e}")
            latencies.append(time.perf_counter() - started)
            statuses[status] = statuses.get(status, 0) + 1

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return latencies, statuses, errors


async def _load(url: str, images: list[bytes], requests: int, concurrency: int, warmup: int) -> dict:
    import aiohttp

    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=60)) as session:
        # Untimed first: connections opened, the server's first calls traced.
        await _send(session, url, images, range(warmup), concurrency)
        started = time.perf_counter()
        latencies, statuses, errors = await _send(session, url, images, range(requests), concurrency)
        wall = time.perf_counter() - started
    ok = statuses.get(200, 0)
    ms = np.asarray(latencies) * 1000
    return {"requests": requests, "concurrency": concurrency, "ok": ok, "failed": requests - ok,
            "statuses": {str(k): v for k, v in sorted(statuses.items())}, "errors": errors,
            "seconds": round(wall, 3), "requests_per_s": round(requests / wall, 1),
            "p50_ms": round(float(np.percentile(ms, 50)), 2), "p90_ms": round(float(np.percentile(ms, 90)), 2),
            "p99_ms": round(float(np.percentile(ms, 99)), 2), "max_ms": round(float(ms.max()), 2)}


def run_client(url: str, images: list[bytes], requests: int, concurrency: int, warmup: int | None = None) -> dict:
    """``requests`` timed POSTs of ``images`` (round robin) to ``url``, ``concurrency`` at a time."""
    return asyncio.run(_load(url, images, requests, concurrency, 2 * concurrency if warmup is None else warmup))


def measure(url: str, image_dir: str, requests: int, concurrency: int) -> dict:
    """`run_client` in a process of its own (the PNG files of ``image_dir``); its figures."""
    proc = subprocess.run([sys.executable, "-m", "mnist_ray.serving.loadtest", "client", url, "--images", image_dir,
                           "--requests", str(requests), "--concurrency", str(concurrency)],
                          capture_output=True, text=True, timeout=max(600, requests))
    if proc.returncode != 0:
        raise MnistRayError(f"load client failed against {url}: {proc.stderr.strip()[-1500:]}")
    return json.loads(proc.stdout)


def read_images(image_dir: str) -> list[bytes]:
    names = sorted(n for n in os.listdir(image_dir) if n.endswith(".png"))
    if not names:
        raise MnistRayError(f"no .png files in {image_dir}")
    images = []
    for n in names:
        with open(os.path.join(image_dir, n), "rb") as f:
            images.append(f.read())
    return images


def wait_ready(url: str, timeout: float, proc: subprocess.Popen | None = None, log_path: str | None = None) -> dict:
    """Poll ``url`` (a readiness endpoint) until it answers 200 with JSON; fail on timeout or exit."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            tail = ""
            if log_path:
                with open(log_path, errors="replace") as f:
                    tail = ":\n" + "\n".join(f.read().strip().splitlines()[-12:])
            raise MnistRayError(f"the server exited with {proc.returncode} before it was ready ({url}){tail}")
        try:
            with urllib.request.urlopen(url, timeout=5) as r:
                if r.status == 200:
                    return json.loads(r.read())
        except (urllib.error.URLError, ConnectionError, TimeoutError, json.JSONDecodeError):
            pass
        time.sleep(0.5)
    raise MnistRayError(f"{url} was not ready after {timeout:.0f} s")


# --- naive server ------------------------------------------------------------------------------

def naive_app(model_dir: str):
    """FastAPI app: one image per request, decoded, then ``model.predict`` on it alone."""
    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse

    from mnist_ray.images import preprocess
    from mnist_ray.model import models, runtimes
    from mnist_ray.plumbing import cluster

    cluster.configure_process_env()
    model = models.keras().models.load_model(os.path.join(model_dir, runtimes.RUNTIME_FILES["tf"]), compile=False)
    # One predict at a time: Keras' predict is not thread-safe (concurrent calls from the thread
    # pool race in its callback bookkeeping: a KeyError, one request in a few hundred at c=32).
    predict_lock = threading.Lock()
    app = FastAPI()

    @app.post("/predict")
    def predict(body: bytes = _body()):  # sync: Starlette runs it in its thread pool
        pixels, errors = preprocess.prepare_batch([body])
        if errors[0]:
            return JSONResponse({"error": errors[0]}, 400)
        with predict_lock:
            probs = model.predict(pixels, verbose=0)[0]
        return {"class": int(probs.argmax()), "probabilities": [float(p) for p in probs]}

    @app.get("/readyz")
    def readyz():
        return {"ready": True}

    del Request
    return app


def _body():
    from fastapi import Body

    return Body(..., media_type="image/png")


def serve_naive(model_dir: str, port: int) -> None:
    import uvicorn

    uvicorn.run(naive_app(model_dir), host="127.0.0.1", port=port, log_level="warning", access_log=False)


# --- the comparison `mnist-ray bench --parts serve` runs ------------------------------------------

def _levels(name: str, url: str, image_dir: str, requests: int, concurrencies: list[int]) -> list[dict]:
    rows = []
    for c in concurrencies:
        row = {"server": name, **measure(url, image_dir, requests, c)}
        log.info("bench: %s, concurrency %d: %.0f requests/s, p50 %.1f ms, p99 %.1f ms, %d failed", name, c,
                 row["requests_per_s"], row["p50_ms"], row["p99_ms"], row["failed"])
        rows.append(row)
    return rows


def _stop(proc: subprocess.Popen, sig: int = signal.SIGINT, timeout: float = 60) -> str:
    """Stop a server the way a user does (Ctrl-C) and return what it printed on stdout."""
    if proc.poll() is None:
        proc.send_signal(sig)
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, _ = proc.communicate()
    return out or ""


def compare(model_dir: str, image_dir: str, requests: int, concurrencies: list[int], *, replicas: str = "1",
            ready_timeout: float = 600, log_dir: str | None = None) -> dict:
    """Requests/s and latency of the naive server, Serve without batching and Serve with
    batching, each in its own processes (Serve with its own local Ray), the same images.
    The servers' stderr goes to ``log_dir`` (default: beside the images)."""
    log_dir = log_dir or os.path.dirname(os.path.abspath(image_dir))
    rows: list[dict] = []
    port = cluster.free_port()
    naive_log = os.path.join(log_dir, "naive-server.log")
    with open(naive_log, "w") as log_file:
        naive = subprocess.Popen([sys.executable, "-m", "mnist_ray.serving.loadtest", "naive-server", "--model", model_dir,
                                  "--port", str(port)], stdout=subprocess.DEVNULL, stderr=log_file, text=True)
    try:
        wait_ready(f"http://127.0.0.1:{port}/readyz", ready_timeout, naive, naive_log)
        rows += _levels("naive (model.predict per request)", f"http://127.0.0.1:{port}/predict", image_dir,
                        requests, concurrencies)
    finally:
        _stop(naive, signal.SIGTERM)
    summaries = {}
    # The HAProxy ingress (mnist-ray serve's default) with and without batching, and batching
    # behind Serve's Python proxy actor: what the ingress itself costs.
    for name, batch, ingress in (("Serve, no batching", 1, "haproxy"), ("Serve, batching", 32, "haproxy"),
                                 ("Serve, batching, Python proxy", 32, "proxy")):
        port = cluster.free_port()
        argv = [sys.executable, "-m", "mnist_ray.cli", "serve", "--model", model_dir, "--port", str(port),
                "--replicas", replicas, "--max-batch-size", str(batch), "--ingress", ingress]
        server_log = os.path.join(log_dir, f"serve-batch{batch}-{ingress}.log")
        with open(server_log, "w") as log_file:
            server = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=log_file, text=True)
        try:
            wait_ready(f"http://127.0.0.1:{port}/readyz", ready_timeout, server, server_log)
            rows += _levels(f"{name} (max_batch_size {batch}, --ingress {ingress})", f"http://127.0.0.1:{port}/predict",
                            image_dir, requests, concurrencies)
        finally:
            out = _stop(server)
        summaries[name] = json.loads(out[out.index("{"):]) if "{" in out else {}
    top = max(concurrencies)
    rate = {r["server"].split(" (")[0]: r["requests_per_s"] for r in rows if r["concurrency"] == top}
    p99 = {r["server"].split(" (")[0]: r["p99_ms"] for r in rows if r["concurrency"] == top}
    speedup = rate["Serve, batching"] / rate["naive"] if rate.get("naive") else None
    return {"requests": requests, "concurrencies": concurrencies, "replicas": replicas, "rows": rows,
            "server_summaries": {k: {f: v.get(f) for f in ("requests", "ok", "failed", "latency_ms", "ingress")}
                                 for k, v in summaries.items()},
            f"batching_over_naive_at_{top}": speedup and round(speedup, 2),
            f"batching_p99_ms_at_{top}": p99.get("Serve, batching"),
            "targets": {"batching >= 5x naive": bool(speedup and speedup >= 5),
                        "batching p99 < 100 ms": bool(p99.get("Serve, batching", 1e9) < 100)}}


def format_table(serving: dict) -> list[str]:
    top = max(serving["concurrencies"])
    lines = [f"## online serving ({serving['requests']:,} requests per row, {serving['replicas']} replica(s), "
             "POST /predict with a 28x28 PNG, the client in its own process)", "",
             "| server | concurrency | requests/s | p50 ms | p99 ms | failed |", "|---|---:|---:|---:|---:|---:|"]
    lines += [f"| {r['server']} | {r['concurrency']} | {r['requests_per_s']:,.0f} | {r['p50_ms']:.1f} | "
              f"{r['p99_ms']:.1f} | {r['failed']} |" for r in serving["rows"]]
    lines += ["", f"At concurrency {top}: batching serves {serving[f'batching_over_naive_at_{top}']}x the naive "
                  f"server's requests/s (target 5x), p99 {serving[f'batching_p99_ms_at_{top}']} ms (target < 100 ms).",
              ""]
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mnist_ray.serving.loadtest")
    sub = parser.add_subparsers(dest="what", required=True)
    client = sub.add_parser("client", help="a bounded load test; JSON figures on stdout")
    client.add_argument("url")
    client.add_argument("--images", required=True, help="a folder of .png files to send (round robin)")
    client.add_argument("--requests", type=int, default=1000)
    client.add_argument("--concurrency", type=int, default=8)
    naive = sub.add_parser("naive-server", help="model.predict on one image per request")
    naive.add_argument("--model", required=True)
    naive.add_argument("--port", type=int, default=8001)
    args = parser.parse_args(argv)
    if args.what == "client":
        print(json.dumps(run_client(args.url, read_images(args.images), args.requests, args.concurrency)))
    else:
        serve_naive(args.model, args.port)
    return 0


if __name__ == "__main__":
    sys.exit(main())
