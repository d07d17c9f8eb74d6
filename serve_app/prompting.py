"""Prompt templates in a chat request: the active version, rendered, becomes the system prompt.

Each Gateway replica keeps the active versions it has read for a few seconds, so a
request naming a template costs no Ledger call most of the time; an activation or a
rollback through this replica's admin API is seen at once, through another replica
within ``TTL_S``. A template that reads the variable ``memory`` gets the user's memory
(``/v1/users/me/memory``), read from the Ledger for that request only; others cost no such call.
"""

from __future__ import annotations

import time
from typing import Any

from deployments.memory import Memory
from deployments.templates import TemplateVersion, names_used, render
from serve_app.auth import APIKey
from serve_app.constants import LEDGER_CALL_TIMEOUT_S
from serve_app.handles import call
from serve_app.protocol import ChatCompletionRequest, ChatMessage

TTL_S = 5.0
MEMORY_VARIABLE = "memory"


class TemplateCache:
    """Active template versions, read from the Ledger and kept for ``ttl_s``."""

    def __init__(self, ledger: Any, ttl_s: float = TTL_S) -> None:
        self.ledger = ledger
        self.ttl_s = ttl_s
        self._entries: dict[tuple[str, int | None], tuple[float, TemplateVersion]] = {}
        self._uses: dict[tuple[str, int], bool] = {}  # (name, version) -> whether it reads ``memory``

    async def get(self, name: str, version: int | None = None) -> TemplateVersion:
        """A template's version (the active one when ``version`` is None).

        Raises:
            NotFoundError: no such template or version.
        """
        entry = self._entries.get((name, version))
        if entry is not None and entry[0] > time.monotonic():
            return entry[1]
        template: TemplateVersion = await call(self.ledger.store.remote("templates.get", name, version),
                                               LEDGER_CALL_TIMEOUT_S, "Ledger")
        self._entries[(name, version)] = (time.monotonic() + self.ttl_s, template)
        return template

    def forget(self, name: str) -> None:
        """Drop what is kept of a template (after this replica changed it)."""
        self._entries = {k: v for k, v in self._entries.items() if k[0] != name}

    async def memory(self, key: APIKey, template: TemplateVersion, enabled: bool = True) -> dict[str, Any]:
        """``{"memory": <the user's memory>}`` when the template reads the variable ``memory`` (one Ledger
        call), else ``{}`` (none)."""
        uses = self._uses.get((template.name, template.version))
        if uses is None:
            uses = self._uses[(template.name, template.version)] = MEMORY_VARIABLE in names_used(template.body)
        if not (uses and enabled):
            return {}
        memory: Memory = await call(self.ledger.store.remote("memory.get", key.tenant, key.user),
                                    LEDGER_CALL_TIMEOUT_S, "Ledger")
        return {MEMORY_VARIABLE: memory.memory}


def with_template(body: ChatCompletionRequest, template: TemplateVersion,
                  extra: dict[str, Any] | None = None) -> ChatCompletionRequest:
    """The request with the rendered template as its system prompt (replacing one it had); ``extra`` variables
    (the user's ``memory``) win over the request's."""
    variables = {**body.variables, **extra} if extra else body.variables
    system = ChatMessage(role="system", content=render(template.name, template.body, variables))
    rest = [m for m in body.messages if m.role not in ("system", "developer")]
    return body.model_copy(update={"messages": [system, *rest], "template": None, "variables": {}})
