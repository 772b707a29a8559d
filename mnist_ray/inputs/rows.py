"""Foreign rows (Parquet, archives) to the project's row form; pure functions run in Ray read tasks."""

from __future__ import annotations

import math

import numpy as np
import pyarrow as pa

from mnist_ray.formats import shards
from mnist_ray.images import preprocess
from mnist_ray.inputs.columns import Columns, is_variable_tensor

ROW_FORM = pa.schema([
    pa.field("id", pa.string()), pa.field("image", pa.binary()), pa.field("label", pa.int8()),
    pa.field("split", pa.string()), pa.field("path", pa.string()),
    pa.field("pixels", pa.binary(preprocess.MODEL_SIZE ** 2)), pa.field("error", pa.string()),
])



def _gray(pixels: np.ndarray) -> np.ndarray:
    """(H, W) or (H, W, C) uint8 -> (H, W) grayscale, the way Pillow's ``convert("L")`` does."""
    if pixels.ndim == 2:
        return pixels
    if pixels.shape[2] == 1:
        return pixels[..., 0]
    from PIL import Image

    mode = "RGB" if pixels.shape[2] == 3 else "RGBA"
    return np.asarray(Image.fromarray(np.ascontiguousarray(pixels), mode).convert("L"))


def pixel_rows(column: pa.Array, shape: tuple[int, ...] | None) -> list[np.ndarray | str | None]:
    """A pixels column -> one uint8 array per row (or an error string, or None for a null)."""
    if isinstance(column.type, pa.ExtensionType):
        column = column.storage
    out: list[np.ndarray | str | None] = []
    if pa.types.is_fixed_size_binary(column.type):
        for v in column.to_pylist():
            out.append(None if v is None else np.frombuffer(v, np.uint8))
    elif is_variable_tensor(column.type):
        valid = column.is_valid().to_pylist()
        data, dims_ = column.flatten()  # children sliced like the struct (field() is not)
        for ok, v, dims in zip(valid, data.to_numpy(zero_copy_only=False), dims_.to_pylist()):
            if not ok or v is None or dims is None:
                out.append(None)
            elif math.prod(dims) != len(v):
                out.append(f"ValueError: {len(v)} pixels do not make a {'x'.join(map(str, dims))} image")
            else:
                out.append(np.asarray(v, np.uint8).reshape(dims))
    else:
        for v in column.to_numpy(zero_copy_only=False):
            if v is None:
                out.append(None)
                continue
            flat = np.asarray(v)
            while flat.dtype == object:  # nested lists: arrays of arrays
                flat = np.stack(list(flat))
            out.append(flat.astype(np.uint8, copy=False))
    for i, v in enumerate(out):
        if v is None or isinstance(v, str):
            continue
        if shape is not None:
            if v.size != math.prod(shape):
                out[i] = f"ValueError: {v.size} pixels do not make a {'x'.join(map(str, shape))} image"
                continue
            v = v.reshape(shape)
        elif v.ndim == 1:
            side = math.isqrt(v.size)
            if side * side != v.size or side == 0:
                out[i] = f"ValueError: {v.size} pixels are not a square image: give --image-shape HxW"
                continue
            v = v.reshape(side, side)
        if v.ndim not in (2, 3):
            out[i] = f"ValueError: pixels of shape {v.shape} are not an image"
            continue
        out[i] = v
    return out


def to_rows(table: pa.Table, cols: Columns, file_id: str, first_row: int, *, encode: bool) -> pa.Table:
    """A batch of foreign rows -> the row form (id, image, label, split, path, pixels, error).

    Without an id column the id is ``FILE#ROW`` (``file_id`` relative to the input, the row's
    number in its file): the same on every run. Pixel columns become the model's pixels
    (``preprocess.mnist_like``, as a decoded PNG would); ``encode`` also stores them as PNG
    (prepare needs the image, infer does not).
    """
    n = table.num_rows
    if cols.id:
        ids = table[cols.id].cast(pa.string())
    else:
        ids = pa.array([f"{file_id}#{first_row + i}" for i in range(n)], pa.string())
    label = pa.nulls(n, pa.int8())
    if cols.label:
        raw = table[cols.label]
        if pa.types.is_dictionary(raw.type):
            raw = raw.cast(raw.type.value_type)
        values = raw.to_numpy(zero_copy_only=False)
        ok = [v is not None and not (isinstance(v, float) and math.isnan(v)) and 0 <= v < 128 for v in values]
        label = pa.array([int(v) if k else None for v, k in zip(values, ok)], pa.int8())
    split = table[cols.split].cast(pa.string()) if cols.split else pa.nulls(n, pa.string())
    errors: list[str | None] = [None] * n
    pixels = pa.nulls(n, ROW_FORM.field("pixels").type)
    path = pa.nulls(n, pa.string())
    column = table[cols.image].combine_chunks()
    if cols.image_kind == "hf":
        bytes_ = column.field("bytes")
        names = {column.type.field(i).name for i in range(column.type.num_fields)}
        if "path" in names:
            path = column.field("path").cast(pa.string())
        images = bytes_.cast(pa.binary())
        errors = [None if b else "no image bytes (an Image that only names a file is not read)"
                  for b in images.is_valid().to_pylist()]
    elif cols.image_kind == "encoded":
        images = column.cast(pa.binary())
        errors = [None if b else "no image bytes" for b in images.is_valid().to_pylist()]
    if cols.image_kind != "pixels" and encode:
        # Shards keep PNG and JPEG as they are and re-encode the rest; an image that does not
        # decode becomes an error row here, as a bad file in an image folder does.
        checked = [stored_image(b, e) for b, e in zip(images.to_pylist(), errors)]
        images = pa.array([b for b, _ in checked], pa.binary())
        errors = [e for _, e in checked]
    elif cols.image_kind == "pixels":
        grays = pixel_rows(column, cols.shape)
        model = np.zeros((n, preprocess.MODEL_SIZE, preprocess.MODEL_SIZE), np.uint8)
        valid = np.zeros(n, bool)
        png: list[bytes | None] = [None] * n
        for i, v in enumerate(grays):
            if v is None:
                errors[i] = "no pixels"
            elif isinstance(v, str):
                errors[i] = v
            else:
                try:
                    gray = _gray(v)
                    model[i], valid[i] = preprocess.mnist_like(gray), True
                    if encode:
                        png[i] = preprocess.encode_png(gray[None])[0]
                except ValueError as e:
                    errors[i] = preprocess.describe_error(e)
        pixels = shards.pixels_column(model, valid)
        images = pa.array(png, pa.binary())
    return pa.table({"id": ids, "image": images, "label": label, "split": split, "path": path,
                     "pixels": pixels, "error": pa.array(errors, pa.string())}, schema=ROW_FORM)


def stored_image(data: bytes | None, error: str | None) -> tuple[bytes | None, str | None]:
    """What a shard stores for encoded image bytes: PNG/JPEG as they are, the rest as PNG, or why not."""
    if error is not None or data is None:
        return None, error or "no image bytes"
    return preprocess.normalize_stored_image(data)

