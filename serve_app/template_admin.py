"""Admin routes (admin key only) for prompt templates: versions, diff, preview, activate, roll back."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from fastapi import APIRouter, Depends, Path, Query
from pydantic import BaseModel, Field

from deployments.templates import NAME, NewVersion, TemplateVersion, render
from serve_app.admin import _ledger
from serve_app.auth import APIKey
from serve_app.deps import get_gateway, require_admin

if TYPE_CHECKING:
    from serve_app.gateway import Gateway

router = APIRouter(prefix="/admin/templates", dependencies=[Depends(require_admin)])
Name = Path(pattern=NAME)


class Preview(BaseModel):
    variables: dict[str, Any] = Field(default_factory=dict)
    version: int | None = Field(None, ge=1, le=2**31, description="Default the active version.")


class Activation(BaseModel):
    version: int = Field(ge=1, le=2**31)


async def _templates(gateway: "Gateway", operation: str, *args: Any) -> Any:
    return await _ledger(gateway, "store", f"templates.{operation}", *args)


@router.get("")
async def list_templates(gateway: "Gateway" = Depends(get_gateway)) -> dict[str, Any]:
    """Every template with its latest and active version."""
    return {"object": "list", "data": await _templates(gateway, "names")}


@router.get("/{name}", response_model=list[TemplateVersion])
async def list_versions(name: str = Name, gateway: "Gateway" = Depends(get_gateway)) -> list[TemplateVersion]:
    """A template's versions, oldest first; ``active`` marks the one in use."""
    versions: list[TemplateVersion] = await _templates(gateway, "versions", name)
    return versions


@router.post("/{name}/versions", response_model=TemplateVersion)
async def add_version(body: NewVersion, name: str = Name, admin: APIKey = Depends(require_admin),
                      gateway: "Gateway" = Depends(get_gateway)) -> TemplateVersion:
    """Store a new version (a syntax error is a 400); ``activate`` makes it the one in use."""
    version: TemplateVersion = await _templates(gateway, "add_version", name, body, admin.key_id)
    gateway.templates.forget(name)
    return version


@router.get("/{name}/diff")
async def diff(name: str = Name, a: int = Query(ge=1, le=2**31), b: int = Query(ge=1, le=2**31),
               gateway: "Gateway" = Depends(get_gateway)) -> dict[str, Any]:
    """A unified diff from version ``a`` to version ``b``."""
    return {"object": "template.diff", "name": name, "a": a, "b": b,
            "diff": await _templates(gateway, "diff", name, a, b)}


@router.post("/{name}/preview")
async def preview(body: Preview, name: str = Name, gateway: "Gateway" = Depends(get_gateway)) -> dict[str, Any]:
    """Render a version with the given variables (a missing one is a 400 naming it)."""
    template: TemplateVersion = await _templates(gateway, "get", name, body.version)
    return {"object": "template.preview", "name": name, "version": template.version,
            "rendered": render(name, template.body, body.variables)}


@router.post("/{name}/activate", response_model=TemplateVersion)
async def activate(body: Activation, name: str = Name, gateway: "Gateway" = Depends(get_gateway)) -> TemplateVersion:
    """Put a version in use."""
    version: TemplateVersion = await _templates(gateway, "activate", name, body.version)
    gateway.templates.forget(name)
    return version


@router.post("/{name}/rollback", response_model=TemplateVersion)
async def rollback(name: str = Name, gateway: "Gateway" = Depends(get_gateway)) -> TemplateVersion:
    """Put back the version that was in use before the current one."""
    version: TemplateVersion = await _templates(gateway, "rollback", name)
    gateway.templates.forget(name)
    return version
