"""``/v1/collections``: a tenant's documents for RAG — ingest (JSON or file upload), search, delete.

Collections belong to the calling key's tenant; an admin key may act for another
tenant with ``?tenant=`` (what ``raygate ingest --tenant`` does).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import orjson
from fastapi import APIRouter, Depends, Path, Query, Request
from pydantic import TypeAdapter, ValidationError

from deployments.parsing import UnsupportedFile, file_text
from deployments.retriever_protocol import (
    COLLECTION_NAME, DocumentIn, DocumentsIn, IngestResult, SearchHit, SearchRequest,
)
from serve_app.auth import APIKey
from serve_app.constants import RETRIEVER_CALL_TIMEOUT_S
from serve_app.deps import authenticate, get_gateway
from serve_app.errors import InvalidRequestError, PermissionDeniedError
from serve_app.handles import call

if TYPE_CHECKING:
    from serve_app.gateway import Gateway

router = APIRouter(prefix="/v1/collections")
Name = Path(pattern=COLLECTION_NAME, description="Letters, digits, '_' and '-'; 64 at most.")
ForTenant = Query(None, min_length=1, max_length=256, description="Admin keys only: act for this tenant.")
_DOCUMENTS = TypeAdapter(DocumentsIn | DocumentIn)
_UPLOAD_BODY = {"requestBody": {"content": {
    "application/json": {"schema": {"anyOf": [DocumentsIn.model_json_schema(ref_template="#/components/schemas/{model}"),
                                              DocumentIn.model_json_schema(ref_template="#/components/schemas/{model}")]}},
    "multipart/form-data": {"schema": {"type": "object", "properties": {
        "file": {"type": "string", "format": "binary"}, "id": {"type": "string"},
        "metadata": {"type": "string", "description": "a JSON object"}}, "required": ["file"]}},
}, "required": True}}


def tenant_of(key: APIKey, tenant: str | None) -> str:
    """The tenant a collection call acts for: the key's own, or any for an admin key."""
    if tenant is None or tenant == key.tenant:
        return key.tenant
    if not key.admin:
        raise PermissionDeniedError("Only an admin key may act for another tenant.")
    return tenant


async def _retriever(gateway: "Gateway", method: str, *args: Any) -> Any:
    if gateway.retriever is None:
        raise InvalidRequestError("RAG is turned off on this gateway (retriever.enabled).", code="rag_disabled")
    return await call(getattr(gateway.retriever, method).remote(*args), RETRIEVER_CALL_TIMEOUT_S, "Retriever")


async def _uploaded(request: Request) -> list[DocumentIn]:
    """The documents of a JSON body (one or ``{"documents": [...]}``) or of a multipart file upload."""
    if request.headers.get("content-type", "").startswith("multipart/form-data"):
        form = await request.form()
        upload = form.get("file")
        if upload is None or isinstance(upload, str):
            raise InvalidRequestError("A multipart upload needs a 'file' part.", param="file")
        try:
            text = file_text(upload.filename or "", await upload.read())
            metadata = orjson.loads(str(form.get("metadata") or "{}"))
            return [DocumentIn(id=str(form.get("id") or upload.filename), text=text, metadata=metadata)]
        except UnsupportedFile as exc:
            raise InvalidRequestError(str(exc), param="file", code="unsupported_file") from exc
        except (orjson.JSONDecodeError, ValidationError) as exc:
            raise InvalidRequestError(f"Invalid document: {exc}".splitlines()[0], param="metadata") from exc
    try:
        parsed = _DOCUMENTS.validate_json(await request.body())
    except ValidationError as exc:
        first = exc.errors()[0]
        raise InvalidRequestError(f"Invalid document: {first['msg']}",
                                  param=".".join(str(p) for p in first["loc"]) or None) from exc
    return parsed.documents if isinstance(parsed, DocumentsIn) else [parsed]


@router.get("")
async def list_collections(tenant: str | None = ForTenant, key: APIKey = Depends(authenticate),
                           gateway: "Gateway" = Depends(get_gateway)) -> dict[str, Any]:
    """The tenant's collections and their chunk counts."""
    data = await _retriever(gateway, "list_collections", tenant_of(key, tenant))
    return {"object": "list", "data": data}


@router.post("/{name}/documents", response_model=IngestResult, openapi_extra=_UPLOAD_BODY)
async def add_documents(request: Request, name: str = Name, tenant: str | None = ForTenant,
                        key: APIKey = Depends(authenticate), gateway: "Gateway" = Depends(get_gateway)) -> IngestResult:
    """Ingest documents (a re-sent id replaces its chunks); the collection is created on first use."""
    documents = await _uploaded(request)
    result: IngestResult = await _retriever(gateway, "ingest", tenant_of(key, tenant), key.user, name, documents)
    return result


@router.post("/{name}/search")
async def search(body: SearchRequest, name: str = Name, tenant: str | None = ForTenant,
                 key: APIKey = Depends(authenticate), gateway: "Gateway" = Depends(get_gateway)) -> dict[str, Any]:
    """Retrieval alone: the best chunks for a query, with their scores and metadata."""
    hits: list[SearchHit] = await _retriever(gateway, "search", tenant_of(key, tenant), name, body.query, body)
    return {"object": "list", "data": [h.model_dump() for h in hits]}


@router.delete("/{name}/documents/{document_id:path}")
async def delete_document(name: str = Name, document_id: str = Path(min_length=1, max_length=256),
                          tenant: str | None = ForTenant, key: APIKey = Depends(authenticate),
                          gateway: "Gateway" = Depends(get_gateway)) -> dict[str, Any]:
    """Remove one document's chunks."""
    removed = await _retriever(gateway, "delete_document", tenant_of(key, tenant), name, document_id)
    return {"object": "document.deleted", "id": document_id, "chunks": removed}


@router.delete("/{name}")
async def delete_collection(name: str = Name, tenant: str | None = ForTenant, key: APIKey = Depends(authenticate),
                            gateway: "Gateway" = Depends(get_gateway)) -> dict[str, Any]:
    """Drop a collection and its documents."""
    await _retriever(gateway, "delete_collection", tenant_of(key, tenant), name)
    return {"object": "collection.deleted", "name": name}
