"""Archives of image folders (.zip, .tar, .tar.gz, WebDataset shards) read as rows, never unpacked."""

# Archives of image folders in, without unpacking them to disk: ``.zip``, ``.tar``, ``.tar.gz``
# (``.tgz``), local or on object storage, and WebDataset-style tar shards (``KEY.png`` beside
# ``KEY.cls``).
#
# The driver lists the members (zip: the central directory; tar: the headers, read through a
# 1 MiB buffer so small members cost no extra request); read tasks then fetch byte ranges of
# consecutive members in parallel, one range request each. gzip cannot seek, so a ``.tar.gz`` is
# listed by one pass in the driver and read by one streaming task. The class folder gives the
# label (``7/x.png``, as for ``images:PATH``); a member whose data is corrupt (CRC, deflate)
# becomes one error row.

from __future__ import annotations

import functools
import gzip
import io
import posixpath
import struct
import tarfile
import zipfile
import zlib
from dataclasses import dataclass
from typing import Iterable

import pyarrow as pa
import pyarrow.fs as pafs

from mnist_ray.inputs import datasets
from mnist_ray.inputs.files import FileSet, is_glob, list_files, listing_fingerprint
from mnist_ray.inputs.rows import ROW_FORM, stored_image
from mnist_ray.plumbing import storage
from mnist_ray.errors import MnistRayError

EXTENSIONS = (".zip", ".tar", ".tar.gz", ".tgz")
PIECE_MEMBERS = 2_000  # members per read task...
PIECE_BYTES = 32 << 20  # ...or bytes, whichever comes first
STREAM_BLOCK_ROWS = 2_000  # rows per block of a streamed .tar.gz
LIST_BUFFER = 1 << 20
LABEL_EXTENSIONS = ("cls", "label", "target")  # WebDataset: the class as text beside the image
ZIP_LOCAL_HEADER = struct.Struct("<IHHHHHIIIHH")  # signature ... name length, extra length


def kind_of(path: str) -> str | None:
    """"zip", "tar" or "tgz" from the name; None for anything else."""
    lower = path.lower()
    if lower.endswith(".zip"):
        return "zip"
    if lower.endswith((".tar.gz", ".tgz")):
        return "tgz"
    if lower.endswith(".tar"):
        return "tar"
    return None


def is_archive(uri: str) -> bool:
    """Whether ``uri`` names archives (a file or a glob of them) rather than a folder."""
    return kind_of(uri.rstrip("/")) is not None


@dataclass(frozen=True)
class Member:
    """A member's name in the archive, where its bytes are and how they are stored."""

    name: str
    offset: int  # zip: its local header; tar: its data
    end: int  # first byte after it (zip: the next local header or the central directory)
    size: int  # stored bytes (compressed in a zip)
    method: int = 0  # zip compression (0 stored, 8 deflate)
    crc: int = 0


@dataclass(frozen=True)
class MemberPiece:
    """Consecutive members of one archive, read by one task (all of a ``.tar.gz``)."""

    path: str
    kind: str
    prefix: str  # id prefix: the archive's name when the input is several archives
    uri: str  # the archive's URI, for the rows' ``path``
    members: tuple[Member, ...]
    webdataset: bool
    rows: int
    bytes: int


# --- rows ----------------------------------------------------------------------------------

def _keep(name: str) -> bool:
    parts = name.split("/")
    return not any(p.startswith(".") or p == "__MACOSX" for p in parts) and bool(parts[-1])


def wds_key(name: str) -> tuple[str, str]:
    """WebDataset's split of a member name: (key, extension) at the first dot of the base name."""
    folder, base = posixpath.split(name)
    stem, _, ext = base.partition(".")
    return posixpath.join(folder, stem), ext.lower()


def _image_member(name: str) -> bool:
    return name.lower().endswith(datasets.IMAGE_EXTENSIONS)


def rows_of(entries: list[tuple[str, bytes | None, str | None]], piece: MemberPiece, *, encode: bool) -> pa.Table:
    """(member name, bytes or None, error or None) -> rows in the row form."""
    ids, images, labels, splits, paths, errors = [], [], [], [], [], []
    if piece.webdataset:
        groups: dict[str, dict] = {}
        for name, data, error in entries:
            key, ext = wds_key(name)
            groups.setdefault(key, {})[ext] = (name, data, error)
        items = []
        for key, parts in groups.items():
            image = next((v for ext, v in parts.items() if _image_member("x." + ext)), None)
            if image is None:
                continue
            label = next((v for ext, v in parts.items() if ext in LABEL_EXTENSIONS), None)
            try:
                value = int(label[1].decode().strip()) if label and label[1] is not None else None
            except ValueError:
                value = None
            items.append((key, image[0], image[1], image[2], value if value is not None and 0 <= value < 128 else None,
                          None))
    else:
        items = [(name, name, data, error, datasets.label_from_path(name), datasets.split_from_path(name))
                 for name, data, error in entries]
    for key, name, data, error, label, split in items:
        ids.append(piece.prefix + key)
        images.append(data)
        labels.append(label)
        splits.append(split)
        paths.append(f"{piece.uri}/{name}")
        errors.append(error)
    if encode:
        checked = [stored_image(d, e) for d, e in zip(images, errors)]
        images, errors = [c[0] for c in checked], [c[1] for c in checked]
    n = len(ids)
    return pa.table({"id": pa.array(ids, pa.string()), "image": pa.array(images, pa.binary()),
                     "label": pa.array(labels, pa.int8()), "split": pa.array(splits, pa.string()),
                     "path": pa.array(paths, pa.string()), "pixels": pa.nulls(n, ROW_FORM.field("pixels").type),
                     "error": pa.array(errors, pa.string())}, schema=ROW_FORM)


