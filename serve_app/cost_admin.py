"""Admin routes (admin key only) for CostGuard's plans and budgets; changes apply without a restart.

Changes go to Redis through CostGuard (wherever it is placed), and every
Gateway replica's CostGuard applies them within ``cost_guard.config_refresh_s``.
The file config stays the base: a PUT budget with a file budget's id replaces
it, a DELETE of a file budget hides it until it is put again.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from fastapi import APIRouter, Depends
from pydantic import ConfigDict, Field, PositiveFloat, PositiveInt, ValidationError

from serve_app.auth import Plan
from serve_app.cost_config import BudgetConfig, PlanConfig, PlansConfig
from serve_app.deps import get_gateway, require_admin
from serve_app.errors import InvalidRequestError
from serve_app.protocol import MAX_OUTPUT_TOKENS

if TYPE_CHECKING:
    from serve_app.gateway import Gateway

router = APIRouter(prefix="/admin", dependencies=[Depends(require_admin)])

# CostGuard hands limits to orjson (64-bit integers at most) and to Lua scripts that compute in
# doubles (exact up to 2**53), USD as integer nano-dollars; a larger limit would fail every request
# it applies to.
MAX_TOKEN_LIMIT = 2**53
MAX_USD_LIMIT = 1e9


class BudgetBody(BudgetConfig):
    """A budget in a PUT body: the path names it, so the body's ``id`` may be left out.

    Numbers must be finite: JSON has no infinity, so an infinite limit or threshold would be
    stored as ``null`` and the budget dropped, unenforced, when CostGuard reloads it.
    """

    model_config = ConfigDict(allow_inf_nan=False)

    id: str | None = Field(  # type: ignore[assignment]
        None, description="Optional; must equal the path's budget id when given."
    )
    limit_tokens: PositiveInt | None = Field(None, le=MAX_TOKEN_LIMIT, description="Tokens allowed per period.")
    limit_usd: PositiveFloat | None = Field(None, le=MAX_USD_LIMIT, description="Spend allowed per period, in USD.")


class PlanBody(PlanConfig):
    """A plan in a PUT body, with limits CostGuard can count."""

    daily_tokens: PositiveInt | None = Field(
        None, le=MAX_TOKEN_LIMIT,
        description="Tokens (prompt + completion) a user may spend per day; None is unlimited.",
    )
    max_tokens_cap: PositiveInt | None = Field(
        None, le=MAX_OUTPUT_TOKENS,
        description="Upper bound on a request's max_tokens (output tokens); None keeps the request's.",
    )


@router.get("/budgets", response_model=list[BudgetConfig])
async def list_budgets(gateway: "Gateway" = Depends(get_gateway)) -> list[BudgetConfig]:
    """Every budget in force: the file's, as changed through this API."""
    budgets: list[BudgetConfig] = await gateway.spend.cost_guard("list_budgets")
    return budgets


@router.put("/budgets/{budget_id}", response_model=BudgetConfig)
async def put_budget(budget_id: str, body: BudgetBody, gateway: "Gateway" = Depends(get_gateway)) -> BudgetConfig:
    """Create or replace a budget; this period's use is kept."""
    if body.id is not None and body.id != budget_id:
        raise InvalidRequestError(f"The body's id '{body.id}' differs from the path's '{budget_id}'.", param="id")
    try:
        budget = BudgetConfig.model_validate({**body.model_dump(), "id": budget_id})
    except ValidationError as exc:  # only the path's id is new here
        raise InvalidRequestError(
            "A budget id takes letters, digits, '.', '_' and '-' only.", param="budget_id"
        ) from exc
    saved: BudgetConfig = await gateway.spend.cost_guard("put_budget", budget)
    return saved


@router.delete("/budgets/{budget_id}", response_model=BudgetConfig)
async def delete_budget(budget_id: str, gateway: "Gateway" = Depends(get_gateway)) -> BudgetConfig:
    """Stop enforcing a budget (a file budget too, until it is put again); returns it."""
    deleted: BudgetConfig = await gateway.spend.cost_guard("delete_budget", budget_id)
    return deleted


@router.get("/plans", response_model=PlansConfig)
async def list_plans(gateway: "Gateway" = Depends(get_gateway)) -> PlansConfig:
    """Every plan in force: the file's, as replaced through this API."""
    plans: PlansConfig = await gateway.spend.cost_guard("list_plans")
    return plans


@router.put("/plans/{plan}", response_model=PlanConfig)
async def put_plan(plan: Plan, body: PlanBody, gateway: "Gateway" = Depends(get_gateway)) -> PlanConfig:
    """Replace a plan for every key that carries it."""
    plan_config = PlanConfig.model_validate(body.model_dump())
    saved: PlanConfig = await gateway.spend.cost_guard("put_plan", plan, plan_config)
    return saved
