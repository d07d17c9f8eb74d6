"""Cost reports, forecasts and recommendations over a synthetic ledger (``deployments.reports``).

The ledger is a real ``Ledger`` on a temporary SQLite file, filled through ``record``;
every expected figure is recomputed here from the inserted rows.
"""

from __future__ import annotations

import csv
import io
import random
from collections import defaultdict
from datetime import date, datetime, timedelta, timezone
from pathlib import Path

import pytest
from ray import serve
from scipy import stats

import deployments.reports
from deployments.ledger import Ledger, RequestRecord
from deployments.reports import DailySpend, GroupBy, cost_report, forecast, to_csv
from serve_app.config import LedgerConfig

DAY_S = 86_400
START = datetime(2025, 3, 1, tzinfo=timezone.utc).timestamp()
PRICES = {"big": (10.0, 30.0), "mid": (2.0, 6.0), "mini": (0.5, 1.5)}  # USD per 1M tokens


def rec(i: int, ts: float, *, tenant: str = "acme", user: str = "ann", model: str | None = "big", prompt: int = 0,
        completion: int = 0, status: int = 200, tags: str | None = None, route: str | None = None,
        fallback: bool = False) -> RequestRecord:
    price_in, price_out = PRICES.get(model or "", (0.0, 0.0))
    return RequestRecord(
        id=f"r{i}", created_at=ts, tenant=tenant, user=user, key_id="k", requested_model=model or "big", model=model,
        prompt_tokens=prompt, completion_tokens=completion, cost_usd=(prompt * price_in + completion * price_out) / 1e6,
        status=status, tags=tags, route=route, fallback=fallback,
    )


def synthetic_rows(n: int = 120) -> list[RequestRecord]:
    rng = random.Random(7)
    return [
        rec(i, START + rng.uniform(0, 10 * DAY_S), tenant=rng.choice(["acme", "globex"]),
            user=rng.choice(["ann", "bob", "cy"]), model=rng.choice(["big", "mid", "mini", None]),
            prompt=rng.randint(0, 5000), completion=rng.randint(0, 2000), status=rng.choice([200, 200, 200, 429, 503]),
            tags=rng.choice([None, "", "web", "web,mobile", "mobile, batch", "batch,batch"]))
        for i in range(n)
    ]


def expected(rows: list[RequestRecord], group_by: GroupBy) -> dict[tuple[str | None, str], tuple[float, ...]]:
    sums: dict[tuple[str | None, str], list[float]] = defaultdict(lambda: [0, 0, 0, 0.0, 0])
    for r in rows:
        if group_by == "tag":
            keys = sorted({t.strip() for t in (r.tags or "").split(",")} - {""}) or ["(none)"]
        elif group_by == "day":
            keys = [datetime.fromtimestamp(r.created_at, timezone.utc).date().isoformat()]
        else:
            keys = [{"model": r.model or "(none)", "tenant": r.tenant, "user": r.user}[group_by]]
        for key in keys:
            s = sums[(r.tenant if group_by == "user" else None, key)]
            for j, v in enumerate([1, r.prompt_tokens, r.completion_tokens, r.cost_usd, int(r.status >= 400)]):
                s[j] += v
    return {k: tuple(v) for k, v in sums.items()}


@pytest.fixture
async def ledger(tmp_path: Path) -> Ledger:
    return Ledger(LedgerConfig(), str(tmp_path))


def test_exported_members() -> None:
    assert sorted(deployments.reports.__all__) == [
        "CostRow", "DailySpend", "Forecast", "GroupBy", "Recommendation", "cost_report", "daily_spend", "forecast",
        "recommendations", "to_csv",
    ]


# -- cost reports ------------------------------------------------------------------------------


@pytest.mark.parametrize("group_by", ["model", "tenant", "user", "tag", "day"])
@pytest.mark.parametrize("window_days", [(0, 10), (2, 5)])
async def test_json_and_csv_sums_match_the_rows(ledger: Ledger, group_by: GroupBy, window_days: tuple[int, int]) -> None:
    rows = synthetic_rows()
    await ledger.record(rows)
    from_ts, to_ts = START + window_days[0] * DAY_S, START + window_days[1] * DAY_S
    want = expected([r for r in rows if from_ts <= r.created_at < to_ts], group_by)

    report = await ledger.cost_report(group_by, from_ts, to_ts)
    got = {(r.tenant, r.key): (r.requests, r.prompt_tokens, r.completion_tokens, r.cost_usd, r.errors) for r in report}
    assert got.keys() == want.keys()
    for key, sums in want.items():
        assert got[key] == pytest.approx(sums, rel=1e-9)

    parsed = list(csv.DictReader(io.StringIO(to_csv(report))))
    assert list(parsed[0]) == ["key", "tenant", "requests", "prompt_tokens", "completion_tokens", "cost_usd", "errors"]
    from_csv = {
        (r["tenant"] or None, r["key"]): (int(r["requests"]), int(r["prompt_tokens"]), int(r["completion_tokens"]),
                                          float(r["cost_usd"]), int(r["errors"]))
        for r in parsed
    }
    assert from_csv == got
    if group_by == "day":
        assert [r.key for r in report] == sorted(r.key for r in report)
    else:
        assert [r.cost_usd for r in report] == sorted((r.cost_usd for r in report), reverse=True)


