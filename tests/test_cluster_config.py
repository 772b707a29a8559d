"""cluster.yaml must be a config Ray's cluster launcher accepts, and one whose nodes would boot:
Python 3.11, the same token auth on every `ray start`, TensorFlow's CUDA wheels on GPU nodes."""

import json
import os
import re
import shlex
import subprocess
import sys
import tomllib
from importlib import metadata, resources
from pathlib import Path

import jsonschema
import pytest
import yaml
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet

ROOT = Path(__file__).resolve().parents[1]
CLUSTER_YAML = ROOT / "cluster.yaml"
GPU_NODE_TYPES = {"gpu-worker"}
NODE_PLATFORMS = ("manylinux2014_x86_64", "manylinux_2_17_x86_64", "manylinux_2_27_x86_64",
                  "manylinux_2_28_x86_64", "manylinux_2_35_x86_64")


def _schema():
    return json.loads(resources.files("ray.autoscaler").joinpath("ray-schema.json").read_text())


@pytest.fixture(scope="module")
def config():
    return yaml.safe_load(CLUSTER_YAML.read_text())


@pytest.fixture(scope="module")
def pyproject():
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def _setup_lists(config) -> dict[str, list[str]]:
    """The setup commands each node type really runs (Ray's rule: a node type's own
    worker_setup_commands replace the global setup_commands + worker_setup_commands)."""
    common = config.get("setup_commands", [])
    out = {}
    for name, node_type in config["available_node_types"].items():
        if name == config["head_node_type"]:
            out[name] = common + config.get("head_setup_commands", [])
        else:
            out[name] = node_type.get("worker_setup_commands", common + config.get("worker_setup_commands", []))
    return out


def _ray_start_env(command: str) -> tuple[str, dict[str, str]]:
    """(the ray executable, the VAR=value assignments in front of it) of one `ray start` line."""
    last = command.split(";")[-1]
    words = shlex.split(last)
    env = {}
    while words and re.fullmatch(r"[A-Z_][A-Z0-9_]*=.*", words[0]):
        key, _, value = words.pop(0).partition("=")
        env[key] = value
    assert words[1] == "start", command
    return words[0], env


def test_cluster_yaml_validates_against_rays_launcher_schema(config):
    jsonschema.validate(config, _schema())
    assert config["head_node_type"] in config["available_node_types"]
    workers = {k: v for k, v in config["available_node_types"].items() if k != config["head_node_type"]}
    assert {"gpu-worker", "cpu-worker"} <= set(workers)
    assert all(v["min_workers"] == 0 for v in workers.values())  # autoscaling from zero
    assert workers["gpu-worker"]["max_workers"] > 0  # ... to a GPU node: what infer/train ask for


def test_the_schema_check_catches_a_broken_config(config):
    broken = {**config, "max_workers": "eight"}
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(broken, _schema())


def test_every_node_makes_a_venv_whose_python_the_package_accepts(config, pyproject):
    requires = SpecifierSet(pyproject["project"]["requires-python"])
    for node_type, commands in _setup_lists(config).items():
        venvs = [shlex.split(c) for c in commands if " venv " in f" {c} "]
        assert len(venvs) == 1, f"{node_type}: one venv, made once"
        words = venvs[0]
        python = words[words.index("--python") + 1]
        assert requires.contains(python + ".0"), f"{node_type}: Python {python} vs requires-python {requires}"
        target = words[-1]
        installs = [c for c in commands if " pip install " in c and "mnist-ray" in c]
        assert installs and all(f"--python {target}/bin/python" in c for c in installs), node_type
        assert any("requirements.lock" in c for c in installs), f"{node_type}: the tested pins"
    starts = config["head_start_ray_commands"] + config["worker_start_ray_commands"]
    # The Ray that starts is the venv's: the AMI's own Python is 3.10.
    assert all(re.search(r"(^|[ ;])~/venv/bin/ray (start|stop)", c) for c in starts), starts


