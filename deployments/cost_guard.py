"""CostGuard: per-user plan quotas and shared budgets, reserved before a model call and settled after.

A request reserves its worst case (prompt estimate + ``max_tokens``, in tokens
and estimated USD) on every counter that applies to it, in one Lua script, so
that concurrent requests on any number of replicas can never together overrun
a limit; after the call, ``settle`` swaps the reservation for the real usage.
The counters live in Redis (layout in ``deployments.cost_guard_lua``), never in
a replica's memory, so the class works embedded in each Gateway replica or as
its own Serve deployment: one async interface, picklable pydantic arguments.

Decisions (``ReserveDecision.outcome``):

* ``allow``: reserved on the requested model.
* ``downgrade``: reserved on the plan's ``downgrade_model`` instead, because the
  requested model is not allowed by the plan, does not fit a quota or budget,
  or a budget it counts against has less than its ``downgrade_below_fraction``
  left (a preference: when the cheaper model does not fit, the requested one
  is kept).
* ``deny``: nothing fits; ``limit`` names the blocking limit and ``resets_at``
  the earliest time a retry can fit (429 ``insufficient_quota``).
* ``forbidden``: the plan does not allow the model and has no downgrade (403),
  kept apart from ``deny`` because waiting will not help.

Expired reservations (a replica died between reserve and settle) are released
inside ``reserve`` (``reclaim_per_reserve`` at a time), and by
``reclaim_expired`` for a periodic sweep, so no timer is needed for
correctness.

Plans and budgets changed through the admin API (``put_budget``,
``delete_budget``, ``put_plan``) are stored in Redis and reach every instance
within ``config_refresh_s`` (``deployments.cost_guard_config_store``).
"""

from __future__ import annotations

import logging
import time
from datetime import date
from typing import Any
from urllib.parse import quote
from zoneinfo import ZoneInfo

import orjson

from deployments.cost_guard_config_store import CostConfigStore
from deployments.cost_guard_lua import COST_GUARD_LUA
from deployments.cost_guard_periods import Window, midnight, period_window
from deployments.cost_guard_reply import Check, decision
from deployments.cost_guard_protocol import (
    NANO_USD, PLAN_QUOTA, BudgetStatus, ReserveDecision, ReserveRequest, SettleResult,
    ThresholdCrossing, UsageReport, budget_status_from_counters, utc,
)
from serve_app.auth import Plan
from serve_app.config_base import base_model_name
from serve_app.cost_config import BudgetConfig, BudgetPeriod, CostGuardConfig, PlanConfig, PlansConfig
from serve_app.pipelining import AutoPipeline
from serve_app.stores import map_redis_errors, redis_client

logger = logging.getLogger(__name__)

__all__ = [
    "BudgetStatus", "CostGuard", "ReserveDecision", "ReserveRequest", "SettleResult", "ThresholdCrossing",
    "UsageReport", "Window", "period_window",
]


def _nano_prices(prices: dict[str, tuple[float, float]]) -> tuple[dict[str, tuple[float, float]], tuple[float, float]]:
    """Prices per token in nano-USD (USD per 1M tokens * 1e9 / 1e6), and the highest of each (unknown models)."""
    nano = {m: (p_in * 1000, p_out * 1000) for m, (p_in, p_out) in prices.items()}
    return nano, (max((p[0] for p in nano.values()), default=0.0), max((p[1] for p in nano.values()), default=0.0))


