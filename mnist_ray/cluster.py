"""Connecting to Ray: a local single-node Ray started in-process, or an existing cluster.

The environment every Ray worker needs (TensorFlow's Keras choice, the S3 endpoint and
credentials) is declared here once and sent through ``runtime_env``; otherwise workers would
silently use Keras 3 or talk to real AWS.
"""

from __future__ import annotations

import logging
import os

log = logging.getLogger(__name__)

# Variables forwarded from the driver to every worker, when set.
FORWARDED_ENV = (
    "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL",
    "AWS_ENDPOINT_URL_S3", "AWS_REGION", "AWS_DEFAULT_REGION", "AWS_EC2_METADATA_DISABLED",
    "AWS_PROFILE", "GOOGLE_APPLICATION_CREDENTIALS",
)


def configure_process_env() -> dict[str, str]:
    """Set what TensorFlow needs before it is imported, and return the workers' env vars.

    tf-keras (Keras 2) rather than Keras 3: Keras 3 fails under MultiWorkerMirroredStrategy.
    """
    os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # TF's C++ startup chatter hides real errors
    env = {"TF_USE_LEGACY_KERAS": os.environ["TF_USE_LEGACY_KERAS"],
           "TF_CPP_MIN_LOG_LEVEL": os.environ["TF_CPP_MIN_LOG_LEVEL"]}
    env.update({k: os.environ[k] for k in FORWARDED_ENV if k in os.environ})
    return env


def runtime_env() -> dict:
    return {"env_vars": configure_process_env()}


def connect(address: str | None = None, *, num_cpus: int | None = None) -> None:
    """Attach to the Ray at ``address`` (or ``RAY_ADDRESS``), else start a local one.

    Reuses an already initialized Ray (tests share one per session). A local Ray binds to
    127.0.0.1: single-node mode needs no open ports.
    """
    import ray

    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS") or None
    kwargs = {"runtime_env": runtime_env(), "log_to_driver": True, "configure_logging": False}
    if address and address != "local":
        log.info("connecting to the Ray cluster at %s", address)
        ray.init(address=address, **kwargs)
    else:
        ray.init(address="local", num_cpus=num_cpus, include_dashboard=False,
                 _node_ip_address="127.0.0.1", **kwargs)
