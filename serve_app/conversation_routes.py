"""Routes of the calling key's (tenant, user): stored conversations and memory.

* ``POST /v1/conversations`` (optional ``metadata`` and initial ``messages``),
  ``GET /v1/conversations/{id}`` (with its messages), ``DELETE /v1/conversations/{id}``.
  A conversation belongs to the (tenant, user) that created it; anyone else gets a 404.
  Chat requests continue one with ``conversation_id`` (``serve_app.conversing``).
* ``GET``, ``PUT`` (replace), ``PATCH`` (merge; null deletes a key) ``/v1/users/me/memory``:
  a JSON object prompt templates read as ``memory`` (``deployments.memory``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from fastapi import APIRouter, Body, Depends, Path
from pydantic import Field, field_validator

from deployments.memory import Memory
from serve_app.auth import APIKey
from serve_app.constants import LEDGER_CALL_TIMEOUT_S
from serve_app.deps import authenticate, get_gateway
from serve_app.errors import NotFoundError
from serve_app.handles import call
from serve_app.protocol import ChatMessage, OpenAIBaseModel, check_unicode

if TYPE_CHECKING:
    from serve_app.gateway import Gateway

router = APIRouter()
ConversationId = Path(min_length=1, max_length=128)
MAX_METADATA_PAIRS, MAX_METADATA_KEY, MAX_METADATA_VALUE = 16, 64, 512


class ConversationCreate(OpenAIBaseModel):
    """``POST /v1/conversations``."""

    metadata: dict[str, str] = Field(default_factory=dict, max_length=MAX_METADATA_PAIRS,
                                     description="Up to 16 pairs: keys of 64 characters, values of 512 at most.")
    messages: list[ChatMessage] = Field(
        default_factory=list, description="Initial messages; leading system/developer ones are kept for good.")

    @field_validator("metadata")
    @classmethod
    def _check_metadata(cls, metadata: dict[str, str]) -> dict[str, str]:
        for key, value in metadata.items():
            if len(key) > MAX_METADATA_KEY or len(value) > MAX_METADATA_VALUE:
                raise ValueError(f"metadata keys have at most {MAX_METADATA_KEY} characters, values "
                                 f"{MAX_METADATA_VALUE}")
            check_unicode(key, value)
        return metadata


def _enabled(flag: bool, what: str) -> None:
    if not flag:
        raise NotFoundError(f"{what} are not enabled on this gateway.", code="feature_disabled")


async def _store(gateway: "Gateway", operation: str, *args: Any) -> Any:
    return await call(gateway.ledger.store.remote(operation, *args), LEDGER_CALL_TIMEOUT_S, "Ledger")


@router.post("/v1/conversations")
async def create_conversation(body: ConversationCreate | None = Body(None), key: APIKey = Depends(authenticate),
                              gateway: "Gateway" = Depends(get_gateway)) -> dict[str, Any]:
    """A new conversation owned by the key's (tenant, user)."""
    settings = gateway.config.conversations
    _enabled(settings.enabled, "Conversations")
    body = body or ConversationCreate()
    messages = [m.model_dump(mode="json", exclude_none=True) for m in body.messages]
    conversation = await _store(gateway, "conversations.create", key.tenant, key.user, body.metadata, messages,
                                settings.max_messages)
    return conversation.public(with_messages=False)  # type: ignore[no-any-return]


@router.get("/v1/conversations/{conversation_id}")
async def get_conversation(conversation_id: str = ConversationId, key: APIKey = Depends(authenticate),
                           gateway: "Gateway" = Depends(get_gateway)) -> dict[str, Any]:
    """The conversation with its messages (oldest first) and the summary of its earliest turns, if any."""
    _enabled(gateway.config.conversations.enabled, "Conversations")
    conversation = await gateway.conversations.read(key, conversation_id)
    return conversation.public()


@router.delete("/v1/conversations/{conversation_id}")
async def delete_conversation(conversation_id: str = ConversationId, key: APIKey = Depends(authenticate),
                              gateway: "Gateway" = Depends(get_gateway)) -> dict[str, Any]:
    """Delete the conversation and its messages."""
    _enabled(gateway.config.conversations.enabled, "Conversations")
    deleted = await _store(gateway, "conversations.delete", key.tenant, key.user, conversation_id)
    return deleted.model_dump()  # type: ignore[no-any-return]


@router.get("/v1/users/me/memory", response_model=Memory)
async def get_memory(key: APIKey = Depends(authenticate), gateway: "Gateway" = Depends(get_gateway)) -> Memory:
    """The calling user's memory."""
    _enabled(gateway.config.memory.enabled, "User memories")
    memory: Memory = await _store(gateway, "memory.get", key.tenant, key.user)
    return memory


@router.put("/v1/users/me/memory", response_model=Memory)
async def put_memory(body: dict[str, Any] = Body(description="The whole memory: string keys, JSON values."),
                     key: APIKey = Depends(authenticate), gateway: "Gateway" = Depends(get_gateway)) -> Memory:
    """Replace the user's memory (null values are left out; ``{}`` empties it)."""
    settings = gateway.config.memory
    _enabled(settings.enabled, "User memories")
    memory: Memory = await _store(gateway, "memory.put", key.tenant, key.user, body, settings.max_keys,
                                  settings.max_bytes)
    return memory


@router.patch("/v1/users/me/memory", response_model=Memory)
async def patch_memory(body: dict[str, Any] = Body(description="Keys to set; a null value deletes the key."),
                       key: APIKey = Depends(authenticate), gateway: "Gateway" = Depends(get_gateway)) -> Memory:
    """Merge top-level keys into the user's memory; a null value deletes its key."""
    settings = gateway.config.memory
    _enabled(settings.enabled, "User memories")
    memory: Memory = await _store(gateway, "memory.patch", key.tenant, key.user, body, settings.max_keys,
                                  settings.max_bytes)
    return memory
