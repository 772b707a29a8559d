"""Request statistics of a running server: each replica's ``Recorder`` sends its requests'
outcomes and latencies once a second to one ``ServeStats`` actor, whose ``state`` is the summary
`mnist-ray serve` prints on exit."""

from __future__ import annotations

import asyncio
import logging
import time

import numpy as np

log = logging.getLogger(__name__)

STATS_NAMESPACE = "mnist-ray"
STATS_EVERY_S = 1.0


class Recorder:
    """Outcomes and latencies of this replica's requests, sent to the stats actor once a second."""

    def __init__(self, stats_actor: str):
        self.stats_actor, self.pending, self.task, self.actor = stats_actor, [], None, None

    def add(self, kind: str, status: int, ms: float, images: int) -> None:
        self.pending.append((kind, status, ms, images))
        if self.task is None:
            self.task = asyncio.get_running_loop().create_task(self._flush_forever())

    async def _flush_forever(self) -> None:
        while True:
            await asyncio.sleep(STATS_EVERY_S)
            if self.pending:
                records, self.pending = self.pending, []
                try:
                    self._actor().add.remote(records)  # fire and forget: stats never slow answers
                except Exception:  # noqa: BLE001 - a lost stats actor must not break serving
                    log.warning("serve: cannot report request stats", exc_info=True)
                    self.actor = None

    def _actor(self):
        import ray

        if self.actor is None:
            # The foreground command creates it; a config deployment (`serve deploy`) makes its own.
            self.actor = ray.remote(ServeStats).options(
                name=self.stats_actor, namespace=STATS_NAMESPACE, get_if_exists=True, lifetime="detached",
                num_cpus=0).remote()
        return self.actor


class ServeStats:
    """Request counts and a bounded sample of latencies from every replica (a zero-CPU actor)."""

    KEEP = 200_000  # latencies kept; beyond, a uniform reservoir sample

    def __init__(self):
        self.counts: dict[str, int] = {}
        self.images = 0
        self.latencies: list[float] = []
        self.seen = 0
        self.rng = np.random.default_rng(0)
        self.started = time.time()

    def add(self, records: list[tuple[str, int, float, int]]) -> None:
        for kind, status, ms, images in records:
            key = f"{kind} {status}"
            self.counts[key] = self.counts.get(key, 0) + 1
            if 200 <= status < 300:
                self.images += images
                self.seen += 1
                if len(self.latencies) < self.KEEP:
                    self.latencies.append(ms)
                elif (j := self.rng.integers(self.seen)) < self.KEEP:
                    self.latencies[j] = ms

    def state(self) -> dict:
        return summarize(self.counts, self.images, self.latencies, time.time() - self.started)


def summarize(counts: dict[str, int], images: int, latencies: list[float], seconds: float) -> dict:
    """The serving summary: requests by outcome, images scored, latency percentiles (ms)."""
    by_class = {"ok": 0, "rejected": 0, "failed": 0}
    for key, n in counts.items():
        status = int(key.rsplit(" ", 1)[1])
        by_class["ok" if status < 400 else "rejected" if status < 500 else "failed"] += n
    lat = np.asarray(latencies, np.float64)
    pct = {f"p{q}": round(float(np.percentile(lat, q)), 2) for q in (50, 90, 99)} if len(lat) else {}
    return {"requests": sum(counts.values()), **by_class, "images": images,
            "latency_ms": {**pct, "max": round(float(lat.max()), 2)} if len(lat) else {},
            "by_status": dict(sorted(counts.items())), "seconds": round(seconds, 1)}
