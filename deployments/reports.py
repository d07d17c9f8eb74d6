"""Cost reports, spend forecasts and saving recommendations, computed from the ledger's rows.

Pure functions over a ``sqlite3.Connection`` to the ledger database, so that the
single-replica Ledger deployment can run them in a worker thread
(``asyncio.to_thread``) under its lock. Their answers are pydantic models: they cross
Serve handles and render as JSON unchanged.

Every figure comes from ledger rows. Where the rows cannot support a figure (no
requests, no router category, no price), the figure is ``None`` and the message says
why: a report that guesses is worse than one that admits a gap. Days are UTC dates;
time ranges are half-open, ``from_ts <= created_at < to_ts``, in epoch seconds.
"""

from __future__ import annotations

import csv
import io
import sqlite3
from datetime import date, datetime, timedelta, timezone
from typing import Literal

from pydantic import BaseModel, Field

from deployments.forecast import DailySpend, Forecast, forecast

__all__ = [
    "CostRow", "DailySpend", "Forecast", "GroupBy", "Recommendation", "cost_report", "daily_spend", "forecast",
    "recommendations", "to_csv",
]

GroupBy = Literal["model", "tenant", "user", "tag", "day"]
NONE_KEY = "(none)"
ERROR_STATUS = 400
_KEY_SQL: dict[str, list[str]] = {
    "model": ["model"],
    "tenant": ["tenant"],
    "user": ["tenant", "user"],  # user ids are only unique within a tenant
    "tag": ["tags"],
    "day": ["date(created_at, 'unixepoch')"],  # SQLite's date() of an epoch is the UTC date
}
_SUMS_SQL = (
    "COUNT(*), COALESCE(SUM(prompt_tokens), 0), COALESCE(SUM(completion_tokens), 0), "
    f"COALESCE(SUM(cost_usd), 0.0), COALESCE(SUM(status >= {ERROR_STATUS}), 0)"
)
_CSV_FORMULA_START = ("=", "+", "-", "@", "\t", "\r")


class CostRow(BaseModel):
    """Usage and spend of one group of requests."""

    key: str = Field(description="The group: a model, tenant, user, tag or UTC date (YYYY-MM-DD); '(none)' if unset.")
    tenant: str | None = Field(None, description="The user's tenant, when grouping by user.")
    requests: int
    prompt_tokens: int
    completion_tokens: int
    cost_usd: float
    errors: int = Field(description="Requests answered with a status of 400 or more.")


class Recommendation(BaseModel):
    """A finding about where money goes, with the figures behind it."""

    id: str = Field(description="Stable name of the finding, e.g. 'route_simple_requests', 'fallbacks'.")
    message: str = Field(description="The finding in one or two sentences, for people.")
    requests: int = Field(description="Requests the finding is about.")
    cost_usd: float = Field(description="What they cost.")
    share_of_spend: float | None = Field(description="cost_usd over all spend in the range; None without spend.")
    estimated_saving_usd: float | None = Field(description="None when the data cannot support an estimate.")
    data: dict[str, float | int | str | None] = Field(default_factory=dict, description="The inputs, by name.")


def _where(from_ts: float, to_ts: float, tenant: str | None) -> tuple[str, list[object]]:
    sql = "created_at >= ? AND created_at < ?"
    params: list[object] = [from_ts, to_ts]
    if tenant is not None:
        sql, params = sql + " AND tenant = ?", [*params, tenant]
    return sql, params


def cost_report(
    db: sqlite3.Connection, group_by: GroupBy, from_ts: float, to_ts: float, tenant: str | None = None
) -> list[CostRow]:
    """Sum requests, tokens, spend and errors per group over a time range.

    Grouping by ``tag`` splits each request's comma-separated tags, so a request with
    two tags counts in both groups (the groups then add up to more than the total) and
    an untagged one counts under '(none)'. Grouping by ``model`` uses the model that
    answered ('(none)' when none did); by ``user``, the (tenant, user) pair; by ``day``,
    the UTC date.

    Args:
        db: connection to the ledger database.
        group_by: the grouping.
        from_ts: start of the range (inclusive), epoch seconds.
        to_ts: end of the range (exclusive), epoch seconds.
        tenant: only this tenant's requests; None for all.

    Returns:
        One row per group: days in date order, other groups by spend, largest first.
    """
    if group_by not in _KEY_SQL:
        raise ValueError(f"unknown group_by {group_by!r}")
    keys = _KEY_SQL[group_by]
    where, params = _where(from_ts, to_ts, tenant)
    sql = f"SELECT {', '.join(keys)}, {_SUMS_SQL} FROM requests WHERE {where} GROUP BY {', '.join(keys)}"
    groups: dict[tuple[str | None, str], list[float]] = {}
    for row in db.execute(sql, params):
        sums = list(row[len(keys):])
        owner = row[0] if group_by == "user" else None
        for key in _split_key(group_by, row[len(keys) - 1]):
            total = groups.setdefault((owner, key), [0, 0, 0, 0.0, 0])
            for i, value in enumerate(sums):
                total[i] += value
    rows = [
        CostRow(key=key, tenant=owner, requests=int(s[0]), prompt_tokens=int(s[1]), completion_tokens=int(s[2]),
                cost_usd=float(s[3]), errors=int(s[4]))
        for (owner, key), s in groups.items()
    ]
    if group_by == "day":
        return sorted(rows, key=lambda r: r.key)
    return sorted(rows, key=lambda r: (-r.cost_usd, r.key, r.tenant or ""))


