"""What a command prints, and where everything else goes.

Quiet by default: the console gets mnist-ray's own lines (stage start and end, progress with
rate and ETA, warnings, the summary). Everything the libraries say (Ray, Ray Data, Ray Train,
TensorFlow, the workers' output that Ray forwards) goes to the run's log file, which is copied
to ``OUTPUT/_logs/`` when the command ends or fails. ``--verbose`` or ``MNIST_RAY_VERBOSE=1``
(for submitted jobs) leaves the libraries' own output on the console, at their own levels.

The libraries' own switches keep the log file readable and reach the workers through the
runtime env (``worker_env``); the console is quiet because the process's stdout and stderr
point at the log file while the command runs, not because text is filtered. That routing is
also the only thing that keeps TensorFlow 2.21's import banners (oneDNN, cudart, cuInit) off
the console: absl writes messages logged before ``absl::InitializeLog()`` to stderr whatever
``TF_CPP_MIN_LOG_LEVEL`` says (tensorflow/tensorflow#100442, abseil/abseil-cpp#1957, both open;
checked with TF 2.21.0). Ray Train's placement-group cleaner warns "Failed to query Ray Train
Controller actor state" every few seconds when its state-API lookup fails (as on a machine
running several Ray instances): Ray forwards that to the driver, which puts it in the file.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import logging
import os
import posixpath
import sys
import tempfile
import threading
import time
import traceback
import warnings
from typing import Callable, Iterator, TextIO

import pyarrow.fs as pafs

VERBOSE_ENV = "MNIST_RAY_VERBOSE"
PROGRESS_EVERY_S = 30.0  # a plain progress line this often (logs, CI); a terminal gets a bar
BAR_EVERY_S = 0.5
POLL_EVERY_S = 5.0

log = logging.getLogger(__name__)


def is_verbose() -> bool:
    return os.environ.get(VERBOSE_ENV, "").strip().lower() not in ("", "0", "false", "no")


def configure(verbose: bool = False) -> None:
    """Set the libraries' log switches for this process, before Ray or TensorFlow is imported."""
    if verbose:
        os.environ[VERBOSE_ENV] = "1"  # seen by subprocesses (bench) and workers (worker_env)
    for key, value in worker_env().items():
        os.environ.setdefault(key, value)
    if not is_verbose():
        # Deprecations inside TensorFlow, Keras and Ray are theirs to fix, not the user's.
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        warnings.filterwarnings("ignore", category=PendingDeprecationWarning)
        warnings.filterwarnings("ignore", category=FutureWarning)


def worker_env() -> dict[str, str]:
    """Environment variables for the driver and every Ray worker (sent through runtime_env)."""
    if is_verbose():
        return {VERBOSE_ENV: "1", "TF_CPP_MIN_LOG_LEVEL": os.environ.get("TF_CPP_MIN_LOG_LEVEL", "0")}
    return {
        "TF_CPP_MIN_LOG_LEVEL": os.environ.get("TF_CPP_MIN_LOG_LEVEL", "2"),  # no C++ INFO/WARNING banners
        "GRPC_VERBOSITY": os.environ.get("GRPC_VERBOSITY", "ERROR"),  # MultiWorkerMirroredStrategy's gRPC
        "PYTHONWARNINGS": os.environ.get(
            "PYTHONWARNINGS", "ignore::DeprecationWarning,ignore::FutureWarning,ignore::PendingDeprecationWarning"),
        "RAY_DEDUP_LOGS": os.environ.get("RAY_DEDUP_LOGS", "1"),  # one line for what every worker says
    }


def configure_ray_data() -> None:
    """Ray Data's own progress and execution-plan output: off unless verbose (the console has ours)."""
    if is_verbose():
        return
    from ray.data import DataContext

    ctx = DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.enable_operator_progress_bars = False
    ctx.print_on_execution_start = False
    ctx.verbose_stats_logs = False


# --- the run's log file ----------------------------------------------------------------------

FILE_SUFFIXES = {".json", ".jsonl", ".md", ".csv", ".txt", ".yaml", ".yml", ".html"}  # outputs that are one file


