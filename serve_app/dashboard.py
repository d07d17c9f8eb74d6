"""``GET /dashboard``: the operator's page (overview numbers, charts, budgets, experiments, alerts, health).

The page is static HTML, CSS and JavaScript from ``serve_app/static`` (uPlot for the
charts, kept in the project: nothing is fetched from a CDN). Its data comes from
``GET /dashboard/data``, the overview and its time series in one answer.

Signing in: an admin key in the login form, or in an ``Authorization`` header on
``GET /dashboard`` (behind a proxy that adds it). Either way the browser gets a
session cookie (HttpOnly, SameSite=Strict, scoped to /dashboard) whose token names a
Redis session holding the key's sha256, never the key; every data call checks that
the key is still a live admin key. Every dashboard answer carries a strict
Content-Security-Policy (no inline script, same-origin only) and ``no-store``.
"""

from __future__ import annotations

import hashlib
import secrets
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fastapi import APIRouter, Depends, Form, Query, Request
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, RedirectResponse, Response

from serve_app.auth import APIKey, hash_key
from serve_app.deps import get_gateway
from serve_app.errors import AuthenticationError, NotFoundError, PermissionDeniedError
from serve_app.overview_admin import DEFAULT_WINDOW_S, overview_of, series_of
from serve_app.stores import map_redis_errors

if TYPE_CHECKING:
    from serve_app.gateway import Gateway

router = APIRouter(prefix="/dashboard", include_in_schema=False)  # a browser page, not the API
STATIC_DIR = Path(__file__).parent / "static"
_STATIC_FILES = {"dashboard.js", "dashboard.css", "uPlot.iife.min.js", "uPlot.min.css"}
COOKIE = "raygate_dashboard"
SESSION_PREFIX = "raygate:dashboard:session:"
SESSION_TTL_S = 8 * 3600
CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; "
       "form-action 'self'; frame-ancestors 'none'; base-uri 'none'")
PAGE_HEADERS = {"content-security-policy": CSP, "cache-control": "no-store"}


def _page(name: str, status_code: int = 200, error: str = "") -> HTMLResponse:
    html = (STATIC_DIR / name).read_text().replace("{{error}}", error)
    return HTMLResponse(html, status_code=status_code, headers=PAGE_HEADERS)


def _session_key(token: str) -> str:
    return SESSION_PREFIX + hashlib.sha256(token.encode()).hexdigest()


async def _admin_from_digest(gateway: "Gateway", digest: str) -> APIKey:
    key = await gateway.keys.authenticate_digest(digest)
    if not key.admin:
        raise PermissionDeniedError("The dashboard needs an admin key.")
    return key


async def _session_admin(request: Request, gateway: "Gateway") -> APIKey | None:
    """The admin behind the request's session cookie, or None (no cookie, expired, key revoked)."""
    token = request.cookies.get(COOKIE)
    if not token:
        return None
    async with map_redis_errors("dashboard session"):
        digest = await gateway.keys.redis.get(_session_key(token))
    if digest is None:
        return None
    try:
        return await _admin_from_digest(gateway, digest)
    except (AuthenticationError, PermissionDeniedError):
        await gateway.keys.redis.delete(_session_key(token))
        return None


async def _start_session(gateway: "Gateway", digest: str, request: Request, response: Response) -> None:
    token = secrets.token_urlsafe(32)
    async with map_redis_errors("dashboard session"):
        await gateway.keys.redis.set(_session_key(token), digest, ex=SESSION_TTL_S)
    response.set_cookie(COOKIE, token, max_age=SESSION_TTL_S, path="/dashboard", httponly=True, samesite="strict",
                        secure=request.url.scheme == "https")


@router.get("", response_class=HTMLResponse)
async def dashboard(request: Request, gateway: "Gateway" = Depends(get_gateway)) -> Response:
    """The dashboard for a signed-in admin (session cookie or admin ``Authorization`` header), else the login
    form."""
    if await _session_admin(request, gateway) is not None:
        return _page("dashboard.html")
    authorization = request.headers.get("authorization")
    if authorization:
        key = await gateway.keys.authenticate(authorization)
        if not key.admin:
            raise PermissionDeniedError("The dashboard needs an admin key.")
        response = _page("dashboard.html")
        await _start_session(gateway, hash_key(authorization.split(" ", 1)[-1].strip()), request, response)
        return response
    return _page("login.html")


@router.post("/login", response_class=HTMLResponse)
async def login(request: Request, key: str = Form(..., max_length=512),
                gateway: "Gateway" = Depends(get_gateway)) -> Response:
    """Check an admin key from the login form; on success, a session cookie and a redirect to the dashboard."""
    digest = hash_key(key.strip())
    try:
        await _admin_from_digest(gateway, digest)
    except (AuthenticationError, PermissionDeniedError) as exc:
        return _page("login.html", exc.status_code, error="That is not a valid admin key.")
    response = RedirectResponse("/dashboard", status_code=303, headers=PAGE_HEADERS)
    await _start_session(gateway, digest, request, response)
    return response


@router.post("/logout")
async def logout(request: Request, gateway: "Gateway" = Depends(get_gateway)) -> Response:
    """End the session and go back to the login form."""
    if token := request.cookies.get(COOKIE):
        await gateway.keys.redis.delete(_session_key(token))
    response = RedirectResponse("/dashboard", status_code=303, headers=PAGE_HEADERS)
    response.delete_cookie(COOKIE, path="/dashboard")
    return response


@router.get("/data")
async def data(request: Request, window_s: int = Query(3600, ge=300, le=DEFAULT_WINDOW_S),
               gateway: "Gateway" = Depends(get_gateway)) -> JSONResponse:
    """The overview of the last ``window_s`` and its time series (30 buckets), for the page's refresh."""
    if await _session_admin(request, gateway) is None:
        raise AuthenticationError("Sign in to the dashboard first.")
    series = await series_of(gateway, window_s, max(window_s // 30, 10))
    to_ts = series["to_ts"]
    body: dict[str, Any] = {"overview": await overview_of(gateway, to_ts - window_s, to_ts), "series": series}
    return JSONResponse(body, headers=PAGE_HEADERS)


@router.get("/static/{name}")
async def static(name: str) -> FileResponse:
    """The page's scripts and styles (a fixed list: nothing else under the package is served)."""
    if name not in _STATIC_FILES:
        raise NotFoundError("No such file.")
    return FileResponse(STATIC_DIR / name, headers={"cache-control": "max-age=3600",
                                                    "content-security-policy": CSP})
