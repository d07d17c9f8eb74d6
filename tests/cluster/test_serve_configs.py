"""The serve configs pass Ray Serve's and raygate's validation, and size GPUs and replicas by raygate's rules.

* serve_config.yaml, serve_config.gpu.yaml and the RayService's serveConfigV2: Ray Serve's
  ``ServeDeploySchema`` (plus the unknown-key check Serve's models skip), ``GatewayConfig`` for the
  args, and every ``deployments:`` entry naming a deployment of the graph the args build.
* serve_config.gpu.yaml's GPU sizing: fractional ``num_gpus`` with a ``gpu_memory_utilization`` that
  fits in it, the single-replica deployments, autoscaling for the rest, and enough GPU nodes.
* serve_config.yaml (one node): autoscaling for what holds no state.

Each validator also has tests showing it refuses a broken copy. Nothing here starts Ray.
"""

from __future__ import annotations

import copy
import re
from typing import Any, Callable

import pytest
import yaml
from pydantic import BaseModel
from ray.serve._private.build_app import build_app
from ray.serve.config import AutoscalingConfig
from ray.serve.schema import (
    DeploymentSchema,
    HTTPOptionsSchema,
    LoggingConfig,
    RayActorOptionsSchema,
    ServeApplicationSchema,
    ServeDeploySchema,
)

from serve_app.config import GatewayConfig
from serve_app.graph import build_graph, model_deployment_name
from tests.cluster.test_cluster_configs import (
    CLUSTER_YAML,
    ConfigError,
    GPU_SERVE_CONFIG,
    LEDGER,
    LOCAL_SERVE_CONFIG,
    QDRANT_LOCAL_DEPLOYMENTS,
    RAYSERVICE_YAML,
    STATE_RESOURCE,
    load_yaml,
    validate_cluster_launcher_config,
)


# --- Serve configs ---------------------------------------------------------------------------------

def check_known_keys(data: Any, model: type[BaseModel], where: str) -> None:
    """Serve's schemas ignore unknown keys (pydantic's default): a typo would pass unnoticed."""
    if not isinstance(data, dict):
        return
    unknown = sorted(set(data) - set(model.model_fields))
    if unknown:
        raise ConfigError(f"{where}: unknown keys {unknown} (not fields of {model.__name__})")


def graph_deployment_names(args: dict[str, Any]) -> list[str]:
    """Names of the deployments ``build_app(args)`` builds (no Ray: bound, not deployed)."""
    args = copy.deepcopy(args)
    # A Redis URL keeps build_graph from starting the embedded Valkey actor; nothing connects to it.
    args.setdefault("stores", {})["redis_url"] = "redis://unused.invalid:6379/0"
    return [d.name for d in build_app(build_graph(args), name="raygate").deployments]


def validate_serve_config(doc: dict[str, Any]) -> None:
    """Validate a Serve config file as `serve deploy` and raygate's build_app would, strictly."""
    ServeDeploySchema.model_validate(doc)
    check_known_keys(doc, ServeDeploySchema, "<top>")
    check_known_keys(doc.get("http_options"), HTTPOptionsSchema, "http_options")
    check_known_keys(doc.get("logging_config"), LoggingConfig, "logging_config")
    for app in doc["applications"]:
        check_known_keys(app, ServeApplicationSchema, f"applications.{app['name']}")
        if app["import_path"] != "serve_app.graph:build_app":
            raise ConfigError(f"import_path: {app['import_path']}")
        GatewayConfig.model_validate(app["args"])
        names = graph_deployment_names(app["args"])
        for entry in app.get("deployments", []):
            where = f"deployments.{entry['name']}"
            check_known_keys(entry, DeploymentSchema, where)
            check_known_keys(entry.get("ray_actor_options"), RayActorOptionsSchema, f"{where}.ray_actor_options")
            if "autoscaling_config" in entry:
                check_known_keys(entry["autoscaling_config"], AutoscalingConfig, f"{where}.autoscaling_config")
                AutoscalingConfig.model_validate(entry["autoscaling_config"])
            if entry["name"] not in names:
                raise ConfigError(f"{where}: the graph has no such deployment (it has {names})")


