"""The Ledger: every request's usage and outcome, in SQLite, written by one replica.

Gateways buffer rows (``serve_app.ledger_buffer``) and send them in batches off
the client's path; the single-replica ``Ledger`` deployment owns the database file,
so SQLite never sees two writers.
"""

from __future__ import annotations

import asyncio
import logging
import sqlite3
import time
from collections.abc import Callable
from pathlib import Path

from typing import Literal

from pydantic import BaseModel, Field

from deployments import conversations, experiment_stats, experiments, memory, overview, privacy, reports, templates
from deployments import batches, evaluations, files
from deployments.privacy import AuditEntry, Content
from serve_app.config import LedgerConfig

logger = logging.getLogger(__name__)


class AttemptRecord(BaseModel):
    """One call to one model within a request (retries and fallbacks each add one)."""

    number: int
    model: str
    status: int = 200
    error_code: str | None = None
    latency_ms: float = 0.0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cost_usd: float = 0.0
    usage_estimated: bool = False


class FeedbackRecord(BaseModel):
    """A user's verdict on one answer (used by experiments and the training dataset builder)."""

    request_id: str
    key_id: str
    rating: int | None = Field(None, ge=1, le=5)
    thumbs: Literal["up", "down"] | None = None
    comment: str | None = None
    created_at: float = Field(default_factory=time.time)


class RequestRecord(BaseModel):
    """One request as the ledger keeps it (no message content)."""

    id: str
    created_at: float = Field(default_factory=time.time)
    tenant: str
    user: str
    key_id: str
    endpoint: str = "chat.completions"
    requested_model: str
    model: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cost_usd: float = 0.0
    latency_ms: float = 0.0
    ttft_ms: float | None = Field(None, description="Time to the first byte of the answer.")
    upstream_ms: float | None = Field(None, description="Time spent in model calls.")
    status: int = 200
    error_code: str | None = None
    stream: bool = False
    cache_status: str | None = Field(None, description="hit, semantic-hit, miss or bypass.")
    saved_usd: float = Field(0.0, description="What a cache hit saved: the original call's price.")
    flags: str | None = Field(None, description="Guard flags, e.g. prompt_injection:pattern:override.")
    template: str | None = Field(None, description="The prompt template used, '<name>@v<version>'.")
    experiment: str | None = Field(None, description="The A/B experiment the request took part in.")
    variant: str | None = Field(None, description="Its variant in that experiment.")
    category: str | None = Field(None, description="The router's category, for model: auto.")
    domain: str | None = Field(None, description="The router's domain, for model: auto.")
    route_reason: str | None = Field(None, description="Which classifier decided, and on what.")
    rag_ms: float | None = Field(None, description="Time spent retrieving, when the request used RAG.")
    rag_chunks: str | None = Field(None, description="The chunks given as sources, 'document#chunk' comma-separated.")
    route: str | None = None
    attempts: int = 0
    fallback: bool = False
    usage_estimated: bool = False
    tags: str | None = Field(None, description="Caller tags (x-raygate-tag), comma-separated.")
    downgraded_from: str | None = Field(None, description="The requested model, when CostGuard downgraded it.")
    mode: str | None = Field(None, description="brief or expand (brief-then-expand answers), else None.")
    attempt_log: list[AttemptRecord] = Field(default_factory=list)
    content: Content | None = Field(None, description="Messages and answer; kept only with the user's consent.")


_COLUMNS = [name for name in RequestRecord.model_fields if name not in ("attempt_log", "content")]
_ATTEMPT_COLUMNS = list(AttemptRecord.model_fields)
_SQL_TYPES = {int: "INTEGER", float: "REAL", bool: "INTEGER"}
_SCHEMA = """
CREATE TABLE IF NOT EXISTS requests (
    id TEXT PRIMARY KEY, created_at REAL NOT NULL, tenant TEXT NOT NULL, user TEXT NOT NULL,
    key_id TEXT NOT NULL, endpoint TEXT NOT NULL, requested_model TEXT NOT NULL, model TEXT,
    prompt_tokens INTEGER NOT NULL, completion_tokens INTEGER NOT NULL, cost_usd REAL NOT NULL,
    latency_ms REAL NOT NULL, status INTEGER NOT NULL, error_code TEXT, stream INTEGER NOT NULL,
    cache_status TEXT, route TEXT
);
CREATE INDEX IF NOT EXISTS requests_tenant_time ON requests (tenant, created_at);
CREATE TABLE IF NOT EXISTS attempts (
    request_id TEXT NOT NULL, number INTEGER NOT NULL, model TEXT NOT NULL, status INTEGER NOT NULL,
    error_code TEXT, latency_ms REAL NOT NULL, prompt_tokens INTEGER NOT NULL, completion_tokens INTEGER NOT NULL,
    cost_usd REAL NOT NULL, usage_estimated INTEGER NOT NULL, PRIMARY KEY (request_id, number)
);
CREATE TABLE IF NOT EXISTS feedback (
    request_id TEXT PRIMARY KEY, key_id TEXT NOT NULL, rating INTEGER, thumbs TEXT, comment TEXT,
    created_at REAL NOT NULL
);
"""


