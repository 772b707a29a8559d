"""Paths, filesystems and the publish protocol shared by every stage that writes a dataset.

A dataset is a directory (local, ``s3://``, or anything pyarrow/fsspec opens) of data files,
plus ``_manifest.json`` (what is in it) and ``_SUCCESS``, written last. Readers refuse a
directory without ``_SUCCESS`` and read only the files the manifest lists, so an interrupted
write never looks complete, and an ``--overwrite`` leaves the old data readable until the
new manifest replaces the old one in a single PUT (object storage has no rename).
"""

from __future__ import annotations

import json
import os
import posixpath
import re
import shutil
from dataclasses import dataclass
from urllib.parse import urlparse

import pyarrow as pa
import pyarrow.fs as pafs

from mnist_ray.errors import MnistRayError

MANIFEST = "_manifest.json"
SUCCESS = "_SUCCESS"
LOCK = "_lock"  # the running writer's lock (mnist_ray.plumbing.lock): kept through publish, never data
LOGS_DIR = "_logs"  # the log files of the runs that wrote this output (mnist_ray.plumbing.logs)
# Entries a writer owns inside its output directory: only these are ever deleted. ``run-KEY``
# directories hold a resumable job's data files and its Ray Data checkpoint (see infer).
OWNED_FILE = re.compile(
    r"^(part-[0-9a-f]+-.*\.parquet|run-[0-9a-f]+|_manifest\.json(\.tmp-[0-9a-f]+)?|_SUCCESS|_lock|_probe-[0-9a-f]+"
    r"|_logs)$")


@dataclass(frozen=True)
class Location:
    """A directory on some filesystem; ``uri`` is what the user wrote, ``path`` what ``fs`` takes."""

    uri: str
    fs: pafs.FileSystem
    path: str

    @property
    def is_local(self) -> bool:
        return isinstance(self.fs, pafs.LocalFileSystem)

    @property
    def scheme(self) -> str:
        """What turns a path on ``fs`` back into a URI: ``s3://`` for S3, nothing for local paths."""
        return "" if self.is_local else self.uri.split("://", 1)[0] + "://"

    def join(self, *names: str) -> str:
        return posixpath.join(self.path, *names)

    def uri_of(self, name: str) -> str:
        return self.uri.rstrip("/") + "/" + name


def s3_filesystem() -> pafs.S3FileSystem:
    """S3 from the standard AWS variables, including the endpoint (MinIO, moto, R2...).

    Timeouts are short and retries few, so a wrong endpoint or bucket fails in seconds.
    """
    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    kwargs: dict = {
        "connect_timeout": 5,
        "request_timeout": 60,
        "retry_strategy": pafs.AwsStandardS3RetryStrategy(max_attempts=3),
    }
    if endpoint:
        parsed = urlparse(endpoint)
        kwargs["endpoint_override"] = parsed.netloc or parsed.path
        kwargs["scheme"] = parsed.scheme or "https"
    region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
    if region:
        kwargs["region"] = region
    return pafs.S3FileSystem(**kwargs)


def resolve(uri: str) -> Location:
    """Map a user path or URL to a pyarrow filesystem and a path on it."""
    if not uri:
        raise MnistRayError("empty path: give a local directory or a URL such as s3://bucket/prefix")
    scheme = urlparse(uri).scheme
    if scheme in ("", "file", "local"):
        local = uri.split("://", 1)[1] if "://" in uri else uri
        return Location(uri, pafs.LocalFileSystem(), os.path.abspath(os.path.expanduser(local)))
    if scheme in ("s3", "s3a"):
        return Location(uri, s3_filesystem(), uri.split("://", 1)[1].rstrip("/"))
    try:
        fs, path = pafs.FileSystem.from_uri(uri)
        return Location(uri, fs, path.rstrip("/"))
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError, OSError):
        pass
    import fsspec  # gs://, az://, http:// ... anything fsspec knows, wrapped for pyarrow

    try:
        fs, path = fsspec.core.url_to_fs(uri)
    except (ImportError, ValueError) as e:
        raise MnistRayError(f"cannot open {uri}: {e}") from e
    return Location(uri, pafs.PyFileSystem(pafs.FSSpecHandler(fs)), path.rstrip("/"))