async def test_tag_groups_count_a_request_in_each_of_its_tags(ledger: Ledger) -> None:
    await ledger.record([rec(1, START, prompt=100, tags="a,b"), rec(2, START, prompt=10, tags=None),
                         rec(3, START, prompt=1, tags=" b ,, b")])
    report = {r.key: r.prompt_tokens for r in await ledger.cost_report("tag", START, START + DAY_S)}
    assert report == {"a": 100, "b": 101, "(none)": 10}


async def test_tenant_filter_and_user_grouping(ledger: Ledger) -> None:
    await ledger.record([rec(1, START, tenant="acme", user="ann", prompt=5), rec(2, START, tenant="globex", user="ann",
                         prompt=7), rec(3, START + DAY_S, tenant="acme", prompt=9)])
    users = await ledger.cost_report("user", START, START + DAY_S)
    assert {(r.tenant, r.key): r.prompt_tokens for r in users} == {("acme", "ann"): 5, ("globex", "ann"): 7}
    only = await ledger.cost_report("tenant", START, START + 2 * DAY_S, tenant="acme")
    assert [(r.key, r.requests, r.prompt_tokens) for r in only] == [("acme", 2, 14)]


async def test_reports_through_a_handle(tmp_path: Path) -> None:
    handle = serve.run(serve.deployment(Ledger).bind(LedgerConfig(), str(tmp_path)), _local_testing_mode=True)
    await handle.record.remote([rec(1, START, prompt=1000, route="simple"), rec(2, START + DAY_S, prompt=2000)])
    report = await handle.cost_report.remote("day", START, START + 2 * DAY_S)
    assert [(r.key, r.cost_usd) for r in report] == [("2025-03-01", 0.01), ("2025-03-02", 0.02)]
    forecast_ = await handle.spend_forecast.remote(START + 3 * DAY_S, now=START + 2 * DAY_S)
    assert forecast_.method == "linear trend over the last 2 days" and forecast_.remaining_usd == pytest.approx(0.03)
    route, _ = await handle.recommendations.remote(START, START + 2 * DAY_S, PRICES)
    assert route.requests == 1 and route.estimated_saving_usd == pytest.approx(0.01 - 0.0005)


def test_csv_neutralises_formulas() -> None:
    row = deployments.reports.CostRow(key="=HYPERLINK(1)", requests=1, prompt_tokens=0, completion_tokens=0,
                                      cost_usd=0.0, errors=0)
    assert list(csv.DictReader(io.StringIO(to_csv([row]))))[0]["key"] == "'=HYPERLINK(1)"


def test_unknown_group_by_is_refused(tmp_path: Path) -> None:
    ledger = Ledger(LedgerConfig(), str(tmp_path))
    with pytest.raises(ValueError, match="group_by"):
        cost_report(ledger.db, "week", 0, 1)  # type: ignore[arg-type]


# -- daily spend and forecasts -----------------------------------------------------------------


def series(values: list[float], first: date = date(2025, 3, 1), today: float | None = None) -> list[DailySpend]:
    days = [DailySpend(day=first + timedelta(days=i), cost_usd=v, requests=1, complete=True) for i, v in enumerate(values)]
    if today is not None:
        days.append(DailySpend(day=first + timedelta(days=len(values)), cost_usd=today, requests=1, complete=False))
    return days


def day_ts(first: date, offset_days: float) -> float:
    return datetime(first.year, first.month, first.day, tzinfo=timezone.utc).timestamp() + offset_days * DAY_S