def _migrate(db: sqlite3.Connection) -> None:
    """Add columns that newer RequestRecord fields need to a database made by an older raygate."""
    present = {row[1] for row in db.execute("PRAGMA table_info(requests)")}
    for name in _COLUMNS:
        if name not in present:
            annotation = RequestRecord.model_fields[name].annotation
            sql_type = _SQL_TYPES.get(annotation, "TEXT")  # type: ignore[arg-type]
            default = "" if "None" in str(annotation) else " NOT NULL DEFAULT 0"
            db.execute(f"ALTER TABLE requests ADD COLUMN {name} {sql_type}{default}")


_INSERT_REQUEST = f"INSERT OR REPLACE INTO requests ({', '.join(_COLUMNS)}) VALUES ({', '.join('?' * len(_COLUMNS))})"
_INSERT_ATTEMPT = (
    f"INSERT OR REPLACE INTO attempts (request_id, {', '.join(_ATTEMPT_COLUMNS)}) "
    f"VALUES (?, {', '.join('?' * len(_ATTEMPT_COLUMNS))})"
)


_OPERATIONS = {f"{fn.__module__.rsplit('.', 1)[-1]}.{fn.__name__}": fn for fn in (
    templates.get, templates.versions, templates.names, templates.add_version, templates.activate,
    templates.rollback, templates.diff, experiments.create, experiments.get, experiments.listing,
    experiments.transition, overview.summary, overview.series, conversations.create, conversations.get,
    conversations.append, conversations.save_summary, conversations.delete, memory.get, memory.put, memory.patch)}
_OPERATIONS["experiments.evaluate"] = experiment_stats.evaluate
_OPERATIONS["evaluations.add"], _OPERATIONS["evaluations.listing"] = evaluations.add, evaluations.listing
_OPERATIONS |= {f"{module.__name__.rsplit('.', 1)[-1]}.{name}": getattr(module, name) for module, names in (
    (files, ("create", "get", "content", "listing", "delete")),
    (batches, ("create", "get", "listing", "cancel", "claim", "renew", "pending", "record", "finalize", "release")),
) for name in names}


