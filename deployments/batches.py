"""Batch jobs (``/v1/batches``): their state, their requests and results, and who is running them.

Functions over the Ledger's SQLite connection (``Ledger.store("batches.<fn>", ...)``). Keeping
the state here, not in a Gateway replica, is what lets a batch outlive the replica running it:

* ``create`` copies the validated requests of the input file into ``batch_items`` (``pending``).
* A Gateway replica ``claim``s the oldest unfinished batch whose lease has run out and holds it
  by renewing the lease (``renew``, ``pending``, ``record``); if the replica dies, the lease runs
  out and another replica (or its restarted self) takes the batch over, with the items left.
* ``record`` stores results as they come (``done`` or ``failed``), so progress is visible and
  nothing finished is run again; an item cut off mid-call is run again (at least once).
* ``finalize`` writes the output and error files (OpenAI's JSONL) and ends the batch:
  ``completed``, ``cancelled`` (after ``cancel``) or ``expired`` (past its completion window).

A batch belongs to the (tenant, user) that created it; anyone else gets a 404.
"""

from __future__ import annotations

import json
import sqlite3
import time
import uuid
from typing import Any, Literal

from pydantic import BaseModel, Field

from deployments import files
from deployments.user_rows import user_where
from serve_app.errors import InvalidRequestError, NotFoundError, RateLimitError

SCHEMA = """
CREATE TABLE IF NOT EXISTS batches (
    id TEXT PRIMARY KEY, tenant TEXT NOT NULL, user TEXT NOT NULL, key_id TEXT NOT NULL, endpoint TEXT NOT NULL,
    input_file_id TEXT NOT NULL, completion_window TEXT NOT NULL, status TEXT NOT NULL, metadata TEXT NOT NULL,
    errors TEXT, total INTEGER NOT NULL, completed INTEGER NOT NULL DEFAULT 0, failed INTEGER NOT NULL DEFAULT 0,
    paused INTEGER NOT NULL DEFAULT 0, output_file_id TEXT, error_file_id TEXT, created_at REAL NOT NULL,
    in_progress_at REAL, expires_at REAL, finalizing_at REAL, completed_at REAL, failed_at REAL, expired_at REAL,
    cancelling_at REAL, cancelled_at REAL, owner TEXT, lease_until REAL NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS batches_user ON batches (tenant, user, created_at);
CREATE INDEX IF NOT EXISTS batches_status ON batches (status, created_at);
CREATE TABLE IF NOT EXISTS batch_items (
    batch_id TEXT NOT NULL, line INTEGER NOT NULL, custom_id TEXT NOT NULL, body TEXT NOT NULL,
    state TEXT NOT NULL, result TEXT, PRIMARY KEY (batch_id, line)
);
"""
RUNNING = ("in_progress", "cancelling")
_TIMES = ("created_at", "in_progress_at", "expires_at", "finalizing_at", "completed_at", "failed_at", "expired_at",
          "cancelling_at", "cancelled_at")
_FIELDS = ("id", "endpoint", "input_file_id", "completion_window", "status", "metadata", "errors", "total",
           "completed", "failed", "paused", "output_file_id", "error_file_id", *_TIMES)


class RequestCounts(BaseModel):
    total: int
    completed: int
    failed: int


class Batch(BaseModel):
    """OpenAI's batch object (``raygate.paused``: this batch waits for interactive latency to fall)."""

    id: str
    object: Literal["batch"] = "batch"
    endpoint: str
    errors: dict[str, Any] | None = None
    input_file_id: str
    completion_window: str
    status: str
    output_file_id: str | None = None
    error_file_id: str | None = None
    created_at: int
    in_progress_at: int | None = None
    expires_at: int | None = None
    finalizing_at: int | None = None
    completed_at: int | None = None
    failed_at: int | None = None
    expired_at: int | None = None
    cancelling_at: int | None = None
    cancelled_at: int | None = None
    request_counts: RequestCounts
    metadata: dict[str, str] | None = None
    raygate: dict[str, Any] = Field(default_factory=dict)


class Item(BaseModel):
    """One request of a batch: its input line number, ``custom_id`` and JSON body."""

    line: int
    custom_id: str
    body: str


