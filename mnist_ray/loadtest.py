"""loadtest: a bounded HTTP load test of an image endpoint, and the naive server it is compared with.

    client        N requests at concurrency C (asyncio + aiohttp, one process of its own): each
                  POSTs one image (raw body, image/png) and times it; -> requests/s, p50/p99, errors
    naive server  one process (FastAPI on uvicorn, sync handlers in its thread pool, as Flask
                  does), ``model.predict`` on one image per request: the way the articles serve

Both run as ``python -m mnist_ray.loadtest {client,naive-server} ...``, so the client never
shares a core's GIL with the server it measures; `mnist-ray bench --parts serve` drives them.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request

import numpy as np

from mnist_ray.errors import MnistRayError


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
    proc = subprocess.run([sys.executable, "-m", "mnist_ray.loadtest", "client", url, "--images", image_dir,
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


def wait_ready(url: str, timeout: float, proc: subprocess.Popen | None = None) -> dict:
    """Poll ``url`` (a readiness endpoint) until it answers 200 with JSON; fail on timeout or exit."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise MnistRayError(f"the server exited with {proc.returncode} before it was ready ({url})")
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

    from mnist_ray import cluster, models, preprocess, runtimes

    cluster.configure_process_env()
    model = models.keras().models.load_model(os.path.join(model_dir, runtimes.RUNTIME_FILES["tf"]), compile=False)
    app = FastAPI()

    @app.post("/predict")
    def predict(body: bytes = _body()):  # sync: Starlette runs it in its thread pool
        pixels, errors = preprocess.prepare_batch([body])
        if errors[0]:
            return JSONResponse({"error": errors[0]}, 400)
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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mnist_ray.loadtest")
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
