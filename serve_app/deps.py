"""FastAPI dependencies shared by the Gateway's OpenAI routes and its admin routes."""

from __future__ import annotations

from typing import TYPE_CHECKING

from fastapi import Depends, Request

from serve_app.auth import APIKey
from serve_app.errors import PermissionDeniedError

if TYPE_CHECKING:
    from serve_app.gateway import Gateway


def get_gateway(request: Request) -> "Gateway":
    """The Gateway replica serving this request (set on ``app.state`` by its constructor)."""
    gateway: Gateway = request.app.state.gateway
    return gateway


async def authenticate(request: Request) -> APIKey:
    """The caller's key record. As a dependency it runs before the body is validated, so 401 wins over 400."""
    return await get_gateway(request).keys.authenticate(request.headers.get("authorization"))


async def require_admin(key: APIKey = Depends(authenticate)) -> APIKey:
    """An admin key, else 403."""
    if not key.admin:
        raise PermissionDeniedError("This route needs an admin key.")
    return key
