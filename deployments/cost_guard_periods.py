"""The periods budgets and quotas count in: a day, a week from Monday, a month, in CostGuard's timezone.

Pure date arithmetic, apart from CostGuard so that it stays small; a period's
label (its start date) is part of the counter keys, so a new period starts
from fresh counters without any reset job.
"""

from __future__ import annotations

from datetime import date, datetime, timedelta
from typing import NamedTuple
from zoneinfo import ZoneInfo

from serve_app.cost_config import BudgetPeriod

class Window(NamedTuple):
    """One period: its label (start date, used in keys) and bounds in epoch seconds."""

    label: str
    start: float
    end: float


def period_window(period: BudgetPeriod, now: float, tz: ZoneInfo) -> Window:
    """Return the day, week (from Monday) or month that contains ``now`` in ``tz``."""
    today = datetime.fromtimestamp(now, tz).date()
    if period == "day":
        start, end = today, today + timedelta(days=1)
    elif period == "week":
        start = today - timedelta(days=today.weekday())
        end = start + timedelta(days=7)
    else:
        start = today.replace(day=1)
        end = date(start.year + start.month // 12, start.month % 12 + 1, 1)
    return Window(start.isoformat(), midnight(start, tz).timestamp(), midnight(end, tz).timestamp())


def midnight(day: date, tz: ZoneInfo) -> datetime:
    """Return the start of ``day`` in ``tz`` (a DST change never falls at midnight in the zones we know)."""
    return datetime(day.year, day.month, day.day, tzinfo=tz)
