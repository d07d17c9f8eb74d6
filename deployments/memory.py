"""Users' memory: per-(tenant, user) facts and preferences, a JSON object kept in the ledger.

Functions over the Ledger's SQLite connection (``Ledger.store("memory.<fn>", ...)``, each
in one transaction). ``put`` replaces the object, ``patch`` merges top-level keys into it
(a null value deletes a key). Limits (``memory.max_keys``, ``memory.max_bytes`` of compact
UTF-8 JSON) are checked on the result; going over is a 400 naming the limit. Prompt
templates read the object as the ``memory`` variable. It is personal data: the user's
export holds it, their erasure deletes it.
"""

from __future__ import annotations

import json
import math
import sqlite3
import time
from typing import Any

from pydantic import BaseModel, Field

from deployments.user_rows import user_where
from serve_app.errors import InvalidRequestError

SCHEMA = """
CREATE TABLE IF NOT EXISTS user_memory (
    tenant TEXT NOT NULL, user TEXT NOT NULL, memory TEXT NOT NULL, updated_at REAL NOT NULL,
    PRIMARY KEY (tenant, user)
);
"""
MAX_KEY_CHARS = 128
MAX_DEPTH = 16


class Memory(BaseModel):
    """``GET /v1/users/me/memory``."""

    object: str = "user.memory"
    memory: dict[str, Any] = Field(default_factory=dict)
    updated_at: float | None = None


def _invalid(message: str, code: str = "invalid_memory") -> InvalidRequestError:
    return InvalidRequestError(message, param="memory", code=code)


def _check_value(value: Any, depth: int = 0) -> None:
    if depth > MAX_DEPTH:
        raise _invalid(f"Memory values may nest at most {MAX_DEPTH} levels deep.")
    if isinstance(value, str):
        _check_text(value)
    elif isinstance(value, float) and not math.isfinite(value):
        raise _invalid("Memory values must be JSON: NaN and Infinity are not.")
    elif isinstance(value, list):
        for item in value:
            _check_value(item, depth + 1)
    elif isinstance(value, dict):
        for key, item in value.items():
            _check_text(key)
            _check_value(item, depth + 1)


def _check_text(text: str) -> None:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise _invalid("Memory text must be valid Unicode (it has a lone surrogate).") from None


def validate(memory: dict[str, Any], max_keys: int, max_bytes: int) -> str:
    """Check a memory object against the limits; return it as compact JSON.

    Raises:
        InvalidRequestError: too many keys (``memory_too_large``), too big, a bad key or value.
    """
    for key in memory:
        if not isinstance(key, str) or not 1 <= len(key) <= MAX_KEY_CHARS:
            raise _invalid(f"Memory keys are strings of 1 to {MAX_KEY_CHARS} characters.")
    _check_value(memory)
    if len(memory) > max_keys:
        raise _invalid(f"The memory would hold {len(memory)} keys; at most {max_keys} are allowed.",
                       "memory_too_large")
    encoded = json.dumps(memory, ensure_ascii=False, separators=(",", ":"))
    size = len(encoded.encode("utf-8"))
    if size > max_bytes:
        raise _invalid(f"The memory would take {size} bytes as JSON; at most {max_bytes} are allowed.",
                       "memory_too_large")
    return encoded


def get(db: sqlite3.Connection, tenant: str, user: str) -> Memory:
    row = db.execute("SELECT memory, updated_at FROM user_memory WHERE tenant = ? AND user = ?",
                     [tenant, user]).fetchone()
    return Memory(memory=json.loads(row[0]), updated_at=row[1]) if row else Memory()


def put(db: sqlite3.Connection, tenant: str, user: str, memory: dict[str, Any], max_keys: int,
        max_bytes: int) -> Memory:
    """Replace the user's memory (keys with a null value are left out; ``{}`` empties it)."""
    memory = {k: v for k, v in memory.items() if v is not None}
    encoded, now = validate(memory, max_keys, max_bytes), time.time()
    if memory:
        db.execute("INSERT OR REPLACE INTO user_memory (tenant, user, memory, updated_at) VALUES (?, ?, ?, ?)",
                   [tenant, user, encoded, now])
    else:
        db.execute("DELETE FROM user_memory WHERE tenant = ? AND user = ?", [tenant, user])
    return Memory(memory=memory, updated_at=now)


def patch(db: sqlite3.Connection, tenant: str, user: str, changes: dict[str, Any], max_keys: int,
          max_bytes: int) -> Memory:
    """Merge top-level keys into the user's memory: a value replaces the key's, null deletes the key."""
    merged = {**get(db, tenant, user).memory, **changes}
    return put(db, tenant, user, merged, max_keys, max_bytes)


def export_user(db: sqlite3.Connection, tenant: str | None, user: str) -> list[dict[str, Any]]:
    """The user's memory, per tenant."""
    where, params = user_where(tenant, user)
    return [{"tenant": t, "memory": json.loads(m), "updated_at": at} for t, m, at in db.execute(
        f"SELECT tenant, memory, updated_at FROM user_memory WHERE {where} ORDER BY tenant", params)]


def erase_user(db: sqlite3.Connection, tenant: str | None, user: str) -> dict[str, int]:
    where, params = user_where(tenant, user)
    return {"memory": db.execute(f"DELETE FROM user_memory WHERE {where}", params).rowcount}
