"""Connecting to Ray: a local single-node Ray started in-process, or an existing cluster.

The environment every Ray worker needs (TensorFlow's Keras choice, the S3 endpoint and
credentials) is declared here once and sent through ``runtime_env``; otherwise workers would
silently use Keras 3 or talk to real AWS.
"""

from __future__ import annotations

import logging
import os
import sys

from mnist_ray import logs
from mnist_ray.errors import MnistRayError

log = logging.getLogger(__name__)

# Variables forwarded from the driver to every worker, when set.
FORWARDED_ENV = (
    "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL",
    "AWS_ENDPOINT_URL_S3", "AWS_REGION", "AWS_DEFAULT_REGION", "AWS_EC2_METADATA_DISABLED",
    "AWS_PROFILE", "GOOGLE_APPLICATION_CREDENTIALS",
)


def configure_process_env() -> dict[str, str]:
    """Set what TensorFlow needs before it is imported, and return the workers' env vars.

    tf-keras (Keras 2) rather than Keras 3 (``compat.keras2_env``).
    """
    from mnist_ray import compat

    for name, value in compat.keras2_env().items():
        os.environ.setdefault(name, value)
    logs.configure()  # the libraries' own log switches: quiet unless verbose
    env = {**{name: os.environ[name] for name in compat.keras2_env()}, **logs.worker_env()}
    env.update({k: os.environ[k] for k in FORWARDED_ENV if k in os.environ})
    return env


def runtime_env() -> dict:
    return {"env_vars": configure_process_env()}


LOOPBACK = ("127.0.0.1", "localhost", "::1")


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


# Single-node mode binds every Ray service to 127.0.0.1. `_node_ip_address="127.0.0.1"` alone
# does not: Ray swaps a loopback node IP for the machine's reachable one, and its servers then
# listen on every interface. Ray's switch for single-machine clusters (the macOS default) is
# read when Ray is imported, so it is set before that: here (the package imports Ray only
# after connecting) or by the caller (tests/conftest.py).
SINGLE_MACHINE = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"


def connect(address: str | None = None, *, num_cpus: int | None = None, paths: tuple[str, ...] = ()) -> None:
    """Attach to the Ray at ``address`` (or ``RAY_ADDRESS``), else start a local one.

    Reuses an already initialized Ray (tests share one per session). A local Ray binds to
    127.0.0.1: single-node mode needs no open ports. ``paths`` are the job's inputs and
    outputs: on a cluster of several machines, local ones only exist on this one.
    """
    address = address or os.environ.get("RAY_ADDRESS") or None
    local = not address or address == "local"
    if local and "ray" not in sys.modules:
        os.environ.setdefault(SINGLE_MACHINE, "0")
    import ray

    global _started_here
    if not ray.is_initialized():
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
            ray.init(address="local", num_cpus=num_cpus, include_dashboard=False,
                     _node_ip_address="127.0.0.1", **kwargs)
    logs.configure_ray_data()
    _warn_local_paths(address, paths)


_started_here = False


def shutdown() -> None:
    """Stop the Ray this process started or attached to through ``connect`` (a Ray the caller
    initialized, such as a test session's, is left alone).

    Called by the command line when a command ends: Ray's own exit hook would do it too, but
    after a fixed half-second pause for late error messages, on every command.
    """
    global _started_here
    if _started_here and "ray" in sys.modules:
        import ray

        ray.shutdown()
    _started_here = False


def _warn_local_paths(address: str | None, paths: tuple[str, ...]) -> None:
    import ray

    target = _host_port(address) if address and address != "local" else None
    # A head on another machine (a ray:// client), or a cluster of several machines.
    remote = target is not None and target[0] not in (*LOOPBACK, ray.util.get_node_ip_address())
    several = len([n for n in ray.nodes() if n.get("Alive")]) > 1
    if not (remote or several):
        return
    local = [p for p in paths if p and "://" not in p]
    if local:
        log.warning("%s: local paths on a Ray cluster of several machines; the workers on other "
                    "nodes cannot see them: use shared storage such as s3://bucket/prefix",
                    ", ".join(local))
