"""A/B experiments: specs, sticky weighted assignment, and storage in the ledger.

An experiment covers the requests that ask for one model name (``match_model``,
``auto`` included) and sends a share of them (``traffic``) to its variants, each a
model, a template version and/or sampling parameters, by weight. A user always gets
the same variant: the choice is a hash of (experiment, user), so no state is kept
per user. Once completed with a winner and ``promote``, every request in scope gets
the winner. Results and significance: ``deployments.experiment_stats``.
"""

from __future__ import annotations

import hashlib
import json
import sqlite3
import time
import uuid
from typing import Any, Literal

from pydantic import BaseModel, Field, model_validator

from serve_app.errors import InvalidRequestError, NotFoundError

Status = Literal["draft", "running", "paused", "completed"]
Metric = Literal["success_rate", "latency", "cost", "feedback", "judge_score"]
SCHEMA = """
CREATE TABLE IF NOT EXISTS experiments (
    id TEXT PRIMARY KEY, name TEXT NOT NULL, spec TEXT NOT NULL, status TEXT NOT NULL, winner TEXT,
    created_at REAL NOT NULL, updated_at REAL NOT NULL
);
"""
_TRANSITIONS: dict[str, set[str]] = {"start": {"draft", "paused"}, "pause": {"running"},
                                     "complete": {"running", "paused"}}
_TARGET = {"start": "running", "pause": "paused", "complete": "completed"}


class Variant(BaseModel):
    """One arm: what it changes, and its share of the experiment's traffic."""

    name: str = Field(min_length=1, max_length=64)
    weight: float = Field(1.0, gt=0, le=1000)
    model: str | None = Field(None, description="Answer with this model instead.")
    template_version: int | None = Field(None, ge=1, description="This version of the experiment's template.")
    parameters: dict[str, float | int] = Field(
        default_factory=dict, description="Sampling overrides: temperature, top_p, max_tokens, presence/frequency_penalty.")

    @model_validator(mode="after")
    def _check_parameters(self) -> "Variant":
        unknown = set(self.parameters) - {"temperature", "top_p", "max_tokens", "presence_penalty",
                                          "frequency_penalty"}
        if unknown:
            raise ValueError(f"variant parameters may not set {sorted(unknown)}")
        return self


class ExperimentSpec(BaseModel):
    """``POST /admin/experiments``."""

    name: str = Field(min_length=1, max_length=128)
    description: str = Field("", max_length=1000)
    match_model: str = Field(min_length=1, max_length=256, description="Requests for this model (or auto) take part.")
    template: str | None = Field(None, max_length=64, description="The template whose versions the variants pick.")
    traffic: float = Field(1.0, gt=0, le=1, description="Share of the users in scope who take part.")
    variants: list[Variant] = Field(min_length=2, max_length=10, description="The first is the control.")
    metric: Metric = Field("success_rate", description="What decides the winner.")
    alpha: float = Field(0.05, gt=0, lt=0.5, description="Significance level.")
    min_samples: int = Field(100, ge=2, le=10_000_000, description="Requests per variant before any verdict.")
    promote: bool = Field(False, description="Complete and serve the winner to everyone once it is significant.")

    @model_validator(mode="after")
    def _unique_names(self) -> "ExperimentSpec":
        names = [v.name for v in self.variants]
        if len(set(names)) != len(names):
            raise ValueError("variant names must be unique")
        if any(v.template_version for v in self.variants) and not self.template:
            raise ValueError("variants with a template_version need the experiment's template")
        return self


class Experiment(ExperimentSpec):
    id: str
    status: Status = "draft"
    winner: str | None = None
    created_at: float
    updated_at: float

    def variant(self, name: str | None) -> Variant | None:
        return next((v for v in self.variants if v.name == name), None)


def _unit(text: str) -> float:
    """A number in [0, 1) from a hash: the same input, the same number, on every replica."""
    return int(hashlib.sha256(text.encode()).hexdigest()[:15], 16) / 16**15


def assign(experiment: Experiment, user: str) -> Variant | None:
    """The user's variant (sticky), or None when the user is outside the experiment's traffic."""
    if experiment.status == "completed":
        return experiment.variant(experiment.winner) if experiment.promote else None
    if experiment.status != "running" or _unit(f"{experiment.id}:traffic:{user}") >= experiment.traffic:
        return None
    point = _unit(f"{experiment.id}:variant:{user}") * sum(v.weight for v in experiment.variants)
    for variant in experiment.variants:
        point -= variant.weight
        if point < 0:
            return variant
    return experiment.variants[-1]


def _load(row: tuple[Any, ...]) -> Experiment:
    ident, _, spec, status, winner, created, updated = row
    return Experiment(**json.loads(spec), id=ident, status=status, winner=winner, created_at=created,
                      updated_at=updated)


def create(db: sqlite3.Connection, spec: ExperimentSpec) -> Experiment:
    now, ident = time.time(), f"exp_{uuid.uuid4().hex[:12]}"
    db.execute("INSERT INTO experiments (id, name, spec, status, winner, created_at, updated_at) "
               "VALUES (?, ?, ?, 'draft', NULL, ?, ?)", [ident, spec.name, spec.model_dump_json(), now, now])
    return get(db, ident)


def get(db: sqlite3.Connection, ident: str) -> Experiment:
    row = db.execute("SELECT * FROM experiments WHERE id = ?", [ident]).fetchone()
    if row is None:
        raise NotFoundError(f"There is no experiment '{ident}'.", param="experiment")
    return _load(row)


def listing(db: sqlite3.Connection, statuses: tuple[str, ...] | None = None) -> list[Experiment]:
    rows = db.execute("SELECT * FROM experiments ORDER BY created_at DESC").fetchall()
    return [e for e in map(_load, rows) if statuses is None or e.status in statuses]


def transition(db: sqlite3.Connection, ident: str, action: str, winner: str | None = None) -> Experiment:
    """start, pause or complete (optionally naming the winner)."""
    experiment = get(db, ident)
    if action not in _TRANSITIONS or experiment.status not in _TRANSITIONS[action]:
        raise InvalidRequestError(f"An experiment that is {experiment.status} cannot {action}.", param="status",
                                  code="invalid_transition")
    if winner is not None and experiment.variant(winner) is None:
        raise InvalidRequestError(f"The experiment has no variant '{winner}'.", param="winner")
    db.execute("UPDATE experiments SET status = ?, winner = COALESCE(?, winner), updated_at = ? WHERE id = ?",
               [_TARGET[action], winner, time.time(), ident])
    return get(db, ident)
