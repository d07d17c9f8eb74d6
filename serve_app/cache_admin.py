"""Admin routes (admin key only) for the response cache: invalidation and counters."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from fastapi import APIRouter, Depends

from deployments.cache_protocol import Selector
from serve_app.deps import get_gateway, require_admin
from serve_app.stores import map_redis_errors

if TYPE_CHECKING:
    from serve_app.gateway import Gateway

router = APIRouter(prefix="/admin/cache", dependencies=[Depends(require_admin)])


@router.post("/invalidate")
async def invalidate(selector: Selector, gateway: "Gateway" = Depends(get_gateway)) -> dict[str, Any]:
    """Remove the entries matching every given condition (tenant, model, tag, user, key_pattern,
    older_than_s) from the exact and semantic layers; an empty body removes everything."""
    async with map_redis_errors("cache invalidate"):
        removed = await gateway.cache.invalidate(selector)
    return {"object": "cache.invalidation", "removed": removed,
            "selector": selector.model_dump(exclude_none=True)}


@router.get("/stats")
async def stats(gateway: "Gateway" = Depends(get_gateway)) -> dict[str, Any]:
    """Hits, semantic hits, misses, bypasses, evictions, saved USD (all replicas) and the entry count."""
    async with map_redis_errors("cache stats"):
        return await gateway.cache.stats()
