"""Plans and budgets changed through the admin API: kept in Redis, picked up by every CostGuard instance.

The file config (``CostGuardConfig``) is the base; Redis holds the overrides, so
a change made on one Gateway replica reaches every replica without a restart,
and survives restarts. Data (``P`` is the CostGuard key prefix):

* ``P:config:budgets``: hash budget id -> ``BudgetConfig`` JSON, or ``TOMBSTONE``
  for a file budget deleted through the API (a deleted API-only budget is
  simply removed).
* ``P:config:plans``: hash plan name -> ``PlanConfig`` JSON, replacing the file's plan.
* ``P:config:version``: a counter INCR'd in the same MULTI as every change.

The effective config is the file config with these applied: a Redis budget
takes the place of the file budget with its id, new ids follow in id order, a
tombstone hides a file budget. Each instance checks the version at most every
``config_refresh_s`` with one script call (``CONFIG_SNAPSHOT_LUA``) that
returns the hashes only when the version moved: one round trip per interval,
and a snapshot consistent with its version. An entry that does not validate
(hand-edited, or naming a model no longer served) is skipped with an error log,
so the file's value stays in force.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Iterable
from typing import Final, TypeVar

import redis.asyncio as aioredis
from redis.asyncio.client import Pipeline
from pydantic import ValidationError

from serve_app.cost_config import BudgetConfig, CostGuardConfig, PlanConfig, PlansConfig
from serve_app.errors import InvalidRequestError, NotFoundError
from serve_app.stores import map_redis_errors

logger = logging.getLogger(__name__)

TOMBSTONE: Final = "-"
Entry = TypeVar("Entry", BudgetConfig, PlanConfig)

# KEYS: version, budgets, plans. ARGV[1]: the version the caller has.
CONFIG_SNAPSHOT_LUA: Final = r"""
local v = redis.call('GET', KEYS[1]) or '0'
if v == ARGV[1] then return {v} end
return {v, redis.call('HGETALL', KEYS[2]), redis.call('HGETALL', KEYS[3])}
"""


def plan_models(plan: PlanConfig) -> set[str]:
    """Return the models a plan names (allowed and downgrade)."""
    names = set(plan.allowed_models or [])
    if plan.downgrade_model:
        names.add(plan.downgrade_model)
    return names


def budget_models(budget: BudgetConfig) -> set[str]:
    """Return the model a model-scoped budget names (none for other scopes)."""
    return {budget.scope_value} if budget.scope == "model" and budget.scope_value else set()


class CostConfigStore:
    """The effective plans and budgets of one CostGuard instance, kept in step with Redis.

    Args:
        redis: the CostGuard's client (``decode_responses=True``).
        base: the file config; its housekeeping fields are never overridden.
        served_models: names a plan or budget may use (GatewayConfig's cross-check).
        key_prefix: the CostGuard key prefix.
    """

    def __init__(
        self, redis: aioredis.Redis, base: CostGuardConfig, served_models: Iterable[str], *, key_prefix: str
    ) -> None:
        self.base = base
        self.config = base
        self.version = ""  # never a Redis value, so the first check loads
        self._served = frozenset(served_models)
        self._version_key = f"{key_prefix}:config:version"
        self._budgets_key = f"{key_prefix}:config:budgets"
        self._plans_key = f"{key_prefix}:config:plans"
        self._redis = redis
        self._snapshot = redis.register_script(CONFIG_SNAPSHOT_LUA)
        self._next_check = 0.0
        self._lock = asyncio.Lock()

    async def refresh(self, *, force: bool = False) -> bool:
        """Reload the overrides when ``config_refresh_s`` has passed since the last check (or ``force``).

        The hot path calls this on every request: when not due it is a clock read. A due
        check is one script call, made by one caller while concurrent ones keep the
        current config. Checks are serialised, so an older snapshot never replaces a newer.

        Returns:
            Whether a new version was loaded (always, on an instance's first check).

        Raises:
            ServiceUnavailableError: Redis is unreachable.
        """
        now = time.monotonic()
        if not force and (now < self._next_check or self._lock.locked()):
            return False
        async with self._lock:
            self._next_check = time.monotonic() + self.base.config_refresh_s
            async with map_redis_errors("cost guard config check"):
                keys = [self._version_key, self._budgets_key, self._plans_key]
                reply = await self._snapshot(keys=keys, args=[self.version])
            if len(reply) == 1:
                return False
            version, budgets, plans = reply
            self.config = self._build(_pairs(budgets), _pairs(plans))
            self.version = str(version)
        logger.info("Cost guard config at version %s: %s budgets", self.version, len(self.config.budgets))
        return True

    async def put_budget(self, budget: BudgetConfig) -> BudgetConfig:
        """Create or replace a budget (a file budget with the same id included).

        Raises:
            InvalidRequestError: a model-scoped budget names a model that is not served.
        """
        self._check_models(budget_models(budget), "scope_value")
        await self._write(lambda pipe: pipe.hset(self._budgets_key, budget.id, budget.model_dump_json()))
        logger.info("Budget %s set through the admin API", budget.id)
        return budget

    async def delete_budget(self, budget_id: str) -> BudgetConfig:
        """Delete a budget; a file budget stays deleted (tombstone) until put again.

        Returns:
            The budget as it was.

        Raises:
            NotFoundError: no such budget in the effective config.
        """
        await self.refresh(force=True)
        budget = next((b for b in self.config.budgets if b.id == budget_id), None)
        if budget is None:
            raise NotFoundError(f"No budget '{budget_id}'.", param="budget_id")
        if any(b.id == budget_id for b in self.base.budgets):
            await self._write(lambda pipe: pipe.hset(self._budgets_key, budget_id, TOMBSTONE))
        else:
            await self._write(lambda pipe: pipe.hdel(self._budgets_key, budget_id))
        logger.info("Budget %s deleted through the admin API", budget_id)
        return budget

    async def put_plan(self, name: str, plan: PlanConfig) -> PlanConfig:
        """Replace one plan.

        Raises:
            InvalidRequestError: not a plan name, or the plan names a model that is not served.
        """
        if name not in PlansConfig.model_fields:
            raise InvalidRequestError(f"No plan '{name}'; plans are {sorted(PlansConfig.model_fields)}.", param="plan")
        self._check_models(set(plan.allowed_models or []), "allowed_models")
        self._check_models({plan.downgrade_model} if plan.downgrade_model else set(), "downgrade_model")
        await self._write(lambda pipe: pipe.hset(self._plans_key, name, plan.model_dump_json()))
        logger.info("Plan %s replaced through the admin API", name)
        return plan

    # -- helpers -------------------------------------------------------------------------------

    async def _write(self, change: Callable[[Pipeline], object]) -> None:
        """Apply one change and bump the version atomically, then reload (read-your-writes here)."""
        async with map_redis_errors("cost guard config write"):
            async with self._redis.pipeline(transaction=True) as pipe:
                change(pipe)
                pipe.incr(self._version_key)
                await pipe.execute()
        await self.refresh(force=True)

    def _check_models(self, names: set[str], param: str) -> None:
        unknown = sorted(names - self._served)
        if unknown:
            raise InvalidRequestError(f"Unknown models {unknown}; served models are {sorted(self._served)}.",
                                      param=param)

    def _build(self, budgets: dict[str, str], plans: dict[str, str]) -> CostGuardConfig:
        """Return the file config with the Redis entries that validate applied."""
        overrides: dict[str, BudgetConfig] = {}
        for budget_id, raw in budgets.items():
            if raw != TOMBSTONE and (b := self._parse(BudgetConfig, budget_id, raw)) is not None:
                if b.id == budget_id:
                    overrides[budget_id] = b
                else:
                    logger.error("Ignoring live budget %s: its JSON has id %s", budget_id, b.id)
        merged = [overrides.pop(b.id, b) for b in self.base.budgets if budgets.get(b.id) != TOMBSTONE]
        merged += [overrides[i] for i in sorted(overrides)]
        plan_configs = {name: self.base.plans.get(name) for name in PlansConfig.model_fields}
        for name, raw in plans.items():
            if name not in plan_configs:
                logger.error("Ignoring live plan %s: not a plan name", name)
            elif (p := self._parse(PlanConfig, name, raw)) is not None:
                plan_configs[name] = p
        return self.base.model_copy(update={"budgets": merged, "plans": PlansConfig(**plan_configs)})

    def _parse(self, model: type[Entry], name: str, raw: str) -> Entry | None:
        """Return a validated entry, or None (logged) when it is invalid or names unserved models."""
        what = "plan" if model is PlanConfig else "budget"
        try:
            entry = model.model_validate_json(raw)
        except ValidationError as exc:
            logger.error("Ignoring live %s %s: %s validation errors", what, name, exc.error_count())
            return None
        names = plan_models(entry) if isinstance(entry, PlanConfig) else budget_models(entry)
        unknown = names - self._served
        if unknown:
            logger.error("Ignoring live %s %s: unknown models %s", what, name, sorted(unknown))
            return None
        return entry


def _pairs(flat: list[str]) -> dict[str, str]:
    """Return HGETALL's flat [field, value, ...] reply (as a script returns it) as a dict."""
    return dict(zip(flat[::2], flat[1::2]))
