"""The ledger's side of ``GET /admin/overview``: totals, throughput, latency, errors, cache effect, spend.

Computed from the request rows of a time window (latency percentiles in numpy, the rest
in SQL), so the overview says exactly what the ledger holds.
"""

from __future__ import annotations

import sqlite3
from typing import Any

import numpy as np

_TOP = 10


def _top(db: sqlite3.Connection, column: str, where: str, params: list[Any]) -> list[dict[str, Any]]:
    sql = (f"SELECT {column}, COUNT(*), SUM(cost_usd) FROM requests WHERE {where} GROUP BY {column} "
           f"ORDER BY 3 DESC, 2 DESC LIMIT {_TOP}")
    return [{column: key, "requests": n, "cost_usd": cost or 0.0} for key, n, cost in db.execute(sql, params)]


def summary(db: sqlite3.Connection, from_ts: float, to_ts: float) -> dict[str, Any]:
    """What the ledger holds about the requests made in ``from_ts``..``to_ts``."""
    where, params = "created_at >= ? AND created_at < ?", [from_ts, to_ts]
    requests, errors, prompt, completion, cost, saved = db.execute(
        "SELECT COUNT(*), SUM(status >= 400), SUM(prompt_tokens), SUM(completion_tokens), SUM(cost_usd), "
        f"SUM(saved_usd) FROM requests WHERE {where}", params).fetchone()
    latencies = np.array([v for (v,) in db.execute(f"SELECT latency_ms FROM requests WHERE {where}", params)])
    by_error = [{"status": s, "code": c, "requests": n} for s, c, n in db.execute(
        f"SELECT status, error_code, COUNT(*) FROM requests WHERE {where} AND status >= 400 "
        "GROUP BY status, error_code ORDER BY 3 DESC", params)]
    cache = dict(db.execute(f"SELECT cache_status, COUNT(*) FROM requests WHERE {where} AND cache_status IS NOT NULL "
                            "GROUP BY cache_status", params).fetchall())
    lookups = sum(n for status, n in cache.items() if status != "bypass")
    hits = cache.get("hit", 0) + cache.get("semantic-hit", 0)
    minutes = max((to_ts - from_ts) / 60, 1e-9)
    percentile = (lambda q: float(np.percentile(latencies, q))) if latencies.size else (lambda q: None)
    return {
        "from_ts": from_ts, "to_ts": to_ts, "requests": requests or 0, "errors": errors or 0,
        "error_rate": (errors or 0) / requests if requests else 0.0, "requests_per_minute": (requests or 0) / minutes,
        "prompt_tokens": prompt or 0, "completion_tokens": completion or 0, "cost_usd": cost or 0.0,
        "latency_ms": {"p50": percentile(50), "p95": percentile(95), "p99": percentile(99)},
        "errors_by_type": by_error,
        "cache": {"results": cache, "hit_rate": hits / lookups if lookups else 0.0, "saved_usd": saved or 0.0},
        "cost_by_model": _top(db, "model", where, params), "cost_by_tenant": _top(db, "tenant", where, params),
        "cost_by_user": _top(db, "user", where, params),
    }


def series(db: sqlite3.Connection, from_ts: float, to_ts: float, bucket_s: float) -> dict[str, Any]:
    """The window cut into ``bucket_s`` buckets, each with requests, errors, cost, latency percentiles and
    cache hit rate (the dashboard's charts). Empty buckets are present, with zeros and no latency."""
    count = max(int(np.ceil((to_ts - from_ts) / bucket_s)), 1)
    rows = db.execute("SELECT created_at, latency_ms, status, cost_usd, cache_status FROM requests "
                      "WHERE created_at >= ? AND created_at < ?", [from_ts, to_ts]).fetchall()
    buckets: list[list[tuple[float, int, float, str | None]]] = [[] for _ in range(count)]
    for created, latency, status, cost, cache in rows:
        buckets[min(int((created - from_ts) // bucket_s), count - 1)].append((latency, status, cost, cache))
    points = []
    for i, bucket in enumerate(buckets):
        latencies = np.array([b[0] for b in bucket])
        lookups = [b[3] for b in bucket if b[3] not in (None, "bypass")]
        hits = sum(1 for c in lookups if c in ("hit", "semantic-hit"))
        points.append({
            "t": from_ts + i * bucket_s, "requests": len(bucket), "errors": sum(1 for b in bucket if b[1] >= 400),
            "cost_usd": sum(b[2] for b in bucket),
            **{f"p{q}": float(np.percentile(latencies, q)) if latencies.size else None for q in (50, 95, 99)},
            "cache_hit_rate": hits / len(lookups) if lookups else None,
        })
    return {"from_ts": from_ts, "to_ts": to_ts, "bucket_s": bucket_s, "points": points}
