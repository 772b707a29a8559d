"""The files of an input without a manifest: listed (a file, a directory, a glob) and fingerprinted."""

from __future__ import annotations

import fnmatch
import hashlib
import json
import os
import posixpath
from dataclasses import dataclass

import pyarrow.fs as pafs

from mnist_ray.plumbing import storage
from mnist_ray.errors import MnistRayError

PARQUET_EXTENSIONS = (".parquet", ".parq", ".pq")


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


def listing_fingerprint(kind: str, files: FileSet, settings: dict) -> str:
    """What an input without a manifest is: every file's path, size and modification time, and
    how it is read. A file replaced, grown or touched gives another fingerprint (a new run key)."""
    h = hashlib.sha256(f"{kind}\0{json.dumps(settings, sort_keys=True)}\0".encode())
    for info in files.files:
        mtime = info.mtime_ns if info.mtime_ns is not None else -1
        h.update(f"{files.rel(info)}\t{info.size}\t{mtime}\n".encode())
    return "sha256:" + h.hexdigest()

