"""Admin routes (admin key only) for users' personal data: consent, export, erasure, and the audit log.

An erasure reaches every store holding a user's content: the ledger (messages and
answers deleted, feedback comments blanked, usage rows pseudonymised), the response
cache (exact entries and their semantic points) and the RAG documents the user
ingested. Each action is audited with the admin key that asked.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from fastapi import APIRouter, Depends, Path, Query
from pydantic import BaseModel, Field

from deployments.cache_protocol import Selector
from deployments.privacy import AuditEntry
from serve_app.admin import _ledger
from serve_app.auth import APIKey
from serve_app.constants import RETRIEVER_CALL_TIMEOUT_S
from serve_app.deps import get_gateway, require_admin
from serve_app.handles import call
from serve_app.stores import map_redis_errors

if TYPE_CHECKING:
    from serve_app.gateway import Gateway

router = APIRouter(prefix="/admin", dependencies=[Depends(require_admin)])
UserId = Path(min_length=1, max_length=256)
TenantQuery = Query(None, min_length=1, max_length=256, description="The user's tenant; all tenants when left out.")


class ConsentBody(BaseModel):
    tenant: str = Field(min_length=1, max_length=256)
    consent: bool


@router.put("/users/{user}/consent")
async def put_consent(body: ConsentBody, user: str = UserId, admin: APIKey = Depends(require_admin),
                      gateway: "Gateway" = Depends(get_gateway)) -> dict[str, Any]:
    """Record whether the ledger keeps this user's message content from now on."""
    await _ledger(gateway, "set_consent", body.tenant, user, body.consent, admin.key_id)
    return {"object": "user.consent", "user": user, "tenant": body.tenant, "consent": body.consent}


@router.get("/users/{user}/export")
async def export_user(user: str = UserId, tenant: str | None = TenantQuery, admin: APIKey = Depends(require_admin),
                      gateway: "Gateway" = Depends(get_gateway)) -> dict[str, Any]:
    """Everything held about the user: requests, messages and answers, feedback, usage, consent."""
    export: dict[str, Any] = await _ledger(gateway, "export_user", tenant, user, admin.key_id)
    return export


@router.delete("/users/{user}")
async def erase_user(user: str = UserId, tenant: str | None = TenantQuery, admin: APIKey = Depends(require_admin),
                     gateway: "Gateway" = Depends(get_gateway)) -> dict[str, Any]:
    """Erase the user's content from the ledger and the cache; usage stays under a pseudonym."""
    async with map_redis_errors("cache erase"):
        cached = await gateway.cache.invalidate(Selector(tenant=tenant, user=user))
    chunks = 0
    if gateway.retriever is not None:
        chunks = await call(gateway.retriever.erase_user.remote(tenant, user), RETRIEVER_CALL_TIMEOUT_S, "Retriever")
    ledger: dict[str, int] = await _ledger(gateway, "erase_user", tenant, user, admin.key_id,
                                           {"cache_entries": cached, "rag_chunks": chunks})
    return {"object": "user.erasure", "user": user, "tenant": tenant, "ledger": ledger, "cache_entries": cached,
            "rag_chunks": chunks}


@router.get("/audit", response_model=list[AuditEntry])
async def audit_log(limit: int = Query(100, ge=1, le=1000), gateway: "Gateway" = Depends(get_gateway)) -> list[AuditEntry]:
    """Consent changes, exports and erasures, newest first."""
    entries: list[AuditEntry] = await _ledger(gateway, "audit_log", limit)
    return entries
