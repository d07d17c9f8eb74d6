"""The OpenAI-style routes besides chat completions, and the health check."""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Any

import orjson
from fastapi import APIRouter, Depends
from fastapi.responses import Response

from deployments.cost_guard_protocol import UsageReport
from deployments.ledger import FeedbackRecord
from serve_app.auth import APIKey
from serve_app.constants import EMBEDDER_CALL_TIMEOUT_S, LEDGER_CALL_TIMEOUT_S
from serve_app.deps import authenticate, get_gateway, require_admin
from serve_app.errors import InvalidRequestError, ModelNotFoundError, NotFoundError
from serve_app.handles import call
from serve_app.http_parts import encode_vectors, probe
from serve_app.metrics import local_metrics
from serve_app.api_protocol import (
    EmbeddingData, EmbeddingRequest, EmbeddingResponse, EmbeddingUsage, FeedbackRequest, ModelCard, ModelList,
)
from serve_app.router_config import AUTO_MODEL

if TYPE_CHECKING:
    from serve_app.gateway import Gateway

router = APIRouter()


@router.get("/v1/usage", response_model=UsageReport)
async def usage(key: APIKey = Depends(authenticate), gateway: "Gateway" = Depends(get_gateway)) -> UsageReport:
    """The calling key's usage today and its remaining plan quota."""
    report: UsageReport = await gateway.spend.cost_guard("usage", key.tenant, key.user, key.plan)
    return report

@router.post("/v1/feedback")
async def feedback(body: FeedbackRequest, key: APIKey = Depends(authenticate),
                   gateway: "Gateway" = Depends(get_gateway)) -> dict[str, Any]:
    """Rate an answer (1-5 and/or thumbs, with a comment). Only the key that asked may rate it."""
    await gateway.ledger_buffer.flush()  # the request's own row may still be buffered here
    record = FeedbackRecord(request_id=body.request_id, key_id=key.key_id, rating=body.rating,
                            thumbs=body.thumbs, comment=body.comment)
    if not await call(gateway.ledger.record_feedback.remote(record), LEDGER_CALL_TIMEOUT_S, "Ledger"):
        raise NotFoundError("No request with this id was made with this API key.", param="request_id")
    return {"object": "feedback", **record.model_dump(exclude={"key_id"})}

@router.get("/v1/models", response_model=ModelList)
async def list_models(key: APIKey = Depends(authenticate), gateway: "Gateway" = Depends(get_gateway)) -> ModelList:
    """The chat models and the embedding model."""
    names = [m.name for m in gateway.config.models] + [gateway.config.embedder.model_name]
    names += [AUTO_MODEL] if gateway.config.router.tiers else []
    return ModelList(data=[ModelCard(id=name) for name in names])

@router.post("/v1/embeddings", response_model=EmbeddingResponse)
async def embeddings(body: EmbeddingRequest, key: APIKey = Depends(authenticate),
                     gateway: "Gateway" = Depends(get_gateway)) -> EmbeddingResponse:
    """OpenAI embeddings through the Embedder deployment."""
    if body.model != gateway.config.embedder.model_name:
        raise ModelNotFoundError(f"The embedding model '{body.model}' does not exist.", param="model")
    try:
        texts = body.inputs()
    except ValueError as exc:
        raise InvalidRequestError(str(exc), param="input") from exc
    vectors, tokens = await call(gateway.embedder.embed.remote(texts), EMBEDDER_CALL_TIMEOUT_S, "Embedder")
    if body.dimensions is not None and body.dimensions != len(vectors[0]):
        raise InvalidRequestError(f"This model only supports dimensions={len(vectors[0])}.", param="dimensions")
    encoded = encode_vectors(vectors, body.encoding_format)
    data = [EmbeddingData(index=i, embedding=e) for i, e in enumerate(encoded)]
    return EmbeddingResponse(data=data, model=body.model, usage=EmbeddingUsage(prompt_tokens=tokens, total_tokens=tokens))

async def component_health(gateway: "Gateway") -> dict[str, str]:
    """Each component's status, ``ok`` or ``down``."""
    checks: dict[str, Any] = {f"model:{name}": m.invoke("check_health") for name, m in gateway.models.items()}
    checks["embedder"] = gateway.embedder.check_health.remote()
    checks["ledger"] = gateway.ledger.check_health.remote()
    if gateway.retriever is not None:
        checks["retriever"] = gateway.retriever.check_health.remote()
    if gateway.cache.semantic is not None:
        checks["semantic_cache"] = gateway.cache.semantic("check_health")
    checks["redis"] = gateway.keys.redis.ping()
    results = await asyncio.gather(*(probe(c) for c in checks.values()))
    return dict(zip(checks, results))


@router.get("/health")
async def health(gateway: "Gateway" = Depends(get_gateway)) -> Response:
    """Each component's status; 503 when a required one is down."""
    status = await component_health(gateway)
    optional = {f"model:{m.name}" for m in gateway.config.models if not m.required}
    healthy = all(ok == "ok" for name, ok in status.items() if name not in optional)
    body = {"status": "ok" if healthy else "degraded", "components": status}
    return Response(orjson.dumps(body), status_code=200 if healthy else 503, media_type="application/json")


@router.get("/metrics", dependencies=[Depends(require_admin)])
async def metrics() -> Response:
    """This node's raygate metrics in Prometheus text (admin key; Prometheus scrapes Ray's agents at scale)."""
    return Response(await local_metrics(), media_type="text/plain; version=0.0.4")
