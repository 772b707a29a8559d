"""The load client against a plain HTTP server, then the whole serving comparison of the bench
(naive server, Serve without and with batching) on a few requests: completion and sane
figures only, never timings against targets."""

import http.server
import threading

import pytest

from mnist_ray.images import preprocess
from mnist_ray.serving import loadtest


@pytest.fixture(scope="module")
def image_dir(tmp_path_factory, mnist_test_arrays):
    images, _ = mnist_test_arrays
    d = tmp_path_factory.mktemp("load-images")
    for i, data in enumerate(preprocess.encode_png(images[:20])):
        (d / f"{i:03d}.png").write_bytes(data)
    return d


class _Handler(http.server.BaseHTTPRequestHandler):
    """Answers 200, except 503 for every fifth request it sees."""

    seen = 0
    lock = threading.Lock()

    def do_POST(self):  # noqa: N802 - http.server's name
        self.rfile.read(int(self.headers["Content-Length"]))
        with self.lock:
            type(self).seen += 1
            status = 503 if self.seen % 5 == 0 else 200
        self.send_response(status)
        self.send_header("Content-Length", "2")
        self.end_headers()
        self.wfile.write(b"{}")

    def log_message(self, *args):
        pass


def test_client_sends_exactly_the_requests_and_counts_failures(image_dir):
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/predict"
        out = loadtest.run_client(url, loadtest.read_images(str(image_dir)), requests=50, concurrency=4, warmup=0)
    finally:
        server.shutdown()
    assert _Handler.seen == 50 and out["requests"] == 50
    assert out["statuses"] == {"200": 40, "503": 10} and out["ok"] == 40 and out["failed"] == 10
    assert 0 < out["p50_ms"] <= out["p99_ms"] <= out["max_ms"] and out["requests_per_s"] > 0


def test_client_counts_a_server_that_is_not_there(image_dir):
    out = loadtest.run_client("http://127.0.0.1:9/predict", loadtest.read_images(str(image_dir)), requests=3,
                              concurrency=2, warmup=0)
    assert out["statuses"] == {"0": 3} and out["failed"] == 3 and "ClientConnectorError" in out["errors"][0]


@pytest.mark.e2e
def test_the_serving_comparison_completes_with_sane_figures(trained_model, image_dir):
    model_dir, _ = trained_model
    out = loadtest.compare(model_dir, str(image_dir), requests=30, concurrencies=[1, 4])
    servers = [r["server"].split(" (")[0] for r in out["rows"]]
    assert servers == (["naive"] * 2 + ["Serve, no batching"] * 2 + ["Serve, batching"] * 2
                       + ["Serve, batching, Python proxy"] * 2)
    for row in out["rows"]:
        assert row["ok"] == 30 and row["failed"] == 0, row
        assert row["requests_per_s"] > 0 and 0 < row["p50_ms"] <= row["p99_ms"]
    # Each Serve run's own summary (printed when it was stopped) counted every request it took:
    # 2 x 30 timed plus the untimed warm-up (2 x concurrency per level).
    for name, summary in out["server_summaries"].items():
        assert summary["ok"] == 2 * 30 + 2 * (1 + 4) and summary["failed"] == 0, (name, summary)
        assert summary["ingress"] == ("proxy" if "Python proxy" in name else "haproxy")
    assert out["batching_over_naive_at_4"] > 0 and set(out["targets"]) == {"batching >= 5x naive",
                                                                            "batching p99 < 100 ms"}
    assert "| Serve, batching (max_batch_size 32, --ingress haproxy) | 4 |" in "\n".join(loadtest.format_table(out))