def describe_error(e: BaseException, uri: str) -> str:
    """One sentence for an I/O failure, with what to check."""
    text = str(e).splitlines()[0] if str(e) else type(e).__name__
    lowered = text.lower()
    if "access_denied" in lowered or "accessdenied" in lowered or "invalidaccesskeyid" in lowered or "signature" in lowered:
        return (f"access denied for {uri} ({text}): check AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY "
                "and the bucket policy")
    if "permission denied" in lowered or isinstance(e, PermissionError):
        return f"cannot write to {uri}: permission denied; choose a path you can write to"
    if "connect" in lowered or "timed out" in lowered or "curl" in lowered:
        return f"cannot reach the storage for {uri} ({text}): check AWS_ENDPOINT_URL and the network"
    return f"{uri}: {text}"


def _check_bucket(loc: Location) -> None:
    if not isinstance(loc.fs, pafs.S3FileSystem):
        return
    bucket = loc.path.split("/", 1)[0]
    try:
        info = loc.fs.get_file_info(bucket)
    except OSError as e:
        raise MnistRayError(describe_error(e, loc.uri)) from e
    if info.type == pafs.FileType.NotFound:
        raise MnistRayError(f"bucket {bucket!r} does not exist (for {loc.uri}): create it or fix the path")


def read_json(loc: Location, name: str) -> dict:
    with loc.fs.open_input_stream(loc.join(name)) as f:
        return json.loads(f.read().decode())


def write_bytes(loc: Location, name: str, data: bytes) -> None:
    with loc.fs.open_output_stream(loc.join(name)) as f:
        f.write(data)


def _write_json_atomically(loc: Location, name: str, obj: dict, token: str) -> None:
    data = json.dumps(obj, indent=2, sort_keys=True).encode()
    if loc.is_local:
        # Locally a rename is atomic; on object storage a single PUT already is.
        tmp = f"{name}.tmp-{token}"
        write_bytes(loc, tmp, data)
        loc.fs.move(loc.join(tmp), loc.join(name))
    else:
        write_bytes(loc, name, data)


def is_complete(loc: Location) -> bool:
    return loc.fs.get_file_info(loc.join(SUCCESS)).type == pafs.FileType.File


def prepare_output(uri: str, *, overwrite: bool, run_id: str) -> Location:
    """Check that ``uri`` can receive a new dataset, create it, and prove it is writable.

    Fails fast (before any Ray work) on a complete dataset without ``overwrite``, on a
    directory holding files this project did not write, on a missing bucket, and on a
    path that cannot be written.
    """
    loc = resolve(uri)
    _check_bucket(loc)
    try:
        info = loc.fs.get_file_info(loc.path)
        if info.type == pafs.FileType.File:
            raise MnistRayError(f"{uri} is a file, not a directory: choose another output path")
        if info.type == pafs.FileType.Directory:
            if is_complete(loc) and not overwrite:
                raise MnistRayError(
                    f"{uri} already holds a complete dataset; pass --overwrite to replace it "
                    "(the old data stays readable until the new one is complete)")
            foreign = [i.base_name for i in loc.fs.get_file_info(pafs.FileSelector(loc.path))
                       if not OWNED_FILE.match(i.base_name)]
            if foreign:
                raise MnistRayError(
                    f"{uri} is not empty and not an mnist-ray dataset (it holds {sorted(foreign)[:3]}...): "
                    "choose a new or empty output path")
        loc.fs.create_dir(loc.path, recursive=True)
        probe = f"_probe-{run_id}"
        write_bytes(loc, probe, b"")
        loc.fs.delete_file(loc.join(probe))
    except MnistRayError:
        raise
    except OSError as e:
        raise MnistRayError(describe_error(e, uri)) from e
    return loc


def publish(loc: Location, manifest: dict, *, run_id: str) -> None:
    """Commit a dataset: manifest, then ``_SUCCESS``, then delete files no manifest lists."""
    keep = {f["path"] for f in manifest["files"]}
    missing = [name for name in keep if loc.fs.get_file_info(loc.join(name)).type != pafs.FileType.File]
    if missing:
        raise MnistRayError(f"refusing to publish {loc.uri}: files {sorted(missing)[:3]} are missing")
    _write_json_atomically(loc, MANIFEST, manifest, run_id)
    write_bytes(loc, SUCCESS, json.dumps({"run_id": run_id, "fingerprint": manifest["fingerprint"]}).encode())
    kept_dirs = {path.split("/", 1)[0] for path in keep if "/" in path}
    for info in loc.fs.get_file_info(pafs.FileSelector(loc.path)):
        name = info.base_name
        if not OWNED_FILE.match(name) or name in keep or name in kept_dirs:
            continue
        if name.startswith("part-"):
            loc.fs.delete_file(info.path)
        elif name.startswith("run-") and info.type == pafs.FileType.Directory:
            loc.fs.delete_dir(info.path)  # an older run's data, or another model's partial work


