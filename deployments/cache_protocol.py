"""What the response cache stores and how it names it: keys, scopes, entries, selectors.

An exact key hashes everything that changes an answer: the tenant (the scope no
other tenant can reach), the model, the normalised messages, the sampling
parameters and the prompt template's version. The semantic layer embeds only the
last user turn; everything else goes into its ``scope`` hash, and a neighbour is
only looked for inside the same scope.
"""

from __future__ import annotations

import hashlib
import re
import time
from collections.abc import AsyncIterator
from typing import Any, Literal

import orjson
from pydantic import BaseModel, Field

from serve_app.protocol import (
    AssistantMessage, ChatCompletionChoice, ChatCompletionRequest, ChatCompletionResponse,
    ChatCompletionStreamChoice, ChatCompletionStreamResponse, ChatMessage, DeltaMessage, FinishReason,
    ImageContentPart, UsageInfo,
)

CacheStatus = Literal["hit", "semantic-hit", "miss", "bypass"]
CACHE_HEADER = "x-raygate-cache"
CATEGORY_HEADER = "x-raygate-category"
# Fields of a request that never change the answer (the rest, extension fields included, do).
_NEUTRAL_FIELDS = {"model", "messages", "stream", "stream_options", "user", "metadata", "store", "service_tier"}
_SPACES = re.compile(r"\s+")
_REPLAY_CHUNK_WORDS = 8


def normalise(text: str) -> str:
    """Collapse runs of whitespace and trim: the same question typed twice hashes the same."""
    return _SPACES.sub(" ", text).strip()


def _digest(value: Any) -> str:
    return hashlib.sha256(orjson.dumps(value, option=orjson.OPT_SORT_KEYS)).hexdigest()


def _messages(messages: list[ChatMessage]) -> list[list[Any]]:
    return [[m.role, m.name, normalise(m.text()), *_image_parts(m)] for m in messages]


def _image_parts(message: ChatMessage) -> list[Any]:
    """A message with images keys on its parts in order, each image by its URL's hash and detail
    (text-only messages add nothing, so their keys are unchanged)."""
    if not message.images() or not isinstance(message.content, list):
        return []
    return [[hashlib.sha256(p.image_url.url.encode()).hexdigest(), p.image_url.detail]
            if isinstance(p, ImageContentPart) else normalise(p.text) for p in message.content]


def _parameters(body: ChatCompletionRequest) -> dict[str, Any]:
    """The request's answer-changing parameters (defaults dropped so {} and {"n": 1} agree)."""
    params = body.model_dump(mode="json", exclude=_NEUTRAL_FIELDS, exclude_none=True)
    params.pop("n", None)
    return params


class CacheScope(BaseModel):
    """Who may be served an entry and which request it answers."""

    tenant: str
    model: str
    template_version: str | None = None

    def exact_key(self, prefix: str, body: ChatCompletionRequest) -> str:
        """Return the Redis key of the exact answer to ``body`` in this scope.

        Readable prefix (tenant, model) so admins can invalidate by key pattern; hashed rest.
        """
        digest = _digest([self.tenant, self.model, self.template_version, _messages(body.messages),
                          _parameters(body)])
        return f"{prefix}:e:{self.tenant}:{self.model}:{digest}"

    def semantic_scope(self, body: ChatCompletionRequest) -> str:
        """Return the hash of everything but the last user turn: neighbours must share it."""
        return _digest([self.tenant, self.model, self.template_version, _messages(body.messages[:-1]),
                        _parameters(body)])


def last_user_text(body: ChatCompletionRequest) -> str | None:
    """The last turn's text when it is the user's (the semantic layer's query), else None."""
    last = body.messages[-1]
    return normalise(last.text()) or None if last.role == "user" else None


class CacheEntry(BaseModel):
    """One cached answer, with what invalidation and GDPR erasure select on."""

    key: str
    question: str | None = Field(None, description="The normalised last user turn (for the semantic match).")
    content: str
    finish_reason: FinishReason
    model: str = Field(description="The model that produced the answer.")
    usage: UsageInfo = Field(description="Usage of the original call (what a hit saves).")
    cost_usd: float = 0.0
    tenant: str
    user: str
    tags: list[str] = Field(default_factory=list)
    category: str | None = None
    stored_at: float = Field(default_factory=time.time)

    def meta(self) -> bytes:
        """The small record invalidation scans (no content)."""
        return orjson.dumps({"tenant": self.tenant, "model": self.model, "user": self.user, "tags": self.tags,
                             "stored_at": self.stored_at})