def test_forecast_recovers_a_noise_free_trend() -> None:
    first = date(2025, 3, 1)
    # Day k (k = 0..13) spends 10 + 2k: at its midday (k + 0.5) the line is 10 + 2 * (t - 0.5).
    s = series([10 + 2 * k for k in range(14)], first, today=3.0)
    now, end = day_ts(first, 14.25), day_ts(first, 17)
    f = forecast(s, end, now, spent_usd=100.0)

    def integral(t: float) -> float:
        return 10 * t + (t - 0.5) ** 2

    assert f.method == "linear trend over the last 14 days" and f.points == 14
    assert f.trend_usd_per_day == pytest.approx(2.0)
    assert f.daily_spend_usd == pytest.approx(10 + 2 * (14.25 - 0.5))
    assert f.remaining_usd == pytest.approx(integral(17) - integral(14.25))
    assert f.projected_usd == pytest.approx(100.0 + integral(17) - integral(14.25))
    assert f.remaining_stderr_usd == pytest.approx(0.0, abs=1e-9)
    assert f.trend_stderr_usd_per_day == pytest.approx(0.0, abs=1e-9)
    assert f.projected_interval_usd == pytest.approx((f.projected_usd, f.projected_usd), abs=1e-6)
    assert f.period_end == datetime(2025, 3, 18, tzinfo=timezone.utc)


def test_forecast_on_noisy_data_matches_least_squares() -> None:
    rng = random.Random(3)
    values = [50 + 1.5 * k + rng.gauss(0, 4) for k in range(40)]
    first = date(2025, 1, 1)
    f = forecast(series(values, first), day_ts(first, 40), day_ts(first, 40), window_days=30)
    fit = stats.linregress([k + 0.5 for k in range(10, 40)], values[10:])
    assert f.method == "linear trend over the last 30 days" and f.points == 30
    assert f.trend_usd_per_day is not None and f.trend_usd_per_day == pytest.approx(fit.slope)
    assert f.trend_stderr_usd_per_day == pytest.approx(fit.stderr)
    assert abs(f.trend_usd_per_day - 1.5) < 3 * fit.stderr  # the true slope is recovered
    assert f.remaining_usd == 0.0 and f.remaining_stderr_usd == 0.0  # the period already ended


def test_forecast_interval_widens_with_noise() -> None:
    rng = random.Random(5)
    first = date(2025, 1, 1)
    values = [20 + rng.gauss(0, 3) for _ in range(14)]
    f = forecast(series(values, first), day_ts(first, 21), day_ts(first, 14), confidence=0.9)
    assert f.remaining_stderr_usd is not None and f.remaining_stderr_usd > 0
    assert f.remaining_interval_usd is not None and f.projected_interval_usd is None  # no spent_usd given
    low, high = f.remaining_interval_usd
    assert f.remaining_usd is not None and low < f.remaining_usd < high
    assert high - f.remaining_usd == pytest.approx(stats.t.ppf(0.95, 12) * f.remaining_stderr_usd)


@pytest.mark.parametrize(("values", "remaining"), [([], None), ([8.0], 8.0 * 2.5)])
def test_forecast_with_too_little_data_is_flat(values: list[float], remaining: float | None) -> None:
    first = date(2025, 3, 1)
    f = forecast(series(values, first, today=1.0), day_ts(first, len(values) + 3), day_ts(first, len(values) + 0.5),
                 spent_usd=4.0)
    assert f.method == "flat: too little data" and f.points == len(values)
    assert f.remaining_usd == remaining
    assert f.projected_usd == (None if remaining is None else 4.0 + remaining)
    assert f.remaining_stderr_usd is None and f.projected_interval_usd is None


def test_forecast_on_two_days_has_a_trend_but_no_error() -> None:
    # 1 at midday of day 0, 3 at midday of day 1: the line is 1 + 2 * (t - 0.5); day 2 should spend 5.
    f = forecast(series([1.0, 3.0]), day_ts(date(2025, 3, 1), 3), day_ts(date(2025, 3, 1), 2))
    assert f.method == "linear trend over the last 2 days"
    assert f.trend_usd_per_day == pytest.approx(2.0) and f.remaining_usd == pytest.approx(5.0)
    assert f.remaining_stderr_usd is None and f.remaining_interval_usd is None


async def test_daily_spend_fills_gaps_from_the_first_request(ledger: Ledger) -> None:
    await ledger.record([rec(1, START + 3 * DAY_S + 60, prompt=1000), rec(2, START + 5 * DAY_S, prompt=3000),
                         rec(3, START + 5 * DAY_S + 10, prompt=1000), rec(4, START + 6 * DAY_S + 7200, prompt=500)])
    now = START + 6 * DAY_S + 3600
    got = await ledger.daily_spend(30, now)
    assert [(d.day.day, d.requests, d.complete) for d in got] == [(4, 1, True), (5, 0, True), (6, 2, True),
                                                                  (7, 0, False)]
    assert [d.cost_usd for d in got] == pytest.approx([0.01, 0.0, 0.04, 0.0])
    assert [d.day.day for d in await ledger.daily_spend(2, now)] == [6, 7]
    assert await ledger.daily_spend(5, START) == []


