"""One writer per output: a lock kept in the output, so a second run is refused in seconds.

Local paths (and shared file systems): an OS file lock (``flock``) on ``OUTPUT/_lock``, which
the kernel releases when its process dies, however it dies. Object storage (``s3://``): a
lease object ``OUTPUT/_lock`` created with ``If-None-Match: *`` (only one PUT can create it),
renewed by its holder every third of the lease with ``If-Match`` on its ETag; a lease left
unrenewed past its term (a killed job) is taken over with ``If-Match`` on the stale ETag, so of
two runs taking over at once exactly one wins. The lock file names its holder (host, pid,
start time, command, Ray job id) for the refusal message.
"""

from __future__ import annotations

import contextlib
import datetime
import email.utils
import json
import logging
import os
import socket
import sys
import threading
import time
import uuid
from typing import Iterator

import pyarrow.fs as pafs

from mnist_ray.plumbing import storage
from mnist_ray.errors import MnistRayError

log = logging.getLogger(__name__)

# A killed job's lease frees after this long; the holder renews it every third of it.
LEASE_SECONDS = 60.0


def holder_info() -> dict:
    """Who holds the lock: enough for a user to find the run (and its Ray job) and stop it."""
    job = None
    with contextlib.suppress(ValueError, TypeError, AttributeError):
        # Set by Ray's job supervisor for the driver of a `ray job submit`.
        job = json.loads(os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR", "null"))["metadata"]["job_submission_id"]
    return {"host": socket.gethostname(), "pid": os.getpid(),
            "started_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "command": " ".join([os.path.basename(sys.argv[0]), *sys.argv[1:]])[:300], "ray_job": job,
            "token": uuid.uuid4().hex}


def describe(holder: dict) -> str:
    """``pid 123 on host h since 2026-...; Ray job x; command: mnist-ray infer ...``"""
    if not holder:
        return "a run that is starting"
    text = f"pid {holder.get('pid')} on host {holder.get('host')} since {holder.get('started_at')}"
    if holder.get("ray_job"):
        text += f", Ray job {holder['ray_job']}"
    return text + f", command: {holder.get('command')}"


def _refused(uri: str, holder: dict, extra: str = "") -> MnistRayError:
    return MnistRayError(f"{uri} is being written by another run ({describe(holder)}{extra}): wait for it "
                         "to finish or stop it, or choose another output")


@contextlib.contextmanager
def output_lock(uri: str, *, beside: bool = False, lease_seconds: float = LEASE_SECONDS) -> Iterator[None]:
    """Hold the lock of the output ``uri`` for the ``with`` block, or refuse naming its holder.

    ``beside``: the lock is ``URI.lock`` next to the output, for outputs published whole (a
    model dir), which replace their directory and everything in it.
    """
    loc = storage.resolve(uri)
    name = loc.path.rstrip("/") + ".lock" if beside else loc.join(storage.LOCK)
    if loc.is_local:
        with _file_lock(uri, name):
            yield
    elif isinstance(loc.fs, pafs.S3FileSystem):
        with _lease(uri, name, lease_seconds):
            yield
    else:
        log.warning("%s: no lock on this storage (only local paths and s3:// have one): runs started at once "
                    "into this output are not refused", uri)
        yield


# --- local files --------------------------------------------------------------------------------

@contextlib.contextmanager
def _file_lock(uri: str, path: str) -> Iterator[None]:
    import fcntl

    info = holder_info()
    directory = os.path.dirname(path)
    created = not os.path.isdir(directory)
    try:
        os.makedirs(directory, exist_ok=True)
        while True:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = _read_holder(fd)
                os.close(fd)
                raise _refused(uri, holder) from None
            # The holder deletes the file when it is done: a lock taken on the deleted file
            # after that protects nothing, so lock the file that is at the path now.
            try:
                if os.fstat(fd).st_ino == os.stat(path).st_ino:
                    break
            except FileNotFoundError:
                pass
            os.close(fd)
    except (NotADirectoryError, FileExistsError):
        raise MnistRayError(f"{uri} is (or lies under) a file, not a directory: choose another output path") from None
    except OSError as e:
        raise MnistRayError(storage.describe_error(e, uri)) from e
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(info).encode(), 0)
        yield
    finally:
        with contextlib.suppress(OSError):
            os.unlink(path)  # while still locked: the next run then locks a new file
        os.close(fd)
        if created:
            with contextlib.suppress(OSError):  # a run refused before writing leaves no trace
                os.rmdir(directory)


def _read_holder(fd: int) -> dict:
    """The holder's details; it writes them just after locking, so wait a moment for them."""
    for _ in range(20):
        data = os.pread(fd, 4096, 0)
        if data:
            with contextlib.suppress(ValueError):
                return json.loads(data)
        time.sleep(0.05)
    return {}


# --- object storage: a lease renewed by its holder -------------------------------------------------