class CacheHit(BaseModel):
    """A lookup's answer: the entry, and how it was found."""

    entry: CacheEntry
    status: Literal["hit", "semantic-hit"]
    similarity: float | None = None

    def extension(self) -> dict[str, Any]:
        """The ``raygate`` object of the answer body: what was served and what it saved."""
        info: dict[str, Any] = {"cache": self.status, "original_usage": self.entry.usage.model_dump(mode="json")}
        if self.similarity is not None:
            info["similarity"] = round(self.similarity, 4)
        return info


class Selector(BaseModel):
    """Which entries an invalidation removes: all given conditions must hold (none given: everything)."""

    tenant: str | None = Field(None, min_length=1, max_length=256)
    model: str | None = Field(None, min_length=1, max_length=256)
    tag: str | None = Field(None, min_length=1, max_length=64)
    user: str | None = Field(None, min_length=1, max_length=256)
    key_pattern: str | None = Field(
        None, min_length=1, max_length=512,
        description="Glob over entry keys '<prefix>:e:<tenant>:<model>:<hash>', e.g. '*:e:acme:gpt-4o:*'.")
    older_than_s: float | None = Field(None, ge=0, le=10 * 365 * 86_400, description="Entries stored longer ago.")

    def matches(self, meta: dict[str, Any], now: float) -> bool:
        """Whether an entry's meta record is selected (``key_pattern`` is matched by the caller)."""
        return ((self.tenant is None or meta.get("tenant") == self.tenant)
                and (self.model is None or meta.get("model") == self.model)
                and (self.user is None or meta.get("user") == self.user)
                and (self.tag is None or self.tag in meta.get("tags", []))
                and (self.older_than_s is None or meta.get("stored_at", now) <= now - self.older_than_s))


def cache_control(header: str | None) -> tuple[bool, bool]:
    """Return (lookup, store) from a ``Cache-Control`` request header (``no-cache``, ``no-store``)."""
    directives = {d.strip().lower().split("=", 1)[0] for d in (header or "").split(",")}
    return "no-cache" not in directives, "no-store" not in directives


def completion_from(hit: CacheHit, request_id: str) -> ChatCompletionResponse:
    """The cached answer as a fresh completion that bills nothing."""
    entry = hit.entry
    choice = ChatCompletionChoice(message=AssistantMessage(content=entry.content), finish_reason=entry.finish_reason)
    return ChatCompletionResponse(id=f"chatcmpl-{request_id}", model=entry.model, choices=[choice],
                                  usage=UsageInfo.of(0, 0))


def replay_chunks(hit: CacheHit, request_id: str) -> list[ChatCompletionStreamResponse]:
    """The cached answer as stream chunks: a role chunk, content a few words at a time, the finish."""
    entry = hit.entry
    cid = f"chatcmpl-{request_id}"
    words = re.findall(r"\S+\s*|\s+", entry.content)
    pieces = ["".join(words[i:i + _REPLAY_CHUNK_WORDS]) for i in range(0, len(words), _REPLAY_CHUNK_WORDS)]

    def chunk(delta: DeltaMessage, finish: FinishReason | None = None) -> ChatCompletionStreamResponse:
        return ChatCompletionStreamResponse(id=cid, model=entry.model, choices=[
            ChatCompletionStreamChoice(delta=delta, finish_reason=finish)])

    chunks = [chunk(DeltaMessage(role="assistant", content=""))]
    chunks += [chunk(DeltaMessage(content=p)) for p in pieces]
    last = chunk(DeltaMessage(), entry.finish_reason)
    return [*chunks, last.model_copy(update={"usage": UsageInfo.of(0, 0)})]


class StreamCollector:
    """Gathers a streamed answer's text so a complete stream can be cached like a whole answer."""

    def __init__(self) -> None:
        self.parts: list[str] = []
        self.finish_reason: FinishReason | None = None

    def add(self, chunk: ChatCompletionStreamResponse) -> None:
        """Take one chunk's text and finish reason."""
        for choice in chunk.choices:
            if choice.delta.content:
                self.parts.append(choice.delta.content)
            self.finish_reason = choice.finish_reason or self.finish_reason

    async def wrap(self, items: AsyncIterator[Any]) -> AsyncIterator[Any]:
        """Pass a stream through, collecting its chunks."""
        async for item in items:
            if isinstance(item, ChatCompletionStreamResponse):
                self.add(item)
            yield item

    def text(self) -> str:
        return "".join(self.parts)
