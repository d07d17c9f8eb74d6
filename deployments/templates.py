"""Prompt templates: Jinja2 in a sandbox, versioned in the ledger, seeded from ``prompts/*.yaml``.

A template has numbered versions (never edited, only added) and one active version;
activating remembers the previous one, so a rollback goes back a step. Rendering
runs in Jinja2's ``SandboxedEnvironment`` (no attribute access to Python internals)
with ``StrictUndefined``: a variable the request did not give is a 400 naming it.
The functions take the Ledger's SQLite connection; the Ledger calls them under its lock.
"""

from __future__ import annotations

import difflib
import json
import re
import sqlite3
import time
from pathlib import Path
from typing import Any

import yaml
from jinja2 import StrictUndefined, TemplateSyntaxError, UndefinedError, meta
from jinja2.exceptions import SecurityError
from jinja2.sandbox import SandboxedEnvironment
from pydantic import BaseModel, Field

from serve_app.errors import InvalidRequestError, NotFoundError

SCHEMA = """
CREATE TABLE IF NOT EXISTS templates (
    name TEXT NOT NULL, version INTEGER NOT NULL, category TEXT, description TEXT, body TEXT NOT NULL,
    created_at REAL NOT NULL, created_by TEXT NOT NULL, PRIMARY KEY (name, version)
);
CREATE TABLE IF NOT EXISTS template_active (
    name TEXT PRIMARY KEY, version INTEGER NOT NULL, history TEXT NOT NULL, updated_at REAL NOT NULL
);
"""
SEED_DIR = Path(__file__).resolve().parents[1] / "prompts"
NAME = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$"
_ENV = SandboxedEnvironment(undefined=StrictUndefined, autoescape=False, keep_trailing_newline=False)
_UNDEFINED = re.compile(r"'([^']+)' is undefined|has no attribute '([^']+)'")


class TemplateVersion(BaseModel):
    name: str
    version: int
    category: str | None = None
    description: str | None = None
    body: str
    created_at: float
    created_by: str
    active: bool = False


class NewVersion(BaseModel):
    """``POST /admin/templates/{name}/versions``."""

    body: str = Field(min_length=1, max_length=100_000)
    category: str | None = Field(None, max_length=64)
    description: str | None = Field(None, max_length=500)
    activate: bool = Field(False, description="Make it the active version at once.")


def check_syntax(body: str) -> None:
    """Raises InvalidRequestError when the body is not a valid Jinja2 template."""
    try:
        _ENV.parse(body)
    except TemplateSyntaxError as exc:
        raise InvalidRequestError(f"Template syntax error on line {exc.lineno}: {exc.message}", param="body",
                                  code="template_syntax") from exc


def names_used(body: str) -> set[str]:
    """The top-level variables a template reads (``memory`` for ``{{ memory.level }}``); none if it does not parse."""
    try:
        return meta.find_undeclared_variables(_ENV.parse(body))
    except TemplateSyntaxError:
        return set()


def render(name: str, body: str, variables: dict[str, Any]) -> str:
    """Render in the sandbox.

    Raises:
        InvalidRequestError: a missing variable (named), an unsafe operation, or a failing expression.
    """
    try:
        return _ENV.from_string(body).render(**variables).strip()
    except UndefinedError as exc:
        match = _UNDEFINED.search(str(exc))
        missing = (match.group(1) or match.group(2)) if match else "?"  # an absent key: {{ memory.level }}
        raise InvalidRequestError(f"The template '{name}' needs the variable '{missing}'.",
                                  param=f"variables.{missing}", code="template_variable_missing") from exc
    except SecurityError as exc:
        raise InvalidRequestError(f"The template '{name}' tried an operation the sandbox forbids.",
                                  param="template", code="template_unsafe") from exc
    except Exception as exc:  # noqa: BLE001 - any other rendering failure is the template's or the variables' fault
        raise InvalidRequestError(f"The template '{name}' could not be rendered: {type(exc).__name__}.",
                                  param="variables", code="template_render_error") from exc


