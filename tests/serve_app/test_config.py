"""GatewayConfig: serve_config.yaml validates; bad configs fail naming the field."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from serve_app.config import GatewayConfig, HFEngineParams, RemoteEngineParams
from serve_app.graph import build_app, load_config, model_deployment_name

ROOT = Path(__file__).resolve().parents[2]


def serve_config() -> dict[str, Any]:
    return yaml.safe_load((ROOT / "serve_config.yaml").read_text())


def test_serve_config_args_validate() -> None:
    app = serve_config()["applications"][0]
    config = GatewayConfig.model_validate(app["args"])
    assert isinstance(config.models[0].engine_params, HFEngineParams)
    assert app["import_path"] == "serve_app.graph:build_app"


def test_serve_config_builds_a_graph(tmp_path: Path) -> None:
    from ray.serve import Application
    from ray.serve._private.api import call_user_app_builder_with_args_if_necessary

    app = serve_config()["applications"][0]
    args = {**app["args"], "stores": {"redis_url": "redis://127.0.0.1:1", "data_dir": str(tmp_path)}}
    # The way `serve run` / `serve deploy` call the import_path (it insists on one parameter).
    built = call_user_app_builder_with_args_if_necessary(build_app, args)
    assert isinstance(built, Application)
    deployment_names = {d["name"] for d in app["deployments"]}
    expected = {"Gateway", "Embedder", "Ledger", "SemanticCache", "Retriever"} | {
        model_deployment_name(m["name"]) for m in app["args"]["models"]}
    assert deployment_names == expected


def test_serve_config_is_loopback_only() -> None:
    assert serve_config()["http_options"]["host"] == "127.0.0.1"


def test_engine_params_follow_engine() -> None:
    config = GatewayConfig.model_validate({"models": [
        {"name": "r", "engine": "remote", "engine_params": {"base_url": "http://x/v1", "model": "m"}}]})
    assert isinstance(config.models[0].engine_params, RemoteEngineParams)


@pytest.mark.parametrize("args,fragment", [
    ({"models": []}, "models"),
    ({"models": [{"name": "a", "engine": "hf", "engine_params": {"modle_path": "x"}}]}, "modle_path"),
    ({"models": [{"name": "a", "engine": "gpu", "engine_params": {}}]}, "engine"),
    ({"models": [{"name": "a", "engine": "remote", "engine_params": {"model": "m"}}]}, "base_url"),
    ({"models": [{"name": "a", "engine": "hf", "engine_params": {}, "fallbacks": ["zz"]}]}, "unknown models ['zz']"),
    ({"models": [{"name": "a", "engine": "hf", "engine_params": {}, "fallbacks": ["a"]}]}, "itself"),
    ({"models": [{"name": "a", "engine": "hf", "engine_params": {}},
                 {"name": "a", "engine": "hf", "engine_params": {}}]}, "duplicate"),
    ({"models": [{"name": "a", "engine": "hf", "engine_params": {}, "input_price_per_1m_usd": -1}]}, "input_price"),
    ({"models": [{"name": "a", "engine": "hf", "engine_params": {}}], "stores": {"redis": "x"}}, "stores.redis"),
    ({"models": [{"name": "a", "engine": "hf", "engine_params": {}}],
      "router": {"tiers": {"deep_analysis": "zz"}}}, "router: tiers or domains name unknown models ['zz']"),
    ({"models": [{"name": "a", "engine": "hf", "engine_params": {}}],
      "router": {"tiers": {"hard": "a"}}}, "router.tiers.hard"),
    ({"models": [{"name": "auto", "engine": "hf", "engine_params": {}}]}, "the router's name"),
    ({"models": [{"name": "a", "engine": "hf", "engine_params": {}}],
      "retriever": {"chunk_tokens": 50, "overlap_tokens": 50}}, "overlap_tokens"),
])
def test_bad_config_names_the_field(args: dict[str, Any], fragment: str) -> None:
    with pytest.raises(ValueError) as info:
        load_config(args)
    assert fragment in str(info.value)


def test_cost_is_price_times_tokens() -> None:
    config = GatewayConfig.model_validate({"models": [
        {"name": "a", "engine": "hf", "engine_params": {}, "input_price_per_1m_usd": 2, "output_price_per_1m_usd": 8}]})
    assert config.models[0].cost_usd(1_000, 500) == pytest.approx(0.006)


def test_stores_resolve_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("REDIS_URL", "redis://127.0.0.1:7777")
    monkeypatch.setenv("RAYGATE_DATA_DIR", str(tmp_path))
    config = load_config({"models": [{"name": "a", "engine": "hf", "engine_params": {}}]})
    assert config.stores.redis_url == "redis://127.0.0.1:7777"
    assert config.stores.data_dir == str(tmp_path.resolve())


@pytest.mark.parametrize("placement", ["deployment", "embedded"])
def test_embedded_models_bind_no_deployment(placement: str, tmp_path: Path) -> None:
    from ray.serve._private.build_app import build_app as build_deployments

    args = {"models": [{"name": "tiny", "engine": "hf", "engine_params": {}},
                       {"name": "gpt", "engine": "remote", "engine_params": {"base_url": "http://x/v1", "model": "m"}}],
            "stores": {"redis_url": "redis://127.0.0.1:1", "data_dir": str(tmp_path)},
            "placement": {"models": placement}}
    names = {d.name for d in build_deployments(build_app(args), name="raygate").deployments}
    # hf (and vllm) models hold weights: always their own deployment; only remote models move in.
    assert "Model_tiny" in names
    assert ("Model_gpt" in names) == (placement == "deployment")
