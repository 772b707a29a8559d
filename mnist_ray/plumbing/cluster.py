"""Connecting to Ray: a local single-node Ray started in-process, or an existing cluster.

The environment every Ray worker needs (TensorFlow's Keras choice, the S3 endpoint and
credentials) is declared here once and sent through ``runtime_env``; otherwise workers would
silently use Keras 3 or talk to real AWS.
"""

from __future__ import annotations

import logging
import os
import sys

from mnist_ray.plumbing import logs
from mnist_ray.errors import MnistRayError

log = logging.getLogger(__name__)

# Variables forwarded from the driver to every worker, when set.
FORWARDED_ENV = (
    "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL",
    "AWS_ENDPOINT_URL_S3", "AWS_REGION", "AWS_DEFAULT_REGION", "AWS_EC2_METADATA_DISABLED",
    "AWS_PROFILE", "GOOGLE_APPLICATION_CREDENTIALS",
)


def parse_range(text: str, flag: str) -> tuple[int, int]:
    """A pool size flag's ``N`` or ``MIN..MAX`` (actors, replicas) -> (min, max), both at least 1."""
    try:
        low, _, high = text.partition("..")
        lo, hi = int(low), int(high or low)
    except ValueError:
        raise MnistRayError(f"{flag} {text!r}: give N or MIN..MAX, e.g. 1..4") from None
    if not 1 <= lo <= hi:
        raise MnistRayError(f"{flag} {text!r}: need 1 <= MIN <= MAX")
    return lo, hi


def configure_process_env() -> dict[str, str]:
    """Set what TensorFlow needs before it is imported, and return the workers' env vars.

    tf-keras (Keras 2) rather than Keras 3 (``compat.keras2_env``); Ray Train's controller polling
    its workers often enough that a run's end is not a wait (``compat.train_poll_env``).
    """
    from mnist_ray.plumbing import compat

    own = {**compat.keras2_env(), **compat.train_poll_env()}
    for name, value in own.items():
        os.environ.setdefault(name, value)
    logs.configure()  # the libraries' own log switches: quiet unless verbose
    env = {**{name: os.environ[name] for name in own}, **logs.worker_env()}
    env.update({k: os.environ[k] for k in FORWARDED_ENV if k in os.environ})
    return env


def runtime_env() -> dict:
    return {"env_vars": configure_process_env()}


def _host_port(address: str) -> tuple[str, int] | None:
    """Host and port of a Ray address (``host:port``, ``ray://host:port``, ``http://host:port``)."""
    rest = address.split("://", 1)[-1].rstrip("/")
    host, _, port = rest.rpartition(":")
    if not host or not port.isdigit():
        return None
    return host.strip("[]"), int(port)


def check_reachable(address: str, timeout: float = 5.0) -> None:
    """Fail in seconds, naming the address, when nothing listens there (Ray itself retries for
    a minute or more before it gives up)."""
    import socket

    target = _host_port(address)
    if target is None:
        if address != "auto":
            raise MnistRayError(f"--address {address!r}: give HOST:PORT (e.g. 10.0.0.5:6379), "
                                "ray://HOST:10001, 'auto' or 'local'")
        return
    try:
        with socket.create_connection(target, timeout=timeout):
            pass
    except OSError as e:
        raise MnistRayError(f"cannot reach the Ray cluster at {address} ({e.strerror or e}): check the "
                            "address and that the head is running (`ray status`), or drop --address "
                            "to run on a local single-node Ray") from None


# Single-node mode binds every Ray service to 127.0.0.1. `--node-ip-address 127.0.0.1` alone
# does not: Ray swaps a loopback node IP for the machine's reachable one, and its servers then
# listen on every interface. Ray's switch for single-machine clusters (the macOS default) is
# read when Ray is imported, so it is set before that: here (the package imports Ray only
# after connecting; the local Ray's processes inherit it) or by the caller (tests/conftest.py).
SINGLE_MACHINE = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"
USAGE_STATS = "RAY_USAGE_STATS_ENABLED"


