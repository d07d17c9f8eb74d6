"""Admin routes (admin key only) for A/B experiments: create, start, pause, complete, results."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Literal

from fastapi import APIRouter, Depends, Path
from pydantic import BaseModel, Field

from deployments.experiments import Experiment, ExperimentSpec
from serve_app.admin import _ledger
from serve_app.deps import get_gateway, require_admin
from serve_app.errors import InvalidRequestError

if TYPE_CHECKING:
    from serve_app.gateway import Gateway

router = APIRouter(prefix="/admin/experiments", dependencies=[Depends(require_admin)])
Ident = Path(pattern=r"^exp_[0-9a-f]{12}$")


class Completion(BaseModel):
    winner: str | None = Field(None, max_length=64, description="The variant to keep (default: none named).")


async def _store(gateway: "Gateway", operation: str, *args: Any) -> Any:
    return await _ledger(gateway, "store", f"experiments.{operation}", *args)


@router.post("", response_model=Experiment)
async def create(spec: ExperimentSpec, gateway: "Gateway" = Depends(get_gateway)) -> Experiment:
    """A new experiment, as a draft; variant models must be configured ones or loaded adapters."""
    known = {m.name for m in gateway.config.models}
    unknown = sorted({v.model for v in spec.variants
                      if v.model and v.model not in known and gateway.adapters.resolve(v.model) is None})
    if unknown:
        raise InvalidRequestError(f"Unknown models in variants: {unknown}.", param="variants")
    experiment: Experiment = await _store(gateway, "create", spec)
    return experiment


@router.get("", response_model=list[Experiment])
async def listing(gateway: "Gateway" = Depends(get_gateway)) -> list[Experiment]:
    found: list[Experiment] = await _store(gateway, "listing", None)
    return found


@router.get("/{ident}", response_model=Experiment)
async def get(ident: str = Ident, gateway: "Gateway" = Depends(get_gateway)) -> Experiment:
    experiment: Experiment = await _store(gateway, "get", ident)
    return experiment


@router.post("/{ident}/{action}", response_model=Experiment)
async def transition(action: Literal["start", "pause", "complete"], body: Completion | None = None,
                     ident: str = Ident, gateway: "Gateway" = Depends(get_gateway)) -> Experiment:
    """start (a draft or paused one), pause, or complete (optionally naming the winner)."""
    winner = body.winner if body is not None else None
    experiment: Experiment = await _store(gateway, "transition", ident, action, winner)
    gateway.experiments.forget()
    return experiment


@router.get("/{ident}/results")
async def results(ident: str = Ident, gateway: "Gateway" = Depends(get_gateway)) -> dict[str, Any]:
    """Per-variant figures with significance against the control; promotes a significant winner when set to."""
    result: dict[str, Any] = await _store(gateway, "evaluate", ident)
    if result.get("promoted"):
        gateway.experiments.forget()
    return result