class CostGuard:
    """Reserves, settles and reports quota and budget usage; embedded or as a Serve deployment.

    Args:
        config: the file's plans, budgets and reservation settings (the admin API overrides
            plans and budgets).
        redis_url: the Redis/Valkey holding the counters and the overrides.
        prices: model name -> (input, output) USD per 1M tokens; its keys are the served models
            that plans and budgets may name. A model missing here is priced at the highest
            known price, so an unpriced name cannot slip past a USD budget.
        key_prefix: namespace of every key (tests use one per test; a ``{hash tag}`` keeps
            all keys in one Redis Cluster slot, which the scripts need).
        pipeline: the embedding Gateway's, shared with its other components; None: one of its own.
    """

    def __init__(
        self,
        config: CostGuardConfig,
        redis_url: str,
        prices: dict[str, tuple[float, float]],
        *,
        key_prefix: str = "raygate:cg",
        pipeline: AutoPipeline | None = None,
    ) -> None:
        self.redis = redis_client(redis_url, config.redis_max_connections)
        self._store = CostConfigStore(self.redis, config, prices, key_prefix=key_prefix)
        self._script = (pipeline or AutoPipeline(self.redis)).register_script(COST_GUARD_LUA)
        self._prices, self._max_price = _nano_prices(prices)
        self._tz = ZoneInfo(config.timezone)
        self._windows: dict[str, Window] = {}
        self._budget_specs: dict[str, tuple[str, BudgetConfig, dict[str, Any]]] = {}
        self._prefix = key_prefix
        self._zset = f"{key_prefix}:reservations"
        self._res_prefix = f"{key_prefix}:res:"

    @property
    def config(self) -> CostGuardConfig:
        """The effective config: the file's, with the plans and budgets changed through the admin API."""
        return self._store.config

    async def reserve(self, request: ReserveRequest, now: float | None = None) -> ReserveDecision:
        """Reserve a request's worst-case usage on every quota and budget it counts against.

        Args:
            request: who calls which model, with the prompt estimate and requested max_tokens.
            now: epoch seconds (tests); default the clock.

        Returns:
            The decision; when ``allowed``, call ``decision.model`` with ``decision.max_tokens``
            and later ``settle`` (or ``release``) with the same request id. Reserving an id
            twice returns the first reservation.

        Raises:
            ServiceUnavailableError: Redis is unreachable.
        """
        now = time.time() if now is None else now
        await self._store.refresh()
        plan = self.config.plans.get(request.plan)
        cap = plan.max_tokens_cap
        max_tokens = request.max_tokens if cap is None else min(request.max_tokens, cap)
        tokens = request.prompt_tokens_estimate + max_tokens
        models = [request.model] if plan.allows(request.model) else []
        if plan.downgrade_model and plan.downgrade_model != request.model:
            models.append(plan.downgrade_model)
        base = {"request_id": request.request_id, "requested_model": request.model, "max_tokens": max_tokens}
        if not models:
            logger.info("Cost guard: request %s asks for model %s outside plan %s", request.request_id,
                        request.model, request.plan)
            return ReserveDecision(outcome="forbidden", reason="model_not_allowed", **base)
        cands, specs, views = [], [], []
        for i, model in enumerate(models):
            nano = self._nano_usd(model, request.prompt_tokens_estimate, max_tokens)
            spec, view = self._counters(request, plan, model, now, with_floor=i == 0 and len(models) > 1)
            cands.append({"m": model, "t": tokens, "u": nano})
            specs.append(orjson.dumps(spec))
            views.append(view)
        head = {
            "rid": request.request_id, "now": now, "exp": now + self.config.reservation_ttl_s,
            "keep": self.config.counter_retention_s, "rp": self._res_prefix,
            "rc": self.config.reclaim_per_reserve, "cands": cands,
        }
        async with map_redis_errors("cost guard reserve"):
            reply = await self._script(
                keys=[self._zset, self._res_prefix + request.request_id],
                args=["reserve", orjson.dumps(head), *specs],
            )
        return decision(reply, request, plan, models, cands, views, base)

    async def settle(self, request_id: str, prompt_tokens: int, completion_tokens: int, model: str) -> SettleResult:
        """Replace a reservation with the real usage, priced for the model that answered.

        The usage counts in the periods (and on the counters) of the reservation, even if a
        period ended in between or another model answered. Settling twice, or after
        ``release``, changes nothing. A reservation reclaimed as expired still records
        the usage (its reserved part was already released).

        Args:
            request_id: the id given to ``reserve``.
            prompt_tokens: real prompt tokens.
            completion_tokens: real completion tokens.
            model: the model that produced them.

        Returns:
            Whether a reservation was settled, and the alert thresholds crossed for the first
            time in their period by this usage.
        """
        nano = self._nano_usd(model, prompt_tokens, completion_tokens)
        async with map_redis_errors("cost guard settle"):
            reply = await self._script(
                keys=[self._zset, self._res_prefix + request_id],
                args=["settle", request_id, prompt_tokens + completion_tokens, nano],
            )
        if not int(reply[0]):
            return SettleResult(settled=False)
        crossings = [
            ThresholdCrossing(budget_id=b, threshold=float(t), period_start=midnight(date.fromisoformat(p), self._tz))
            for b, p, t in reply[1]
        ]
        for c in crossings:
            logger.info("Budget %s crossed %s of its limit for the period starting %s", c.budget_id, c.threshold,
                        c.period_start.date())
        return SettleResult(settled=True, crossings=crossings)

    async def release(self, request_id: str) -> bool:
        """Give back everything a failed request reserved.

        Returns:
            True when a reservation was released; False when none was left (settled,
            released or never made).
        """
        async with map_redis_errors("cost guard release"):
            reply = await self._script(
                keys=[self._zset, self._res_prefix + request_id], args=["release", request_id]
            )
        return bool(int(reply))

    async def reclaim_expired(self, now: float | None = None, limit: int = 1000) -> int:
        """Release up to ``limit`` reservations whose expiry is at or before ``now``.

        ``reserve`` already reclaims a few per call; this is for a periodic sweep after a
        replica crash, and for tests.

        Returns:
            How many reservations were reclaimed.
        """
        now = time.time() if now is None else now
        async with map_redis_errors("cost guard reclaim"):
            reply = await self._script(
                keys=[self._zset],
                args=["reclaim", repr(now), limit, self.config.counter_retention_s, self._res_prefix],
            )
        if int(reply):
            logger.warning("Cost guard reclaimed %s expired reservations", reply)
        return int(reply)

    async def usage(self, tenant: str, user: str, plan: Plan, now: float | None = None) -> UsageReport:
        """Return a user's daily plan quota: used, reserved, remaining and reset time."""
        now = time.time() if now is None else now
        await self._store.refresh()
        day = self._window("day", now)
        limit = self.config.plans.get(plan).daily_tokens
        async with map_redis_errors("cost guard usage"):
            c = await self.redis.hgetall(self._quota_key(tenant, user, day.label))
        used, reserved = int(c.get("ut", 0)), int(c.get("rt", 0))
        return UsageReport(
            tenant=tenant, user=user, plan=plan, used_tokens=used, reserved_tokens=reserved, limit_tokens=limit,
            remaining_tokens=None if limit is None else max(0, limit - used - reserved),
            used_usd=int(c.get("uu", 0)) / NANO_USD, resets_at=utc(day.end),
        )

    async def budget_status(self, now: float | None = None) -> list[BudgetStatus]:
        """Return every budget's use in its current period, in config order."""
        now = time.time() if now is None else now
        await self._store.refresh()
        budgets = self.config.budgets  # one snapshot: a refresh may swap the config during the await
        windows = [self._window(b.period, now) for b in budgets]
        async with map_redis_errors("cost guard budget status"):
            async with self.redis.pipeline(transaction=False) as pipe:
                for b, w in zip(budgets, windows):
                    pipe.hgetall(self._budget_key(b.id, w.label))
                counters: list[dict[str, str]] = await pipe.execute()
        return [budget_status_from_counters(b, w.start, w.end, c) for b, w, c in zip(budgets, windows, counters)]

    async def list_budgets(self) -> list[BudgetConfig]:
        """Return the effective budgets, as of Redis now (file order, then budgets added by id)."""
        await self._store.refresh(force=True)
        return list(self.config.budgets)

    async def put_budget(self, budget: BudgetConfig) -> BudgetConfig:
        """Create or replace a budget (keeping this period's use); all instances see it in ``config_refresh_s``.

        Raises:
            InvalidRequestError: a model-scoped budget names a model that is not served.
        """
        return await self._store.put_budget(budget)

    async def delete_budget(self, budget_id: str) -> BudgetConfig:
        """Stop enforcing a budget, a file budget included (until put again), and return it.

        Raises:
            NotFoundError: no budget with this id.
        """
        return await self._store.delete_budget(budget_id)

    async def list_plans(self) -> PlansConfig:
        """Return the effective plans, as of Redis now."""
        await self._store.refresh(force=True)
        return self.config.plans

    async def put_plan(self, name: str, plan: PlanConfig) -> PlanConfig:
        """Replace a plan; every instance applies it within ``config_refresh_s``.

        Raises:
            InvalidRequestError: not a plan name, or the plan names a model that is not served.
        """
        return await self._store.put_plan(name, plan)

    async def ping(self) -> None:
        """Raise ServiceUnavailableError when Redis does not answer (for the Gateway's GET /health).

        Deliberately not ``check_health``: Serve would restart CostGuard replicas over a Redis
        outage that a restart cannot fix.
        """
        async with map_redis_errors("cost guard ping"):
            await self.redis.ping()

    async def close(self) -> None:
        """Close the Redis connections."""
        await self._script.pipeline.close()
        await self.redis.aclose()

    # -- helpers -------------------------------------------------------------------------------

    def _counters(
        self, request: ReserveRequest, plan: PlanConfig, model: str, now: float, *, with_floor: bool
    ) -> tuple[list[dict[str, Any]], list[Check]]:
        """Return the script's counter specs for one candidate model, and Python's view of them."""
        # Expiry is housekeeping, so it follows the wall clock: a `now` in the past (tests, a
        # replica's clock behind Redis's) must not expire live counters.
        keep = self.config.counter_retention_s + max(0.0, time.time() - now)
        day = self._window("day", now)
        quota: dict[str, Any] = {"k": self._quota_key(request.tenant, request.user, day.label), "x": day.end + keep}
        if plan.daily_tokens is not None:
            quota["lt"] = plan.daily_tokens
        spec, view = [quota], [Check(PLAN_QUOTA, day.end)]
        for b in self.config.budgets:
            if not b.applies(request.tenant, request.user, model, request.tags):
                continue
            w = self._window(b.period, now)
            c = {**self._budget_spec(b, w.label), "x": w.end + keep}
            if with_floor and b.downgrade_below_fraction is not None:
                c["f"] = b.downgrade_below_fraction
            spec.append(c)
            view.append(Check(b.id, w.end))
        return spec, view

    def _budget_spec(self, b: BudgetConfig, label: str) -> dict[str, Any]:
        """Return the parts of a budget's counter spec that are fixed within a period (cached)."""
        cached = self._budget_specs.get(b.id)
        if cached is None or cached[0] != label or cached[1] is not b:  # a new period, or a changed budget
            c: dict[str, Any] = {"k": self._budget_key(b.id, label), "id": b.id, "p": label}
            if b.limit_tokens is not None:
                c["lt"] = b.limit_tokens
            if b.limit_usd is not None:
                c["lu"] = round(b.limit_usd * NANO_USD)
            if b.alert_thresholds:
                c["a"] = [[t, f"{self._prefix}:alert:{b.id}:{label}:{t!r}", repr(t)] for t in b.alert_thresholds]
            cached = self._budget_specs[b.id] = (label, b, c)
        return cached[2]

    async def set_prices(self, prices: dict[str, tuple[float, float]]) -> None:
        """Model -> (input, output) USD per 1M tokens; a live change (the Gateway's user_config) lands here."""
        self._prices, self._max_price = _nano_prices(prices)

    def _nano_usd(self, model: str, prompt_tokens: int, completion_tokens: int) -> int:
        p_in, p_out = self._prices.get(model) or self._prices.get(base_model_name(model), self._max_price)  # adapters
        return round(prompt_tokens * p_in + completion_tokens * p_out)

    def _window(self, period: BudgetPeriod, now: float) -> Window:
        # Cached: the hot path recomputes a period only when `now` leaves it.
        w = self._windows.get(period)
        if w is None or not w.start <= now < w.end:
            w = self._windows[period] = period_window(period, now, self._tz)
        return w

    def _quota_key(self, tenant: str, user: str, day: str) -> str:
        return f"{self._prefix}:quota:{quote(tenant, safe='')}:{quote(user, safe='')}:{day}"

    def _budget_key(self, budget_id: str, period: str) -> str:
        return f"{self._prefix}:budget:{budget_id}:{period}"