def _split_key(group_by: GroupBy, value: object) -> list[str]:
    if group_by != "tag":
        return [NONE_KEY if value is None or value == "" else str(value)]
    tags = {t.strip() for t in str(value or "").split(",")} - {""}
    return sorted(tags) or [NONE_KEY]


def to_csv(rows: list[CostRow]) -> str:
    """Render report rows as CSV with a header row (the ``CostRow`` field names).

    Text cells that a spreadsheet would run as a formula (tags come from callers) are
    prefixed with a quote, as OWASP advises against CSV injection.
    """
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=list(CostRow.model_fields))
    writer.writeheader()
    for row in rows:
        cells = row.model_dump()
        for name in ("key", "tenant"):
            if isinstance(cells[name], str) and cells[name].startswith(_CSV_FORMULA_START):
                cells[name] = "'" + cells[name]
        writer.writerow(cells)
    return out.getvalue()


def daily_spend(db: sqlite3.Connection, days: int, now: float, tenant: str | None = None) -> list[DailySpend]:
    """Return the spend of each UTC day up to and including today, oldest first.

    Days without requests count as 0, but only from the day of the first request the
    ledger holds (for the tenant): before it there is no data, not zero spend.

    Args:
        db: connection to the ledger database.
        days: how many days back, today included (today is marked incomplete).
        now: the present, epoch seconds; later rows are ignored.
        tenant: only this tenant's requests; None for all.
    """
    if days < 1:
        raise ValueError("days must be at least 1")
    today = _utc_date(now)
    tenant_sql, tenant_params = ("AND tenant = ?", [tenant]) if tenant is not None else ("", [])
    (first_ts,) = db.execute(
        f"SELECT MIN(created_at) FROM requests WHERE created_at <= ? {tenant_sql}", [now, *tenant_params]
    ).fetchone()
    if first_ts is None:
        return []
    first = max(today - timedelta(days=days - 1), _utc_date(first_ts))
    sql = (
        "SELECT date(created_at, 'unixepoch'), COALESCE(SUM(cost_usd), 0.0), COUNT(*) FROM requests "
        f"WHERE created_at >= ? AND created_at <= ? {tenant_sql} GROUP BY 1"
    )
    found = {d: (c, n) for d, c, n in db.execute(sql, [_day_start(first), now, *tenant_params])}
    series = []
    for i in range((today - first).days + 1):
        day = first + timedelta(days=i)
        cost, count = found.get(day.isoformat(), (0.0, 0))
        series.append(DailySpend(day=day, cost_usd=float(cost), requests=int(count), complete=day < today))
    return series


def recommendations(
    db: sqlite3.Connection,
    from_ts: float,
    to_ts: float,
    prices: dict[str, tuple[float, float]],
    cheap_model: str | None = None,
    *,
    tenant: str | None = None,
    simple_prefix: str = "simple",
) -> list[Recommendation]:
    """Find spend that routing or reliability work could cut, from the ledger alone.

    * ``route_simple_requests``: spend on the most expensive configured model (highest
      input + output price) for requests whose router category (``route``) starts with
      ``simple_prefix``, and the saving had their tokens been priced on ``cheap_model``
      (default: the cheapest configured model). Requests without a route are counted as
      unclassified and reported, never assumed simple.
    * ``fallbacks``: requests that failed over to a fallback model, and their cost.

    Args:
        db: connection to the ledger database.
        from_ts: start of the range (inclusive), epoch seconds.
        to_ts: end of the range (exclusive), epoch seconds.
        prices: model -> (input, output) USD per 1M tokens.
        cheap_model: the model simple requests should go to; None picks the cheapest.
        tenant: only this tenant's requests; None for all.
        simple_prefix: router categories counted as simple start with this.
    """
    where, params = _where(from_ts, to_ts, tenant)
    count, cost = db.execute(f"SELECT COUNT(*), COALESCE(SUM(cost_usd), 0.0) FROM requests WHERE {where}",
                             params).fetchone()
    if not count:
        empty = "No requests were recorded in this range, so there is nothing to estimate."
        return [
            Recommendation(id=i, message=empty, requests=0, cost_usd=0.0, share_of_spend=None,
                           estimated_saving_usd=None)
            for i in ("route_simple_requests", "fallbacks")
        ]
    total = (int(count), float(cost))
    return [_route_simple(db, where, params, total, prices, cheap_model, simple_prefix),
            _fallbacks(db, where, params, total)]


