"""The SQL condition that selects one user's rows, shared by every ledger module that exports or erases them."""

from __future__ import annotations


def user_where(tenant: str | None, user: str, alias: str = "") -> tuple[str, list[str]]:
    """``(sql, params)`` for the user's rows in one tenant, or in every tenant when ``tenant`` is None."""
    prefix = f"{alias}." if alias else ""
    if tenant is None:
        return f"{prefix}user = ?", [user]
    return f"{prefix}tenant = ? AND {prefix}user = ?", [tenant, user]
