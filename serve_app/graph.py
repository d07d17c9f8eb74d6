"""``build_app``: serve_config.yaml's ``import_path``. Validates the config once, returns the bound graph."""

from __future__ import annotations

import logging
from typing import Any

from pydantic import ValidationError
from ray import serve
from ray.serve import Application
from ray.serve.deployment import Deployment

from deployments.cache import CacheService
from deployments.cost_guard import CostGuard
from deployments.retriever import Retriever
from deployments.router import Router
from deployments.semantic_cache import SemanticCache
from deployments.embedder import Embedder
from deployments.guard import Guard
from deployments.ledger import Ledger
from deployments.models.server import ModelDeployment
from serve_app.config import GatewayConfig, ModelConfig, StoresConfig
from serve_app.gateway import Gateway
from serve_app.stores import embedded_redis_url

logger = logging.getLogger(__name__)

# Defaults; serve_config.yaml's `deployments:` overrides any of them by deployment name.
# Serve's default max_ongoing_requests=5 collapses throughput under concurrency (measured: DESIGN.md).
DEFAULT_GATEWAY_OPTIONS: dict[str, Any] = {"num_replicas": 1, "max_ongoing_requests": 256,
                                           "ray_actor_options": {"num_cpus": 0}}
DEFAULT_MODEL_OPTIONS: dict[str, Any] = {"num_replicas": 1, "max_ongoing_requests": 64,
                                         "ray_actor_options": {"num_cpus": 0}}
DEFAULT_EMBEDDER_OPTIONS: dict[str, Any] = {"num_replicas": 1, "max_ongoing_requests": 128,
                                            "ray_actor_options": {"num_cpus": 0}}
DEFAULT_LEDGER_OPTIONS: dict[str, Any] = {"num_replicas": 1, "max_ongoing_requests": 64,
                                          "ray_actor_options": {"num_cpus": 0}}
DEFAULT_COMPONENT_OPTIONS: dict[str, Any] = {"num_replicas": 1, "max_ongoing_requests": 256,
                                             "ray_actor_options": {"num_cpus": 0}}
# SemanticCache and Retriever: one replica each, as Qdrant's local mode lets one process open a dir
# (with QDRANT_URL they may scale out).
DEFAULT_SEMANTIC_CACHE_OPTIONS: dict[str, Any] = {"num_replicas": 1, "max_ongoing_requests": 128,
                                                  "ray_actor_options": {"num_cpus": 0}}


def model_deployment_name(model_name: str) -> str:
    """Return the Serve deployment name of a model (what `deployments:` entries refer to)."""
    return "Model_" + "".join(c if c.isalnum() or c in "_-" else "_" for c in model_name)


def build_model_deployment(model: ModelConfig, data_dir: str) -> Application:
    """Bind the ModelDeployment of one model."""
    deployment: Deployment = serve.deployment(ModelDeployment, name=model_deployment_name(model.name),
                                              **DEFAULT_MODEL_OPTIONS)
    return deployment.bind(model, data_dir)


def build_embedder_deployment(config: GatewayConfig) -> Application:
    """Bind the Embedder deployment."""
    return serve.deployment(Embedder, name="Embedder", **DEFAULT_EMBEDDER_OPTIONS).bind(config.embedder)


def build_ledger_deployment(config: GatewayConfig) -> Application:
    """Bind the Ledger deployment (one replica: it owns the SQLite file)."""
    return serve.deployment(Ledger, name="Ledger", **DEFAULT_LEDGER_OPTIONS).bind(
        config.ledger, config.stores.data_dir
    )


def build_component_deployments(config: GatewayConfig, redis_url: str, embedder: Application) -> dict[str, Application]:
    """Bind the components placed as deployments (the others are embedded in the Gateway)."""
    components: dict[str, Application] = {}
    if config.cache.enabled and config.cache.semantic.enabled:
        stores = config.stores
        deployment = serve.deployment(SemanticCache, name="SemanticCache", **DEFAULT_SEMANTIC_CACHE_OPTIONS)
        components["semantic_cache"] = deployment.bind(config.cache, stores.qdrant_url, stores.data_dir,
                                                       stores.qdrant_path, embedder)
    if config.retriever.enabled:
        stores = config.stores
        deployment = serve.deployment(Retriever, name="Retriever", **DEFAULT_SEMANTIC_CACHE_OPTIONS)
        components["retriever"] = deployment.bind(config.retriever, config.embedder, stores.qdrant_url,
                                                  stores.data_dir, stores.qdrant_path, embedder)
    if config.cache.enabled and config.placement.cache == "deployment":
        deployment = serve.deployment(CacheService, name="Cache", **DEFAULT_COMPONENT_OPTIONS)
        components["cache"] = deployment.bind(config.cache, redis_url, components.get("semantic_cache"))
    if config.placement.cost_guard == "deployment":
        deployment = serve.deployment(CostGuard, name="CostGuard", **DEFAULT_COMPONENT_OPTIONS)
        components["cost_guard"] = deployment.bind(config.cost_guard, redis_url, config.prices())
    if config.placement.router == "deployment":
        components["router"] = serve.deployment(Router, name="Router", **DEFAULT_COMPONENT_OPTIONS).bind(
            config.router, redis_url, embedder)
    if config.placement.guard == "deployment":
        components["guard"] = serve.deployment(Guard, name="Guard", **DEFAULT_COMPONENT_OPTIONS).bind(
            config.guard, redis_url)
    return components


def load_config(args: dict[str, Any]) -> GatewayConfig:
    """Validate the application args and resolve environment defaults.

    Raises:
        ValueError: a readable message naming each bad field.
    """
    try:
        config = GatewayConfig.model_validate(args)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e['loc']) or '<args>'}: {e['msg']}" for e in exc.errors()
        )
        raise ValueError(f"Invalid raygate config: {problems}") from None
    stores: StoresConfig = config.stores.resolved()
    return config.model_copy(update={"stores": stores})


def build_app(args: dict[str, Any]) -> Application:
    """Build raygate's graph from serve_config.yaml's ``args`` (the ``import_path`` target).

    Serve calls it with exactly one argument; tests and benchmarks that need other
    Gateway options call ``build_graph``.

    Args:
        args: the application args (validated by ``GatewayConfig``).

    Returns:
        The Gateway bound to its models, Embedder and Ledger (and components placed as deployments).
    """
    return build_graph(args)


def build_graph(args: dict[str, Any], *, gateway_options: dict[str, Any] | None = None) -> Application:
    """``build_app`` with Serve options overriding the Gateway's defaults.

    Args:
        args: the application args.
        gateway_options: e.g. ``{"num_replicas": 2}`` (serve_config.yaml's ``deployments:`` does
            this for `serve run` / `serve deploy`).
    """
    config = load_config(args)
    redis_url = config.stores.redis_url or embedded_redis_url(config.stores.data_dir)
    models = {m.name: build_model_deployment(m, config.stores.data_dir) for m in config.models
              if not config.placement.embeds(m)}  # embedded models run in the Gateway (serve_app.placement)
    gateway = serve.deployment(Gateway, name="Gateway", **{**DEFAULT_GATEWAY_OPTIONS, **(gateway_options or {})})
    embedder = build_embedder_deployment(config)
    return gateway.bind(config, redis_url, models, embedder, build_ledger_deployment(config),
                        **build_component_deployments(config, redis_url, embedder))
