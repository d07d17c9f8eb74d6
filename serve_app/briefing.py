"""Brief-then-expand answers: a short answer first, with a handle to ask for the full one.

* **Brief** (``"brief": true`` in the body, or the header ``x-raygate-brief: 1``): the output
  budget is capped at ``brief.max_tokens`` (a smaller ``max_tokens`` from the client is kept),
  ``brief.instruction`` is added as a system message of this request only (after a template's
  or RAG's), and the exchange is kept in a conversation: the request's ``conversation_id``, or a
  new one of the key's (tenant, user). The answer carries the handle: ``raygate.brief`` and
  ``raygate.expand.conversation_id`` in the body (a stream: on its final chunk) and the header
  ``x-raygate-conversation-id``.
* **Expand** (``"expand": true`` with that ``conversation_id``; ``messages`` may be empty): the
  user turn ``brief.expand_instruction`` is added after the request's messages, with no brevity
  cap, and the conversation's history (the question and the brief answer) is prepended by
  ``serve_app.conversing``, whose ownership rules apply (another user's id is a 404).

The ledger row's ``mode`` is ``brief`` or ``expand``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

from fastapi.responses import Response

from deployments.conversations import SYSTEM_ROLES
from serve_app.auth import APIKey
from serve_app.brief_config import BriefConfig
from serve_app.constants import LEDGER_CALL_TIMEOUT_S
from serve_app.errors import InvalidRequestError
from serve_app.handles import call
from serve_app.protocol import ChatCompletionRequest, ChatMessage

if TYPE_CHECKING:
    from serve_app.gateway import Gateway

BRIEF_HEADER = "x-raygate-brief"
CONVERSATION_HEADER = "x-raygate-conversation-id"
_TRUE = ("1", "true", "yes", "on")

Mode = Literal["brief", "expand"]


def capped(body: ChatCompletionRequest, cap: int) -> ChatCompletionRequest:
    """The request with its output budget at most ``cap`` (the field the client used keeps it)."""
    asked = body.max_completion_tokens or body.max_tokens
    budget = min(asked, cap) if asked else cap
    field = "max_completion_tokens" if body.max_completion_tokens else "max_tokens"
    return body.model_copy(update={field: budget})


def with_instruction(body: ChatCompletionRequest, instruction: str) -> ChatCompletionRequest:
    """The request with ``instruction`` as a system message after its leading system ones (this request only:
    conversations keep a request's leading system messages out of the stored turns)."""
    lead = 0
    while lead < len(body.messages) and body.messages[lead].role in SYSTEM_ROLES:
        lead += 1
    messages = [*body.messages[:lead], ChatMessage(role="system", content=instruction), *body.messages[lead:]]
    return body.model_copy(update={"messages": messages})


def with_expand_turn(body: ChatCompletionRequest, instruction: str) -> ChatCompletionRequest:
    """The request with the expand instruction as its last user turn."""
    return body.model_copy(update={"messages": [*body.messages, ChatMessage(role="user", content=instruction)]})


@dataclass
class Brief:
    """A chat request's brief-or-expand mode, and the conversation that carries its handle."""

    mode: Mode | None = None
    conversation_id: str | None = None

    @classmethod
    def of(cls, body: ChatCompletionRequest, headers: Any,
           config: BriefConfig) -> tuple[ChatCompletionRequest, "Brief"]:
        """Read the mode (``expand`` wins over the header) and apply what needs no store: the cap, the expand turn.

        Raises:
            InvalidRequestError: brief or expand asked while ``brief.enabled`` is false.
        """
        header = (headers.get(BRIEF_HEADER) or "").strip().lower() in _TRUE
        mode: Mode | None = "expand" if body.expand else "brief" if body.brief or header else None
        if mode is None:
            return body, cls()
        if not config.enabled:
            raise InvalidRequestError("Brief answers are not enabled on this gateway.", param=mode,
                                      code="brief_disabled")
        update = {"brief": False, "expand": False}
        if mode == "brief":
            return capped(body, config.max_tokens).model_copy(update=update), cls(mode)
        return with_expand_turn(body, config.expand_instruction).model_copy(update=update), cls(
            mode, body.conversation_id)

    async def attach(self, gateway: "Gateway", key: APIKey, body: ChatCompletionRequest) -> ChatCompletionRequest:
        """For a brief request: its conversation (a new one without ``conversation_id``) and the instruction.

        Raises:
            InvalidRequestError: conversations are turned off (the handle would have nowhere to live).
        """
        if self.mode != "brief":
            return body
        settings = gateway.config.conversations
        if not settings.enabled:
            raise InvalidRequestError("Brief answers need conversations, which are not enabled on this gateway.",
                                      param="brief", code="conversations_disabled")
        if body.conversation_id is None:
            conversation = await call(gateway.ledger.store.remote(
                "conversations.create", key.tenant, key.user, {"raygate": "brief"}, [], settings.max_messages),
                LEDGER_CALL_TIMEOUT_S, "Ledger")
            body = body.model_copy(update={"conversation_id": conversation.id})
        self.conversation_id = body.conversation_id
        return with_instruction(body, gateway.config.brief.instruction)

    def extension(self, base: dict[str, Any] | None) -> dict[str, Any] | None:
        """The answer's ``raygate`` object: ``base`` (citations) with the handle added."""
        if self.mode is None or self.conversation_id is None:
            return base
        handle: dict[str, Any] = {"brief": False, "conversation_id": self.conversation_id}
        if self.mode == "brief":
            hint = f'send {{"expand": true, "conversation_id": "{self.conversation_id}"}}'
            handle = {"brief": True, "expand": {"conversation_id": self.conversation_id, "hint": hint}}
        return {**(base or {}), **handle}

    def tag(self, response: Response) -> Response:
        """The response with the ``x-raygate-conversation-id`` header when it has a handle."""
        if self.mode is not None and self.conversation_id is not None:
            response.headers[CONVERSATION_HEADER] = self.conversation_id
        return response
