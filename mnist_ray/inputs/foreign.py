"""Parquet that mnist-ray did not write: find its image, id and label columns, turn its rows into
the project's row form, and fingerprint it (such input has no manifest).

Image columns: a Hugging Face ``Image`` struct {bytes, path}, binary of encoded images, or
pixels (uint8 list, fixed-size list, nested lists, a Ray tensor column as ``read_images`` or
``from_numpy`` + ``write_parquet`` produce). Pure functions on pyarrow values; the Ray read
that drives them is ``readers.read_pieces`` over the row groups ``plan`` lists.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import hashlib
import json
import math
import os
import posixpath
from dataclasses import dataclass
from typing import Iterable

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs

from mnist_ray.images import preprocess
from mnist_ray.plumbing import storage
from mnist_ray.errors import MnistRayError

PARQUET_EXTENSIONS = (".parquet", ".parq", ".pq")
IMAGE_NAMES = ("image", "img", "images", "png", "jpg", "jpeg", "picture")
ID_NAMES = ("id", "image_id", "uid", "key", "__key__")
LABEL_NAMES = ("label", "labels", "class", "target", "digit", "y", "cls")
SPLIT_NAMES = ("split",)
VARIABLE_TENSOR = b"ray.data.arrow_variable_shaped_tensor"
RAY_TENSOR_NAMES = (b"ray.data.arrow_tensor", b"ray.data.arrow_tensor_v2", VARIABLE_TENSOR)
ROW_FORM = pa.schema([
    pa.field("id", pa.string()), pa.field("image", pa.binary()), pa.field("label", pa.int8()),
    pa.field("split", pa.string()), pa.field("path", pa.string()),
    pa.field("pixels", pa.binary(preprocess.MODEL_SIZE ** 2)), pa.field("error", pa.string()),
])


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


# --- column detection (schema only) ---------------------------------------------------------

def hf_features(schema: pa.Schema) -> dict:
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


def _storage_and_shape(field: pa.Field) -> tuple[pa.DataType, tuple[int, ...] | None]:
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


def _is_variable_tensor(t: pa.DataType) -> bool:
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
    t, _ = _storage_and_shape(field)
    if _is_variable_tensor(t):
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
    t, shape = _storage_and_shape(field)
    if image_shape:
        return image_shape
    if shape:
        return shape
    if pa.types.is_fixed_size_binary(t):
        side = math.isqrt(t.byte_width)
        return (side, side)
    if _is_variable_tensor(t):
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


def _describe(schema: pa.Schema) -> str:
    return ", ".join(f"{f.name} ({f.type})" for f in schema)


def detect(schema: pa.Schema, *, image_column: str | None = None, id_column: str | None = None,
           label_column: str | None = None, image_shape: tuple[int, ...] | None = None) -> Columns:
    """The columns to read, found from the schema alone; a one-line error when no choice is safe."""
    features = hf_features(schema)
    if image_column:
        if image_column not in schema.names:
            raise MnistRayError(f"--image-column {image_column!r}: no such column (columns: {_describe(schema)})")
        image = image_column
        kind = image_kind(schema.field(image), features)
        if kind is None:
            raise MnistRayError(f"--image-column {image!r} is {schema.field(image).type}, not images: give a column "
                                "of encoded images (binary, or a struct {bytes, path}) or of uint8 pixels")
    else:
        candidates = [(f.name, k) for f in schema if (k := image_kind(f, features))]
        if not candidates:
            raise MnistRayError(f"no image column in this Parquet (columns: {_describe(schema)}): need encoded images "
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


# --- rows (run in Ray read tasks) -----------------------------------------------------------

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
    elif _is_variable_tensor(column.type):
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
        from mnist_ray.formats import shards

        pixels = shards.pixels_column(model, valid)
        images = pa.array(png, pa.binary())
    return pa.table({"id": ids, "image": images, "label": label, "split": split, "path": path,
                     "pixels": pixels, "error": pa.array(errors, pa.string())}, schema=ROW_FORM)


def stored_image(data: bytes | None, error: str | None) -> tuple[bytes | None, str | None]:
    """What a shard stores for encoded image bytes: PNG/JPEG as they are, the rest as PNG, or why not."""
    if error is not None or data is None:
        return None, error or "no image bytes"
    return preprocess.normalize_stored_image(data)


# --- files and fingerprint (driver) ---------------------------------------------------------

@dataclass(frozen=True)
class File:
    path: str  # on the filesystem
    size: int
    mtime_ns: int | None


@dataclass(frozen=True)
class FileSet:
    """The files of an input: where they are and what each is (size, modification time)."""

    root: storage.Location  # the directory ids are relative to
    files: tuple[File, ...]

    def rel(self, file: File) -> str:
        return posixpath.relpath(file.path, self.root.path)


def is_glob(path: str) -> bool:
    return any(c in path for c in "*?[")


def _parent_uri(uri: str, levels: int) -> str:
    """``uri`` without its last ``levels`` path parts (a local path is made absolute first)."""
    if "://" not in uri:
        uri = os.path.abspath(os.path.expanduser(uri))
    for _ in range(levels):
        uri = uri.rstrip("/").rsplit("/", 1)[0]
    return uri


def list_files(uri: str, extensions: tuple[str, ...] = PARQUET_EXTENSIONS) -> FileSet:
    """A file, a directory (searched recursively) or a glob -> the matching files, sorted."""
    loc = storage.resolve(uri)
    try:
        if is_glob(loc.path):
            parts = loc.path.split("/")
            depth = next(i for i, p in enumerate(parts) if is_glob(p))
            base = "/".join(parts[:depth])
            root = storage.Location(_parent_uri(uri, len(parts) - depth), loc.fs, base)
            infos = [i for i in loc.fs.get_file_info(pafs.FileSelector(base, recursive=True, allow_not_found=True))
                     if i.type == pafs.FileType.File and fnmatch.fnmatchcase(i.path, loc.path)]
        else:
            info = loc.fs.get_file_info(loc.path)
            if info.type == pafs.FileType.File:
                root, infos = storage.Location(_parent_uri(uri, 1), loc.fs, posixpath.dirname(loc.path)), [info]
            elif info.type == pafs.FileType.Directory:
                root = loc
                infos = [i for i in loc.fs.get_file_info(pafs.FileSelector(loc.path, recursive=True))
                         if i.type == pafs.FileType.File and i.base_name.lower().endswith(extensions)]
            else:
                raise MnistRayError(f"nothing at {uri}: give a Parquet file, a directory of them, or a glob")
    except MnistRayError:
        raise
    except OSError as e:
        raise MnistRayError(storage.describe_error(e, uri)) from e
    # Hidden and underscore files are not data (_SUCCESS, .crc, _common_metadata).
    infos = [i for i in infos if not any(p.startswith((".", "_"))
                                         for p in posixpath.relpath(i.path, root.path).split("/"))]
    if not infos:
        raise MnistRayError(f"no {'/'.join(extensions)} files at {uri}")
    return FileSet(root, tuple(File(i.path, i.size, i.mtime_ns) for i in sorted(infos, key=lambda i: i.path)))


def fingerprint(kind: str, files: FileSet, settings: dict) -> str:
    """What an input without a manifest is: every file's path, size and modification time, and
    how it is read. A file replaced, grown or touched gives another fingerprint (a new run key)."""
    h = hashlib.sha256(f"{kind}\0{json.dumps(settings, sort_keys=True)}\0".encode())
    for info in files.files:
        mtime = info.mtime_ns if info.mtime_ns is not None else -1
        h.update(f"{files.rel(info)}\t{info.size}\t{mtime}\n".encode())
    return "sha256:" + h.hexdigest()


# --- the plan: row groups as read pieces (driver) --------------------------------------------

PIECE_ROWS = 20_000  # row groups are merged into read pieces of about this many rows


@dataclass(frozen=True)
class Piece:
    """Row groups ``row_groups`` of one file, whose first row is row ``first_row`` of the file."""

    path: str
    file_id: str
    row_groups: tuple[int, ...]
    first_row: int
    rows: int
    bytes: int
    # The file's own pixel shape: Ray writes each block with a fixed shape when its images
    # share one, so the files of one read_images differ.
    shape: tuple[int, ...] | None = None


@dataclass(frozen=True)
class ParquetInput:
    """A foreign Parquet input, planned: its files, columns, pieces, rows and fingerprint."""

    uri: str
    files: FileSet
    columns: Columns
    pieces: tuple[Piece, ...]
    rows: int
    fingerprint: str

    def read_piece(self, piece: Piece, encode: bool = False) -> Iterable[pa.Table]:
        """The rows of one piece (what a Ray read task runs)."""
        return read_piece(piece, self.files.root.fs, self.columns, encode)

    def sample(self, n: int = 8) -> pa.Table | None:
        """The first rows, converted in the driver (infer's smoke test)."""
        if not self.pieces:
            return None
        import pyarrow.parquet as pq

        first = self.pieces[0]
        with self.files.root.fs.open_input_file(first.path) as f:
            table = pq.ParquetFile(f).read_row_group(first.row_groups[0], columns=self.columns.read_columns())
        columns = dataclasses.replace(self.columns, shape=first.shape)
        return to_rows(table.slice(0, n), columns, first.file_id, first.first_row, encode=False)

    def ids(self) -> Iterable[pa.Array]:
        """Every row's id, one piece at a time (reconciliation)."""
        import pyarrow.parquet as pq

        for piece in self.pieces:
            if self.columns.id:
                with self.files.root.fs.open_input_file(piece.path) as f:
                    t = pq.ParquetFile(f).read_row_groups(list(piece.row_groups), columns=[self.columns.id])
                yield t[self.columns.id].cast(pa.string())
            else:
                yield pa.array([f"{piece.file_id}#{piece.first_row + i}" for i in range(piece.rows)], pa.string())

    def dataset(self, encode: bool = False, num_cpus: float | None = None):
        """The streaming Ray Dataset of the input's rows in the row form."""
        import functools

        from mnist_ray.formats import readers

        # Each task gets its piece and a few small arguments, not the whole plan.
        read = functools.partial(read_piece, fs=self.files.root.fs, columns=self.columns, encode=encode)
        return readers.read_pieces(self.pieces, read, "ForeignParquet", ROW_FORM, num_cpus=num_cpus)


def read_piece(piece: Piece, fs: pafs.FileSystem, columns: Columns, encode: bool) -> Iterable[pa.Table]:
    """One piece's row groups, in the row form (runs in a Ray read task)."""
    import pyarrow.parquet as pq

    with fs.open_input_file(piece.path) as f:
        table = pq.ParquetFile(f).read_row_groups(list(piece.row_groups), columns=columns.read_columns())
    yield to_rows(table, dataclasses.replace(columns, shape=piece.shape), piece.file_id, piece.first_row,
                  encode=encode)


def open_parquet(uri: str, *, image_column: str | None = None, id_column: str | None = None,
                 label_column: str | None = None, image_shape: str | None = None) -> ParquetInput:
    """Plan the read of any image Parquet at ``uri`` (a file, a directory, a glob): a one-line
    error when it has no usable image column, the files disagree, or the choice is ambiguous."""
    import pyarrow.parquet as pq

    files = list_files(uri)
    shape = parse_shape(image_shape)
    columns, pieces, rows = None, [], 0
    for info in files.files:
        try:
            with files.root.fs.open_input_file(info.path) as f:
                meta = pq.ParquetFile(f).metadata
                schema = meta.schema.to_arrow_schema()
        except (OSError, pa.ArrowInvalid) as e:
            raise MnistRayError(f"{info.path} is not a readable Parquet file ({str(e).splitlines()[0]})") from e
        try:
            found = detect(schema, image_column=image_column, id_column=id_column, label_column=label_column,
                           image_shape=shape)
        except (ValueError, TypeError, KeyError, AttributeError) as e:  # a schema no rule here expected
            raise MnistRayError(f"{files.rel(info)}: columns not understood ({_describe(schema)}): "
                                f"{type(e).__name__}: {e}") from e
        if columns is None:
            columns = found
        elif dataclasses.replace(found, shape=None) != dataclasses.replace(columns, shape=None):
            theirs, ours = (f"{c.image}/{c.id}/{c.label}" for c in (found, columns))
            raise MnistRayError(f"{files.rel(info)} has other columns than {files.rel(files.files[0])} "
                                f"(image/id/label {theirs} vs {ours}): give files of one layout")
        start, group, group_rows, group_bytes, first = 0, [], 0, 0, 0
        for i in range(meta.num_row_groups):
            rg = meta.row_group(i)
            if group and group_rows + rg.num_rows > PIECE_ROWS:
                pieces.append(Piece(info.path, files.rel(info), tuple(group), first, group_rows, group_bytes,
                                    found.shape))
                group, group_rows, group_bytes = [], 0, 0
            if not group:
                first = start
            group.append(i)
            group_rows += rg.num_rows
            group_bytes += rg.total_byte_size
            start += rg.num_rows
        if group:
            pieces.append(Piece(info.path, files.rel(info), tuple(group), first, group_rows, group_bytes,
                                    found.shape))
        rows += meta.num_rows
    settings = {"image": columns.image, "id": columns.id, "label": columns.label, "shape": columns.shape}
    return ParquetInput(uri, files, columns, tuple(pieces), rows, fingerprint("parquet", files, settings))
