"""Judge scores of answers, in the ledger's ``evaluations`` table (operations for ``Ledger.store``).

One row per judgement: the ledger row it judged (``request_id``: a chat request, or the
``<id>-retry`` row of a sync-route retry), the score (1-5; NULL when the judge's reply
could not be parsed), the judge's reason and model, and how it was asked (``sampled``
off the client's path, or ``sync`` before the answer was sent). A request's score is
its latest row's (``latest_scores``).
"""

from __future__ import annotations

import sqlite3
import time
from typing import Literal

from pydantic import BaseModel, Field

SCHEMA = """
CREATE TABLE IF NOT EXISTS evaluations (
    id INTEGER PRIMARY KEY AUTOINCREMENT, request_id TEXT NOT NULL, score INTEGER, reason TEXT,
    judge_model TEXT NOT NULL, answer_model TEXT, mode TEXT NOT NULL, created_at REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS evaluations_request ON evaluations (request_id);
"""
# The latest score of each judged request, for joins (experiment metric, dataset filter).
LATEST_SCORE_SQL = ("(SELECT e.score FROM evaluations e WHERE e.request_id = {id} AND e.score IS NOT NULL "
                    "ORDER BY e.id DESC LIMIT 1)")


class EvaluationRecord(BaseModel):
    """One judgement of one answer."""

    request_id: str
    score: int | None = Field(None, ge=1, le=5, description="None: the judge's reply had no score.")
    reason: str | None = None
    judge_model: str
    answer_model: str | None = Field(None, description="The model whose answer was judged.")
    mode: Literal["sampled", "sync"] = "sampled"
    created_at: float = Field(default_factory=time.time)


_COLUMNS = list(EvaluationRecord.model_fields)


def add(db: sqlite3.Connection, record: EvaluationRecord) -> None:
    """Store a judgement."""
    db.execute(f"INSERT INTO evaluations ({', '.join(_COLUMNS)}) VALUES ({', '.join('?' * len(_COLUMNS))})",
               [getattr(record, c) for c in _COLUMNS])


def listing(db: sqlite3.Connection, request_id: str | None = None, limit: int = 100,
            offset: int = 0) -> list[EvaluationRecord]:
    """Judgements, newest first, optionally of one request (its retry's included)."""
    where, params = ("WHERE request_id = ? OR request_id = ?", [request_id, f"{request_id}-retry"]) \
        if request_id else ("", [])
    rows = db.execute(f"SELECT {', '.join(_COLUMNS)} FROM evaluations {where} ORDER BY id DESC LIMIT ? OFFSET ?",
                      [*params, limit, offset]).fetchall()
    return [EvaluationRecord(**dict(zip(_COLUMNS, row))) for row in rows]