def _row(db: sqlite3.Connection, name: str, version: int | None) -> TemplateVersion:
    active = db.execute("SELECT version FROM template_active WHERE name = ?", [name]).fetchone()
    wanted = version if version is not None else (active[0] if active else None)
    row = db.execute("SELECT name, version, category, description, body, created_at, created_by FROM templates "
                     "WHERE name = ? AND version = ?", [name, wanted]).fetchone() if wanted is not None else None
    if row is None:
        what = f"version {version} of the template '{name}'" if version is not None else f"the template '{name}'"
        raise NotFoundError(f"There is no {what}.", param="template")
    fields = dict(zip(("name", "version", "category", "description", "body", "created_at", "created_by"), row))
    return TemplateVersion(**fields, active=bool(active and active[0] == row[1]))


def get(db: sqlite3.Connection, name: str, version: int | None = None) -> TemplateVersion:
    """A version of a template (the active one by default)."""
    return _row(db, name, version)


def versions(db: sqlite3.Connection, name: str) -> list[TemplateVersion]:
    numbers = [v for (v,) in db.execute("SELECT version FROM templates WHERE name = ? ORDER BY version", [name])]
    if not numbers:
        raise NotFoundError(f"There is no template '{name}'.", param="template")
    return [_row(db, name, v) for v in numbers]


def names(db: sqlite3.Connection) -> list[dict[str, Any]]:
    rows = db.execute("SELECT t.name, MAX(t.version), a.version FROM templates t LEFT JOIN template_active a "
                      "ON a.name = t.name GROUP BY t.name ORDER BY t.name").fetchall()
    return [{"name": n, "latest_version": latest, "active_version": active} for n, latest, active in rows]


def add_version(db: sqlite3.Connection, name: str, new: NewVersion, actor: str) -> TemplateVersion:
    """Store the next version number of ``name`` (activating it when asked, or when it is the first)."""
    check_syntax(new.body)
    (latest,) = db.execute("SELECT COALESCE(MAX(version), 0) FROM templates WHERE name = ?", [name]).fetchone()
    db.execute("INSERT INTO templates (name, version, category, description, body, created_at, created_by) "
               "VALUES (?, ?, ?, ?, ?, ?, ?)", [name, latest + 1, new.category, new.description, new.body,
                                                time.time(), actor])
    if new.activate or latest == 0:
        activate(db, name, latest + 1)
    return _row(db, name, latest + 1)


def activate(db: sqlite3.Connection, name: str, version: int) -> TemplateVersion:
    """Make ``version`` the active one, remembering the one it replaces."""
    _row(db, name, version)  # raises when it does not exist
    current = db.execute("SELECT version, history FROM template_active WHERE name = ?", [name]).fetchone()
    history = json.loads(current[1]) + [current[0]] if current and current[0] != version else (
        json.loads(current[1]) if current else [])
    db.execute("INSERT OR REPLACE INTO template_active (name, version, history, updated_at) VALUES (?, ?, ?, ?)",
               [name, version, json.dumps(history[-50:]), time.time()])
    return _row(db, name, version)


def rollback(db: sqlite3.Connection, name: str) -> TemplateVersion:
    """Re-activate the version that was active before the current one."""
    current = db.execute("SELECT history FROM template_active WHERE name = ?", [name]).fetchone()
    history = json.loads(current[0]) if current else []
    if not history:
        raise InvalidRequestError(f"The template '{name}' has no earlier active version.", param="template",
                                  code="nothing_to_roll_back")
    previous = history.pop()
    db.execute("UPDATE template_active SET version = ?, history = ?, updated_at = ? WHERE name = ?",
               [previous, json.dumps(history), time.time(), name])
    return _row(db, name, previous)


def diff(db: sqlite3.Connection, name: str, a: int, b: int) -> str:
    """A unified diff between two versions."""
    old, new = _row(db, name, a), _row(db, name, b)
    return "".join(difflib.unified_diff(old.body.splitlines(keepends=True), new.body.splitlines(keepends=True),
                                        fromfile=f"{name}@v{a}", tofile=f"{name}@v{b}"))


def seed(db: sqlite3.Connection, directory: Path = SEED_DIR) -> int:
    """Add version 1 of each ``prompts/*.yaml`` template the ledger does not know yet; return how many."""
    added = 0
    for path in sorted(directory.glob("*.yaml")) if directory.is_dir() else []:
        spec = yaml.safe_load(path.read_text(encoding="utf-8"))
        if db.execute("SELECT 1 FROM templates WHERE name = ?", [spec["name"]]).fetchone() is None:
            add_version(db, spec["name"], NewVersion(body=spec["body"], category=spec.get("category"),
                                                     description=spec.get("description")), f"seed:{path.name}")
            added += 1
    return added