def rayservice_serve_config() -> dict[str, Any]:
    return yaml.safe_load(load_yaml(RAYSERVICE_YAML)["spec"]["serveConfigV2"])


@pytest.mark.parametrize("which", ["serve_config.gpu.yaml", "rayservice serveConfigV2"])
def test_serve_configs_pass_serve_and_gateway_config(which: str) -> None:
    doc = load_yaml(GPU_SERVE_CONFIG) if which == "serve_config.gpu.yaml" else rayservice_serve_config()
    validate_serve_config(doc)
    assert doc["proxy_location"] == "EveryNode" and doc["http_options"]["host"] == "0.0.0.0"


def test_rayservice_serves_the_gpu_config() -> None:
    """The RayService embeds serve_config.gpu.yaml's settings: one is not edited without the other."""
    embedded, gpu = rayservice_serve_config(), load_yaml(GPU_SERVE_CONFIG)
    assert embedded == gpu


def _entry(doc: dict[str, Any], name: str) -> dict[str, Any]:
    return next(d for d in doc["applications"][0]["deployments"] if d["name"] == name)


def _gateway(doc: dict[str, Any]) -> dict[str, Any]:
    return _entry(doc, "Gateway")


def _args(doc: dict[str, Any]) -> dict[str, Any]:
    return doc["applications"][0]["args"]


@pytest.mark.parametrize(
    ("break_doc", "match"),
    [
        pytest.param(lambda d: d["applications"][0].pop("import_path"), "import_path", id="no-import-path"),
        pytest.param(lambda d: _gateway(d).update(num_replicas=2),
                     "num_replicas is not allowed", id="num-replicas-with-autoscaling"),
        pytest.param(lambda d: d.update(proxy_location="Everywhere"), "proxy_location", id="bad-proxy-location"),
        pytest.param(lambda d: _args(d).update(modelz=[]), "modelz", id="unknown-arg"),
        pytest.param(lambda d: _args(d)["models"][0]["engine_params"].update(gpu_memory_utilization=1.5),
                     "gpu_memory_utilization", id="gpu-memory-utilization-over-1"),
        pytest.param(lambda d: _args(d)["models"][0].update(fallbacks=["nope"]),
                     "unknown models", id="unknown-fallback"),
        pytest.param(lambda d: _gateway(d)["autoscaling_config"].update(min_replica=1),
                     "min_replica", id="autoscaling-typo"),
        pytest.param(lambda d: _gateway(d)["autoscaling_config"].update(max_replicas=0),
                     "max_replicas", id="autoscaling-bad-value"),
        pytest.param(lambda d: _gateway(d).update(num_replica=1), "num_replica", id="deployment-option-typo"),
        pytest.param(lambda d: _gateway(d)["ray_actor_options"].update(num_gpu=1), "num_gpu", id="actor-option-typo"),
        pytest.param(lambda d: _gateway(d).update(name="Model_qwen"), "no such deployment", id="no-such-deployment"),
    ],
)
def test_serve_config_validation_refuses_a_broken_config(break_doc: Callable[[dict[str, Any]], Any],
                                                         match: str) -> None:
    doc = load_yaml(GPU_SERVE_CONFIG)
    break_doc(doc)
    with pytest.raises(ValueError, match=re.escape(match)):  # pydantic's ValidationError, ConfigError
        validate_serve_config(doc)


# --- GPU sizing ----------------------------------------------------------------------------------