def _route_simple(
    db: sqlite3.Connection, where: str, params: list[object], total: tuple[int, float],
    prices: dict[str, tuple[float, float]], cheap_model: str | None, prefix: str,
) -> Recommendation:
    def sums(condition: str, extra: list[object]) -> tuple[int, int, int, float]:
        sql = (f"SELECT COUNT(*), COALESCE(SUM(prompt_tokens), 0), COALESCE(SUM(completion_tokens), 0), "
               f"COALESCE(SUM(cost_usd), 0.0) FROM requests WHERE {where} AND {condition}")
        n, p, c, usd = db.execute(sql, [*params, *extra]).fetchone()
        return int(n), int(p), int(c), float(usd)

    unclassified, _, _, unclassified_usd = sums("(route IS NULL OR route = '')", [])
    simple, _, _, simple_usd = sums("substr(route, 1, ?) = ?", [len(prefix), prefix])
    data: dict[str, float | int | str | None] = {
        "total_requests": total[0], "total_cost_usd": total[1], "simple_requests": simple,
        "simple_cost_usd": simple_usd, "unclassified_requests": unclassified, "unclassified_cost_usd": unclassified_usd,
    }
    note = (f" {unclassified} requests ({_usd(unclassified_usd)}) have no router category; they are counted as "
            "unclassified and left out of this estimate.") if unclassified else ""

    def unknown(message: str) -> Recommendation:
        return Recommendation(id="route_simple_requests", message=message + note, requests=0, cost_usd=0.0,
                              share_of_spend=None, estimated_saving_usd=None, data=data)

    if not prices:
        return unknown("No model prices are configured, so a routing saving cannot be estimated.")
    expensive = max(sorted(prices), key=lambda m: sum(prices[m]))
    cheap = cheap_model or min(sorted(prices), key=lambda m: sum(prices[m]))
    data.update(expensive_model=expensive, cheap_model=cheap)
    if cheap not in prices:
        return unknown(f"The model {cheap} has no configured price, so a routing saving cannot be estimated.")
    if sum(prices[cheap]) >= sum(prices[expensive]):
        return unknown(f"{cheap} is not cheaper than {expensive}, the most expensive model; nothing to estimate.")
    if not simple:
        return unknown(f"No request in this range has a router category starting with '{prefix}', so the "
                       "saving from routing simple requests to a cheaper model cannot be estimated.")
    n, prompt, completion, usd = sums("substr(route, 1, ?) = ? AND model = ?", [len(prefix), prefix, expensive])
    repriced = (prompt * prices[cheap][0] + completion * prices[cheap][1]) / 1_000_000
    share = _share(usd, total[1])
    data.update(repriced_cost_usd=repriced, share_of_simple_spend=_share(usd, simple_usd))
    message = (
        f"{n} of {simple} requests classified '{prefix}' were served by {expensive}, the most expensive model, "
        f"costing {_usd(usd)} ({_pct(share)} of all spend); priced on {cheap} their tokens would have cost "
        f"{_usd(repriced)}, an estimated saving of {_usd(usd - repriced)}."
    )
    return Recommendation(id="route_simple_requests", message=message + note, requests=n, cost_usd=usd,
                          share_of_spend=share, estimated_saving_usd=usd - repriced, data=data)


def _fallbacks(db: sqlite3.Connection, where: str, params: list[object], total: tuple[int, float]) -> Recommendation:
    n, usd = db.execute(f"SELECT COUNT(*), COALESCE(SUM(cost_usd), 0.0) FROM requests WHERE {where} AND fallback = 1",
                        params).fetchone()
    n, usd, share = int(n), float(usd), _share(float(usd), total[1])
    message = (
        f"{n} of {total[0]} requests ({_pct(n / total[0])}) failed over to a fallback model, costing "
        f"{_usd(usd)} ({_pct(share)} of all spend); check the primary models' errors and circuit breakers."
        if n else f"None of the {total[0]} requests failed over to a fallback model."
    )
    return Recommendation(
        id="fallbacks", message=message, requests=n, cost_usd=usd, share_of_spend=share, estimated_saving_usd=None,
        data={"total_requests": total[0], "request_share": n / total[0], "total_cost_usd": total[1]},
    )


def _share(part: float, whole: float) -> float | None:
    return part / whole if whole > 0 else None




def _utc_date(ts: float) -> date:
    return datetime.fromtimestamp(ts, timezone.utc).date()


def _day_start(day: date) -> float:
    return datetime(day.year, day.month, day.day, tzinfo=timezone.utc).timestamp()


def _usd(value: float) -> str:
    return f"${value:,.2f}" if abs(value) >= 1 else f"${value:.4f}"


def _pct(share: float | None) -> str:
    return "an unknown share" if share is None else f"{share:.1%}"
