"""Every kind of input behind one interface: what it is, a few rows, its ids, its Ray datasets."""

# Every source yields rows of ``id``, ``label``, ``path`` and either ``pixels`` (shards of schema 2)
# or ``image`` (encoded bytes), and optionally ``error`` (a row the read could not produce), which
# ``predictor.prepare_rows`` turns into the model's input. For infer, a source answers without Ray
# what it is (``describe``), a few real rows (``sample``) and the digest of its ids (``digest``), and
# with Ray the streaming ``dataset``; for prepare, the rows to shard (``shard_rows``) and the class
# names they declare (``class_names``). Which command opens which kind is ``registry``'s.

from __future__ import annotations

import hashlib
import threading
from typing import ClassVar

import pyarrow as pa
import pyarrow.fs as pafs

from mnist_ray.formats import shards
from mnist_ray.images import preprocess
from mnist_ray.inputs import arrays, datasets, foreign
from mnist_ray.inputs.columns import ColumnChoice
from mnist_ray.inputs.files import PARQUET_EXTENSIONS, is_glob
from mnist_ray.plumbing import storage
from mnist_ray.errors import MnistRayError

SAMPLE_ROWS = 8


class Source:
    """One input of ``mnist-ray infer``.

    ``resume_key`` names the column Ray Data's checkpoint filter sees right after the read, and
    ``scheme`` what must be put in front of that column's values to give the ids written (the
    files' URIs on object storage); ``rows`` and ``fingerprint`` identify the input's content.
    """

    kind: ClassVar[str]
    resume_key: ClassVar[str] = "id"
    # The spec prefixes that name this kind (``parquet:PATH``); None: its path is the spec.
    prefix: ClassVar[str | None] = None

    def __init__(self, uri: str, *, rows: int, fingerprint: str, scheme: str = ""):
        self.uri, self.rows, self.fingerprint, self.scheme = uri, rows, fingerprint, scheme

    @classmethod
    def claims(cls, uri: str) -> bool:
        """Whether ``uri`` is this kind of input (a cheap look, no full listing)."""
        raise NotImplementedError

    @classmethod
    def named_by(cls, spec: str) -> bool:
        """Whether ``spec`` names this kind by its prefix (``parquet:PATH``)."""
        return cls.prefix is not None and spec.startswith(cls.prefix)

    @classmethod
    def open(cls, spec: str, options) -> "Source":
        """The input ``spec`` names, read as ``options`` (a ``registry.Options``) say."""
        return cls(spec)

    def describe(self) -> dict:
        """What the predictions' manifest records as its input (``evaluate`` reads it)."""
        return {"kind": self.kind, "uri": self.uri, "fingerprint": self.fingerprint, "rows": self.rows}

    def sample(self) -> pa.Table | None:
        """A few real rows, read in the driver without Ray."""
        raise NotImplementedError

    def digest(self, stop: threading.Event) -> shards.IdDigest | None:
        """The digest of every id (None when ``stop`` is set first): what the output must match."""
        raise NotImplementedError

    def dataset(self, read_cpus: float):
        """The streaming Ray Dataset of the rows; read tasks reserve ``read_cpus`` each."""
        raise NotImplementedError

    def shard_rows(self, limit: int | None, block_rows: int):
        """prepare's rows (encoded images, checked; at most ``limit``) as a Ray Dataset, and their count."""
        raise MnistRayError(f"{self.uri} is {self.kind}: prepare does not read it")

    def class_names(self) -> list[str]:
        """The names of the classes the shards declare: the input's own, else digits for every label."""
        return shards.class_names_for([])


class DatasetSource(Source):
    """A named dataset (mnist-sample, mnist-test, mnist, fashion-mnist, idx:PATH, photos:SOURCE):
    digit arrays in memory, encoded as PNG (or rendered as photos) by Ray tasks."""

    kind = "dataset"

    def __init__(self, spec: str, data: datasets.ArrayDataset):
        self.data = data
        super().__init__(spec, rows=data.num_rows, fingerprint="")

    @classmethod
    def claims(cls, uri: str) -> bool:
        return True  # prepare's catch-all: datasets.load names the sources it knows

    @classmethod
    def named_by(cls, spec: str) -> bool:
        return spec in datasets.NAMED_SOURCES or spec.startswith(("idx:", "photos:"))

    @classmethod
    def open(cls, spec: str, options) -> "DatasetSource":
        data = datasets.load(spec, val_fraction=options.val_fraction, seed=options.seed)
        if not isinstance(data, datasets.ArrayDataset):  # images:PATH is ImageFolderSource's
            raise MnistRayError(f"{spec} is not a dataset of digit arrays")
        return cls(spec, data)

    def shard_rows(self, limit: int | None, block_rows: int):
        return arrays.encoded_rows(self.data, limit, block_rows)

    def class_names(self) -> list[str]:
        from mnist_ray.model import export

        labels = [int(s.labels.max()) for s in self.data.splits.values() if len(s.labels)]
        return shards.class_names_for(labels, export.CLASS_NAMES.get(self.data.name.removeprefix("photos:")))