def check_gpu_sizing(doc: dict[str, Any]) -> None:
    """raygate's rules for a GPU serve config.

    * every vLLM model's deployment asks for a fraction of a GPU (0 < num_gpus < 1) and its
      engine's gpu_memory_utilization fits in that fraction (vLLM cannot see Ray's reservation);
    * the Ledger runs exactly one replica (it owns the SQLite file), so do SemanticCache and
      Retriever while Qdrant is in local mode (no stores.qdrant_url), each on the node offering
      STATE_RESOURCE;
    * every other deployment of the graph has an entry with an autoscaling_config;
    * an entry that sets ray_actor_options states num_cpus (it replaces the code's whole dict).
    """
    [app] = doc["applications"]
    args = app["args"]
    entries = {d["name"]: d for d in app.get("deployments", [])}
    single = {LEDGER} | (set() if args.get("stores", {}).get("qdrant_url") else set(QDRANT_LOCAL_DEPLOYMENTS))
    for name, entry in entries.items():
        if "ray_actor_options" in entry and "num_cpus" not in entry["ray_actor_options"]:
            raise ConfigError(f"{name}: ray_actor_options without num_cpus (Ray's default is 1)")
    for model in args["models"]:
        if model["engine"] != "vllm":
            continue
        name = model_deployment_name(model["name"])
        num_gpus = entries.get(name, {}).get("ray_actor_options", {}).get("num_gpus", 0)
        if not 0 < num_gpus < 1:
            raise ConfigError(f"{name}: num_gpus {num_gpus} is not a fraction of a GPU")
        utilization = model["engine_params"]["gpu_memory_utilization"]
        if utilization > num_gpus:
            raise ConfigError(f"{name}: gpu_memory_utilization {utilization} > num_gpus {num_gpus}")
    for name in graph_deployment_names(args):
        entry = entries.get(name)
        if entry is None:
            raise ConfigError(f"{name}: no deployments: entry")
        if name in single:
            if entry.get("num_replicas") != 1 or "autoscaling_config" in entry:
                raise ConfigError(f"{name}: keeps local state, needs num_replicas 1 and no autoscaling_config")
            if entry.get("ray_actor_options", {}).get("resources", {}).get(STATE_RESOURCE, 0) <= 0:
                raise ConfigError(f"{name}: not pinned to the state node ({STATE_RESOURCE})")
        elif not entry.get("autoscaling_config"):
            raise ConfigError(f"{name}: no autoscaling_config")


def gpus_needed(doc: dict[str, Any], bound: str) -> float:
    """GPUs the model deployments hold at their min_replicas or max_replicas."""
    entries = doc["applications"][0]["deployments"]
    return sum(e["autoscaling_config"][bound] * e.get("ray_actor_options", {}).get("num_gpus", 0)
               for e in entries if "autoscaling_config" in e)


def test_gpu_serve_config_sizing() -> None:
    doc = load_yaml(GPU_SERVE_CONFIG)
    check_gpu_sizing(doc)
    models = _args(doc)["models"]
    assert len([m for m in models if m["engine"] == "vllm"]) >= 2
    assert any(m["engine_params"].get("enable_lora") for m in models)


def test_local_serve_config_autoscales_what_holds_no_state() -> None:
    """serve_config.yaml (one node): every deployment of its graph has an entry; the Ledger, SemanticCache
    and Retriever keep one replica (local files); every other one autoscales."""
    doc = load_yaml(LOCAL_SERVE_CONFIG)
    [app] = doc["applications"]
    names = graph_deployment_names(app["args"])
    validate_serve_config(doc)
    entries = {d["name"]: d for d in app["deployments"]}
    assert set(entries) == set(names)
    for name, entry in entries.items():
        if name in {LEDGER, *QDRANT_LOCAL_DEPLOYMENTS}:
            assert entry["num_replicas"] == 1 and "autoscaling_config" not in entry, name
        else:
            assert entry["autoscaling_config"]["max_replicas"] > entry["autoscaling_config"]["min_replicas"], name
    assert doc["http_options"]["host"] == "127.0.0.1"