class Ledger:
    """Single-replica deployment owning the SQLite ledger.

    Args:
        config: ledger settings.
        data_dir: raygate's state dir; the database file lives under it.
    """

    def __init__(self, config: LedgerConfig, data_dir: str) -> None:
        path = Path(data_dir) / config.db_file
        path.parent.mkdir(parents=True, exist_ok=True)
        self.db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=NORMAL")
        self.db.execute("PRAGMA secure_delete=ON")  # erased content is overwritten, not left in free pages
        self.config = config
        self.db.executescript(_SCHEMA + privacy.SCHEMA + templates.SCHEMA + experiments.SCHEMA + conversations.SCHEMA
                              + memory.SCHEMA + evaluations.SCHEMA + files.SCHEMA + batches.SCHEMA)
        _migrate(self.db)
        with self.db:
            self.db.execute("BEGIN")
            seeded = templates.seed(self.db, Path(config.prompts_dir) if config.prompts_dir else templates.SEED_DIR)
        self._lock = asyncio.Lock()
        logger.info("Ledger open at %s (%d prompt templates seeded)", path, seeded)

    async def record(self, rows: list[RequestRecord]) -> int:
        """Insert a batch of rows (a row with a known id replaces the old one).

        Returns:
            The number of rows written.
        """
        values = [tuple(getattr(r, c) for c in _COLUMNS) for r in rows]
        attempts = [(r.id, *(getattr(a, c) for c in _ATTEMPT_COLUMNS)) for r in rows for a in r.attempt_log]
        content = [(r.id, r.tenant, r.user, r.created_at, r.content) for r in rows if r.content is not None]
        async with self._lock:
            await asyncio.to_thread(self._write, values, attempts, content)
        return len(values)

    async def record_feedback(self, feedback: FeedbackRecord) -> bool:
        """Store feedback on a request made by the same key; a second verdict replaces the first.

        Returns:
            False when no request with that id was made by that key (nothing is stored).
        """
        async with self._lock:
            return await asyncio.to_thread(self._write_feedback, feedback)

    async def list_attempts(self, request_id: str) -> list[AttemptRecord]:
        """Return the calls made for one request, in order."""
        sql = f"SELECT {', '.join(_ATTEMPT_COLUMNS)} FROM attempts WHERE request_id = ? ORDER BY number"
        async with self._lock:
            rows = await asyncio.to_thread(self._read, sql, [request_id])
        return [AttemptRecord(**dict(zip(_ATTEMPT_COLUMNS, row))) for row in rows]

    async def list_requests(
        self, *, limit: int = 100, offset: int = 0, tenant: str | None = None
    ) -> list[RequestRecord]:
        """Return requests, newest first, optionally for one tenant."""
        where, params = ("WHERE tenant = ?", [tenant]) if tenant else ("", [])
        sql = f"SELECT {', '.join(_COLUMNS)} FROM requests {where} ORDER BY created_at DESC LIMIT ? OFFSET ?"
        async with self._lock:
            rows = await asyncio.to_thread(self._read, sql, [*params, limit, offset])
        return [RequestRecord(**dict(zip(_COLUMNS, row))) for row in rows]

    async def route_counts(self, from_ts: float, to_ts: float) -> list[tuple[str | None, str | None, int]]:
        """(category, model, requests) of routed requests (``model: auto``) in a time range."""
        sql = ("SELECT category, model, COUNT(*) FROM requests WHERE requested_model = 'auto' AND created_at >= ? "
               "AND created_at < ? GROUP BY category, model ORDER BY 3 DESC")
        async with self._lock:
            rows = await asyncio.to_thread(self._read, sql, [from_ts, to_ts])
        return [(c, m, int(n)) for c, m, n in rows]  # type: ignore[misc]

    async def check_health(self) -> None:
        """Raise if the database cannot be read."""
        async with self._lock:
            await asyncio.to_thread(self._read, "SELECT 1", [])

    def _write(self, requests: list[tuple[object, ...]], attempts: list[tuple[object, ...]],
               content: list[tuple[str, str, str, float, Content]]) -> None:
        with self.db:
            self.db.execute("BEGIN")
            self.db.executemany(_INSERT_REQUEST, requests)
            self.db.executemany(_INSERT_ATTEMPT, attempts)
            privacy.store_content(self.db, content, self.config.default_consent)

    async def set_consent(self, tenant: str, user: str, consent: bool, actor: str) -> None:
        """Record whether the ledger may keep a user's message content from now on (audited)."""
        await self._privacy(lambda: privacy.set_consent(self.db, tenant, user, consent), "consent", tenant, user,
                            actor, {"consent": consent})

    async def export_user(self, tenant: str | None, user: str, actor: str) -> dict[str, object]:
        """All the ledger holds about a user, as JSON (audited)."""
        export = await self._privacy(lambda: privacy.export_user(self.db, tenant, user, _COLUMNS), "export", tenant,
                                     user, actor, {})
        return export  # type: ignore[no-any-return]

    async def erase_user(self, tenant: str | None, user: str, actor: str,
                         elsewhere: dict[str, int] | None = None) -> dict[str, int]:
        """Erase a user's content, keep their usage under a pseudonym (audited with the counts, and what
        was erased in other stores)."""
        async with self._lock:
            return await asyncio.to_thread(self._erase, tenant, user, actor, elsewhere or {})

    async def store(self, operation: str, *args: object) -> object:
        """Run one ``_OPERATIONS`` entry (``"<module>.<function>"``: templates, experiments, overview,
        conversations, memory, evaluations, files, batches) over the database, in one transaction."""
        work = _OPERATIONS[operation]

        def run() -> object:
            with self.db:
                self.db.execute("BEGIN")
                return work(self.db, *args)

        async with self._lock:
            return await asyncio.to_thread(run)

    async def audit_log(self, limit: int = 100) -> list[AuditEntry]:
        """Consent changes, exports and erasures, newest first."""
        async with self._lock:
            return await asyncio.to_thread(privacy.audit_log, self.db, limit)

    async def _privacy(self, work: Callable[[], object], action: str, tenant: str | None, user: str, actor: str,
                       detail: dict[str, object]) -> object:
        def run() -> object:
            with self.db:
                self.db.execute("BEGIN")
                result = work()
                privacy.audit(self.db, action, tenant, user, actor, detail)
            return result

        async with self._lock:
            return await asyncio.to_thread(run)

    def _erase(self, tenant: str | None, user: str, actor: str, elsewhere: dict[str, int]) -> dict[str, int]:
        with self.db:
            self.db.execute("BEGIN")
            counts = privacy.erase_user(self.db, tenant, user)
            privacy.audit(self.db, "erase", tenant, user, actor, {**counts, **elsewhere})
        self.db.execute("PRAGMA wal_checkpoint(TRUNCATE)")  # the WAL held the old pages
        return counts

    def _write_feedback(self, feedback: FeedbackRecord) -> bool:
        owner = self.db.execute("SELECT key_id FROM requests WHERE id = ?", [feedback.request_id]).fetchone()
        if owner is None or owner[0] != feedback.key_id:
            return False
        columns = list(FeedbackRecord.model_fields)
        with self.db:
            self.db.execute("BEGIN")
            self.db.execute(f"INSERT OR REPLACE INTO feedback ({', '.join(columns)}) VALUES ({', '.join('?' * len(columns))})",
                            [getattr(feedback, c) for c in columns])
        return True

    async def get_feedback(self, request_id: str) -> FeedbackRecord | None:
        """Return the feedback on a request, if any."""
        columns = list(FeedbackRecord.model_fields)
        async with self._lock:
            rows = await asyncio.to_thread(
                self._read, f"SELECT {', '.join(columns)} FROM feedback WHERE request_id = ?", [request_id])
        return FeedbackRecord(**dict(zip(columns, rows[0]))) if rows else None

    def _read(self, sql: str, params: list[object]) -> list[tuple[object, ...]]:
        return self.db.execute(sql, params).fetchall()

    async def cost_report(
        self, group_by: reports.GroupBy, from_ts: float, to_ts: float, tenant: str | None = None
    ) -> list[reports.CostRow]:
        """Requests, tokens, spend and errors per model, tenant, user, tag or UTC day (``reports.cost_report``)."""
        async with self._lock:
            return await asyncio.to_thread(reports.cost_report, self.db, group_by, from_ts, to_ts, tenant)

    async def daily_spend(
        self, days: int, now: float | None = None, tenant: str | None = None
    ) -> list[reports.DailySpend]:
        """Spend per UTC day over the last ``days`` days, today included (``reports.daily_spend``)."""
        now = time.time() if now is None else now
        async with self._lock:
            return await asyncio.to_thread(reports.daily_spend, self.db, days, now, tenant)

    async def spend_forecast(
        self, period_end: float, *, now: float | None = None, spent_usd: float | None = None,
        window_days: int = 14, tenant: str | None = None,
    ) -> reports.Forecast:
        """Spend expected until ``period_end`` from the recent daily trend (``reports.forecast``).

        Runs here rather than in the Gateway so that numpy and scipy load in the Ledger's
        process only.
        """
        now = time.time() if now is None else now
        series = await self.daily_spend(window_days + 1, now, tenant)
        return await asyncio.to_thread(
            reports.forecast, series, period_end, now, spent_usd=spent_usd, window_days=window_days
        )

    async def recommendations(
        self, from_ts: float, to_ts: float, prices: dict[str, tuple[float, float]],
        cheap_model: str | None = None, tenant: str | None = None,
    ) -> list[reports.Recommendation]:
        """Findings about avoidable spend, from the ledger's rows (``reports.recommendations``)."""
        async with self._lock:
            return await asyncio.to_thread(
                reports.recommendations, self.db, from_ts, to_ts, prices, cheap_model, tenant=tenant
            )