class ShardSource(Source):
    """Image shards (``mnist-ray prepare``): only the files the manifest lists."""

    kind = "shards"

    def __init__(self, uri: str, model_metadata: dict | None = None):
        self.loc, self.manifest = shards.open_shards(uri)
        self.paths = shards.shard_paths(self.loc, self.manifest)
        self.model_metadata = model_metadata
        super().__init__(uri, rows=self.manifest["rows"], fingerprint=self.manifest["fingerprint"])

    @classmethod
    def open(cls, spec: str, options) -> "ShardSource":
        return cls(spec, options.model_metadata)

    @classmethod
    def claims(cls, uri: str) -> bool:
        loc = storage.resolve(uri)
        try:
            return loc.fs.get_file_info(loc.join(storage.MANIFEST)).type == pafs.FileType.File
        except OSError as e:
            raise MnistRayError(storage.describe_error(e, uri)) from e

    def columns(self) -> list[str]:
        """The stored pixels where the shards have them and made them with the model's
        preprocessing version (then the encoded image only if some rows have no pixels), else
        the encoded image: a changed ``mnist_like`` never scores stale pixels."""
        usable = (shards.has_pixels(self.manifest) if self.model_metadata is None
                  else shards.pixels_usable(self.manifest, self.model_metadata))
        if not usable:
            return ["id", "image", "label", "path"]
        return ["id", "pixels", "label", "path"] + (["image"] if self.manifest.get("pixels_missing", 0) else [])

    def sample(self) -> pa.Table | None:
        import pyarrow.parquet as pq

        if not self.paths:
            return None
        with pq.ParquetFile(self.paths[0], filesystem=self.loc.fs) as first:
            if not first.num_row_groups:
                return None
            return shards.row_form(first.read_row_group(0, columns=self.columns()).slice(0, SAMPLE_ROWS))

    def digest(self, stop: threading.Event) -> shards.IdDigest | None:
        import pyarrow.parquet as pq

        ids = shards.IdDigest()
        for path in self.paths:  # one file's ids in memory at a time
            if stop.is_set():
                return None
            ids.add(pq.read_table(path, columns=["id"], filesystem=self.loc.fs)["id"])
        return ids

    def dataset(self, read_cpus: float):
        return shards.read_dataset(self.uri, columns=self.columns(), num_cpus=read_cpus)


class ImageFolderSource(Source):
    """A folder of image files (local or object storage), listed once; the id is the relative path."""

    kind, resume_key = "images", "path"  # the read has no id yet: files are resumed by path
    prefix = "images:"

    def __init__(self, uri: str):
        self.folder = datasets.image_folder(uri.removeprefix(self.prefix))
        listing = hashlib.sha256("\n".join(f"{rel}\t{size}" for rel, size in self.folder.files).encode())
        super().__init__(uri, rows=len(self.folder.files), fingerprint="sha256:" + listing.hexdigest(),
                         scheme=self.folder.root.scheme)

    @classmethod
    def claims(cls, uri: str) -> bool:
        return True  # the catch-all: image_folder says clearly what is wrong with anything else

    def describe(self) -> dict:
        return {**super().describe(), "files": self.rows}

    def paths(self) -> list[str]:
        return [self.folder.root.join(rel) for rel, _ in self.folder.files]

    def sample(self) -> pa.Table | None:
        first = self.paths()[:SAMPLE_ROWS]
        raw = []
        for path in first:
            with self.folder.root.fs.open_input_file(path) as f:
                raw.append(f.readall())
        return datasets.folder_rows(pa.table({"bytes": pa.array(raw, pa.binary()), "path": pa.array(first, pa.string())}),
                                    self.folder.root.path, self.folder.root.scheme)

    def digest(self, stop: threading.Event) -> shards.IdDigest:
        ids = shards.IdDigest()
        ids.add(pa.array([rel for rel, _ in self.folder.files], pa.string()))
        return ids

    def dataset(self, read_cpus: float):
        return self.read(self.paths(), datasets.folder_rows, batch_size=256, num_cpus=read_cpus)

    def shard_rows(self, limit: int | None, block_rows: int):
        paths = self.paths()
        paths = [paths[i] for i in arrays.evenly_spaced(len(paths), limit)]
        return self.read(paths, checked_folder_rows, batch_size=64), len(paths)

    def class_names(self) -> list[str]:
        return shards.class_names_for(datasets.label_from_path(rel) for rel, _ in self.folder.files)

    def read(self, paths: list[str], rows_of, batch_size: int, num_cpus: float | None = None):
        """The files at ``paths`` read by Ray, as rows made by ``rows_of(batch, root, scheme)``."""
        import ray

        root = self.folder.root
        return ray.data.read_binary_files(paths, filesystem=root.fs, include_paths=True,
                                          num_cpus=num_cpus).map_batches(
            rows_of, batch_format="pyarrow", batch_size=batch_size,
            fn_kwargs={"root": root.path, "scheme": root.scheme})