def test_gpu_nodes_fit_the_gpu_serve_config() -> None:
    """Both clusters have GPUs for every model replica at max_replicas, and for min_replicas at
    their minimum size; only their head offers the state resource."""
    doc = load_yaml(GPU_SERVE_CONFIG)
    low, high = gpus_needed(doc, "min_replicas"), gpus_needed(doc, "max_replicas")
    assert 0 < low <= high

    launcher = validate_cluster_launcher_config(load_yaml(CLUSTER_YAML))
    types = launcher["available_node_types"]
    head = launcher["head_node_type"]
    workers = [t for name, t in types.items() if name != head]
    assert sum(t["min_workers"] * t["resources"].get("GPU", 0) for t in workers) >= low
    assert sum(t["max_workers"] * t["resources"].get("GPU", 0) for t in workers) >= high
    assert launcher["max_workers"] >= sum(t["min_workers"] for t in workers)
    assert [n for n, t in types.items() if STATE_RESOURCE in t["resources"]] == [head]

    cluster = load_yaml(RAYSERVICE_YAML)["spec"]["rayClusterConfig"]
    groups = cluster["workerGroupSpecs"]
    gpus = [int(g["template"]["spec"]["containers"][0]["resources"]["limits"].get("nvidia.com/gpu", 0))
            for g in groups]
    assert sum(g["minReplicas"] * n for g, n in zip(groups, gpus)) >= low
    assert sum(g["maxReplicas"] * n for g, n in zip(groups, gpus)) >= high
    assert STATE_RESOURCE in cluster["headGroupSpec"]["resources"]
    assert not any(STATE_RESOURCE in g.get("resources", {}) for g in groups)


BIG_MODEL = "Model_qwen2_5-3b"
ONE_REPLICA = {"min_replicas": 1, "max_replicas": 1}


def _actor_options(doc: dict[str, Any], name: str) -> dict[str, Any]:
    return _entry(doc, name)["ray_actor_options"]


def _drop_entry(doc: dict[str, Any], name: str) -> None:
    deployments = doc["applications"][0]["deployments"]
    deployments.remove(_entry(doc, name))


@pytest.mark.parametrize(
    ("break_doc", "match"),
    [
        pytest.param(lambda d: _actor_options(d, BIG_MODEL).update(num_gpus=1), "not a fraction", id="whole-gpu"),
        pytest.param(lambda d: _actor_options(d, BIG_MODEL).pop("num_gpus"), "not a fraction", id="no-gpu"),
        pytest.param(lambda d: _args(d)["models"][1]["engine_params"].update(gpu_memory_utilization=0.6),
                     "gpu_memory_utilization 0.6 > num_gpus 0.5", id="utilization-over-num-gpus"),
        pytest.param(lambda d: _entry(d, LEDGER).update(num_replicas=2), "Ledger: keeps local state", id="two-ledgers"),
        pytest.param(lambda d: _entry(d, LEDGER).update(num_replicas="auto", autoscaling_config=ONE_REPLICA),
                     "Ledger: keeps local state", id="autoscaled-ledger"),
        pytest.param(lambda d: _entry(d, "Retriever").update(num_replicas=2),
                     "Retriever: keeps local state", id="two-local-qdrant-retrievers"),
        pytest.param(lambda d: _actor_options(d, "SemanticCache").pop("resources"),
                     "SemanticCache: not pinned", id="unpinned-cache"),
        pytest.param(lambda d: _gateway(d).update(autoscaling_config=None, num_replicas=2),
                     "Gateway: no autoscaling_config", id="fixed-gateway"),
        pytest.param(lambda d: _drop_entry(d, "Embedder"), "Embedder: no deployments: entry", id="no-embedder-entry"),
        pytest.param(lambda d: _actor_options(d, "Gateway").pop("num_cpus"),
                     "Gateway: ray_actor_options without num_cpus", id="actor-options-without-num-cpus"),
    ],
)
def test_gpu_sizing_refuses(break_doc: Callable[[dict[str, Any]], Any], match: str) -> None:
    doc = load_yaml(GPU_SERVE_CONFIG)
    break_doc(doc)
    with pytest.raises(ConfigError, match=re.escape(match)):
        check_gpu_sizing(doc)


def test_a_qdrant_server_lets_the_qdrant_deployments_autoscale() -> None:
    doc = load_yaml(GPU_SERVE_CONFIG)
    _args(doc)["stores"]["qdrant_url"] = "http://qdrant:6333"
    for name in QDRANT_LOCAL_DEPLOYMENTS:
        entry = _entry(doc, name)
        del entry["num_replicas"], entry["ray_actor_options"]["resources"]
        entry["autoscaling_config"] = {"min_replicas": 1, "max_replicas": 4, "target_ongoing_requests": 64}
    check_gpu_sizing(doc)
    validate_serve_config(doc)
