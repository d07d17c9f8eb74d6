"""RAG in a chat request: retrieve for the last user turn, put numbered sources into the system message."""

from __future__ import annotations

import time
from typing import Any

from deployments.retriever_protocol import Citation, RagOptions, SearchHit, rag_system_message
from serve_app.constants import RETRIEVER_CALL_TIMEOUT_S
from serve_app.errors import InvalidRequestError
from serve_app.handles import call
from serve_app.protocol import ChatCompletionRequest, ChatMessage


class Grounding:
    """What retrieval added to a request: the sources' citations, and what the ledger records."""

    def __init__(self, hits: list[SearchHit], seconds: float) -> None:
        self.citations = [Citation.model_validate(h.model_dump(include=set(Citation.model_fields))) for h in hits]
        self.ms = seconds * 1000
        self.chunk_ids = ",".join(f"{h.document_id}#{h.chunk}" for h in hits)

    def extension(self) -> dict[str, Any]:
        return {"citations": [c.model_dump(mode="json") for c in self.citations]}


def query_of(body: ChatCompletionRequest) -> str:
    """The text to retrieve for: the last user turn."""
    for message in reversed(body.messages):
        if message.role == "user" and message.text().strip():
            return message.text()
    raise InvalidRequestError("RAG needs a user message to retrieve for.", param="messages")


def grounded(body: ChatCompletionRequest, hits: list[SearchHit]) -> ChatCompletionRequest:
    """The request with the sources in its system message (added first when it has none), ``rag`` removed."""
    messages = list(body.messages)
    if messages[0].role in ("system", "developer"):
        messages[0] = ChatMessage(role=messages[0].role, content=rag_system_message(hits, messages[0].text()))
    elif hits:
        messages.insert(0, ChatMessage(role="system", content=rag_system_message(hits, None)))
    return body.model_copy(update={"messages": messages, "rag": None})


async def ground(retriever: Any, tenant: str, body: ChatCompletionRequest,
                 options: RagOptions) -> tuple[ChatCompletionRequest, Grounding]:
    """Retrieve from the tenant's collection and return the grounded request.

    Raises:
        NotFoundError: the tenant has no such collection.
        ServiceUnavailableError: the Retriever cannot answer.
    """
    started = time.perf_counter()
    hits: list[SearchHit] = await call(retriever.search.remote(tenant, options.collection, query_of(body), options),
                                       RETRIEVER_CALL_TIMEOUT_S, "Retriever")
    return grounded(body, hits), Grounding(hits, time.perf_counter() - started)
