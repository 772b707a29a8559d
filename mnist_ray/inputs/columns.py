"""Which columns of a Parquet hold the image, id, label and split: found from the schema alone."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass

import pyarrow as pa

from mnist_ray.errors import MnistRayError

IMAGE_NAMES = ("image", "img", "images", "png", "jpg", "jpeg", "picture")
ID_NAMES = ("id", "image_id", "uid", "key", "__key__")
LABEL_NAMES = ("label", "labels", "class", "target", "digit", "y", "cls")
SPLIT_NAMES = ("split",)
VARIABLE_TENSOR = b"ray.data.arrow_variable_shaped_tensor"
RAY_TENSOR_NAMES = (b"ray.data.arrow_tensor", b"ray.data.arrow_tensor_v2", VARIABLE_TENSOR)


@dataclass(frozen=True)
class Columns:
    """Which columns hold what: ``image_kind`` is "hf" (struct), "encoded" (binary) or "pixels"."""

    image: str
    image_kind: str
    shape: tuple[int, ...] | None = None  # pixels: (H, W) or (H, W, C), when the column fixes it
    id: str | None = None
    label: str | None = None
    label_names: tuple[str, ...] | None = None
    split: str | None = None

    def read_columns(self) -> list[str]:
        return [c for c in (self.image, self.id, self.label, self.split) if c]


@dataclass(frozen=True)
class ColumnChoice:
    """The columns a user named (``--image-column`` ...): None leaves the choice to ``detect``."""

    image_column: str | None = None
    id_column: str | None = None
    label_column: str | None = None
    image_shape: str | None = None

    def as_kwargs(self) -> dict:
        return {"image_column": self.image_column, "id_column": self.id_column,
                "label_column": self.label_column, "image_shape": self.image_shape}


def parse_shape(text: str | None) -> tuple[int, ...] | None:
    """``--image-shape 28x28`` (or HxWxC) -> (28, 28)."""
    if not text:
        return None
    try:
        shape = tuple(int(p) for p in text.lower().split("x"))
    except ValueError:
        shape = ()
    if len(shape) not in (2, 3) or min(shape) < 1 or (len(shape) == 3 and shape[2] not in (1, 3, 4)):
        raise MnistRayError(f"--image-shape {text!r}: give HxW or HxWxC (C 1, 3 or 4), e.g. 28x28")
    return shape



def recorded_features(schema: pa.Schema) -> dict:
    """The ``datasets`` features recorded in the schema metadata (empty when there are none)."""
    raw = (schema.metadata or {}).get(b"huggingface")
    if not raw:
        return {}
    try:
        return json.loads(raw).get("info", {}).get("features", {}) or {}
    except (ValueError, AttributeError):
        return {}


def ray_tensor_shape(name: bytes | None, serialized: bytes | None) -> tuple[int, ...] | None:
    """The fixed shape a Ray tensor column's Parquet metadata records; None when it has none.

    Ray 2.60 serializes it as JSON (``ray.data._internal.tensor_extensions.arrow``): the
    shape as a list (``[28, 28]``) for ``arrow_tensor``/``arrow_tensor_v2``, the number of
    dimensions (``2``) for ``arrow_variable_shaped_tensor``, whose every row has its own shape.
    Ray 2.49-2.54 wrote cloudpickle, which is never loaded here: such a column's shape is
    unknown (square rows, or --image-shape).
    """
    if name not in RAY_TENSOR_NAMES or name == VARIABLE_TENSOR or not serialized:
        return None
    try:
        value = json.loads(serialized)
    except (ValueError, UnicodeDecodeError):
        return None
    if isinstance(value, dict):
        value = value.get("shape")
    if isinstance(value, list) and value and all(isinstance(s, int) and s > 0 for s in value):
        return tuple(value)
    return None


def storage_and_shape(field: pa.Field) -> tuple[pa.DataType, tuple[int, ...] | None]:
    """A tensor column's storage type and fixed shape (registered or not), else (type, None)."""
    t = field.type
    if isinstance(t, pa.ExtensionType):
        try:
            shape = tuple(t.shape)
        except (AttributeError, TypeError, ValueError):
            shape = ()
        fixed = bool(shape) and all(isinstance(s, int) and s > 0 for s in shape)
        return t.storage_type, shape if fixed else None
    meta = field.metadata or {}
    return t, ray_tensor_shape(meta.get(b"ARROW:extension:name"), meta.get(b"ARROW:extension:metadata"))


def is_variable_tensor(t: pa.DataType) -> bool:
    """Ray's variable-shaped tensor storage: struct {data: list<uint8>, shape: list<int>}."""
    if not pa.types.is_struct(t) or {t.field(i).name for i in range(t.num_fields)} != {"data", "shape"}:
        return False
    data, shape = t.field("data").type, t.field("shape").type
    return _uint8_depth(data) == (1, (0,)) and (pa.types.is_list(shape) or pa.types.is_large_list(shape)) \
        and pa.types.is_integer(shape.value_type)


def _uint8_depth(t: pa.DataType) -> tuple[int, tuple[int, ...]] | None:
    """Nesting depth of lists around uint8, and their fixed sizes (0 where variable); None otherwise."""
    sizes = []
    while pa.types.is_list(t) or pa.types.is_large_list(t) or pa.types.is_fixed_size_list(t):
        sizes.append(t.list_size if pa.types.is_fixed_size_list(t) else 0)
        t = t.value_type
    if not sizes or not pa.types.is_uint8(t):
        return None
    return len(sizes), tuple(sizes)