async def test_ledger_forecast_from_recorded_rows(ledger: Ledger) -> None:
    # Day k spends (k + 1) * 0.01 USD: k + 1 requests of 1,000 prompt tokens on big.
    rows = [rec(100 * k + j, START + k * DAY_S + 3600 * (j + 1), prompt=1000) for k in range(10) for j in range(k + 1)]
    await ledger.record(rows)
    f = await ledger.spend_forecast(START + 12 * DAY_S, now=START + 10 * DAY_S, spent_usd=0.5, window_days=7)
    assert f.method == "linear trend over the last 7 days" and f.points == 7
    assert f.trend_usd_per_day == pytest.approx(0.01)
    assert f.remaining_usd == pytest.approx(0.11 + 0.12)
    assert f.projected_usd == pytest.approx(0.5 + 0.23)


# -- recommendations ---------------------------------------------------------------------------


def crafted_rows() -> list[RequestRecord]:
    t = START + 3600
    return [
        *(rec(i, t, model="big", prompt=1000, completion=500, route="simple/qa") for i in range(3)),  # 0.025 each
        rec(3, t, model="mini", prompt=1000, completion=500, route="simple"),  # 0.00125
        *(rec(i, t, model="big", prompt=2000, completion=1000, route="complex/code") for i in (4, 5)),  # 0.05 each
        rec(6, t, model="mid", prompt=1000, completion=1000),  # unclassified, 0.008
        rec(7, t, model="mid", prompt=1000, completion=1000, route="", fallback=True),  # unclassified, 0.008
        rec(8, START - 10, model="big", prompt=10**6, route="simple"),  # outside the range
    ]


async def test_recommendations_on_a_crafted_ledger(ledger: Ledger) -> None:
    await ledger.record(crafted_rows())
    route, fallbacks = await ledger.recommendations(START, START + DAY_S, PRICES)
    total = 0.075 + 0.00125 + 0.1 + 0.016
    assert route.id == "route_simple_requests"
    assert route.requests == 3 and route.cost_usd == pytest.approx(0.075)
    assert route.share_of_spend == pytest.approx(0.075 / total)
    repriced = (3000 * 0.5 + 1500 * 1.5) / 1e6
    assert route.estimated_saving_usd == pytest.approx(0.075 - repriced)
    assert route.data["expensive_model"] == "big" and route.data["cheap_model"] == "mini"
    assert route.data["unclassified_requests"] == 2 and route.data["unclassified_cost_usd"] == pytest.approx(0.016)
    assert route.data["share_of_simple_spend"] == pytest.approx(0.075 / 0.07625)
    assert "2 requests ($0.0160) have no router category" in route.message
    assert f"would have cost $0.0037, an estimated saving of ${route.estimated_saving_usd:.4f}." in route.message

    assert fallbacks.id == "fallbacks"
    assert fallbacks.requests == 1 and fallbacks.cost_usd == pytest.approx(0.008)
    assert fallbacks.share_of_spend == pytest.approx(0.008 / total)
    assert fallbacks.data["request_share"] == pytest.approx(1 / 8)
    assert fallbacks.estimated_saving_usd is None


async def test_recommendations_with_an_explicit_cheap_model(ledger: Ledger) -> None:
    await ledger.record(crafted_rows())
    route, _ = await ledger.recommendations(START, START + DAY_S, PRICES, cheap_model="mid")
    assert route.estimated_saving_usd == pytest.approx(0.075 - (3000 * 2 + 1500 * 6) / 1e6)


@pytest.mark.parametrize(
    ("rows", "prices", "cheap", "says"),
    [
        ([], PRICES, None, "No requests were recorded"),
        ([rec(1, START, route=None)], PRICES, None, "No request in this range has a router category"),
        ([rec(1, START, route="simple")], {}, None, "No model prices are configured"),
        ([rec(1, START, route="simple")], PRICES, "tiny", "tiny has no configured price"),
        ([rec(1, START, route="simple")], {"big": (1.0, 1.0)}, None, "not cheaper"),
    ],
)
async def test_recommendations_never_invent_numbers(
    ledger: Ledger, rows: list[RequestRecord], prices: dict[str, tuple[float, float]], cheap: str | None, says: str
) -> None:
    await ledger.record(rows)
    route, fallbacks = await ledger.recommendations(START, START + DAY_S, prices, cheap_model=cheap)
    assert says in route.message
    assert route.estimated_saving_usd is None and route.share_of_spend is None
    if not rows:
        assert fallbacks.share_of_spend is None and says in fallbacks.message