def test_every_ray_start_carries_the_same_token_auth(config):
    head = [_ray_start_env(c) for c in config["head_start_ray_commands"] if " start " in c]
    workers = [_ray_start_env(c) for c in config["worker_start_ray_commands"] if " start " in c]
    assert len(head) == 1 and len(workers) == 1
    (_, head_env), (_, worker_env) = head[0], workers[0]
    assert head_env == worker_env, "a worker must start with the head's environment"
    assert head_env["RAY_AUTH_MODE"] == "token"
    # The token file the nodes read is the one file_mounts ships, generated once where `ray up` runs.
    token_path = head_env["RAY_AUTH_TOKEN_PATH"].replace("$HOME", "~")
    assert config["file_mounts"].get(token_path) == token_path
    for node_type, commands in _setup_lists(config).items():
        assert any(c.startswith(f"test -s {token_path}") for c in commands), f"{node_type}: fail early without a token"


def test_gpu_nodes_install_the_gpu_extra_and_only_they(config):
    lists = _setup_lists(config)
    common = config["setup_commands"]
    for node_type, commands in lists.items():
        gpu_installs = [c for c in commands if "mnist-ray[gpu]" in c]
        if node_type in GPU_NODE_TYPES:
            assert commands[:len(common)] == common, f"{node_type} repeats the common setup unchanged"
            assert len(gpu_installs) == 1 and "-c ~/mnist-ray/requirements.lock" in gpu_installs[0]
        else:
            assert not gpu_installs, f"{node_type} has no GPU: no CUDA wheels (GBs)"


def test_the_gpu_extra_is_tensorflow_with_its_cuda_wheels(pyproject):
    """The extra names the locked TensorFlow, and that TensorFlow's own metadata declares
    `and-cuda` as NVIDIA's CUDA 12 wheels, NCCL included (multi-GPU training needs it)."""
    (gpu,) = [Requirement(r) for r in pyproject["project"]["optional-dependencies"]["gpu"]]
    locked = dict(line.split("==") for line in (ROOT / "requirements.lock").read_text().splitlines()
                  if "==" in line and not line.startswith("#"))
    assert gpu.name == "tensorflow" and gpu.extras == {"and-cuda"}
    assert gpu.specifier.contains(locked["tensorflow"]) and metadata.version("tensorflow") == locked["tensorflow"]
    tf = metadata.metadata("tensorflow")
    assert "and-cuda" in tf.get_all("Provides-Extra")
    cuda = [Requirement(r) for r in tf.get_all("Requires-Dist")
            if Requirement(r).marker and Requirement(r).marker.evaluate({"extra": "and-cuda"})
            and not Requirement(r).marker.evaluate({"extra": ""})]
    names = {r.name for r in cuda}
    assert {"nvidia-cudnn-cu12", "nvidia-nccl-cu12", "nvidia-cuda-runtime-cu12"} <= names, names


def test_the_gpu_extra_resolves_beside_the_lock(tmp_path):
    """A real resolve against the package index (metadata only: under 1 MB and ~30 s here, no
    wheel is downloaded), for the nodes' platform rather than this machine's: the extra adds
    NVIDIA's wheels for Python 3.11 on Linux x86_64 and moves no pin of the CPU lock."""
    report = tmp_path / "report.json"
    # pip takes --platform tags literally: every manylinux tag a 3.11 node (glibc 2.35) accepts.
    platforms = [w for tag in NODE_PLATFORMS for w in ("--platform", tag)]
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--dry-run", "--quiet", "--report", str(report),
         "--python-version", "3.11", *platforms, "--only-binary", ":all:",
         "--target", str(tmp_path / "never-written"), "-c", str(ROOT / "requirements.lock"),
         "tensorflow[and-cuda]==2.21.*"],
        capture_output=True, text=True, timeout=300, env={**os.environ, "PIP_NO_INPUT": "1"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    would_install = {i["metadata"]["name"].lower(): i["metadata"]["version"]
                     for i in json.loads(report.read_text())["install"]}
    assert "nvidia-nccl-cu12" in would_install and "nvidia-cudnn-cu12" in would_install, would_install
    locked = dict(line.lower().split("==") for line in (ROOT / "requirements.lock").read_text().splitlines()
                  if "==" in line and not line.startswith("#"))
    moved = {n: (v, locked[n]) for n, v in would_install.items() if n in locked and locked[n] != v}
    assert not moved, f"the gpu extra would change locked versions: {moved}"