def image_kind(field: pa.Field, features: dict) -> str | None:
    """What an image column of this field would be ("hf", "encoded", "pixels"), or None."""
    if features.get(field.name, {}).get("_type") == "Image":
        return "hf"
    t, _ = storage_and_shape(field)
    if is_variable_tensor(t):
        return "pixels"  # Ray's read_images of images of several sizes: each row has its shape
    if pa.types.is_struct(t):
        names = {t.field(i).name for i in range(t.num_fields)}
        inner = t.field("bytes").type if "bytes" in names else None
        return "hf" if inner is not None and (pa.types.is_binary(inner) or pa.types.is_large_binary(inner)) else None
    if pa.types.is_binary(t) or pa.types.is_large_binary(t):
        return "encoded"
    if pa.types.is_fixed_size_binary(t) and math.isqrt(t.byte_width) ** 2 == t.byte_width:
        return "pixels"  # e.g. mnist-ray's own 784-byte ``pixels``
    if _uint8_depth(t) is not None:
        return "pixels"
    return None


def _pixel_shape(field: pa.Field, image_shape: tuple[int, ...] | None) -> tuple[int, ...] | None:
    t, shape = storage_and_shape(field)
    if image_shape:
        return image_shape
    if shape:
        return shape
    if pa.types.is_fixed_size_binary(t):
        side = math.isqrt(t.byte_width)
        return (side, side)
    if is_variable_tensor(t):
        return None  # per row, from its own shape
    depth, sizes = _uint8_depth(t)
    if depth >= 2 and all(sizes[:3]):
        return sizes[:3]
    if depth == 1 and sizes[0] and math.isqrt(sizes[0]) ** 2 == sizes[0]:
        return (math.isqrt(sizes[0]),) * 2
    return None  # per row: a square length, or nested lists


def _pick(schema: pa.Schema, explicit: str | None, names: tuple[str, ...], ok, what: str, flag: str) -> str | None:
    if explicit:
        if explicit not in schema.names:
            raise MnistRayError(f"{flag} {explicit!r}: no such column (columns: {', '.join(schema.names)})")
        return explicit
    found = [n for n in schema.names if n.lower() in names and ok(schema.field(n))]
    if len(found) > 1:
        raise MnistRayError(f"several {what} columns ({', '.join(found)}): choose one with {flag}")
    return found[0] if found else None


def _is_integer(field: pa.Field) -> bool:
    t = field.type.value_type if pa.types.is_dictionary(field.type) else field.type
    return pa.types.is_integer(t)


def describe_schema(schema: pa.Schema) -> str:
    return ", ".join(f"{f.name} ({f.type})" for f in schema)


def detect(schema: pa.Schema, *, image_column: str | None = None, id_column: str | None = None,
           label_column: str | None = None, image_shape: tuple[int, ...] | None = None) -> Columns:
    """The columns to read, found from the schema alone; a one-line error when no choice is safe."""
    features = recorded_features(schema)
    if image_column:
        if image_column not in schema.names:
            raise MnistRayError(f"--image-column {image_column!r}: no such column (columns: {describe_schema(schema)})")
        image = image_column
        kind = image_kind(schema.field(image), features)
        if kind is None:
            raise MnistRayError(f"--image-column {image!r} is {schema.field(image).type}, not images: give a column "
                                "of encoded images (binary, or a struct {bytes, path}) or of uint8 pixels")
    else:
        candidates = [(f.name, k) for f in schema if (k := image_kind(f, features))]
        if not candidates:
            raise MnistRayError(f"no image column in this Parquet (columns: {describe_schema(schema)}): need encoded images "
                                "(binary, or a struct {bytes, path}) or uint8 pixels; name it with --image-column")
        tagged = [c for c in candidates if features.get(c[0], {}).get("_type") == "Image"]
        named = [c for c in candidates if c[0].lower() in IMAGE_NAMES]
        for group in (candidates, tagged, named):
            if len(group) == 1:
                image, kind = group[0]
                break
        else:
            raise MnistRayError(f"several image columns ({', '.join(n for n, _ in candidates)}): "
                                "choose one with --image-column")
    shape = _pixel_shape(schema.field(image), image_shape) if kind == "pixels" else None
    rest = pa.schema([f for f in schema if f.name != image])
    id_ = _pick(rest, id_column, ID_NAMES, lambda f: pa.types.is_string(f.type) or pa.types.is_large_string(f.type)
                or pa.types.is_integer(f.type), "id", "--id-column")
    tagged_labels = [n for n in rest.names if features.get(n, {}).get("_type") == "ClassLabel"]
    if not label_column and len(tagged_labels) == 1:
        label_column = tagged_labels[0]
    label = _pick(rest, label_column, LABEL_NAMES, _is_integer, "label", "--label-column")
    if label and not _is_integer(rest.field(label)):
        raise MnistRayError(f"--label-column {label!r} is {rest.field(label).type}: labels must be integers")
    names = features.get(label, {}).get("names") if label else None
    split = _pick(rest, None, SPLIT_NAMES, lambda f: pa.types.is_string(f.type), "split", "")
    return Columns(image, kind, shape, id_, label, tuple(names) if names else None, split)