class Claim(BaseModel):
    """A batch a replica now holds: whose key runs it, and until when it may run."""

    id: str
    tenant: str
    user: str
    key_id: str
    status: str
    expires_at: float


class Page(BaseModel):
    """The batch's status and its next pending items (``items`` empty: none left after the cursor)."""

    status: str
    expires_at: float
    items: list[Item]


def _batch(row: tuple[Any, ...]) -> Batch:
    values = dict(zip(_FIELDS, row))
    times = {name: int(values[name]) if values[name] is not None else None for name in _TIMES}
    return Batch(id=values["id"], endpoint=values["endpoint"], input_file_id=values["input_file_id"],
                 completion_window=values["completion_window"], status=values["status"],
                 errors=json.loads(values["errors"]) if values["errors"] else None,
                 output_file_id=values["output_file_id"], error_file_id=values["error_file_id"],
                 request_counts=RequestCounts(total=values["total"], completed=values["completed"],
                                              failed=values["failed"]),
                 metadata=json.loads(values["metadata"]) or None, raygate={"paused": bool(values["paused"])}, **times)


def _row(db: sqlite3.Connection, batch_id: str, tenant: str | None = None, user: str | None = None) -> Batch:
    where, params = "id = ?", [batch_id]
    if tenant is not None:
        where, params = where + " AND tenant = ? AND user = ?", [*params, tenant, user]
    row = db.execute(f"SELECT {', '.join(_FIELDS)} FROM batches WHERE {where}", params).fetchone()
    if row is None:
        raise NotFoundError(f"No such Batch object: {batch_id}", param="batch_id", code="batch_not_found")
    return _batch(row)


def create(db: sqlite3.Connection, tenant: str, user: str, key_id: str, input_file_id: str, endpoint: str,
           window: tuple[str, float], metadata: dict[str, str], items: list[tuple[int, str, str]],
           errors: list[dict[str, Any]], max_active: int) -> Batch:
    """A batch over the input file's ``items`` (``(line, custom_id, body)``), or a ``failed`` one listing the
    input's ``errors`` (nothing runs then, as OpenAI does after validating).

    Raises:
        NotFoundError: the input file is not the caller's.
        InvalidRequestError: the input file's purpose is not ``batch``.
        RateLimitError: ``max_active`` of the user's batches are unfinished.
    """
    if files.get(db, tenant, user, input_file_id).purpose != "batch":
        raise InvalidRequestError("The input file must have been uploaded with purpose 'batch'.",
                                  param="input_file_id", code="invalid_file_purpose")
    (active,) = db.execute("SELECT COUNT(*) FROM batches WHERE tenant = ? AND user = ? AND status IN (?, ?)",
                           [tenant, user, *RUNNING]).fetchone()
    if active >= max_active:
        raise RateLimitError(f"At most {max_active} batches may be unfinished at once.", code="batch_limit_reached")
    batch_id, now = f"batch_{uuid.uuid4().hex}", time.time()
    label, window_s = window
    failed = bool(errors)
    db.execute("INSERT INTO batches (id, tenant, user, key_id, endpoint, input_file_id, completion_window, status, "
               "metadata, errors, total, created_at, in_progress_at, expires_at, failed_at) "
               "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
               [batch_id, tenant, user, key_id, endpoint, input_file_id, label,
                "failed" if failed else "in_progress", json.dumps(metadata, ensure_ascii=False),
                json.dumps({"object": "list", "data": errors}) if failed else None, 0 if failed else len(items), now,
                None if failed else now, now + window_s, now if failed else None])
    if not failed:
        db.executemany("INSERT INTO batch_items (batch_id, line, custom_id, body, state) VALUES (?, ?, ?, ?, 'pending')",
                       [(batch_id, line, custom_id, body) for line, custom_id, body in items])
    return _row(db, batch_id)


def get(db: sqlite3.Connection, tenant: str, user: str, batch_id: str) -> Batch:
    """The batch with its progress (``NotFoundError`` when it is not the caller's)."""
    return _row(db, batch_id, tenant, user)


