"""The ledger's personal data: message content kept only with consent, export, erasure, and their audit.

Functions over the Ledger's SQLite connection (the Ledger calls them under its lock).
Usage rows stay after an erasure, for billing, with the user replaced by a pseudonym;
everything a user wrote or was answered goes, stored conversations, memory and batch files included
(those are kept whatever the consent: the client asked for them). ``secure_delete`` overwrites what is
deleted, so no content survives in the file's free pages.
"""

from __future__ import annotations

import hashlib
import json
import sqlite3
import time
from typing import Any

from pydantic import BaseModel, Field

from deployments import batches, conversations, files, memory
from deployments.user_rows import user_where

SCHEMA = """
CREATE TABLE IF NOT EXISTS consent (
    tenant TEXT NOT NULL, user TEXT NOT NULL, consent INTEGER NOT NULL, updated_at REAL NOT NULL,
    PRIMARY KEY (tenant, user)
);
CREATE TABLE IF NOT EXISTS messages (
    request_id TEXT PRIMARY KEY, tenant TEXT NOT NULL, user TEXT NOT NULL, messages TEXT NOT NULL,
    answer TEXT, created_at REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS messages_user ON messages (tenant, user);
CREATE TABLE IF NOT EXISTS audit (
    id INTEGER PRIMARY KEY AUTOINCREMENT, at REAL NOT NULL, action TEXT NOT NULL, tenant TEXT,
    user TEXT NOT NULL, actor TEXT NOT NULL, detail TEXT NOT NULL
);
"""


class Content(BaseModel):
    """What a user sent and was answered in one request (stored only with their consent)."""

    messages: list[dict[str, Any]]
    answer: str | None = None


class AuditEntry(BaseModel):
    at: float
    action: str
    tenant: str | None
    user: str
    actor: str = Field(description="The admin key id that asked.")
    detail: dict[str, Any]


def pseudonym(tenant: str, user: str) -> str:
    """The stable stand-in an erased user's usage rows keep."""
    return "erased-" + hashlib.sha256(f"{tenant}\x00{user}".encode()).hexdigest()[:16]


def consents(db: sqlite3.Connection, pairs: set[tuple[str, str]], default: bool) -> dict[tuple[str, str], bool]:
    """Each (tenant, user)'s consent, ``default`` where none was given."""
    found = {(t, u): bool(c) for t, u, c in db.execute("SELECT tenant, user, consent FROM consent").fetchall()
             if (t, u) in pairs} if pairs else {}
    return {pair: found.get(pair, default) for pair in pairs}


def store_content(db: sqlite3.Connection, rows: list[tuple[str, str, str, float, Content]], default: bool) -> int:
    """Keep the content of the rows (request id, tenant, user, time, content) whose user consented."""
    allowed = consents(db, {(t, u) for _, t, u, _, _ in rows}, default)
    kept = [(rid, t, u, json.dumps(c.messages, ensure_ascii=False), c.answer, at)
            for rid, t, u, at, c in rows if allowed[(t, u)]]
    db.executemany("INSERT OR REPLACE INTO messages (request_id, tenant, user, messages, answer, created_at) "
                   "VALUES (?, ?, ?, ?, ?, ?)", kept)
    return len(kept)


def set_consent(db: sqlite3.Connection, tenant: str, user: str, consent: bool) -> None:
    db.execute("INSERT OR REPLACE INTO consent (tenant, user, consent, updated_at) VALUES (?, ?, ?, ?)",
               [tenant, user, int(consent), time.time()])


def export_user(db: sqlite3.Connection, tenant: str | None, user: str, columns: list[str]) -> dict[str, Any]:
    """Everything the ledger holds about a user: requests, messages, feedback, usage, consent, conversations
    (``deployments.conversations``) and memory (``deployments.memory``)."""
    where, params = user_where(tenant, user)
    requests = [dict(zip(columns, row)) for row in db.execute(
        f"SELECT {', '.join(columns)} FROM requests WHERE {where} ORDER BY created_at", params)]
    messages = [{"request_id": rid, "messages": json.loads(m), "answer": a, "created_at": at}
                for rid, m, a, at in db.execute(
                    f"SELECT request_id, messages, answer, created_at FROM messages WHERE {where} ORDER BY created_at",
                    params)]
    r_where, r_params = user_where(tenant, user, "r")
    feedback = [dict(zip(("request_id", "rating", "thumbs", "comment", "created_at"), row)) for row in db.execute(
        f"SELECT f.request_id, f.rating, f.thumbs, f.comment, f.created_at FROM feedback f "
        f"JOIN requests r ON r.id = f.request_id WHERE {r_where} ORDER BY f.created_at", r_params)]
    consent = [{"tenant": t, "consent": bool(c), "updated_at": at} for t, c, at in db.execute(
        f"SELECT tenant, consent, updated_at FROM consent WHERE {where}", params)]
    usage = {"requests": len(requests), "prompt_tokens": sum(r["prompt_tokens"] for r in requests),
             "completion_tokens": sum(r["completion_tokens"] for r in requests),
             "cost_usd": sum(r["cost_usd"] for r in requests)}
    return {"object": "user.export", "user": user, "tenant": tenant, "consent": consent, "usage": usage,
            "requests": requests, "messages": messages, "feedback": feedback,
            "conversations": conversations.export_user(db, tenant, user), "memory": memory.export_user(db, tenant, user),
            "files": files.export_user(db, tenant, user), "batches": batches.export_user(db, tenant, user)}


def erase_user(db: sqlite3.Connection, tenant: str | None, user: str) -> dict[str, int]:
    """Delete the user's content, consent, conversations, memory, files and batches, blank their feedback comments, pseudonymise
    their usage rows."""
    where, params = user_where(tenant, user)
    r_where, r_params = user_where(tenant, user, "requests")
    counts = {
        "messages": db.execute(f"DELETE FROM messages WHERE {where}", params).rowcount,
        "feedback_comments": db.execute(
            f"UPDATE feedback SET comment = NULL WHERE comment IS NOT NULL AND request_id IN "
            f"(SELECT id FROM requests WHERE {r_where})", r_params).rowcount,
        "consent": db.execute(f"DELETE FROM consent WHERE {where}", params).rowcount,
        **conversations.erase_user(db, tenant, user),
        **memory.erase_user(db, tenant, user),
        **files.erase_user(db, tenant, user),
        **batches.erase_user(db, tenant, user),
    }
    tenants = [t for (t,) in db.execute(f"SELECT DISTINCT tenant FROM requests WHERE {where}", params)]
    counts["requests_pseudonymised"] = sum(
        db.execute("UPDATE requests SET user = ? WHERE tenant = ? AND user = ?",
                   [pseudonym(t, user), t, user]).rowcount for t in tenants)
    return counts


def audit(db: sqlite3.Connection, action: str, tenant: str | None, user: str, actor: str,
          detail: dict[str, Any]) -> None:
    db.execute("INSERT INTO audit (at, action, tenant, user, actor, detail) VALUES (?, ?, ?, ?, ?, ?)",
               [time.time(), action, tenant, user, actor, json.dumps(detail)])


def audit_log(db: sqlite3.Connection, limit: int) -> list[AuditEntry]:
    rows = db.execute("SELECT at, action, tenant, user, actor, detail FROM audit ORDER BY id DESC LIMIT ?", [limit])
    return [AuditEntry(at=at, action=a, tenant=t, user=u, actor=actor, detail=json.loads(d))
            for at, a, t, u, actor, d in rows]
