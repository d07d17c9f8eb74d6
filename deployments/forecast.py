"""Spend forecast: a linear trend over recent complete days, projected to the end of a budget period.

A pure function of a daily series, so the Ledger runs it where the data is and the
Gateway never loads numpy/scipy.
"""

from __future__ import annotations

import math
from datetime import date, datetime, timezone

from pydantic import BaseModel, Field

DAY_S = 86_400
_EPOCH = date(1970, 1, 1)


class DailySpend(BaseModel):
    """Spend of one UTC day."""

    day: date
    cost_usd: float
    requests: int
    complete: bool = Field(description="False for the day that contains `now`: its spend is still growing.")


class Forecast(BaseModel):
    """Spend expected between now and the end of a period, and how sure the estimate is."""

    method: str = Field(description="How the estimate was made, e.g. 'linear trend over the last 14 days'.")
    points: int = Field(description="Complete days the estimate rests on.")
    period_end: datetime
    confidence: float = Field(description="Coverage of the intervals.")
    daily_spend_usd: float | None = Field(None, description="Spend per day the trend gives for now (never below 0).")
    trend_usd_per_day: float | None = Field(None, description="Fitted change of the daily spend per day (slope).")
    trend_stderr_usd_per_day: float | None = Field(None, description="Standard error of the slope.")
    remaining_usd: float | None = Field(None, description="Spend expected from now to period_end.")
    remaining_stderr_usd: float | None = Field(
        None, description="Standard error of remaining_usd: the trend's uncertainty plus day-to-day scatter."
    )
    remaining_interval_usd: tuple[float, float] | None = Field(
        None, description="Interval around remaining_usd (Student t on the fit's residuals)."
    )
    spent_usd: float | None = Field(None, description="Spend already counted in the period, as the caller gave it.")
    projected_usd: float | None = Field(None, description="spent_usd + remaining_usd: the period's expected total.")
    projected_interval_usd: tuple[float, float] | None = Field(None, description="spent_usd + the remaining interval.")


def forecast(
    series: list[DailySpend],
    period_end: float,
    now: float,
    *,
    spent_usd: float | None = None,
    window_days: int = 14,
    confidence: float = 0.9,
) -> Forecast:
    """Project spend from now to the end of a period from the trend of recent daily spend.

    A least-squares line is fitted to the last ``window_days`` complete days (each at
    its midday; today, still running, is left out) and integrated from ``now`` to
    ``period_end``. Its standard error adds the uncertainty of the line at those
    dates to the day-to-day scatter of the residuals, one draw per remaining day. With
    fewer than two complete days there is no trend: the one day's spend is carried
    flat (method "flat: too little data"), and with none, nothing is projected.

    Args:
        series: daily spend, oldest first (``daily_spend``).
        period_end: end of the period, epoch seconds (a budget's ``resets_at``).
        now: the present, epoch seconds.
        spent_usd: spend already counted in the period (a budget's ``used_usd``); it makes
            ``projected_usd`` the period's expected total.
        window_days: how many complete days the trend is fitted on.
        confidence: coverage of the intervals.
    """
    points = [p for p in series if p.complete][-window_days:]
    n = len(points)
    t_now, t_end = now / DAY_S, max(period_end, now) / DAY_S
    span_days = t_end - t_now
    result = Forecast(method="flat: too little data", points=n, confidence=confidence, spent_usd=spent_usd,
                      period_end=datetime.fromtimestamp(period_end, timezone.utc))
    if n < 2:
        if points:
            result.daily_spend_usd = points[0].cost_usd
            result.remaining_usd = points[0].cost_usd * span_days
            result.projected_usd = _plus(spent_usd, result.remaining_usd)
        return result
    import numpy as np

    x = np.array([(p.day - _EPOCH).days + 0.5 for p in points])
    y = np.array([p.cost_usd for p in points])
    x_mean, y_mean = float(x.mean()), float(y.mean())
    sxx = float(((x - x_mean) ** 2).sum())
    slope = float(((x - x_mean) * (y - y_mean)).sum()) / sxx
    intercept = y_mean - slope * x_mean
    # A line's integral over [now, end] is the span times the line's value at the span's midpoint.
    mid = (t_now + t_end) / 2
    remaining = max(0.0, span_days * (intercept + slope * mid))
    result.method = f"linear trend over the last {n} days"
    result.daily_spend_usd = max(0.0, intercept + slope * t_now)
    result.trend_usd_per_day, result.remaining_usd = slope, remaining
    result.projected_usd = _plus(spent_usd, remaining)
    dof = n - 2
    if dof == 0:  # two points: the line fits exactly and says nothing about its own error
        return result
    from scipy import stats

    scatter = math.sqrt(float(((y - (intercept + slope * x)) ** 2).sum()) / dof)
    mean_se = scatter * math.sqrt(1 / n + (mid - x_mean) ** 2 / sxx)
    stderr = math.sqrt((span_days * mean_se) ** 2 + span_days * scatter**2)
    half = float(stats.t.ppf((1 + confidence) / 2, dof)) * stderr
    result.trend_stderr_usd_per_day = scatter / math.sqrt(sxx)
    result.remaining_stderr_usd = stderr
    result.remaining_interval_usd = (max(0.0, remaining - half), remaining + half)
    if spent_usd is not None:
        result.projected_interval_usd = (spent_usd + max(0.0, remaining - half), spent_usd + remaining + half)
    return result


def _plus(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None else a + b
