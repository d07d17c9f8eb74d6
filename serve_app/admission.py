"""Admitting a chat request: the limit check, the route, the reservation, and the exact-cache read sent with them.

Each is a Redis round trip, and one after another they were most of the wait a request at 1
client spent outside the upstream. A request that names its model sends all three in one loop
turn and waits for about one (bench/RESULTS.md, "Hot-path cuts, round 4"). What each decides is
unchanged: the errors keep their order (limits, images, quota); a reservation made for a request
the check then refuses is released at once; the early read is the exact layer only (a paraphrase
search costs an Embedder call, which a refused request must not spend) and is used only when the
request that reaches the cache is the one it was planned for.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

from deployments.cache import CachePlan
from deployments.cache_protocol import CacheHit
from deployments.cost_guard_protocol import ReserveDecision
from deployments.guard_protocol import GuardDecision
from deployments.ledger import RequestRecord
from deployments.router import RoutePlan
from serve_app.auth import APIKey
from serve_app.config import ModelConfig
from serve_app.errors import ModelNotFoundError
from serve_app.grounding import query_of
from serve_app.protocol import ChatCompletionRequest
from serve_app.spend import capped_request
from serve_app.vision import check_images
from serve_app.watch import flood_alert

if TYPE_CHECKING:
    from serve_app.gateway import Gateway

__all__ = ["CacheRead", "admit"]


Admission = tuple[GuardDecision, ModelConfig, ReserveDecision]


async def admit(gateway: "Gateway", key: APIKey, body: ChatCompletionRequest, model: ModelConfig | None,
                record: RequestRecord, tags: list[str], tokens: int) -> Admission:
    """Check the key's limits, route ``model: auto``, reserve: a named model's reservation goes with the check.

    Raises:
        RaygateError: the limits, the images or the quota refuse the request (in that order).
    """
    checking = gateway.guard("check", key, tokens)
    max_image_bytes = gateway.config.gateway.max_image_bytes
    if model is None:  # the route needs the check's verdict first: a refused request is not classified
        limits = _admitted(gateway, key, await checking)
        model = await _route(gateway, key, body, record)
        check_images(body, model, max_image_bytes)
        return limits, model, await gateway.spend.reserve(record.id, key, body, model, tags)
    reserving = asyncio.ensure_future(gateway.spend.reserve(record.id, key, body, model, tags))
    try:
        limits = _admitted(gateway, key, await checking)
        check_images(body, model, max_image_bytes)
    except BaseException:
        reserving.add_done_callback(lambda done: done.cancelled() or done.exception() is not None
                                    or gateway.spend.finish(record.id, None, None))  # a release
        raise
    return limits, model, await reserving


def _admitted(gateway: "Gateway", key: APIKey, limits: GuardDecision) -> GuardDecision:
    """The check's outcome: the anomaly watcher runs, a flood alerts, a refusal raises."""
    gateway.watcher.start()
    flood_alert(gateway.alerter, key, limits)
    if (denied := limits.to_error()) is not None:
        raise denied
    return limits


async def _route(gateway: "Gateway", key: APIKey, body: ChatCompletionRequest,
                 record: RequestRecord) -> ModelConfig:
    """``model: auto``: classify the request and take the model its category (or domain) is routed to."""
    if not gateway.config.router.enabled_for(key.tenant):
        raise ModelNotFoundError("The model 'auto' needs a routing table (router.tiers).", param="model")
    fallbacks = {m.name: m.fallbacks for m in gateway.config.models}
    plan: RoutePlan = await gateway.router("route", query_of(body), key.tenant, fallbacks)
    c = plan.classification
    record.route, record.category, record.domain = plan.header(), c.category, c.domain
    record.route_reason = f"{c.classifier}: {c.reason}"[:500]
    return gateway._model(plan.model)


class CacheRead:
    """A request's exact-cache read, sent early when the request names its model.

    Planned for what the cache will see: the request as sent, capped at the max_tokens it
    reserves. A plan cap, a downgrade, a template, RAG, a brief or a conversation changes that;
    then the early read is dropped and the request is looked up as it became.
    """

    def __init__(self, gateway: "Gateway", body: ChatCompletionRequest, tenant: str, model: ModelConfig | None,
                 cache_control: str | None) -> None:
        self.gateway, self.body, self.model = gateway, body, model
        self.tenant, self.cache_control = tenant, cache_control
        self.max_tokens, self.plan, self.reading = 0, None, None
        if model is not None:
            self.max_tokens = body.max_output_tokens(model.default_max_tokens)  # what the reservation asks for
            self.plan = gateway.cache.plan(capped_request(body, self.max_tokens), tenant, model.name, cache_control)
            if self.plan.lookup:
                self.reading = asyncio.ensure_future(gateway.cache_lookup(self.plan, "lookup_exact"))

    async def lookup(self, uncapped: ChatCompletionRequest, body: ChatCompletionRequest, model: ModelConfig,
                     decision: ReserveDecision, template: str | None) -> tuple[CachePlan, CacheHit | None]:
        """The plan for ``body`` (``uncapped`` capped as decided) and its hit: exact, else a paraphrase's."""
        cache = self.gateway.cache
        if self.plan is not None and uncapped is self.body and model is self.model \
                and decision.max_tokens == self.max_tokens:
            hit = await self.reading if self.reading is not None else None
            if hit is None and cache.may_find_paraphrase(self.plan):
                hit = await self.gateway.cache_lookup(self.plan, "lookup_semantic")
            return self.plan, hit
        self.cancel()
        plan = cache.plan(body, self.tenant, model.name, self.cache_control, template)
        return plan, (await self.gateway.cache_lookup(plan) if plan.lookup else None)

    def cancel(self) -> None:
        """Drop the early read (the request was refused or changed)."""
        if self.reading is not None:
            self.reading.cancel()
