"""Stored conversations in a chat request (``conversation_id``): history in, the new turn out.

A request naming a conversation sends only its new turn(s). Before the model call the
Gateway builds the messages sent upstream:

    [the conversation's pinned system messages] + [the request's leading system messages
    (its own, a rendered template, RAG sources)] + [a summary of older turns] + [the newest
    stored turns that fit] + [the request's new turns]

"Fit" is the model's context window (``ModelConfig.context_window``) less the output budget
(``max_tokens`` after the plan's cap) and everything else sent, counted with the same
generous estimate as reservations (UTF-8 bytes / 3, 4 a message, 765 an image). Turns that
do not fit are folded, with the previous summary, into a new summary by
``conversations.summary_model`` (stored with the last turn it covers, so it is made once
per overflow, not per request); without a summary model, or when the summary call fails
(or the plan refuses it), they are left out. The stored turns are kept whole either way:
``GET /v1/conversations/{id}`` still shows them. A summary call is a request of its own in
the ledger (``endpoint`` ``conversations.summary``), reserved and settled like any other.

After a successful answer (a stream: once it completed), the request's new turns and the
answer are appended to the conversation, off the client's path; the next read of that
conversation through this replica waits for the write.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from deployments.conversations import SYSTEM_ROLES, Conversation, StoredMessage
from deployments.cost_guard_protocol import ReserveDecision
from deployments.ledger import RequestRecord
from serve_app.auth import APIKey
from serve_app.config import ModelConfig
from serve_app.constants import LEDGER_CALL_TIMEOUT_S
from serve_app.errors import InvalidRequestError, RaygateError
from serve_app.handles import call
from serve_app.protocol import IMAGE_PROMPT_TOKENS, ChatCompletionRequest, ChatMessage
from serve_app.spend import capped_request

if TYPE_CHECKING:
    from serve_app.gateway import Gateway

logger = logging.getLogger(__name__)

SUMMARY_PREFIX = "Summary of the earlier conversation: "
SUMMARY_INSTRUCTION = (
    "You summarise conversations for an assistant who will continue them. Summarise the conversation below in at "
    "most {words} words: keep facts, names, numbers, decisions, the user's preferences and open questions. Write "
    "in the conversation's language. Answer with the summary only.")
SUMMARY_ENDPOINT = "conversations.summary"
_PER_MESSAGE_TOKENS = 4
_MAX_PENDING = 10_000
_WRITE_WAIT_S = 5.0


def message_tokens(message: ChatMessage) -> int:
    """The generous token estimate reservations use (``serve_app.spend``), for one message."""
    return (len(message.text().encode("utf-8")) // 3 + _PER_MESSAGE_TOKENS
            + IMAGE_PROMPT_TOKENS * len(message.images()))


def tokens(messages: list[ChatMessage]) -> int:
    return sum(message_tokens(m) for m in messages)


def summary_message(text: str) -> ChatMessage:
    return ChatMessage(role="system", content=SUMMARY_PREFIX + text)


def _turn(stored: StoredMessage, vision: bool) -> ChatMessage:
    """A stored message as sent; a model that cannot read images gets their text only."""
    message = ChatMessage.model_validate(stored.message)
    if not vision and message.images():
        return message.model_copy(update={"content": message.text() or "[image]"})
    return message


@dataclass
class History:
    """What of a conversation is sent with a request, besides its pinned system messages."""

    pinned: list[ChatMessage]
    summary: str | None  # the stored summary, when it is sent
    kept: list[ChatMessage]
    dropped: list[StoredMessage] = field(default_factory=list)  # turns left out that no summary covers yet
    summary_fits: bool = True  # whether a new summary of ``dropped`` would fit

    def turns(self, summary: str | None = None) -> list[ChatMessage]:
        """The summary (a new one, else the stored one) and the kept turns."""
        text = summary or self.summary
        return [*([summary_message(text)] if text else []), *self.kept]


def plan_history(conversation: Conversation, fixed_tokens: int, window: int | None, max_tokens: int,
                 summary_tokens: int | None, vision: bool = False) -> History:
    """Choose the stored turns that fit the window, newest first, starting at a user turn.

    Args:
        conversation: the stored conversation.
        fixed_tokens: the estimate of what the request sends besides the history.
        window: the model's context window; None sends every turn.
        max_tokens: the output budget to leave room for.
        summary_tokens: room to keep for a new summary (a summary model is configured), else None.
        vision: whether the model reads images.
    """
    pinned = [_turn(m, vision) for m in conversation.messages if m.pinned]
    # Turns a stored summary covers are never sent again: the summary stands for them.
    stored = [m for m in conversation.messages if not m.pinned and m.seq > conversation.summary_upto]
    turns = [_turn(m, vision) for m in stored]
    summary = conversation.summary
    if window is None:
        return History(pinned, summary, turns)
    budget = window - max_tokens - fixed_tokens - tokens(pinned)
    current = message_tokens(summary_message(summary)) if summary else 0
    if current + tokens(turns) <= budget:
        return History(pinned, summary, turns)
    room = budget - max(current, summary_tokens or 0)
    cut, used = len(turns), 0
    while cut > 0 and used + message_tokens(turns[cut - 1]) <= room:
        cut, used = cut - 1, used + message_tokens(turns[cut - 1])
    while cut < len(turns) and turns[cut].role != "user":  # never open on an answer without its question
        cut += 1
    return History(pinned, summary if current <= budget - used else None, turns[cut:], stored[:cut], room >= 0)


def transcript(summary: str | None, dropped: list[StoredMessage], max_tokens: int | None) -> str:
    """The text a summary model reads: the previous summary, then the turns, oldest cut first when too long."""
    lines = [f"{m.message.get('role')}: {ChatMessage.model_validate(m.message).text()}" for m in dropped]
    head = [f"Earlier summary: {summary}"] if summary else []
    while max_tokens is not None and len(lines) > 1 and len("\n".join(head + lines).encode("utf-8")) // 3 > max_tokens:
        lines.pop(0)
    return "\n".join(head + lines)


@dataclass
class _Turn:
    tenant: str
    user: str
    conversation_id: str
    messages: list[dict[str, Any]]


class Conversations:
    """The Gateway's side of stored conversations: expand a request, append its turn once answered.

    Args:
        gateway: the Gateway replica (its config, Ledger, dispatcher, spend and ledger records).
    """

    def __init__(self, gateway: "Gateway") -> None:
        self.gateway = gateway
        self._pending: dict[str, _Turn] = {}  # request id -> what to append once it is answered
        self._writes: dict[str, asyncio.Future[None]] = {}  # conversation id -> its latest append

    async def _store(self, operation: str, *args: Any) -> Any:
        return await call(self.gateway.ledger.store.remote(f"conversations.{operation}", *args),
                          LEDGER_CALL_TIMEOUT_S, "Ledger")

    async def read(self, key: APIKey, conversation_id: str) -> Conversation:
        """The key's conversation, once this replica's pending append to it is written.

        Raises:
            NotFoundError: no such conversation for the key's (tenant, user).
        """
        write = self._writes.get(conversation_id)
        if write is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(asyncio.shield(write), _WRITE_WAIT_S)
        conversation: Conversation = await self._store("get", key.tenant, key.user, conversation_id)
        return conversation

    async def expand(self, key: APIKey, body: ChatCompletionRequest, model: ModelConfig, decision: ReserveDecision,
                     request_id: str) -> ChatCompletionRequest:
        """The request with its conversation's history; unchanged without ``conversation_id``.

        Raises:
            InvalidRequestError: conversations are turned off.
            NotFoundError: no such conversation for the key's (tenant, user).
        """
        if body.conversation_id is None:
            return body
        settings = self.gateway.config.conversations
        if not settings.enabled:
            raise InvalidRequestError("Conversations are not enabled on this gateway.", param="conversation_id",
                                      code="conversations_disabled")
        if decision.model is not None and decision.model != model.name:
            model = self.gateway._model(decision.model)  # the downgrade the request will be sent to
        conversation = await self.read(key, body.conversation_id)
        lead = 0
        while lead < len(body.messages) and body.messages[lead].role in SYSTEM_ROLES:
            lead += 1
        new = body.messages[lead:]
        summary_model = self.gateway.config.model(settings.summary_model) if settings.summary_model else None
        room = settings.summary_max_tokens * 4 // 3 + 16 if summary_model else None
        history = plan_history(conversation, tokens(body.messages), model.context_window(), decision.max_tokens,
                               room, getattr(model, "vision", False))
        summary = None
        if history.dropped and summary_model is not None and history.summary_fits:
            summary = await self._summarise(key, request_id, conversation, history, summary_model)
        if len(self._pending) >= _MAX_PENDING:  # requests that never ended (a client gone before the stream began)
            self._pending.pop(next(iter(self._pending)))
        self._pending[request_id] = _Turn(key.tenant, key.user, conversation.id,
                                          [m.model_dump(mode="json", exclude_none=True) for m in new])
        messages = [*history.pinned, *body.messages[:lead], *history.turns(summary), *new]
        return body.model_copy(update={"messages": messages, "conversation_id": None})

    async def _summarise(self, key: APIKey, request_id: str, conversation: Conversation, history: History,
                         model: ModelConfig) -> str | None:
        """Fold the turns left out (and the previous summary) into a new summary, kept in the ledger.

        Returns:
            The summary, or None when it could not be made (the turns are then left out).
        """
        settings = self.gateway.config.conversations
        window = model.context_window()
        instruction = SUMMARY_INSTRUCTION.format(words=max(20, settings.summary_max_tokens * 3 // 4))
        text = transcript(history.summary, history.dropped,
                          window - settings.summary_max_tokens - 64 if window else None)
        body = ChatCompletionRequest(model=model.name, max_tokens=settings.summary_max_tokens, temperature=0,
                                     messages=[ChatMessage(role="system", content=instruction),
                                               ChatMessage(role="user", content=text)])
        record = RequestRecord(id=f"{request_id}-summary", tenant=key.tenant, user=key.user, key_id=key.key_id,
                               endpoint=SUMMARY_ENDPOINT, requested_model=model.name)
        started, attempts = time.perf_counter(), []
        gateway = self.gateway
        try:
            decision = await gateway.spend.reserve(record.id, key, body, model, [])
        except RaygateError as exc:
            logger.info("Conversation summary not reserved (%s); the oldest turns are left out", exc.code)
            return None
        if decision.model is not None and decision.model != model.name:
            record.downgraded_from, model = model.name, gateway._model(decision.model)
        try:
            answer = await gateway.dispatcher.first_answer(capped_request(body, decision.max_tokens), model, attempts)
        except RaygateError as exc:
            gateway._record(record, started, None, None, exc, attempts)
            logger.info("Conversation summary failed (%s); the oldest turns are left out", exc.code)
            return None
        gateway._record(record, started, answer.model, answer.first.usage, None, attempts)
        gateway._correct_tokens(key, answer.first.usage)  # the user's tokens per minute count it too
        summary = (answer.first.choices[0].message.content or "").strip()
        if not summary:
            return None
        try:
            await self._store("save_summary", key.tenant, key.user, conversation.id, summary, history.dropped[-1].seq)
        except RaygateError as exc:  # used for this request all the same; the next one summarises again
            logger.warning("Keeping a conversation summary failed: %s", exc.code)
        return summary

    def finish(self, request_id: str, answer: str | None) -> None:
        """After a request ended: append its new turns and ``answer`` to its conversation (None: it failed)."""
        turn = self._pending.pop(request_id, None)
        if turn is None or answer is None:
            return
        messages = [*turn.messages, {"role": "assistant", "content": answer}]
        previous = self._writes.get(turn.conversation_id)
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._writes[turn.conversation_id] = done
        self.gateway.spend.background.spawn(self._append(turn, messages, previous, done))

    async def _append(self, turn: _Turn, messages: list[dict[str, Any]], previous: asyncio.Future[None] | None,
                      done: asyncio.Future[None]) -> None:
        try:
            if previous is not None:  # appends to one conversation keep their order
                await asyncio.shield(previous)
            await self._store("append", turn.tenant, turn.user, turn.conversation_id, messages,
                              self.gateway.config.conversations.max_messages)
        except Exception as exc:  # noqa: BLE001 - off the client's path: log, never raise
            logger.warning("Appending to a conversation failed: %s", type(exc).__name__)
        finally:
            done.set_result(None)
            if self._writes.get(turn.conversation_id) is done:
                del self._writes[turn.conversation_id]