def log_uri(output: str | None, command: str) -> str | None:
    """Where the run's log file is kept: ``OUTPUT/_logs/COMMAND-UTC.log`` (None: no output);
    beside an output that is one file (``report.json``): in its folder's ``_logs``."""
    if not output:
        return None
    from mnist_ray.plumbing import storage

    output = output.rstrip("/")
    if posixpath.splitext(output)[1].lower() in FILE_SUFFIXES:
        output = posixpath.dirname(output) or "."
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    return posixpath.join(output, storage.LOGS_DIR, f"{command}-{stamp}-{os.getpid()}.log")


class RunLog:
    """The console stream, and the local file that receives everything else while a command runs."""

    def __init__(self, console: TextIO, path: str, uri: str | None):
        self.console, self.path, self.uri = console, path, uri

    @property
    def is_tty(self) -> bool:
        return self.console.isatty()


_current: RunLog | None = None


@contextlib.contextmanager
def run_log(command: str, output: str | None) -> Iterator[RunLog]:
    """Run a command with its output routed: mnist-ray's lines to the console, all to the log file.

    Quiet: file descriptors 1 and 2 (Python, C++ and forwarded worker output alike) point at the
    log file, and a handler writes mnist-ray's records to the real stderr. Verbose: the console
    keeps everything and the file gets every logging record. Either way the file is copied to
    ``log_uri(output, command)`` at the end, also when the command fails.
    """
    global _current
    uri = log_uri(output, command)
    fd, path = tempfile.mkstemp(prefix=f"mnist-ray-{command}-", suffix=".log")
    file = os.fdopen(fd, "w", buffering=1)
    quiet = not is_verbose()
    sys.stdout.flush()
    sys.stderr.flush()
    saved = (os.dup(1), os.dup(2)) if quiet else None
    console = os.fdopen(os.dup(2), "w", buffering=1) if quiet else sys.stderr
    fmt = logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s")
    to_file = logging.StreamHandler(file)
    to_file.setFormatter(fmt)
    to_console = logging.StreamHandler(console)
    to_console.setFormatter(_ConsoleFormatter(console.isatty()))
    root, ours = logging.getLogger(), logging.getLogger("mnist_ray")
    old_handlers = root.handlers[:]
    if quiet:
        os.dup2(file.fileno(), 1)
        os.dup2(file.fileno(), 2)
        ours.addHandler(to_console)  # mnist-ray's records: the console and (through root) the file
        root.handlers[:] = [to_file]
    else:
        root.addHandler(to_file)
    _current = RunLog(console, path, uri)
    error = None
    try:
        yield _current
    except BaseException as e:
        error = e
        file.write(traceback.format_exc())
        raise
    finally:
        _current = None
        sys.stdout.flush()
        sys.stderr.flush()
        if quiet:
            ours.removeHandler(to_console)
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            os.close(saved[0])
            os.close(saved[1])
            console.close()
        root.handlers[:] = old_handlers
        file.close()
        _keep(path, uri, error)


class _ConsoleFormatter(logging.Formatter):
    def __init__(self, tty: bool):
        super().__init__()
        self.clear = "\r\x1b[2K" if tty else ""  # over a progress bar being drawn

    def format(self, record: logging.LogRecord) -> str:
        level = "" if record.levelno == logging.INFO else f"{record.levelname.lower()}: "
        return f"{self.clear}mnist-ray: {level}{record.getMessage()}"


