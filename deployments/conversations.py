"""Stored conversations: a (tenant, user)'s message history, which chat requests naming it continue.

Functions over the Ledger's SQLite connection (the Ledger runs each in one transaction,
under its lock; ``Ledger.store("conversations.<fn>", ...)``). A conversation belongs to
the (tenant, user) of the key that created it: any other caller gets a 404, never a 403,
so ids do not leak. Each message has a sequence number; leading system/developer
messages given at creation are *pinned*: never trimmed, always sent first. Beyond
``max_messages`` the oldest unpinned messages are deleted (and an answer left first without its
question with them). A summary of the oldest
turns (made by the Gateway when the history outgrows a model's window) is kept with
``summary_upto``, the last sequence number it covers, so it is made once, not per request.

Conversations are a feature the client asks for, so they are stored whatever the
user's analytics consent; they are personal data all the same: ``export_user`` and
``erase_user`` (called by ``deployments.privacy``) include them.
"""

from __future__ import annotations

import json
import sqlite3
import time
import uuid
from typing import Any, Literal

from pydantic import BaseModel, Field

from deployments.user_rows import user_where
from serve_app.errors import InvalidRequestError, NotFoundError

SCHEMA = """
CREATE TABLE IF NOT EXISTS conversations (
    id TEXT PRIMARY KEY, tenant TEXT NOT NULL, user TEXT NOT NULL, metadata TEXT NOT NULL, summary TEXT,
    summary_upto INTEGER NOT NULL DEFAULT 0, created_at REAL NOT NULL, updated_at REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS conversations_user ON conversations (tenant, user);
CREATE TABLE IF NOT EXISTS conversation_messages (
    conversation_id TEXT NOT NULL, seq INTEGER NOT NULL, pinned INTEGER NOT NULL, message TEXT NOT NULL,
    created_at REAL NOT NULL, PRIMARY KEY (conversation_id, seq)
);
"""
SYSTEM_ROLES = ("system", "developer")


class StoredMessage(BaseModel):
    seq: int
    pinned: bool = Field(description="A leading system message given at creation: never trimmed.")
    message: dict[str, Any] = Field(description="The chat message as sent (role, content, name).")
    created_at: float


class Conversation(BaseModel):
    """A conversation with (when read whole) its messages, oldest first."""

    id: str
    tenant: str
    user: str
    metadata: dict[str, str]
    created_at: float
    summary: str | None = None
    summary_upto: int = Field(0, description="The last sequence number the summary covers (0: no summary).")
    messages: list[StoredMessage] = Field(default_factory=list)

    def public(self, with_messages: bool = True) -> dict[str, Any]:
        """The client's view: OpenAI's conversation object, plus the messages and the summary."""
        view: dict[str, Any] = {"id": self.id, "object": "conversation", "created_at": int(self.created_at),
                                "metadata": self.metadata}
        if with_messages:
            view["messages"] = [m.message for m in self.messages]
            view["summary"] = self.summary
        return view


class Deleted(BaseModel):
    id: str
    object: Literal["conversation.deleted"] = "conversation.deleted"
    deleted: bool = True


def new_id() -> str:
    return f"conv_{uuid.uuid4().hex}"


def _owned(db: sqlite3.Connection, tenant: str, user: str, conversation_id: str) -> tuple[Any, ...]:
    row = db.execute("SELECT id, tenant, user, metadata, created_at, summary, summary_upto FROM conversations "
                     "WHERE id = ? AND tenant = ? AND user = ?", [conversation_id, tenant, user]).fetchone()
    if row is None:
        raise NotFoundError("There is no conversation with this id.", param="conversation_id",
                            code="conversation_not_found")
    return tuple(row)


def _encoded(message: dict[str, Any]) -> str:
    """A message as stored: JSON that can be answered again (no NaN, no lone surrogate in unknown fields)."""
    try:
        encoded = json.dumps(message, ensure_ascii=False, allow_nan=False)
        encoded.encode("utf-8")
    except (ValueError, UnicodeEncodeError):
        raise InvalidRequestError("Messages must be valid JSON text (no NaN, no lone surrogates).",
                                  param="messages") from None
    return encoded


def _insert(db: sqlite3.Connection, conversation_id: str, messages: list[dict[str, Any]], first_seq: int,
            pinned: int, now: float) -> None:
    db.executemany(
        "INSERT INTO conversation_messages (conversation_id, seq, pinned, message, created_at) VALUES (?, ?, ?, ?, ?)",
        [(conversation_id, first_seq + i, int(i < pinned), _encoded(m), now) for i, m in enumerate(messages)])


def create(db: sqlite3.Connection, tenant: str, user: str, metadata: dict[str, str], messages: list[dict[str, Any]],
           max_messages: int) -> Conversation:
    """A new conversation, with its initial messages (leading system/developer ones pinned).

    Raises:
        InvalidRequestError: more messages than ``max_messages``.
    """
    if len(messages) > max_messages:
        raise InvalidRequestError(f"A conversation holds at most {max_messages} messages.", param="messages",
                                  code="too_many_messages")
    now, conversation_id = time.time(), new_id()
    db.execute("INSERT INTO conversations (id, tenant, user, metadata, created_at, updated_at) VALUES (?, ?, ?, ?, ?, ?)",
               [conversation_id, tenant, user, json.dumps(metadata, ensure_ascii=False), now, now])
    pinned = next((i for i, m in enumerate(messages) if m.get("role") not in SYSTEM_ROLES), len(messages))
    _insert(db, conversation_id, messages, 1, pinned, now)
    return get(db, tenant, user, conversation_id)


