"""Named datasets' digit arrays as Ray Data rows of encoded images (PNG, or photos of them)."""

from __future__ import annotations

import zlib

import numpy as np
import pyarrow as pa

from mnist_ray.errors import MnistRayError
from mnist_ray.images import preprocess
from mnist_ray.inputs import datasets

BLOCK_ROWS = 5_000  # rows per Ray Data block when encoding arrays: enough blocks to use every core


def evenly_spaced(n: int, limit: int | None) -> np.ndarray:
    """Indices of at most ``limit`` rows spread over all ``n`` (every class of a sorted set)."""
    if limit is None or limit >= n:
        return np.arange(n)
    return np.unique(np.linspace(0, n - 1, limit).round().astype(np.int64))


def encode_array_batch(batch: pa.Table, height: int, width: int, render: str = "png") -> pa.Table:
    """Rows of raw uint8 pixels -> rows of PNG (or photo JPEG) bytes in the shard schema (a Ray task)."""
    pixels = batch["pixels"].combine_chunks()
    start, n = pixels.offset * height * width, len(pixels)
    raw = np.frombuffer(pixels.buffers()[1], dtype=np.uint8)[start: start + n * height * width]
    digits = raw.reshape(n, height, width)
    if render == "photo":  # seeded by id: the same photo on every run
        images = [datasets.render_photo(d, np.random.default_rng(zlib.crc32(i.encode())))
                  for d, i in zip(digits, batch["id"].to_pylist())]
    else:
        images = preprocess.encode_png(digits)
    return pa.table({
        "id": batch["id"], "image": pa.array(images, pa.binary()), "label": batch["label"],
        "split": batch["split"], "path": pa.nulls(n, pa.string()),
    })


def array_blocks(data: datasets.ArrayDataset, limit: int | None, block_rows: int) -> tuple[list[pa.Table], int, int]:
    """The kept rows of every split as Arrow blocks of raw pixels, and the image height and width."""
    blocks, shape = [], None
    for split_name, split in data.splits.items():
        keep = evenly_spaced(len(split.labels), limit)
        images, labels, ids = split.images[keep], split.labels[keep], split.ids[keep]
        if shape not in (None, images.shape[1:]):
            raise MnistRayError(f"{data.name}: splits have different image sizes")
        shape = images.shape[1:]
        flat = images.reshape(len(images), -1)
        for start in range(0, len(labels), block_rows):
            stop = min(start + block_rows, len(labels))
            chunk = np.ascontiguousarray(flat[start:stop])
            pixels = pa.FixedSizeBinaryArray.from_buffers(
                pa.binary(chunk.shape[1]), len(chunk), [None, pa.py_buffer(chunk.tobytes())])
            blocks.append(pa.table({
                "id": pa.array(ids[start:stop], pa.string()), "pixels": pixels,
                "label": pa.array(labels[start:stop], pa.int8()),
                "split": pa.array([split_name] * (stop - start), pa.string()),
            }))
    return blocks, int(shape[0]), int(shape[1])


def encoded_rows(data: datasets.ArrayDataset, limit: int | None, block_rows: int = BLOCK_ROWS):
    """The streaming Ray Dataset of ``data``'s rows with encoded images, and how many there are."""
    import ray

    blocks, height, width = array_blocks(data, limit, min(BLOCK_ROWS, block_rows))
    ds = ray.data.from_arrow(blocks).map_batches(
        encode_array_batch, batch_format="pyarrow", batch_size=None,
        fn_kwargs={"height": height, "width": width, "render": data.render})
    return ds, sum(b.num_rows for b in blocks)