def listing(db: sqlite3.Connection, tenant: str, user: str, limit: int, after: str | None) -> tuple[list[Batch], bool]:
    """A page of the user's batches, newest first, after the batch ``after``; and whether more follow."""
    where, params = "tenant = ? AND user = ?", [tenant, user]
    cursor = db.execute("SELECT created_at, id FROM batches WHERE id = ? AND tenant = ? AND user = ?",
                        [after, tenant, user]).fetchone() if after else None
    if cursor is not None:
        where, params = where + " AND (created_at, id) < (?, ?)", [*params, *cursor]
    rows = db.execute(f"SELECT {', '.join(_FIELDS)} FROM batches WHERE {where} ORDER BY created_at DESC, id DESC "
                      "LIMIT ?", [*params, limit + 1]).fetchall()
    return [_batch(r) for r in rows[:limit]], len(rows) > limit


def cancel(db: sqlite3.Connection, tenant: str, user: str, batch_id: str) -> Batch:
    """Ask a running batch to stop: ``cancelling`` until its runner has written what it finished, then
    ``cancelled``; a batch no replica holds is ended at once.

    Raises:
        NotFoundError: not the caller's batch.
        InvalidRequestError: the batch has already ended.
    """
    batch, now = _row(db, batch_id, tenant, user), time.time()
    if batch.status not in RUNNING:
        raise InvalidRequestError(f"Cannot cancel a batch with status '{batch.status}'.", param="batch_id",
                                  code="batch_not_cancellable")
    db.execute("UPDATE batches SET status = 'cancelling', cancelling_at = COALESCE(cancelling_at, ?) WHERE id = ?",
               [now, batch_id])
    (lease_until,) = db.execute("SELECT lease_until FROM batches WHERE id = ?", [batch_id]).fetchone()
    return finalize(db, batch_id, None) if lease_until < now else _row(db, batch_id)


def claim(db: sqlite3.Connection, owner: str, lease_s: float) -> Claim | None:
    """Take the oldest unfinished batch no live replica holds, for ``lease_s``."""
    now = time.time()
    row = db.execute("SELECT id, tenant, user, key_id, status, expires_at FROM batches WHERE status IN (?, ?) "
                     "AND lease_until < ? ORDER BY created_at LIMIT 1", [*RUNNING, now]).fetchone()
    if row is None:
        return None
    db.execute("UPDATE batches SET owner = ?, lease_until = ? WHERE id = ?", [owner, now + lease_s, row[0]])
    return Claim(**dict(zip(("id", "tenant", "user", "key_id", "status", "expires_at"), row)))


def renew(db: sqlite3.Connection, batch_id: str, owner: str, lease_s: float, paused: bool | None = None) -> str | None:
    """Extend the owner's lease (and note whether it is paused); the batch's status, or None when the lease
    was lost to another replica."""
    now = time.time()
    updated = db.execute("UPDATE batches SET lease_until = ?, paused = COALESCE(?, paused) WHERE id = ? AND owner = ? "
                         "AND lease_until >= ?", [now + lease_s, paused, batch_id, owner, now]).rowcount
    if not updated:
        return None
    (status,) = db.execute("SELECT status FROM batches WHERE id = ?", [batch_id]).fetchone()
    return str(status)


def pending(db: sqlite3.Connection, batch_id: str, owner: str, lease_s: float, after_line: int,
            limit: int) -> Page | None:
    """Renew the lease and return the next pending items after ``after_line`` (None: the lease was lost)."""
    status = renew(db, batch_id, owner, lease_s)
    if status is None:
        return None
    (expires_at,) = db.execute("SELECT expires_at FROM batches WHERE id = ?", [batch_id]).fetchone()
    rows = db.execute("SELECT line, custom_id, body FROM batch_items WHERE batch_id = ? AND state = 'pending' AND "
                      "line > ? ORDER BY line LIMIT ?", [batch_id, after_line, limit]).fetchall()
    return Page(status=status, expires_at=expires_at,
                items=[Item(line=line, custom_id=custom_id, body=body) for line, custom_id, body in rows])