def get(db: sqlite3.Connection, tenant: str, user: str, conversation_id: str) -> Conversation:
    """The conversation with its messages, oldest first.

    Raises:
        NotFoundError: no such conversation for this (tenant, user).
    """
    cid, t, u, metadata, created_at, summary, upto = _owned(db, tenant, user, conversation_id)
    messages = [StoredMessage(seq=seq, pinned=bool(p), message=json.loads(m), created_at=at)
                for seq, p, m, at in db.execute("SELECT seq, pinned, message, created_at FROM conversation_messages "
                                                "WHERE conversation_id = ? ORDER BY seq", [cid])]
    return Conversation(id=cid, tenant=t, user=u, metadata=json.loads(metadata), created_at=created_at,
                        summary=summary, summary_upto=upto, messages=messages)


def append(db: sqlite3.Connection, tenant: str, user: str, conversation_id: str, messages: list[dict[str, Any]],
           max_messages: int) -> int:
    """Add messages after the last one, then delete the oldest unpinned ones beyond ``max_messages`` (and
    the answers that would then open the history).

    Returns:
        The number of messages deleted. A conversation deleted meanwhile takes nothing (0).
    """
    try:
        _owned(db, tenant, user, conversation_id)
    except NotFoundError:
        return 0
    now = time.time()
    (last,) = db.execute("SELECT COALESCE(MAX(seq), 0) FROM conversation_messages WHERE conversation_id = ?",
                         [conversation_id]).fetchone()
    _insert(db, conversation_id, messages, last + 1, 0, now)
    db.execute("UPDATE conversations SET updated_at = ? WHERE id = ?", [now, conversation_id])
    (count,) = db.execute("SELECT COUNT(*) FROM conversation_messages WHERE conversation_id = ?",
                          [conversation_id]).fetchone()
    if count <= max_messages:
        return 0
    unpinned = db.execute("SELECT seq, message FROM conversation_messages WHERE conversation_id = ? AND pinned = 0 "
                          "ORDER BY seq", [conversation_id]).fetchall()
    cut = min(count - max_messages, len(unpinned))
    while 0 < cut < len(unpinned) - 1 and json.loads(unpinned[cut][1]).get("role") != "user":
        cut += 1  # an answer is not kept without its question: the history opens on a user turn
    if cut == 0:
        return 0
    return db.execute("DELETE FROM conversation_messages WHERE conversation_id = ? AND pinned = 0 AND seq <= ?",
                      [conversation_id, unpinned[cut - 1][0]]).rowcount


def save_summary(db: sqlite3.Connection, tenant: str, user: str, conversation_id: str, summary: str,
                 upto: int) -> bool:
    """Keep a summary of the messages up to sequence number ``upto`` (unless a wider one is kept already)."""
    return db.execute("UPDATE conversations SET summary = ?, summary_upto = ? WHERE id = ? AND tenant = ? AND "
                      "user = ? AND summary_upto < ?", [summary, upto, conversation_id, tenant, user, upto]).rowcount > 0


def delete(db: sqlite3.Connection, tenant: str, user: str, conversation_id: str) -> Deleted:
    """Delete a conversation and its messages.

    Raises:
        NotFoundError: no such conversation for this (tenant, user).
    """
    _owned(db, tenant, user, conversation_id)
    db.execute("DELETE FROM conversation_messages WHERE conversation_id = ?", [conversation_id])
    db.execute("DELETE FROM conversations WHERE id = ?", [conversation_id])
    return Deleted(id=conversation_id)


def export_user(db: sqlite3.Connection, tenant: str | None, user: str) -> list[dict[str, Any]]:
    """Every conversation of the user (all tenants when ``tenant`` is None), with messages and summary."""
    where, params = user_where(tenant, user)
    rows = db.execute(f"SELECT id, tenant FROM conversations WHERE {where} ORDER BY created_at", params).fetchall()
    found = [get(db, t, user, cid) for cid, t in rows]
    return [{"id": c.id, "tenant": c.tenant, "created_at": c.created_at, "metadata": c.metadata,
             "summary": c.summary, "messages": [{"created_at": m.created_at, **m.message} for m in c.messages]}
            for c in found]


def erase_user(db: sqlite3.Connection, tenant: str | None, user: str) -> dict[str, int]:
    """Delete every conversation of the user and their messages."""
    where, params = user_where(tenant, user)
    messages = db.execute(f"DELETE FROM conversation_messages WHERE conversation_id IN "
                          f"(SELECT id FROM conversations WHERE {where})", params).rowcount
    return {"conversations": db.execute(f"DELETE FROM conversations WHERE {where}", params).rowcount,
            "conversation_messages": messages}
