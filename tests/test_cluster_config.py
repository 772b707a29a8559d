"""cluster.yaml must be a config Ray's cluster launcher accepts."""

import json
from importlib import resources
from pathlib import Path

import jsonschema
import pytest
import yaml

CLUSTER_YAML = Path(__file__).resolve().parents[1] / "cluster.yaml"


def _schema():
    return json.loads(resources.files("ray.autoscaler").joinpath("ray-schema.json").read_text())


def test_cluster_yaml_validates_against_rays_launcher_schema():
    config = yaml.safe_load(CLUSTER_YAML.read_text())
    jsonschema.validate(config, _schema())
    assert config["head_node_type"] in config["available_node_types"]
    workers = {k: v for k, v in config["available_node_types"].items() if k != config["head_node_type"]}
    assert {"gpu-worker", "cpu-worker"} <= set(workers)
    assert all(v["min_workers"] == 0 for v in workers.values())  # autoscaling from zero


def test_the_schema_check_catches_a_broken_config():
    config = yaml.safe_load(CLUSTER_YAML.read_text())
    config["max_workers"] = "eight"
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(config, _schema())