def connect(address: str | None = None, *, num_cpus: int | None = None, paths: tuple[str, ...] = (),
            shared_storage: bool = False) -> None:
    """Attach to the Ray at ``address`` (or ``RAY_ADDRESS``), else start a local one.

    Reuses an already initialized Ray (tests share one per session). A local Ray is this
    command's own: bound to 127.0.0.1, on ports nobody else uses (see ``LocalRay``). ``paths``
    are the job's inputs and outputs: on a cluster, local ones are refused unless
    ``shared_storage`` says every node sees them.
    """
    address = address or os.environ.get("RAY_ADDRESS") or None
    local = not address or address == "local"
    if not local:
        check_shared_storage(address, paths, shared_storage)
    if local and "ray" not in sys.modules:
        os.environ.setdefault(SINGLE_MACHINE, "0")
    if local:
        # This command's own Ray reports no usage stats, like the heads it starts
        # (`--disable-usage-stats`). Ray Data's usage poller would otherwise query a Prometheus on
        # localhost:9090 every few seconds from the driver, and log a traceback when its thread
        # outlives the command's log streams at exit.
        os.environ.setdefault(USAGE_STATS, "0")
    import ray

    global _started_here, _local_ray
    if not ray.is_initialized():
        if local:
            use_token_auth()
        _started_here = True
        kwargs = {"runtime_env": runtime_env(), "log_to_driver": True, "configure_logging": False}
        if not local:
            check_reachable(address)
            log.info("connecting to the Ray cluster at %s", address)
            # Inside `ray job submit` the job's runtime env (jobs/runtime_env.yaml) sets some of
            # the same variables: combine the two instead of refusing to start.
            os.environ.setdefault("RAY_OVERRIDE_JOB_RUNTIME_ENV", "1")
            ray.init(address=address, **kwargs)
        else:
            _local_ray = LocalRay.start(num_cpus)
            ray.init(address=_local_ray.address, _node_ip_address=LOCALHOST, **kwargs)
    logs.configure_ray_data()


_started_here = False
_local_ray: "LocalRay | None" = None


def shutdown() -> None:
    """Stop the Ray this process started or attached to through ``connect`` (a Ray the caller
    initialized, such as a test session's, is left alone).

    Called by the command line when a command ends: Ray's own exit hook would do it too, but
    after a fixed half-second pause for late error messages, on every command.
    """
    global _started_here, _local_ray
    if _started_here and "ray" in sys.modules:
        import ray

        ray.shutdown()
    if _local_ray is not None:
        _local_ray.stop()
    _started_here, _local_ray = False, None


# The flag every job that runs on Ray has (``shared_storage`` in its config).
SHARED_STORAGE_HELP = ("with --address: the local paths given are on storage every node mounts "
                       "(NFS...), so the cluster may use them")


def local_ray() -> "LocalRay | None":
    """The local Ray ``connect`` started for this process, if it did."""
    return _local_ray


def check_shared_storage(address: str, paths: tuple[str, ...], shared_storage: bool) -> None:
    """Refuse local paths for a job on a cluster: the other nodes (and those an autoscaler adds
    later, even to a one-node cluster) cannot see them, unless ``shared_storage`` says they can."""
    local = [p for p in paths if p and ("://" not in p or p.startswith("file://"))]
    if local and not shared_storage:
        raise MnistRayError(f"{local[0]} is a local path, but the job runs on the Ray cluster at {address} whose "
                            "other nodes cannot see it: use shared storage such as s3://bucket/prefix, or pass "
                            "--shared-storage if every node mounts this path")


# --- the local Ray: started and owned by this command --------------------------------------------

LOCALHOST = "127.0.0.1"
# Ray's processes inherit these: ports Ray fixes by default and `ray start` has no flag for.
FIXED_PORT_ENV = ("DASHBOARD_METRIC_PORT", "AUTOSCALER_METRIC_PORT")
# Ray's default ports (GCS, dashboard, client server, dashboard agent, the two metric ports):
# a head started later on this machine wants them. Three are inside Linux's ephemeral range,
# where the OS may hand them out for port 0.
RAY_DEFAULT_PORTS = frozenset({6379, 8265, 10001, 52365, 44217, 44227})


def free_port() -> int:
    """A port free on 127.0.0.1 now, never one of Ray's defaults."""
    import socket

    while True:
        with socket.socket() as s:
            s.bind((LOCALHOST, 0))
            port = s.getsockname()[1]
        if port not in RAY_DEFAULT_PORTS:
            return port


def _die_with_parent():
    """A ``preexec_fn``: the child gets SIGTERM when the thread that started it ends, so a
    command killed with SIGKILL leaves no Ray behind (Linux; elsewhere ``stop`` and atexit)."""
    import ctypes
    import signal

    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
    except OSError:
        return None
    PR_SET_PDEATHSIG = 1
    return lambda: libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


def use_token_auth() -> None:
    """Token authentication for the local Ray, on as ``ray.init()`` would turn it on, with a
    token of this process's own unless one is given (nothing depends on ~/.ray).

    Ray reads the mode once, when imported: when it was imported before, its config is
    refreshed the way ``ray.init`` refreshes it for a new local cluster (Ray 2.60,
    ray._private.authentication.authentication_token_setup._enable_token_auth).
    """
    import secrets

    if os.environ.get("RAY_AUTH_MODE", "token") != "token":
        return  # the user turned it off
    os.environ.setdefault("RAY_AUTH_TOKEN", secrets.token_hex(16))
    if "RAY_AUTH_MODE" not in os.environ:
        os.environ["RAY_AUTH_MODE"] = "token"
        from ray._raylet import Config

        Config.initialize("")