def prepare_directory_output(uri: str, *, overwrite: bool, marker: str, what: str) -> Location:
    """Check that ``uri`` can receive a directory published whole (a model dir, a report).

    Fails fast on an existing directory without ``overwrite``, on a non-empty directory that
    is not a ``what`` (it has no ``marker`` file: publishing would delete someone else's
    files), and on a path that cannot be written.
    """
    loc = resolve(uri)
    try:
        info = loc.fs.get_file_info(loc.path)
        if info.type == pafs.FileType.File:
            raise MnistRayError(f"{uri} is a file: choose a directory for the {what}")
        if info.type == pafs.FileType.Directory:
            # Logs of an earlier run (a failed one leaves only those) belong to this writer.
            names = {i.base_name for i in loc.fs.get_file_info(pafs.FileSelector(loc.path))} - {LOGS_DIR}
            if names and not overwrite:
                raise MnistRayError(f"{uri} already exists; pass --overwrite to replace it "
                                    f"(the old {what} stays in place until the new one is complete)")
            if names and marker not in names:
                raise MnistRayError(f"{uri} is not empty and not a {what}: choose a new path")
        parent = os.path.dirname(loc.path.rstrip("/"))
        if parent:
            loc.fs.create_dir(parent, recursive=True)
        probe = f"{loc.path.rstrip('/')}.probe-{os.getpid()}"
        with loc.fs.open_output_stream(probe):
            pass
        loc.fs.delete_file(probe)
    except MnistRayError:
        raise
    except OSError as e:
        raise MnistRayError(describe_error(e, uri)) from e
    return loc


def publish_directory(local_dir: str, loc: Location, *, run_id: str) -> None:
    """Publish a finished local directory (a model dir) at ``loc``, ``_SUCCESS`` last.

    Locally: the new directory is renamed into place and the old one removed after, so a
    reader sees the old or the new dir, never a mix. On object storage (no rename) the old
    ``_SUCCESS`` is removed first, so during the upload readers are refused, not misled.
    """
    with open(os.path.join(local_dir, SUCCESS), "w") as f:
        json.dump({"run_id": run_id}, f)
    try:
        if loc.is_local:
            target = loc.path.rstrip("/")
            old = f"{target}.old-{run_id}"
            if os.path.exists(target):
                os.replace(target, old)
            shutil.move(local_dir, target)
            shutil.rmtree(old, ignore_errors=True)
            return
        if loc.fs.get_file_info(loc.join(SUCCESS)).type == pafs.FileType.File:
            loc.fs.delete_file(loc.join(SUCCESS))
        if loc.fs.get_file_info(loc.path).type == pafs.FileType.Directory:
            loc.fs.delete_dir_contents(loc.path)
        for root, _, files in os.walk(local_dir):
            for name in files:
                if name == SUCCESS:
                    continue
                rel = os.path.relpath(os.path.join(root, name), local_dir).replace(os.sep, "/")
                with open(os.path.join(root, name), "rb") as f:
                    write_bytes(loc, rel, f.read())
        with open(os.path.join(local_dir, SUCCESS), "rb") as f:
            write_bytes(loc, SUCCESS, f.read())
    except OSError as e:
        raise MnistRayError(describe_error(e, loc.uri)) from e


def open_dataset(uri: str, *, producer: str) -> tuple[Location, dict]:
    """A complete dataset's location and manifest, or a clear error saying what to run."""
    loc = resolve(uri)
    _check_bucket(loc)
    try:
        info = loc.fs.get_file_info(loc.path)
        if info.type == pafs.FileType.NotFound:
            raise MnistRayError(f"no dataset at {uri}: check the path, or create it with `{producer}`")
        if not is_complete(loc):
            raise MnistRayError(
                f"{uri} is not a complete dataset (no {SUCCESS}): its writer did not finish; "
                f"rerun `{producer}` (with --overwrite if needed)")
        manifest = read_json(loc, MANIFEST)
    except MnistRayError:
        raise
    except OSError as e:
        raise MnistRayError(describe_error(e, uri)) from e
    return loc, manifest
