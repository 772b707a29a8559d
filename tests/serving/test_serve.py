"""mnist-ray serve: the replica's logic without Ray, then one real Ray Serve for the module
(2 replicas, the model read from the S3 test server, HTTP on 127.0.0.1) that real requests, a
real browser and a replica kill go through. The last test stops it and reads its summary."""

import base64
import io
import json
import threading
import time
import zlib

import numpy as np
import pytest
import requests
import yaml
from PIL import Image

from mnist_ray.images import preprocess
from mnist_ray.inputs import datasets
from mnist_ray.model import runtimes
from mnist_ray.plumbing import cluster
from mnist_ray.errors import MnistRayError
from mnist_ray.inference.predict import PredictConfig
from mnist_ray.inference.predict import run as predict_run
from mnist_ray.serving.serve import ServeConfig, write_config
from mnist_ray.serving.serve import run as serve_run
from mnist_ray.serving.serve_app import BadRequest, DigitService
from mnist_ray.serving.stats import ServeStats

cluster.configure_process_env()
CHROMEDRIVER = "/usr/bin/chromedriver"
CHROMIUM = "/usr/bin/chromium"
LIMIT_MB = 1.0
BATCH_LIMIT = 8


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _png(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def files(tmp_path_factory, mnist_test_arrays):
    """Real digits as users have them: MNIST PNGs, a photo-like JPEG, an RGBA PNG, a BMP."""
    images, labels = mnist_test_arrays
    d = tmp_path_factory.mktemp("serve-files")
    paths = []
    for i in range(6):
        kind = i % 4
        if kind == 0:
            p = d / f"d{i}.png"
            p.write_bytes(_png(images[i]))
        elif kind == 1:
            p = d / f"d{i}.jpg"
            p.write_bytes(datasets.render_photo(images[i], np.random.default_rng(zlib.crc32(b"serve") + i)))
        elif kind == 2:
            p = d / f"d{i}.png"
            Image.fromarray(images[i]).convert("RGBA").resize((57, 57)).save(p)
        else:
            p = d / f"d{i}.bmp"
            Image.fromarray(images[i]).convert("RGB").resize((31, 45)).save(p)
        paths.append(p)
    return paths, [int(v) for v in labels[:6]]


# --- without Ray ----------------------------------------------------------------------------------

def test_prepare_is_predicts_preprocessing_and_rejects_what_cannot_be_a_digit(files):
    paths, _ = files
    data = [p.read_bytes() for p in paths]
    expected, errors = preprocess.prepare_pixels(data)
    assert not any(errors)
    for d, e in zip(data, expected):
        np.testing.assert_array_equal(DigitService.prepare(d), e)
    cases = [(b"", 400, "empty image"), (b"hello", 400, "not an image"),
             (_png(np.zeros((28, 28), np.uint8)), 422, "blank image"),
             (_png(np.full((40, 60), 255, np.uint8)), 422, "blank image"),
             (paths[1].read_bytes()[:len(paths[1].read_bytes()) // 2], 400, "cannot decode"),
             (_png(np.zeros((7000, 6000), np.uint8)), 413, "megapixels")]
    for data, status, words in cases:
        with pytest.raises(BadRequest) as e:
            DigitService.prepare(data)
        assert (e.value.status, words in e.value.message) == (status, True), e.value.message


def test_service_answers_with_the_models_probabilities_and_the_image_it_saw():
    calls = []

    def model(x):
        calls.append(x.shape)
        return np.tile(np.linspace(0.01, 0.18, 10, dtype=np.float32), (len(x), 1))

    service = DigitService(lambda: model, {"class_names": list("abcdefghij"), "version": "m-1"}, "tf")
    assert calls == [(1, 28, 28, 1)] and service.ready  # warmed up once at load
    pixels = np.zeros((2, 28, 28), np.uint8)
    probs = service.score(pixels)
    out = service.answer(probs[0], pixels[0], preprocess_ms=1.0, model_ms=2.0, batch_size=2, include_image=True)
    assert out["class"] == 9 and out["class_name"] == "j" and out["model_version"] == "m-1"
    assert Image.open(io.BytesIO(base64.b64decode(out["model_input_png"]))).size == (28, 28)


def test_summary_counts_outcomes_and_percentiles():
    stats = ServeStats()
    stats.add([("predict", 200, float(ms), 1) for ms in range(1, 101)]
              + [("predict", 415, 1.0, 0), ("batch", 200, 5.0, 3), ("predict", 500, 9.0, 0)])
    s = stats.state()
    assert (s["requests"], s["ok"], s["rejected"], s["failed"], s["images"]) == (103, 101, 1, 1, 103)
    assert 49 <= s["latency_ms"]["p50"] <= 52 and s["latency_ms"]["max"] == 100


def test_bad_settings_are_clear_errors():
    for bad, match in [(dict(replicas="0"), "--replicas"), (dict(replicas="3..2"), "--replicas"),
                       (dict(replicas="x"), "N or MIN..MAX"), (dict(runtime="onnx"), "unknown runtime"),
                       (dict(max_batch_size=0), "--max-batch-size"), (dict(port=70000), "--port"),
                       (dict(max_batch_size=64, max_ongoing_requests=8), "--max-ongoing-requests")]:
        with pytest.raises(MnistRayError, match=match):
            ServeConfig(**bad).validate()


def test_write_config_is_a_serve_deploy_config_of_the_same_settings(trained_model, tmp_path):
    from ray.serve import Application
    from ray.serve.schema import ServeDeploySchema

    model_dir, _ = trained_model
    cfg = ServeConfig(model="s3://bucket/model", replicas="1..4", max_batch_size=16, gpus_per_replica=0.5,
                      host="0.0.0.0", port=8100)
    path = tmp_path / "serve.yaml"
    write_config(cfg, "tflite-int8", str(path))
    doc = yaml.safe_load(path.read_text())
    ServeDeploySchema.model_validate(doc)
    app = doc["applications"][0]
    assert doc["http_options"] == {"host": "0.0.0.0", "port": 8100}
    assert app["args"]["model"] == "s3://bucket/model" and app["args"]["runtime"] == "tflite-int8"
    assert app["args"]["max_batch_size"] == 16 and app["args"]["use_gpu"] is True
    deployment = app["deployments"][0]
    scaling = deployment["autoscaling_config"]
    assert scaling["min_replicas"] == 1 and scaling["max_replicas"] == 4
    assert deployment["ray_actor_options"]["num_gpus"] == 0.5
    assert "AWS_SECRET_ACCESS_KEY" not in path.read_text()  # credentials never go into the file
    # The import path builds the application from exactly these args.
    module, _, attr = app["import_path"].partition(":")
    assert isinstance(getattr(__import__(module, fromlist=[attr]), attr)(app["args"]), Application)


def test_the_command_writes_the_config_and_refuses_bad_flags_in_one_line(trained_model, tmp_path):
    import subprocess
    import sys

    model_dir, _ = trained_model
    path = tmp_path / "serve.yaml"
    ok = subprocess.run([sys.executable, "-m", "mnist_ray.cli", "serve", "--model", model_dir, "--write-config",
                         str(path), "--runtime", "tflite-int8"], capture_output=True, text=True, timeout=120)
    assert ok.returncode == 0, ok.stderr
    assert json.loads(ok.stdout)["runtime"] == "tflite-int8" and "serve deploy" in path.read_text()
    bad = subprocess.run([sys.executable, "-m", "mnist_ray.cli", "serve", "--model", model_dir, "--replicas", "0"],
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode == 1 and bad.stderr.strip().splitlines()[-1] == \
        "mnist-ray serve: error: --replicas '0': need 1 <= MIN <= MAX"


# --- one real Serve for the rest of the module --------------------------------------------------

@pytest.fixture(scope="module")
def model_in_s3(trained_model, s3_server):
    """The trained model dir copied to the S3 test server: replicas download it themselves."""
    import boto3
    import pyarrow.fs as pafs

    from mnist_ray.plumbing import storage

    model_dir, _ = trained_model
    boto3.client("s3", endpoint_url=s3_server).create_bucket(Bucket="serve-models")
    loc = storage.resolve("s3://serve-models/cnn")
    pafs.copy_files(model_dir, loc.path, source_filesystem=pafs.LocalFileSystem(), destination_filesystem=loc.fs)
    return "s3://serve-models/cnn"


@pytest.fixture(scope="module")
def server(ray_local, model_in_s3):
    """`mnist-ray serve`'s own run() in a thread, on the session's Ray: (base URL, its state)."""
    from ray import serve

    port = _free_port()
    cfg = ServeConfig(model=model_in_s3, replicas="2", cpus_per_replica=0.5, port=port, max_request_mb=LIMIT_MB,
                      max_batch_images=BATCH_LIMIT, max_batch_size=16)
    state = {"stop": threading.Event()}

    def target():
        try:
            state["summary"] = serve_run(cfg, state["stop"])
        except BaseException as e:  # noqa: BLE001 - reported by the fixture
            state["error"] = e

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and "error" not in state:
        try:
            if requests.get(f"{url}/readyz", timeout=5).json().get("ready"):
                break
        except (requests.RequestException, ValueError):
            pass
        time.sleep(0.5)
    else:
        raise RuntimeError(f"serve did not become ready: {state.get('error')!r}")
    state["thread"] = thread
    yield url, state
    state["stop"].set()
    thread.join(60)
    serve.shutdown()


def _predict_reference(model_dir: str, data: list[bytes]) -> np.ndarray:
    """What `mnist-ray predict` computes, unrounded: its preprocessing, its runtime, one batch."""
    pixels, errors = preprocess.prepare_batch(data)
    assert not any(errors)
    return runtimes.load(model_dir, "tf")(pixels)


def test_served_probabilities_equal_predicts(server, files, trained_model, capsys):
    url, _ = server
    model_dir, _ = trained_model
    paths, labels = files
    data = [p.read_bytes() for p in paths]
    expected = _predict_reference(model_dir, data)
    printed = predict_run(PredictConfig(images=tuple(map(str, paths)), model=model_dir))["results"]
    capsys.readouterr()
    for i, (p, d) in enumerate(zip(paths, data)):
        raw = requests.post(f"{url}/predict", data=d, headers={"Content-Type": "image/png"}, timeout=30)
        form = requests.post(f"{url}/predict", files={"image": (p.name, d)}, timeout=30)
        for r in (raw, form):
            assert r.status_code == 200, r.text
            answer = r.json()
            np.testing.assert_allclose(answer["probabilities"], expected[i], atol=1e-5)
            assert answer["class"] == int(expected[i].argmax()) and answer["class_name"] == printed[i]["prediction"]
            assert answer["runtime"] == "tf" and answer["model_version"].startswith("cnn-")
            assert answer["preprocess_ms"] > 0 and answer["model_ms"] > 0 and answer["batch_size"] >= 1
        pct = printed[i]["percentages"]
        np.testing.assert_allclose([pct[str(c)] for c in range(10)], 100 * expected[i], atol=0.006)
    assert sum(int(expected[i].argmax()) == labels[i] for i in range(len(labels))) >= 4  # a trained model


def test_http_is_haproxy_straight_to_the_replicas_and_listens_on_loopback_only(server):
    import psutil

    url, _ = server
    port = int(url.rsplit(":", 1)[1])
    listeners = [c for c in psutil.net_connections("inet") if c.status == psutil.CONN_LISTEN and c.pid]
    front = {c.pid for c in listeners if c.laddr.port == port}
    assert {psutil.Process(pid).name() for pid in front} == {"haproxy"}
    # Its HTTP frontend, stats page and Prometheus exporter: all on 127.0.0.1, none on Ray's
    # fixed ports (a second Serve on this machine can start its own).
    bound = {(c.laddr.ip, c.laddr.port) for c in listeners if c.pid in front}
    assert len(bound) == 3 and {ip for ip, _ in bound} == {"127.0.0.1"}, bound
    assert not {8404, 9101} & {p for _, p in bound}
    # Replicas take HTTP themselves (direct ingress), on loopback too.
    replicas = {c.laddr.ip for c in listeners if 30000 <= c.laddr.port <= 31000
                and "ServeReplica" in " ".join(psutil.Process(c.pid).cmdline())}
    assert replicas == {"127.0.0.1"}


def test_batch_endpoint_equals_single(server, files):
    url, _ = server
    paths, _ = files
    data = [p.read_bytes() for p in paths]
    single = [requests.post(f"{url}/predict", data=d, headers={"Content-Type": "image/png"}, timeout=30).json()
              for d in data]
    as_json = requests.post(f"{url}/predict/batch", timeout=30,
                            json={"images": [base64.b64encode(d).decode() for d in data[:3]]
                                  + ["data:image/png;base64," + base64.b64encode(d).decode() for d in data[3:]]})
    as_form = requests.post(f"{url}/predict/batch", timeout=30,
                            files=[("images", (p.name, d)) for p, d in zip(paths, data)])
    for r in (as_json, as_form):
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["images"] == len(data) and body["errors"] == 0
        for one, many in zip(single, body["results"]):
            assert many["class"] == one["class"]
            # Another batch composition moves the 6th or 7th digit (oneDNN).
            np.testing.assert_allclose(many["probabilities"], one["probabilities"], atol=1e-5)
    assert max(r["batch_size"] for r in as_json.json()["results"]) > 1  # the images shared model calls


def _chunks(data: bytes, size: int = 64 << 10):
    for i in range(0, len(data), size):
        yield data[i:i + size]


def test_every_bad_request_gets_a_4xx_in_words_and_the_server_goes_on(server, files):
    url, _ = server
    paths, _ = files
    good, jpeg = paths[0].read_bytes(), paths[1].read_bytes()
    big = np.random.default_rng(0).integers(0, 255, (800, 800), dtype=np.uint8)  # ~640 kB of noise
    over = _png(np.concatenate([big, big]))  # > 1 MB: over the limit
    png = {"Content-Type": "image/png"}
    b64 = base64.b64encode(good).decode()
    cases = [
        ("not an image", "/predict", dict(data=b"GIF? no, just text", headers=png), 400, "not an image"),
        ("empty body", "/predict", dict(data=b"", headers=png), 400, "empty body"),
        ("truncated JPEG", "/predict", dict(data=jpeg[:len(jpeg) // 2], headers=png), 400, "cannot decode"),
        ("over the size limit", "/predict", dict(data=over, headers=png), 413, "request too large"),
        ("over the limit, chunked", "/predict", dict(data=_chunks(over), headers=png), 413, "request too large"),
        ("60 megapixels", "/predict", dict(data=_png(np.zeros((6000, 10000), np.uint8)), headers=png), 413,
         "megapixels"),
        ("blank image", "/predict", dict(data=_png(np.full((60, 80), 250, np.uint8)), headers=png), 422,
         "blank image"),
        ("blank 28x28", "/predict", dict(data=_png(np.zeros((28, 28), np.uint8)), headers=png), 422, "blank image"),
        ("wrong content type", "/predict", dict(data=good, headers={"Content-Type": "text/plain"}), 415,
         "is not an image"),
        ("form without a file", "/predict", dict(files={"image": (None, "x")}), 400, "the form has no file"),
        ("form with two files", "/predict", dict(files=[("a", good), ("b", good)]), 400, "/predict takes one image"),
        ("too many images", "/predict/batch", dict(json={"images": [b64] * (BATCH_LIMIT + 1)}), 413,
         "too many images"),
        ("batch: not JSON", "/predict/batch", dict(data=b"{images:", headers={"Content-Type": "application/json"}),
         400, "not JSON"),
        ("batch: no images list", "/predict/batch", dict(json={"image": b64}), 422, "expected a JSON object"),
        ("batch: empty list", "/predict/batch", dict(json={"images": []}), 400, "no images"),
        ("batch: wrong content type", "/predict/batch", dict(data=good, headers=png), 415, "/predict/batch takes JSON"),
    ]
    table = []
    for name, path, kwargs, status, words in cases:
        r = requests.post(f"{url}{path}", timeout=30, **kwargs)
        error = r.json()["error"]
        table.append(f"| {name} | POST {path} | {r.status_code} | {error} |")
        assert (r.status_code, words in error) == (status, True), (name, r.status_code, error)
    for method, path, status in [("GET", "/nope", 404), ("GET", "/predict", 405)]:
        r = requests.request(method, f"{url}{path}", timeout=30)
        table.append(f"| unknown route / method | {method} {path} | {r.status_code} | {r.json()['error']} |")
        assert r.status_code == status
    # One bad image in a batch is one error entry; the others are answered.
    r = requests.post(f"{url}/predict/batch", json={"images": [b64, "@@not base64@@", b64]}, timeout=30)
    assert r.status_code == 200 and r.json()["errors"] == 1
    assert r.json()["results"][1] == {"error": "not base64: each image must be a base64 string (or a data: URL)",
                                      "status": 400}
    print("\n| request | endpoint | status | error |\n|---|---|---:|---|\n" + "\n".join(table))
    # ... and the server goes on: both replicas alive, good requests answered, no 5xx counted.
    assert requests.post(f"{url}/predict", data=good, headers=png, timeout=30).status_code == 200
    time.sleep(1.5)  # replicas report their counts once a second
    stats = requests.get(f"{url}/stats", timeout=30).json()
    assert stats["failed"] == 0 and stats["rejected"] >= len(cases)
    assert _running_replicas() == 2


def _running_replicas() -> int:
    from ray import serve

    deployment = serve.status().applications["mnist"].deployments["MnistServer"]
    return deployment.replica_states.get("RUNNING", 0)


def _browser(tmp_path):
    from selenium import webdriver

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                "--disable-component-update", "--disable-sync", "--no-first-run", "--window-size=1100,900",
                f"--user-data-dir={tmp_path / 'chromium-profile'}"):
        options.add_argument(arg)
    # Debian's chromedriver, given explicitly: Selenium's own driver download does not work offline.
    return webdriver.Chrome(service=webdriver.ChromeService(executable_path=CHROMEDRIVER), options=options)


def test_the_page_in_a_real_browser(server, files, tmp_path):
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    url, _ = server
    paths, labels = files
    driver = _browser(tmp_path)
    try:
        driver.get(url + "/")
        wait = WebDriverWait(driver, 60)
        wait.until(lambda d: d.find_element(By.ID, "model-version").text.startswith("cnn-"))

        def answers() -> int:
            return int(driver.find_element(By.TAG_NAME, "body").get_attribute("data-answered") or 0)

        def seen_pixels() -> np.ndarray:
            src = driver.find_element(By.ID, "seen").get_attribute("src")
            assert src.startswith("data:image/png;base64,")
            return np.asarray(Image.open(io.BytesIO(base64.b64decode(src.split(",", 1)[1]))))

        # Upload a digit: the page shows the class the API gives, its 28x28 input and ten bars.
        driver.find_element(By.ID, "file-input").send_keys(str(paths[0]))
        wait.until(lambda d: answers() == 1)
        expected = requests.post(f"{url}/predict", data=paths[0].read_bytes(), timeout=30).json()
        assert driver.find_element(By.ID, "result-class").text == expected["class_name"] == str(labels[0])
        assert driver.find_element(By.ID, "error").text == ""
        np.testing.assert_array_equal(seen_pixels(), DigitService.prepare(paths[0].read_bytes()))
        percents = [float(e.text.rstrip(" %")) for e in driver.find_elements(By.CSS_SELECTOR, ".bar-pct")]
        assert len(percents) == 10 and abs(sum(percents) - 100) < 1 and percents.index(max(percents)) == labels[0]

        # Draw a "1" with the mouse: a vertical stroke; the answer comes when the button is released.
        canvas = driver.find_element(By.ID, "canvas")
        chain = ActionChains(driver).move_to_element_with_offset(canvas, 5, -90).click_and_hold()
        for _ in range(18):
            chain.move_by_offset(-1, 10)
        chain.release().perform()
        wait.until(lambda d: answers() == 2)
        shown = driver.find_element(By.ID, "result-class").text
        assert shown in [str(c) for c in range(10)] and driver.find_element(By.ID, "error").text == ""
        seen = seen_pixels().astype(float)
        columns = seen.sum(0) / seen.sum()
        assert columns[9:19].sum() > 0.9  # the stroke arrived: an upright bar in the middle of 28x28
        shot = tmp_path / "serve-page.png"
        driver.save_screenshot(str(shot))
        print(f"\nscreenshot of the page: {shot} (the drawn digit answered as {shown})")
        assert shot.stat().st_size > 10_000

        # A file that is not an image: the page shows the server's words, as text.
        text_file = tmp_path / "notes.png"
        text_file.write_text("<b>not</b> an image")
        driver.find_element(By.ID, "file-input").send_keys(str(text_file))
        wait.until(lambda d: answers() == 3)
        assert driver.find_element(By.ID, "error").text.startswith("not an image")
        assert driver.find_element(By.ID, "result-class").text == "–"
    finally:
        driver.quit()


def test_a_killed_replica_is_replaced_and_requests_keep_succeeding(server, files):
    import ray

    url, _ = server
    good = files[0][0].read_bytes()
    replicas = [a for a in ray.util.list_named_actors(all_namespaces=True)
                if a["name"].startswith("SERVE_REPLICA::mnist#MnistServer")]
    assert len(replicas) == 2
    victim = replicas[0]
    ray.kill(ray.get_actor(victim["name"], namespace=victim["namespace"]), no_restart=True)
    killed_at = time.monotonic()
    attempts = failures = answered = 0
    replaced = None
    while time.monotonic() - killed_at < 90:
        for _ in range(3):  # the client retries; every failed attempt is counted
            attempts += 1
            try:
                r = requests.post(f"{url}/predict", data=good, headers={"Content-Type": "image/png"}, timeout=30)
                if r.status_code == 200:
                    answered += 1
                    break
            except requests.RequestException:
                pass
            failures += 1
        else:
            pytest.fail(f"three attempts in a row failed {time.monotonic() - killed_at:.1f} s after the kill")
        names = {a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
                 if a["name"].startswith("SERVE_REPLICA::mnist#MnistServer")}
        if replaced is None and victim["name"] not in names and len(names) == 2 and _running_replicas() == 2:
            replaced = time.monotonic() - killed_at
        if replaced is not None and answered >= 20:
            break
    print(f"\nreplica killed: {answered} requests answered, {failures} of {attempts} attempts failed; "
          f"Serve replaced it in {replaced and round(replaced, 1)} s")
    assert replaced is not None, "Serve did not bring the replica count back to 2"
    assert failures <= answered  # a few requests may hit the dead replica before Serve notices


def test_summary_on_stop_has_requests_and_latency_percentiles(server):
    _, state = server
    time.sleep(1.5)  # the last reports of the replicas
    state["stop"].set()
    state["thread"].join(60)
    summary = state.get("summary")
    assert summary is not None, state.get("error")
    print("\nserve summary:", json.dumps({k: summary[k] for k in ("requests", "ok", "rejected", "failed",
                                                                  "images", "latency_ms")}))
    assert summary["stopped_by"] == "stopped" and summary["requests"] >= 60 and summary["ok"] >= 40
    lat = summary["latency_ms"]
    assert 0 < lat["p50"] <= lat["p90"] <= lat["p99"] <= lat["max"]
    assert summary["rejected"] >= 16 and summary["images"] >= summary["ok"]