def _keep(path: str, uri: str | None, error: BaseException | None) -> None:
    """Copy the local log file into the output (local or object storage), when the command got
    as far as creating that output; a command refused before it started leaves no log."""
    from mnist_ray.plumbing import storage
    from mnist_ray.errors import MnistRayError

    output = posixpath.dirname(posixpath.dirname(uri)) if uri else None
    try:
        loc = storage.resolve(output) if output is not None else None
        if loc is not None and loc.fs.get_file_info(loc.path).type == pafs.FileType.Directory:
            logs_dir = storage.resolve(posixpath.dirname(uri))
            if logs_dir.is_local:  # object storage has no directories (create_dir adds a marker)
                logs_dir.fs.create_dir(logs_dir.path, recursive=True)
            with open(path, "rb") as f:
                storage.write_bytes(logs_dir, posixpath.basename(uri), f.read())
            os.remove(path)
            return
    except Exception as e:  # noqa: BLE001 - losing the log must not hide the command's own result
        print(f"mnist-ray: cannot write the log to {uri} ({e}); it stays at {path}", file=sys.stderr)
        return
    cause = error
    while cause is not None and not isinstance(cause, (MnistRayError, KeyboardInterrupt)):
        cause = getattr(cause, "cause", None) or cause.__cause__
    if error is None or cause is not None:
        os.remove(path)  # nothing ran there: refused before it started, or nothing to keep
    else:
        print(f"mnist-ray: the run's full log: {path}", file=sys.stderr)


def current_log() -> str | None:
    """Where this run's log file is kept (for the summary), when a command is running."""
    return None if _current is None else _current.uri


def format_summary(summary) -> str:
    """A command's summary as JSON, one top-level key per line (readable in a log, and parseable)."""
    if not isinstance(summary, dict) or not summary:
        return json.dumps(summary)
    lines = [f"  {json.dumps(k)}: {json.dumps(v)}" for k, v in summary.items()]
    return "{\n" + ",\n".join(lines) + "\n}"


# --- stages and progress ---------------------------------------------------------------------

def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f"{seconds} s"


class _Heartbeat(threading.Thread):
    """While a stage runs: a progress line every PROGRESS_EVERY_S (a bar on a terminal)."""

    def __init__(self, label: str, progress: Callable[[], tuple[int, int, str] | None] | None):
        super().__init__(daemon=True, name=f"progress-{label}")
        self.label, self.progress, self.stopped = label, progress, threading.Event()
        self.console = _current.console if _current is not None and _current.is_tty else None
        self.started = time.time()
        self.polled, self.state = 0.0, None  # progress() may read storage: not at every redraw

    def line(self) -> str:
        elapsed = time.time() - self.started
        if self.progress and time.time() - self.polled >= POLL_EVERY_S:
            self.polled = time.time()
            try:
                self.state = self.progress()
            except Exception:  # noqa: BLE001 - progress must never break the job
                self.state = None
        state = self.state
        if not state:
            return f"{self.label} running, {_duration(elapsed)}"
        done, total, unit = state
        rate = done / max(elapsed, 1e-9)
        speed = ""
        if done > 0:
            per = f"{1 / rate:.0f} s/{unit}" if rate < 1 else f"{rate:.1f} {unit}s/s"
            speed = f", {per}, ETA {_duration(max(total - done, 0) / rate)}"
        bar = ""
        if self.console is not None:
            filled = int(24 * min(done, total) / max(total, 1))
            bar = f"[{'#' * filled}{'.' * (24 - filled)}] "
        return f"{self.label} {bar}{done}/{total} {unit}s, {_duration(elapsed)}{speed}"

    def run(self) -> None:
        every = BAR_EVERY_S if self.console is not None else PROGRESS_EVERY_S
        while not self.stopped.wait(every):
            if self.console is not None:
                self.console.write("\r\x1b[2K" + self.line())
                self.console.flush()
            else:
                log.info("%s", self.line())

    def stop(self) -> None:
        self.stopped.set()
        self.join(timeout=5)
        if self.console is not None:
            self.console.write("\r\x1b[2K")
            self.console.flush()


@contextlib.contextmanager
def stage(label: str, progress: Callable[[], tuple[int, int, str] | None] | None = None, *,
          lines: bool = True) -> Iterator[None]:
    """Progress of one long step: ``progress()`` gives (done, total, unit) when it knows.
    ``lines=False``: the step prints its own progress lines, so only a terminal gets a bar."""
    beat = _Heartbeat(label, progress)
    if not lines and beat.console is None:
        yield
        return
    beat.start()
    try:
        yield
    finally:
        beat.stop()
