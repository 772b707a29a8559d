"""Session fixtures that start real services: an S3 server (moto) and one local Ray.

Both bind to 127.0.0.1. The S3 variables are set before Ray starts, so Ray's workers
inherit them (and get them again through the runtime_env of `cluster.connect`).
"""

from __future__ import annotations

import gzip
import os
import socket
import uuid
from pathlib import Path

import numpy as np
import pytest

# Before anything imports Ray: every Ray these tests start listens on 127.0.0.1 only (see
# mnist_ray.plumbing.cluster.SINGLE_MACHINE), including the `ray start --head` of test_cluster.py.
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")

# The MNIST test set shipped in the package (mnist_ray/data/mnist): the repo needs nothing beside it.
MNIST_TEST_DIR = Path(__file__).resolve().parents[1] / "mnist_ray" / "data" / "mnist"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def mnist_idx_dir() -> Path:
    """The real MNIST test set in IDX format, as shipped in the package."""
    if not (MNIST_TEST_DIR / "t10k-images-idx3-ubyte.gz").exists():
        pytest.fail(f"the real MNIST test set is missing: expected it in {MNIST_TEST_DIR}")
    return MNIST_TEST_DIR


@pytest.fixture(scope="session")
def mnist_test_arrays(mnist_idx_dir):
    """(images uint8 (10000, 28, 28), labels (10000,)) parsed independently of the project."""
    raw = gzip.decompress((mnist_idx_dir / "t10k-images-idx3-ubyte.gz").read_bytes())
    images = np.frombuffer(raw, np.uint8, offset=16).reshape(-1, 28, 28)
    labels = np.frombuffer(gzip.decompress((mnist_idx_dir / "t10k-labels-idx1-ubyte.gz").read_bytes()),
                           np.uint8, offset=8)
    return images, labels


@pytest.fixture(scope="session")
def s3_server():
    """A moto S3 server on 127.0.0.1; AWS_* variables point every client at it."""
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    env = {"AWS_ENDPOINT_URL": endpoint, "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
           "AWS_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true"}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    yield endpoint
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
    server.stop()


@pytest.fixture
def s3_bucket(s3_server) -> str:
    """A fresh, empty bucket on the test S3 server."""
    import boto3

    name = f"test-{uuid.uuid4().hex[:10]}"
    boto3.client("s3", endpoint_url=s3_server).create_bucket(Bucket=name)
    return name


@pytest.fixture(scope="session")
def ray_local(s3_server):
    """One local Ray for the whole session: 2 CPUs, bound to 127.0.0.1, never a leftover cluster."""
    import ray

    from mnist_ray.plumbing import cluster

    os.environ.pop("RAY_ADDRESS", None)
    cluster.connect(None, num_cpus=2)
    yield
    ray.shutdown()


@pytest.fixture(scope="session")
def digit_folder(tmp_path_factory, mnist_test_arrays):
    """A folder of real MNIST digits as users have files: class folders, PNG/JPEG/BMP, grey,
    RGB and RGBA, odd sizes, one unlabeled file, one corrupt and one truncated file, and
    files that are not images. Returns (path, {relative path: label or None}) of the good ones."""
    from PIL import Image

    root = tmp_path_factory.mktemp("digits")
    images, labels = mnist_test_arrays
    good = {}
    for i in range(40):
        image, label = Image.fromarray(images[i]), int(labels[i])
        (root / str(label)).mkdir(exist_ok=True)
        kind = i % 4
        if kind == 0:
            rel, img, fmt = f"{label}/d{i}.png", image, "PNG"
        elif kind == 1:
            rel, img, fmt = f"{label}/d{i}.jpg", image.convert("RGB").resize((100, 80)), "JPEG"
        elif kind == 2:
            rel, img, fmt = f"{label}/d{i}.bmp", image.convert("RGB").resize((31, 45)), "BMP"
        else:
            rel, img, fmt = f"{label}/d{i}.png", image.convert("RGBA").resize((57, 57)), "PNG"
        img.save(root / rel, format=fmt)
        good[rel] = label
    Image.fromarray(images[100]).save(root / "loose.png")
    good["loose.png"] = None
    (root / "3" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n this is not really a png")
    full = (root / "0" / "d0.png").read_bytes() if (root / "0" / "d0.png").exists() else None
    jpeg = next(root.glob("*/d1.jpg")).read_bytes()
    (root / "5" / "truncated.jpg").parent.mkdir(exist_ok=True)
    (root / "5" / "truncated.jpg").write_bytes(jpeg[: len(jpeg) // 3])
    (root / "README.txt").write_text("not an image")
    (root / ".DS_Store").write_bytes(b"\0\0")
    del full
    return root, good


@pytest.fixture(scope="session")
def small_shards(ray_local, tmp_path_factory) -> str:
    """mnist-sample, 1,000 train and 500 val rows: small enough to train on in seconds."""
    from mnist_ray.preparation.prepare import PrepareConfig, run

    out = str(tmp_path_factory.mktemp("small") / "shards")
    run(PrepareConfig(output=out, limit=1000))
    return out


@pytest.fixture(scope="session")
def trained_model(small_shards, tmp_path_factory) -> tuple[str, dict]:
    """A cnn trained by `mnist-ray train` with 2 Ray Train workers: (model dir, summary)."""
    from mnist_ray.training.train import TrainConfig, run

    out = str(tmp_path_factory.mktemp("trained") / "model")
    summary = run(TrainConfig(data=small_shards, output=out, model="cnn", epochs=3, workers=2,
                              batch_size=64, learning_rate=2e-3))
    return out, summary
