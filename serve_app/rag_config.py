"""The retriever's configuration (``GatewayConfig.retriever``)."""

from __future__ import annotations

from pydantic import Field, PositiveInt, model_validator

from deployments.retriever_protocol import RagOptions
from serve_app.config_base import BaseConfig


class RetrieverConfig(BaseConfig):
    """RAG over Qdrant: chunking, ingestion batches and tenants' defaults."""

    enabled: bool = Field(True, description="Serve /v1/collections and the chat `rag` extension.")
    chunk_tokens: PositiveInt = Field(200, le=2048, description="Token budget of a chunk (the embedder reads 256).")
    overlap_tokens: int = Field(40, ge=0, description="Tokens repeated from one chunk at the start of the next.")
    embed_batch: PositiveInt = Field(256, description="Chunks sent to the Embedder per call when ingesting.")
    tenant_defaults: dict[str, RagOptions] = Field(
        default_factory=dict, description="Tenant -> rag options used when a chat request names none.")

    @model_validator(mode="after")
    def _check_overlap(self) -> "RetrieverConfig":
        if self.overlap_tokens >= self.chunk_tokens:
            raise ValueError("retriever: overlap_tokens must be smaller than chunk_tokens")
        return self
