"""``/v1/files`` and ``/v1/batches``: background batch jobs the OpenAI way (the official SDK works as is).

* ``POST /v1/files`` (multipart ``file`` + ``purpose=batch``), ``GET /v1/files[/{id}]``,
  ``GET /v1/files/{id}/content``, ``DELETE /v1/files/{id}``.
* ``POST /v1/batches`` (``input_file_id``, ``endpoint``, ``completion_window``, ``metadata``),
  ``GET /v1/batches[/{id}]``, ``POST /v1/batches/{id}/cancel``.

Files and batches belong to the calling key's (tenant, user); anyone else gets a 404. The
input file is checked when the batch is created (``serve_app.batch_input``); the Gateway
replicas then run it in the background (``serve_app.batching``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Literal

from fastapi import APIRouter, Depends, Path, Query, Request
from fastapi.responses import Response
from pydantic import Field

from deployments.batches import Batch
from deployments.files import FileDeleted, FileObject
from serve_app.auth import APIKey
from serve_app.batch_input import check_endpoint, completion_window_s, parse_input
from serve_app.constants import LEDGER_CALL_TIMEOUT_S
from serve_app.deps import authenticate, get_gateway
from serve_app.errors import InvalidRequestError, NotFoundError
from serve_app.handles import call
from serve_app.protocol import OpenAIBaseModel

if TYPE_CHECKING:
    from serve_app.gateway import Gateway

router = APIRouter(prefix="/v1")
FileId = Path(min_length=1, max_length=128)
BatchId = Path(min_length=1, max_length=128)
Limit = Query(20, ge=1, le=10_000)
After = Query(None, max_length=128, description="The id of the last object of the previous page.")
FILE_PURPOSES = ("batch",)
_UPLOAD_BODY = {"requestBody": {"content": {"multipart/form-data": {"schema": {"type": "object", "properties": {
    "file": {"type": "string", "format": "binary"}, "purpose": {"type": "string", "enum": list(FILE_PURPOSES)}},
    "required": ["file", "purpose"]}}}, "required": True}}


class BatchCreate(OpenAIBaseModel):
    """``POST /v1/batches``."""

    input_file_id: str = Field(min_length=1, max_length=128)
    endpoint: str
    completion_window: str
    metadata: dict[str, str] | None = Field(None, max_length=16)


def _enabled(gateway: "Gateway") -> None:
    if not gateway.config.batches.enabled:
        raise NotFoundError("Batches are not enabled on this gateway.", code="feature_disabled")


async def _store(gateway: "Gateway", operation: str, *args: Any) -> Any:
    _enabled(gateway)
    return await call(gateway.ledger.store.remote(operation, *args), LEDGER_CALL_TIMEOUT_S, "Ledger")


def _page(data: list[Any], has_more: bool) -> dict[str, Any]:
    """OpenAI's cursor page (the SDK follows ``has_more`` with ``after=last_id``)."""
    return {"object": "list", "data": [d.model_dump() for d in data], "has_more": has_more,
            "first_id": data[0].id if data else None, "last_id": data[-1].id if data else None}


@router.post("/files", response_model=FileObject, openapi_extra=_UPLOAD_BODY)
async def upload_file(request: Request, key: APIKey = Depends(authenticate),
                      gateway: "Gateway" = Depends(get_gateway)) -> FileObject:
    """Upload a JSONL file of requests for a batch (``gateway.max_upload_bytes`` at most)."""
    _enabled(gateway)
    if not request.headers.get("content-type", "").startswith("multipart/form-data"):
        raise InvalidRequestError("Upload the file as multipart/form-data with 'file' and 'purpose'.", param="file")
    form = await request.form()
    upload, purpose = form.get("file"), form.get("purpose")
    if upload is None or isinstance(upload, str):
        raise InvalidRequestError("A multipart upload needs a 'file' part.", param="file")
    if purpose not in FILE_PURPOSES:
        raise InvalidRequestError(f"purpose must be one of {list(FILE_PURPOSES)}.", param="purpose",
                                  code="invalid_purpose")
    content = await upload.read()
    filename = (upload.filename or "upload.jsonl")[:256]
    stored: FileObject = await _store(gateway, "files.create", key.tenant, key.user, purpose, filename, content)
    return stored