def record(db: sqlite3.Connection, batch_id: str, owner: str, lease_s: float,
           results: list[tuple[int, bool, str]]) -> str | None:
    """Store finished items' result lines (``(line, ok, line_json)``; an item already finished keeps its first
    result) and renew the lease. Returns the batch's status, None when the lease was lost."""
    for line, ok, result in results:
        if db.execute("UPDATE batch_items SET state = ?, result = ? WHERE batch_id = ? AND line = ? AND "
                      "state = 'pending'", ["done" if ok else "failed", result, batch_id, line]).rowcount:
            db.execute(f"UPDATE batches SET {'completed' if ok else 'failed'} = "
                       f"{'completed' if ok else 'failed'} + 1 WHERE id = ?", [batch_id])
    return renew(db, batch_id, owner, lease_s)


def _unfinished_line(custom_id: str, code: str, message: str) -> str:
    return json.dumps({"id": f"batch_req_{uuid.uuid4().hex}", "custom_id": custom_id, "response": None,
                       "error": {"code": code, "message": message}}, ensure_ascii=False)


def finalize(db: sqlite3.Connection, batch_id: str, owner: str | None) -> Batch:
    """End the batch: write its output file (successes) and error file (failures, then the requests a
    cancel or the deadline left unrun), in input order; status ``cancelled``, ``expired`` or ``completed``."""
    now = time.time()
    (tenant, user, status, expires_at, current) = db.execute(
        "SELECT tenant, user, status, expires_at, owner FROM batches WHERE id = ?", [batch_id]).fetchone()
    if status not in RUNNING or (owner is not None and current != owner):
        return _row(db, batch_id)  # ended already, or taken over by another replica
    items = db.execute("SELECT custom_id, state, result FROM batch_items WHERE batch_id = ? ORDER BY line",
                       [batch_id]).fetchall()
    left = any(state == "pending" for _, state, _ in items)
    final = "cancelled" if status == "cancelling" else "expired" if left and now >= expires_at else "completed"
    reason = {"cancelled": ("batch_cancelled", "The batch was cancelled before this request ran."),
              "expired": ("batch_expired", "The batch's completion window ended before this request ran.")}
    output = [result for _, state, result in items if state == "done"]
    errors = [result for _, state, result in items if state == "failed"]
    errors += [_unfinished_line(custom_id, *reason[final]) for custom_id, state, _ in items
               if state == "pending" and final in reason]
    written = {name: files.create(db, tenant, user, "batch_output", f"{batch_id}_{name}.jsonl",
                                  ("\n".join(lines) + "\n").encode()).id if lines else None
               for name, lines in (("output", output), ("error", errors))}
    db.execute(f"UPDATE batches SET status = ?, output_file_id = ?, error_file_id = ?, finalizing_at = ?, "
               f"{final}_at = ?, owner = NULL, lease_until = 0, paused = 0 WHERE id = ?",
               [final, written["output"], written["error"], now, now, batch_id])
    db.execute("DELETE FROM batch_items WHERE batch_id = ?", [batch_id])  # the files hold the results now
    return _row(db, batch_id)


def release(db: sqlite3.Connection, owner: str) -> int:
    """Give up the owner's leases (a replica stopping), so another replica takes its batches over at once."""
    return db.execute("UPDATE batches SET lease_until = 0, paused = 0 WHERE owner = ? AND status IN (?, ?)",
                      [owner, *RUNNING]).rowcount


def export_user(db: sqlite3.Connection, tenant: str | None, user: str) -> list[dict[str, Any]]:
    """The user's batches (their requests and results are in the exported files)."""
    where, params = user_where(tenant, user)
    rows = db.execute(f"SELECT {', '.join(_FIELDS)} FROM batches WHERE {where} ORDER BY created_at", params).fetchall()
    return [_batch(r).model_dump(exclude={"raygate"}) for r in rows]


def erase_user(db: sqlite3.Connection, tenant: str | None, user: str) -> dict[str, int]:
    """Delete the user's batches and the requests of those still running (which then stop: their lease
    renewals find no batch)."""
    where, params = user_where(tenant, user)
    items = db.execute(f"DELETE FROM batch_items WHERE batch_id IN (SELECT id FROM batches WHERE {where})",
                       params).rowcount
    return {"batches": db.execute(f"DELETE FROM batches WHERE {where}", params).rowcount, "batch_items": items}