def checked_folder_rows(batch: pa.Table, root: str, scheme: str) -> pa.Table:
    """Rows of raw file bytes -> shard rows, or rows with an ``error`` for files that do not decode."""
    rows = datasets.folder_rows(batch, root, scheme)
    checked = [preprocess.normalize_stored_image(data) for data in rows["image"].to_pylist()]
    return rows.set_column(rows.schema.get_field_index("image"), "image",
                           pa.array([image or b"" for image, _ in checked], pa.binary())) \
        .append_column("error", pa.array([error for _, error in checked], pa.string()))


class PlannedSource(Source):
    """An input planned into read pieces (``foreign.ParquetInput``, ``archives.ArchiveInput``):
    the read makes the ids, so the checkpoint filter resumes by ``id``."""

    def __init__(self, uri: str, planned):
        self.planned = planned
        super().__init__(uri, rows=planned.rows, fingerprint=planned.fingerprint)

    def describe(self) -> dict:
        return {**super().describe(), "files": len(self.planned.files.files)}

    def sample(self) -> pa.Table | None:
        return self.planned.sample(SAMPLE_ROWS)

    def digest(self, stop: threading.Event) -> shards.IdDigest | None:
        ids = shards.IdDigest()
        for chunk in self.planned.ids():  # one piece's ids at a time
            if stop.is_set():
                return None
            ids.add(chunk)
        return ids

    def dataset(self, read_cpus: float):
        return self.planned.dataset(encode=False, num_cpus=read_cpus)

    def shard_rows(self, limit: int | None, block_rows: int):
        ds = self.planned.dataset(encode=True)
        if limit is not None and limit < self.rows:
            return ds.limit(limit), limit  # the first rows: a planned read has no splits to spread over
        return ds, self.rows


class ArchiveSource(PlannedSource):
    """A .zip, .tar or .tar.gz of image folders, or WebDataset tar shards (a glob), unpacked by none."""

    kind = "archive"
    prefix = "images:"  # prepare's images:PATH, when PATH is an archive

    def __init__(self, uri: str):
        from mnist_ray.inputs import archives

        super().__init__(uri, archives.open_archives(uri.removeprefix(self.prefix)))

    @classmethod
    def claims(cls, uri: str) -> bool:
        from mnist_ray.inputs import archives

        return archives.is_archive(uri)

    @classmethod
    def named_by(cls, spec: str) -> bool:
        return super().named_by(spec) and cls.claims(spec.removeprefix(cls.prefix))

    def class_names(self) -> list[str]:
        return shards.class_names_for(self.planned.labels())


class ParquetSource(PlannedSource):
    """Parquet mnist-ray did not write (``parquet:PATH``, a .parquet file, a glob, a directory of
    them): the image, id and label columns found by ``columns.detect`` or named by flags."""

    kind = "parquet"
    prefix = "parquet:"

    def __init__(self, uri: str, columns: ColumnChoice = ColumnChoice()):
        planned = foreign.open_parquet(uri.removeprefix(self.prefix), **columns.as_kwargs())
        super().__init__(uri, planned)

    @classmethod
    def open(cls, spec: str, options) -> "ParquetSource":
        return cls(spec, options.columns)

    @classmethod
    def claims(cls, uri: str) -> bool:
        if uri.startswith(cls.prefix) or uri.lower().endswith(PARQUET_EXTENSIONS):
            return True
        if is_glob(uri):
            return False  # a glob of images is an error of the image folder kind
        loc = storage.resolve(uri)
        try:
            if loc.fs.get_file_info(loc.path).type != pafs.FileType.Directory:
                return False
            infos = loc.fs.get_file_info(pafs.FileSelector(loc.path, recursive=True))
        except OSError as e:
            raise MnistRayError(storage.describe_error(e, uri)) from e
        names = [i.base_name.lower() for i in infos if i.type == pafs.FileType.File]
        # A directory of Parquet files (and no images): a Hugging Face or Ray Data export.
        return any(n.endswith(PARQUET_EXTENSIONS) for n in names) and \
            not any(n.endswith(datasets.IMAGE_EXTENSIONS) for n in names)

    def describe(self) -> dict:
        c = self.planned.columns
        return {**super().describe(), "columns": {"image": c.image, "id": c.id, "label": c.label}}

    def class_names(self) -> list[str]:
        names = self.planned.columns.label_names
        return list(names) if names else shards.class_names_for([])