class LocalRay:
    """A one-node Ray that belongs to this command: ``ray start --head --block`` in a child
    process, every port chosen free, its own temp dir, stopped with the command.

    Not ``ray.init()``'s in-process start: that puts the dashboard agent on its fixed port
    52365, which ``ray.init`` cannot change (upstream's answer: use ``ray start``, ray-project/ray
    PR #34886; checked on Ray 2.60). A local run next to a user's ``ray start --head`` then
    takes that port and the head's jobs fail with "No available agent to submit job".
    """

    READY = "Ray runtime started"  # `ray start` prints it once the node is up (Ray 2.60)

    def __init__(self, process, address: str, temp_dir: str, log_file):
        self.process, self.address, self.temp_dir, self.log_file = process, address, temp_dir, log_file

    @classmethod
    def start(cls, num_cpus: int | None = None, timeout: float = 180.0, *,
              dashboard_port: int | None = None, num_gpus: float | None = None) -> "LocalRay":
        """``dashboard_port``: with the dashboard (its job server takes ``ray job submit``) there;
        ``num_gpus``: GPUs the node declares (tests of GPU scheduling on a machine without one)."""
        import atexit
        import subprocess
        import tempfile
        import time

        # Its own temp root: `ray start` writes the address of "the" local cluster there, which
        # a user's head, `ray status` and `ray.init()` read under /tmp/ray.
        temp_dir = os.path.join(tempfile.gettempdir(), "mnist-ray")  # short: Unix socket paths
        os.makedirs(temp_dir, exist_ok=True)
        port = free_port()
        command = [sys.executable, "-m", "ray.scripts.scripts", "start", "--head", "--block",
                   "--node-ip-address", LOCALHOST, "--port", str(port),
                   *(["--include-dashboard", "true", "--dashboard-host", LOCALHOST, "--dashboard-port",
                      str(dashboard_port)] if dashboard_port else ["--include-dashboard", "false"]),
                   "--temp-dir", temp_dir, "--disable-usage-stats",
                   "--ray-client-server-port", str(free_port()),
                   # 0: the OS picks a free port (Ray's defaults are fixed numbers).
                   "--dashboard-agent-listen-port", "0", "--dashboard-agent-grpc-port", "0",
                   "--metrics-export-port", "0", "--runtime-env-agent-port", "0",
                   "--node-manager-port", "0", "--object-manager-port", "0",
                   "--min-worker-port", "0", "--max-worker-port", "0"]
        if num_cpus is not None:
            command += ["--num-cpus", str(num_cpus)]
        if num_gpus is not None:
            command += ["--num-gpus", str(num_gpus)]
        env = {**os.environ, SINGLE_MACHINE: os.environ.get(SINGLE_MACHINE, "0"),
               # Ray's processes that look their cluster up (Ray Train's placement group
               # cleaner, the state API) find this one, not "multiple active Ray instances".
               "RAY_ADDRESS": f"{LOCALHOST}:{port}",
               **{name: os.environ.get(name) or str(free_port()) for name in FIXED_PORT_ENV}}
        # Nameless (unlinked at once): a command killed by a signal, before atexit runs, leaves
        # no log behind. Its output is read back with pread, not a seek of the shared offset.
        log_file = tempfile.TemporaryFile("w+b", prefix="ray-start-", dir=temp_dir)
        process = subprocess.Popen(command, env=env, stdin=subprocess.DEVNULL, stdout=log_file,
                                   stderr=subprocess.STDOUT, preexec_fn=_die_with_parent())
        ray_ = cls(process, f"{LOCALHOST}:{port}", temp_dir, log_file)
        atexit.register(ray_.stop)
        deadline = time.monotonic() + timeout
        while True:
            output = ray_.output()
            if cls.READY in output:
                return ray_
            if process.poll() is not None or time.monotonic() > deadline:
                ray_.stop(wait=20)
                tail = " | ".join(line.strip() for line in output.strip().splitlines()[-3:])
                raise MnistRayError(f"could not start a local Ray (`ray start` "
                                    f"{'exited' if process.returncode is not None else 'timed out'}): {tail}")
            time.sleep(0.05)

    def output(self) -> str:
        """What `ray start` printed so far."""
        if self.log_file.closed:
            return ""
        fd = self.log_file.fileno()
        return os.pread(fd, os.fstat(fd).st_size, 0).decode(errors="replace")

    def stop(self, wait: float = 0.0) -> None:
        """SIGTERM: `ray start --block` stops the node's processes, then exits. Not waited for
        by default (it takes seconds, and the command is done): the processes end on their own."""
        import subprocess

        if self.process.poll() is None:
            self.process.terminate()
            if wait:
                try:
                    self.process.wait(wait)
                except subprocess.TimeoutExpired:
                    self.process.kill()
                    self.process.wait()
        self.log_file.close()
