"""A/B experiments in a chat request: which variant the user gets, and what it changes.

Each Gateway replica keeps the list of live experiments (running, or completed with a
winner to promote) for a few seconds; assignment itself needs no call (a hash of the
experiment and the user). A Ledger that cannot answer leaves requests outside any
experiment rather than failing them.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from deployments.experiments import Experiment, Variant, assign
from serve_app.constants import LEDGER_CALL_TIMEOUT_S
from serve_app.errors import RaygateError
from serve_app.handles import call
from serve_app.protocol import ChatCompletionRequest

logger = logging.getLogger(__name__)
TTL_S = 5.0


class ExperimentCache:
    """The live experiments, read from the Ledger and kept for ``ttl_s``."""

    def __init__(self, ledger: Any, ttl_s: float = TTL_S) -> None:
        self.ledger = ledger
        self.ttl_s = ttl_s
        self._live: list[Experiment] = []
        self._expires = 0.0

    async def assignment(self, model: str, user: str) -> tuple[Experiment, Variant] | None:
        """The first live experiment on ``model`` that takes this user, and the user's variant."""
        for experiment in await self.live():
            if experiment.match_model == model and (variant := assign(experiment, user)) is not None:
                return experiment, variant
        return None

    async def live(self) -> list[Experiment]:
        if time.monotonic() >= self._expires:
            try:
                found: list[Experiment] = await call(
                    self.ledger.store.remote("experiments.listing", ("running", "completed")),
                    LEDGER_CALL_TIMEOUT_S, "Ledger")
                self._live = [e for e in found if e.status == "running" or (e.promote and e.winner)]
            except RaygateError:
                logger.warning("Experiments unavailable; requests run outside them for now")
            self._expires = time.monotonic() + self.ttl_s
        return self._live

    def forget(self) -> None:
        """Re-read on the next request (after this replica changed an experiment)."""
        self._expires = 0.0


def with_variant(body: ChatCompletionRequest, experiment: Experiment,
                 variant: Variant) -> tuple[ChatCompletionRequest, int | None]:
    """The request as the variant has it, and the template version it asks for."""
    update: dict[str, Any] = dict(variant.parameters)
    if variant.model:
        update["model"] = variant.model
    version = None
    if variant.template_version and experiment.template:
        update["template"], version = experiment.template, variant.template_version
    return body.model_copy(update=update), version