def _s3_client():
    """boto3 reads the same AWS_* variables as pyarrow's S3 (AWS_ENDPOINT_URL(_S3) included)."""
    import boto3
    from botocore.config import Config

    return boto3.client("s3", config=Config(connect_timeout=5, read_timeout=30, retries={"max_attempts": 3}))


def _code(e: Exception) -> str:
    return getattr(e, "response", {}).get("Error", {}).get("Code", "")


class _Lease:
    """The lease object at ``bucket/key``: acquire, renew in a thread, release."""

    def __init__(self, uri: str, path: str, seconds: float):
        self.uri, self.seconds = uri, seconds
        self.bucket, _, self.key = path.partition("/")
        self.client = _s3_client()
        self.info = {**holder_info(), "lease_seconds": seconds}
        self.etag: str | None = None
        self.lost = threading.Event()
        self.stopped = threading.Event()

    def _body(self) -> bytes:
        now = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
        return json.dumps({**self.info, "renewed_at": now}).encode()

    def acquire(self) -> None:
        from botocore.exceptions import ClientError

        for _ in range(5):  # the lease may come and go between the calls below
            try:
                self.etag = self.client.put_object(Bucket=self.bucket, Key=self.key, Body=self._body(),
                                                   IfNoneMatch="*")["ETag"]
                return
            except ClientError as e:
                if _code(e) not in ("PreconditionFailed", "ConditionalRequestConflict"):
                    raise
            try:
                current = self.client.get_object(Bucket=self.bucket, Key=self.key)
            except ClientError as e:
                if _code(e) in ("NoSuchKey", "404"):
                    continue  # released meanwhile: try to create it again
                raise
            holder = _parse(current["Body"].read())
            # Both times from the storage's clock (the holder's and ours may differ).
            age = _server_now(current) - current["LastModified"].timestamp()
            term = float(holder.get("lease_seconds") or self.seconds)
            if age < term:
                raise _refused(self.uri, holder, f"; lease renewed {age:.0f} s ago, lapses in "
                                                 f"{term - age:.0f} s unless renewed")
            try:
                self.etag = self.client.put_object(Bucket=self.bucket, Key=self.key, Body=self._body(),
                                                   IfMatch=current["ETag"])["ETag"]
            except ClientError as e:
                if _code(e) in ("PreconditionFailed", "ConditionalRequestConflict", "NoSuchKey"):
                    continue  # another run took it over (or it was released) first: look again
                raise
            log.warning("%s: took over the lock of a run that stopped renewing it %.0f s ago (%s)",
                        self.uri, age, describe(holder))
            return
        raise MnistRayError(f"{self.uri}: could not take its lock (other runs keep taking it): try again")

    def renew_until_stopped(self) -> None:
        from botocore.exceptions import BotoCoreError, ClientError

        while not self.stopped.wait(self.seconds / 3):
            try:
                self.etag = self.client.put_object(Bucket=self.bucket, Key=self.key, Body=self._body(),
                                                   IfMatch=self.etag)["ETag"]
            except ClientError as e:
                if _code(e) in ("PreconditionFailed", "NoSuchKey", "ConditionalRequestConflict"):
                    log.error("%s: lost the lock: another run took it over after this one failed to renew "
                              "it for %g s", self.uri, self.seconds)
                    self.lost.set()
                    return
                log.warning("%s: could not renew the lock (%s); retrying", self.uri, e)
            except BotoCoreError as e:
                log.warning("%s: could not renew the lock (%s); retrying", self.uri, e)

    def release(self) -> None:
        from botocore.exceptions import BotoCoreError, ClientError

        if self.lost.is_set():
            return
        with contextlib.suppress(ClientError, BotoCoreError):  # a lease left behind lapses by itself
            self.client.delete_object(Bucket=self.bucket, Key=self.key, IfMatch=self.etag)


def _parse(data: bytes) -> dict:
    try:
        return json.loads(data)
    except ValueError:
        return {}


def _server_now(response: dict) -> float:
    date = response.get("ResponseMetadata", {}).get("HTTPHeaders", {}).get("date")
    return email.utils.parsedate_to_datetime(date).timestamp() if date else time.time()


@contextlib.contextmanager
def _lease(uri: str, path: str, seconds: float) -> Iterator[None]:
    from botocore.exceptions import BotoCoreError, ClientError

    lease = _Lease(uri, path, seconds)
    try:
        lease.acquire()
    except (ClientError, BotoCoreError) as e:
        if _code(e) == "NoSuchBucket":
            raise MnistRayError(f"bucket {lease.bucket!r} does not exist (for {uri}): create it or fix the path") from e
        raise MnistRayError(storage.describe_error(e, uri)) from e
    renewer = threading.Thread(target=lease.renew_until_stopped, daemon=True, name="mnist-ray-lease")
    renewer.start()
    try:
        yield
    finally:
        lease.stopped.set()
        renewer.join()
        lease.release()
    if lease.lost.is_set():
        raise MnistRayError(f"{uri}: this run lost its lock midway (it could not renew it for {seconds:g} s) "
                            "and another run took over: check the output, rerun if in doubt")