@router.get("/files")
async def list_files(purpose: str | None = Query(None, max_length=32), limit: int = Limit, after: str | None = After,
                     order: Literal["asc", "desc"] = "desc", key: APIKey = Depends(authenticate),
                     gateway: "Gateway" = Depends(get_gateway)) -> dict[str, Any]:
    """The caller's files, newest first by default."""
    data, more = await _store(gateway, "files.listing", key.tenant, key.user, purpose, limit, after, order)
    return _page(data, more)


@router.get("/files/{file_id}", response_model=FileObject)
async def get_file(file_id: str = FileId, key: APIKey = Depends(authenticate),
                   gateway: "Gateway" = Depends(get_gateway)) -> FileObject:
    """A file's metadata."""
    found: FileObject = await _store(gateway, "files.get", key.tenant, key.user, file_id)
    return found


@router.get("/files/{file_id}/content")
async def file_content(file_id: str = FileId, key: APIKey = Depends(authenticate),
                       gateway: "Gateway" = Depends(get_gateway)) -> Response:
    """A file's bytes (a batch's output or error file: one JSON result per line)."""
    meta, content = await _store(gateway, "files.content", key.tenant, key.user, file_id)
    disposition = f'attachment; filename="{meta.filename.replace(chr(34), "")}"'
    return Response(content, media_type="application/octet-stream", headers={"content-disposition": disposition})


@router.delete("/files/{file_id}", response_model=FileDeleted)
async def delete_file(file_id: str = FileId, key: APIKey = Depends(authenticate),
                      gateway: "Gateway" = Depends(get_gateway)) -> FileDeleted:
    """Delete a file (a batch already created from it keeps running)."""
    deleted: FileDeleted = await _store(gateway, "files.delete", key.tenant, key.user, file_id)
    return deleted


@router.post("/batches", response_model=Batch)
async def create_batch(body: BatchCreate, key: APIKey = Depends(authenticate),
                       gateway: "Gateway" = Depends(get_gateway)) -> Batch:
    """Create a batch from an uploaded file: ``in_progress``, or ``failed`` with the input's errors by line."""
    settings = gateway.config.batches
    check_endpoint(body.endpoint)
    window = (body.completion_window, completion_window_s(body.completion_window, settings.completion_windows))
    _, content = await _store(gateway, "files.content", key.tenant, key.user, body.input_file_id)
    items, errors = parse_input(content, body.endpoint, settings.max_requests)
    batch: Batch = await _store(gateway, "batches.create", key.tenant, key.user, key.key_id, body.input_file_id,
                                body.endpoint, window, body.metadata or {}, items, errors,
                                settings.max_active_per_user)
    gateway.batches.wake()
    return batch


@router.get("/batches")
async def list_batches(limit: int = Limit, after: str | None = After, key: APIKey = Depends(authenticate),
                       gateway: "Gateway" = Depends(get_gateway)) -> dict[str, Any]:
    """The caller's batches, newest first."""
    data, more = await _store(gateway, "batches.listing", key.tenant, key.user, limit, after)
    return _page(data, more)


@router.get("/batches/{batch_id}", response_model=Batch)
async def get_batch(batch_id: str = BatchId, key: APIKey = Depends(authenticate),
                    gateway: "Gateway" = Depends(get_gateway)) -> Batch:
    """The batch and its progress (``request_counts``)."""
    batch: Batch = await _store(gateway, "batches.get", key.tenant, key.user, batch_id)
    return batch


@router.post("/batches/{batch_id}/cancel", response_model=Batch)
async def cancel_batch(batch_id: str = BatchId, key: APIKey = Depends(authenticate),
                       gateway: "Gateway" = Depends(get_gateway)) -> Batch:
    """Stop a batch: ``cancelling`` while its requests in flight finish, then ``cancelled`` with the files
    of what ran."""
    batch: Batch = await _store(gateway, "batches.cancel", key.tenant, key.user, batch_id)
    gateway.batches.wake(cancelled=batch_id)
    return batch
