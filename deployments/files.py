"""Uploaded files (``/v1/files``): a (tenant, user)'s batch inputs, and the outputs batches write for them.

Functions over the Ledger's SQLite connection (``Ledger.store("files.<fn>", ...)``), so files
survive restarts with the batches that read them. A file belongs to the (tenant, user) that
uploaded it (or whose batch wrote it): anyone else gets a 404, never a 403, so ids do not leak.
The bytes are kept as a BLOB beside the metadata; a batch file holds prompts, so a user's files
are part of their GDPR export (metadata) and erasure (everything).
"""

from __future__ import annotations

import sqlite3
import time
import uuid
from typing import Any, Literal

from pydantic import BaseModel

from deployments.user_rows import user_where
from serve_app.errors import NotFoundError

SCHEMA = """
CREATE TABLE IF NOT EXISTS files (
    id TEXT PRIMARY KEY, tenant TEXT NOT NULL, user TEXT NOT NULL, purpose TEXT NOT NULL, filename TEXT NOT NULL,
    bytes INTEGER NOT NULL, created_at REAL NOT NULL, content BLOB NOT NULL
);
CREATE INDEX IF NOT EXISTS files_user ON files (tenant, user, created_at);
"""
_FIELDS = "id, bytes, created_at, filename, purpose"


class FileObject(BaseModel):
    """OpenAI's file object."""

    id: str
    object: Literal["file"] = "file"
    bytes: int
    created_at: int
    filename: str
    purpose: str
    status: Literal["processed"] = "processed"
    expires_at: int | None = None
    status_details: str | None = None


class FileDeleted(BaseModel):
    id: str
    object: Literal["file"] = "file"
    deleted: bool = True


def _file(row: tuple[Any, ...]) -> FileObject:
    file_id, size, created_at, filename, purpose = row
    return FileObject(id=file_id, bytes=size, created_at=int(created_at), filename=filename, purpose=purpose)


def create(db: sqlite3.Connection, tenant: str, user: str, purpose: str, filename: str, content: bytes) -> FileObject:
    """Keep a file for the (tenant, user)."""
    file_id, now = f"file-{uuid.uuid4().hex}", time.time()
    db.execute("INSERT INTO files (id, tenant, user, purpose, filename, bytes, created_at, content) "
               "VALUES (?, ?, ?, ?, ?, ?, ?, ?)", [file_id, tenant, user, purpose, filename, len(content), now, content])
    return FileObject(id=file_id, bytes=len(content), created_at=int(now), filename=filename, purpose=purpose)


def get(db: sqlite3.Connection, tenant: str, user: str, file_id: str) -> FileObject:
    """The file's metadata.

    Raises:
        NotFoundError: no such file for this (tenant, user).
    """
    row = db.execute(f"SELECT {_FIELDS} FROM files WHERE id = ? AND tenant = ? AND user = ?",
                     [file_id, tenant, user]).fetchone()
    if row is None:
        raise NotFoundError(f"No such File object: {file_id}", param="file_id", code="file_not_found")
    return _file(row)


def content(db: sqlite3.Connection, tenant: str, user: str, file_id: str) -> tuple[FileObject, bytes]:
    """The file's metadata and bytes (``NotFoundError`` as ``get``)."""
    meta = get(db, tenant, user, file_id)
    (data,) = db.execute("SELECT content FROM files WHERE id = ?", [file_id]).fetchone()
    return meta, bytes(data)


def listing(db: sqlite3.Connection, tenant: str, user: str, purpose: str | None, limit: int, after: str | None,
            order: Literal["asc", "desc"]) -> tuple[list[FileObject], bool]:
    """A page of the (tenant, user)'s files, by creation time, after the file ``after``; and whether more follow."""
    where, params = "tenant = ? AND user = ?", [tenant, user]
    if purpose is not None:
        where, params = where + " AND purpose = ?", [*params, purpose]
    if after is not None:
        cursor = db.execute("SELECT created_at, id FROM files WHERE id = ? AND tenant = ? AND user = ?",
                            [after, tenant, user]).fetchone()
        if cursor is not None:
            compare = ">" if order == "asc" else "<"
            where += f" AND (created_at, id) {compare} (?, ?)"
            params += list(cursor)
    direction = "ASC" if order == "asc" else "DESC"
    rows = db.execute(f"SELECT {_FIELDS} FROM files WHERE {where} ORDER BY created_at {direction}, id {direction} "
                      "LIMIT ?", [*params, limit + 1]).fetchall()
    return [_file(r) for r in rows[:limit]], len(rows) > limit


def delete(db: sqlite3.Connection, tenant: str, user: str, file_id: str) -> FileDeleted:
    """Delete a file (``NotFoundError`` as ``get``). A batch that read it keeps its own copy of the requests."""
    get(db, tenant, user, file_id)
    db.execute("DELETE FROM files WHERE id = ?", [file_id])
    return FileDeleted(id=file_id)


def export_user(db: sqlite3.Connection, tenant: str | None, user: str) -> list[dict[str, Any]]:
    """The user's files (all tenants when ``tenant`` is None), with their text."""
    where, params = user_where(tenant, user)
    rows = db.execute(f"SELECT {_FIELDS}, tenant, content FROM files WHERE {where} ORDER BY created_at",
                      params).fetchall()
    return [{**_file(r[:5]).model_dump(), "tenant": r[5], "content": bytes(r[6]).decode("utf-8", "replace")}
            for r in rows]


def erase_user(db: sqlite3.Connection, tenant: str | None, user: str) -> dict[str, int]:
    """Delete every file of the user."""
    where, params = user_where(tenant, user)
    return {"files": db.execute(f"DELETE FROM files WHERE {where}", params).rowcount}