def _zip_member(data: memoryview, base: int, m: Member) -> tuple[bytes | None, str | None]:
    """One zip member's bytes from a range that starts at ``base``; or an error."""
    at = m.offset - base
    try:
        header = ZIP_LOCAL_HEADER.unpack_from(data, at)
    except struct.error:
        return None, "corrupt archive member: truncated local header"
    if header[0] != 0x04034B50:
        return None, "corrupt archive member: bad local header signature"
    start = at + ZIP_LOCAL_HEADER.size + header[9] + header[10]
    stored = bytes(data[start: start + m.size])
    try:
        if m.method == zipfile.ZIP_STORED:
            raw = stored
        elif m.method == zipfile.ZIP_DEFLATED:
            raw = zlib.decompress(stored, -15)
        else:
            return None, f"unsupported zip compression method {m.method} (store or deflate the images)"
    except zlib.error as e:
        return None, f"corrupt archive member: {e}"
    if zlib.crc32(raw) != m.crc:
        return None, "corrupt archive member: CRC mismatch"
    return raw, None


def read_piece(piece: MemberPiece, fs: pafs.FileSystem, encode: bool) -> Iterable[pa.Table]:
    """The rows of one piece (runs in a Ray read task): one range read, or one stream (tgz)."""
    if piece.kind == "tgz":
        yield from _stream_tgz(piece, fs, encode)
        return
    start, end = piece.members[0].offset, max(m.end for m in piece.members)
    with fs.open_input_file(piece.path) as f:
        data = memoryview(f.read_at(end - start, start))
    entries = []
    for m in piece.members:
        if piece.kind == "zip":
            raw, error = _zip_member(data, start, m)
        else:
            raw = bytes(data[m.offset - start: m.offset - start + m.size])
            error = None if len(raw) == m.size else "corrupt archive member: truncated"
        entries.append((m.name, raw, error))
    yield rows_of(entries, piece, encode=encode)


def _stream_tgz(piece: MemberPiece, fs: pafs.FileSystem, encode: bool) -> Iterable[pa.Table]:
    wanted = {m.name for m in piece.members}
    entries = []
    with fs.open_input_stream(piece.path, compression=None) as raw, tarfile.open(fileobj=raw, mode="r|gz") as tar:
        for info in tar:
            name = _tar_name(info.name)
            if name not in wanted or not info.isfile():
                continue
            entries.append((name, tar.extractfile(info).read(), None))
            if len(entries) >= STREAM_BLOCK_ROWS and not piece.webdataset:
                yield rows_of(entries, piece, encode=encode)
                entries = []
    if entries:
        yield rows_of(entries, piece, encode=encode)


# --- listing (driver) ----------------------------------------------------------------------

def _tar_name(name: str) -> str:
    return name[2:] if name.startswith("./") else name


def _wanted(names: list[str]) -> tuple[list[bool], bool, int]:
    """Which members to read, whether the archive is a WebDataset shard, and its row count."""
    kept = [_keep(n) for n in names]
    webdataset = any(k and wds_key(n)[1] in LABEL_EXTENSIONS for n, k in zip(names, kept))
    if webdataset:
        wanted = [k and (_image_member(n) or wds_key(n)[1] in LABEL_EXTENSIONS) for n, k in zip(names, kept)]
        rows = len({wds_key(n)[0] for n, w in zip(names, wanted) if w and _image_member(n)})
    else:
        wanted = [k and _image_member(n) for n, k in zip(names, kept)]
        rows = sum(wanted)
    return wanted, webdataset, rows


def list_members(path: str, fs: pafs.FileSystem, kind: str, what: str) -> list[Member]:
    """Every file member of an archive, in archive order; a one-line error for a non-archive."""
    try:
        if kind == "zip":
            with fs.open_input_file(path) as f, zipfile.ZipFile(io.BufferedReader(f, LIST_BUFFER)) as z:
                infos = sorted((i for i in z.infolist() if not i.is_dir()), key=lambda i: i.header_offset)
                ends = [i.header_offset for i in infos[1:]] + [z.start_dir]
                return [Member(i.filename, i.header_offset, end, i.compress_size, i.compress_type, i.CRC)
                        for i, end in zip(infos, ends)]
        if kind == "tar":
            with fs.open_input_file(path) as f, tarfile.open(fileobj=io.BufferedReader(f, LIST_BUFFER), mode="r:") as t:
                return [Member(_tar_name(i.name), i.offset_data, i.offset_data + i.size, i.size)
                        for i in t if i.isfile()]
        with fs.open_input_stream(path, compression=None) as f, tarfile.open(fileobj=f, mode="r|gz") as t:
            return [Member(_tar_name(i.name), 0, 0, i.size) for i in t if i.isfile()]
    except (zipfile.BadZipFile, tarfile.TarError, EOFError, zlib.error, gzip.BadGzipFile) as e:
        name = {"zip": "zip", "tar": "tar", "tgz": "gzipped tar"}[kind]
        raise MnistRayError(f"{what} is not a readable {name} archive ({type(e).__name__}: "
                            f"{str(e).splitlines()[0] if str(e) else 'corrupt'})") from e
    except OSError as e:
        raise MnistRayError(storage.describe_error(e, what)) from e


def _pieces(path: str, kind: str, prefix: str, uri: str, members: list[Member]) -> list[MemberPiece]:
    wanted, webdataset, _ = _wanted([m.name for m in members])
    chosen = [m for m, w in zip(members, wanted) if w]
    if kind == "tgz":
        _, _, rows = _wanted([m.name for m in chosen])
        return [MemberPiece(path, kind, prefix, uri, tuple(chosen), webdataset, rows, sum(m.size for m in chosen))] \
            if chosen else []
    pieces, group = [], []

    def close():
        _, _, rows = _wanted([m.name for m in group])
        pieces.append(MemberPiece(path, kind, prefix, uri, tuple(group), webdataset, rows,
                            group[-1].end - group[0].offset))

    for m in chosen:
        # A WebDataset sample's members stay in one piece: split only where the key changes.
        full = len(group) >= PIECE_MEMBERS or (group and m.end - group[0].offset > PIECE_BYTES)
        if group and full and (not webdataset or wds_key(m.name)[0] != wds_key(group[-1].name)[0]):
            close()
            group = []
        group.append(m)
    if group:
        close()
    return pieces


@dataclass(frozen=True)
class ArchiveInput:
    """Archives, planned: their files, read pieces, row count and fingerprint."""

    uri: str
    files: FileSet
    pieces: tuple[MemberPiece, ...]
    rows: int
    fingerprint: str

    @property
    def fs(self) -> pafs.FileSystem:
        return self.files.root.fs

    def read_piece(self, piece: MemberPiece, encode: bool = False) -> Iterable[pa.Table]:
        return read_piece(piece, self.fs, encode)

    def labels(self) -> list[int | None]:
        """The labels the class folders give (prepare names its classes from them)."""
        return [datasets.label_from_path(m.name) for p in self.pieces if not p.webdataset for m in p.members]

    def ids(self) -> Iterable[pa.Array]:
        for p in self.pieces:
            if p.webdataset:
                keys = dict.fromkeys(wds_key(m.name)[0] for m in p.members if _image_member(m.name))
                yield pa.array([p.prefix + k for k in keys], pa.string())
            else:
                yield pa.array([p.prefix + m.name for m in p.members], pa.string())

    def sample(self, n: int = 8) -> pa.Table | None:
        """A few rows read in the driver (infer's smoke test)."""
        if not self.pieces:
            return None
        first = self.pieces[0]
        if first.kind != "tgz":
            members = first.members[:2 * n]
            first = MemberPiece(first.path, first.kind, first.prefix, first.uri, members, first.webdataset, 0,
                          members[-1].end - members[0].offset)
        return next(iter(read_piece(first, self.fs, False))).slice(0, n)

    def dataset(self, encode: bool = False, num_cpus: float | None = None):
        from mnist_ray.formats import readers

        read = functools.partial(read_piece, fs=self.fs, encode=encode)
        return readers.read_pieces(self.pieces, read, "Archive", ROW_FORM, num_cpus=num_cpus)


def open_archives(uri: str) -> ArchiveInput:
    """Plan the read of an archive (or a glob of them): one-line errors for a non-archive or
    one without images."""
    kind = kind_of(uri.rstrip("/"))
    if kind is None:
        raise MnistRayError(f"{uri} is not an archive: give a .zip, .tar, .tar.gz or .tgz")
    files = list_files(uri, extensions=EXTENSIONS)
    several = len(files.files) > 1 or is_glob(uri)
    pieces = []
    for file in files.files:
        rel = files.rel(file)
        file_kind = kind_of(file.path) or kind
        archive_uri = files.root.uri_of(rel)
        members = list_members(file.path, files.root.fs, file_kind, archive_uri)
        pieces += _pieces(file.path, file_kind, rel + "/" if several else "", archive_uri, members)
    rows = sum(p.rows for p in pieces)
    if rows == 0:
        raise MnistRayError(f"no image files ({', '.join(datasets.IMAGE_EXTENSIONS)}) in {uri}")
    return ArchiveInput(uri, files, tuple(pieces), rows, listing_fingerprint("archive", files, {}))
