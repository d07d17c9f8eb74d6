"""The Gateway: raygate's HTTP ingress. It authenticates, validates and orchestrates.

Hub and spoke: the Gateway calls each component through its handle and no
component calls back. Work after the answer (the ledger row) leaves the
client's path and is batched.
"""

from __future__ import annotations

import asyncio
import functools
import gc
import logging
import os
import time
from collections.abc import AsyncIterator
from typing import Any

import orjson
from fastapi import Depends, Request
from fastapi.responses import Response, StreamingResponse
from ray import serve
from ray.serve.handle import DeploymentHandle

from deployments.cache import CachePlan, ResponseCache
from deployments.cache_protocol import CACHE_HEADER, CATEGORY_HEADER, CacheHit, StreamCollector
from deployments.cost_guard import CostGuard
from deployments.guard import Guard, check_request_size
from deployments.guard_protocol import GuardDecision
from deployments.injection import InjectionDetector
from deployments.router import Router
from deployments.ledger import RequestRecord
from deployments.privacy import Content
from serve_app import (__version__, adapters, admin, api_routes, batch_routes, cache_admin, conversation_routes,
                       cost_admin, dashboard, evaluation_admin, experiment_admin, overview_admin, privacy_admin,
                       rag_routes, router_admin, template_admin)
from serve_app.judging import Evaluator
from serve_app.router_config import AUTO_MODEL
from serve_app.alerts import Alerter
from serve_app.auth import APIKey, KeyStore
from serve_app.deps import authenticate
from serve_app.circuit import CircuitBreakers
from serve_app.config import GatewayConfig, ModelConfig
from serve_app.constants import (
    EMBEDDER_CALL_TIMEOUT_S,
    LEDGER_CALL_TIMEOUT_S,
    MODEL_CALL_TIMEOUT_S,
    FLAGS_HEADER,
    MODEL_HEADER,
    ROUTE_HEADER,
)
from serve_app.errors import (
    ErrorResponse,
    ModelNotFoundError,
    RaygateError,
    UpstreamUnavailableError,
)
from serve_app.dispatch import Attempt, Dispatcher
from serve_app.grounding import Grounding, ground
from serve_app.experimenting import ExperimentCache, with_variant
from serve_app.prompting import TemplateCache, with_template
from serve_app.batching import BatchRunner
from serve_app.briefing import Brief
from serve_app.conversing import Conversations
from serve_app.handles import call, next_item
from serve_app.metrics import GatewayMetrics
from serve_app.middleware import RequestContextMiddleware, install_cors, install_error_handlers
from serve_app.placement import Placed, placed_models
from serve_app.records import fill_record
from serve_app.adapters import AdapterIndex
from serve_app.admission import CacheRead, admit
from serve_app.request_log import RequestLog
from serve_app.live import LiveSettings, apply_live
from serve_app.protocol import (
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatCompletionStreamResponse,
    UsageInfo,
)
from serve_app.spend import TAG_HEADER, Spend, capped_request, estimate_prompt_tokens, parse_tags
from serve_app.pipelining import SHARED_CONNECTIONS, AutoPipeline
from serve_app.stores import redis_client
from serve_app.http_parts import GatewayAPI, answer_headers, client_language, lean_chat_completions
from serve_app.ledger_buffer import LedgerBuffer
from serve_app.streaming import cached_answer, sse_events
from serve_app.thresholds import ThresholdEvaluator
from serve_app.vision import downgrade_refused, vision_capable
from serve_app.watch import AnomalyWatcher, periodic_work

logger = logging.getLogger(__name__)

ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    status: {"model": ErrorResponse} for status in (400, 401, 403, 404, 405, 413, 429, 500, 503)
}

app = GatewayAPI(title="raygate", version=__version__, responses=ERROR_RESPONSES)
# Outermost: every response, errors included, gets x-request-id; big bodies stop here.
app.add_middleware(RequestContextMiddleware, max_body_bytes=lambda path: app.state.max_upload_bytes
                   if path.endswith(("/documents", "/v1/files")) else app.state.max_body_bytes)
install_error_handlers(app)
app.state.max_body_bytes = app.state.max_upload_bytes = 1_048_576
for routes in (admin, cost_admin, cache_admin, privacy_admin, api_routes, overview_admin, dashboard, rag_routes,
               router_admin, template_admin, experiment_admin, adapters, conversation_routes, evaluation_admin,
               batch_routes):
    app.include_router(routes.router)


@serve.ingress(app)
class Gateway:
    """The ingress deployment.

    Args:
        config: the validated application config.
        redis_url: where keys and counters live.
        models: one handle per model placed as a deployment, by model name (embedded ones have none).
        embedder: the Embedder's handle.
        ledger: the Ledger's handle.
        cost_guard: CostGuard's handle when it is placed as a deployment; None embeds it here.
        guard: the Guard's handle when it is placed as a deployment; None embeds it here.
        semantic_cache: the SemanticCache's handle; None keeps the cache exact-only.
        retriever: the Retriever's handle; None turns RAG off.
        router: the Router's handle when it is placed as a deployment; None embeds it here.
        cache: the Cache's handle when the response cache is placed as a deployment; None embeds it here.
    """

    def __init__(
        self,
        config: GatewayConfig,
        redis_url: str,
        models: dict[str, DeploymentHandle],
        embedder: DeploymentHandle,
        ledger: DeploymentHandle,
        cost_guard: DeploymentHandle | None = None,
        guard: DeploymentHandle | None = None,
        semantic_cache: DeploymentHandle | None = None,
        retriever: DeploymentHandle | None = None,
        router: DeploymentHandle | None = None,
        cache: DeploymentHandle | None = None,
    ) -> None:
        self.config = self.args_config = config
        gc.set_threshold(config.gateway.gc_threshold)  # the young generation only; Serve freezes the startup heap
        redis = redis_client(redis_url)
        pipeline = AutoPipeline(redis, connections=SHARED_CONNECTIONS)  # the embedded components' Redis commands
        self.keys = KeyStore(redis, os.environ.get(config.gateway.admin_key_env) or None,
                             cache_ttl_s=config.gateway.key_cache_ttl_s)
        self.models = placed_models(config, models)  # handles, or ModelServers embedded here (placement.models)
        self.dispatcher = Dispatcher(config, self.models, CircuitBreakers(redis, pipeline))
        costs = cost_guard or CostGuard(config.cost_guard, redis_url, config.prices(), pipeline=pipeline)
        placed = Placed("CostGuard", costs, remote=cost_guard is not None)
        self.alerter = Alerter(config.alerts, redis, budget_status=lambda: placed("budget_status"))
        self.spend = Spend(placed, on_crossings=self.alerter.notify)
        self.guard = Placed("Guard", guard or Guard(config.guard, redis_url, pipeline=pipeline),
                            remote=guard is not None)
        self.thresholds = ThresholdEvaluator(config.alerts.rules, self.alerter, lambda a, b: call(
            ledger.store.remote("overview.summary", a, b), LEDGER_CALL_TIMEOUT_S, "Ledger"),
            lambda: placed("budget_status"))
        self.watcher = AnomalyWatcher(self.guard if config.guard.anomaly.enabled else None, self.alerter, redis,
                                      config.alerts.evaluate_interval_s, also=periodic_work(self))
        semantic = Placed("SemanticCache", semantic_cache, remote=True) if semantic_cache is not None else None
        self.metrics = GatewayMetrics()
        self.request_log = RequestLog(config.logs, config.stores.data_dir)
        self.adapters = AdapterIndex(config, config.stores.data_dir)
        self.cache = ResponseCache(config.cache, redis_url, semantic,  # plans and counts here either way
                                   on_evict=lambda n: self.metrics.inc("raygate_cache_evictions", n),
                                   pipeline=pipeline)
        self.cached = Placed("Cache", cache or self.cache, remote=cache is not None)  # lookups and stores
        self.router = Placed("Router", router or Router(config.router, redis_url, embedder), remote=router is not None)
        self.injection = InjectionDetector(config.guard.injection, Placed("Embedder", embedder, remote=True,
                                                                          timeout_s=EMBEDDER_CALL_TIMEOUT_S))
        self.embedder = embedder
        self.retriever = retriever
        self.ledger = ledger
        self.templates = TemplateCache(ledger)
        self.conversations = Conversations(self)
        self.experiments = ExperimentCache(ledger)
        self.evaluator = Evaluator(self)  # the judge: sampled and sync-route scoring (serve_app.judging)
        self.ledger_buffer = LedgerBuffer(
            self._send_to_ledger,
            flush_interval_s=config.gateway.ledger_flush_interval_s,
            batch_size=config.gateway.ledger_batch_size,
        )
        app.state.gateway = self
        app.state.max_body_bytes = config.gateway.max_body_bytes
        app.state.max_upload_bytes = config.gateway.max_upload_bytes
        install_cors(app, config.gateway.cors_allow_origins)
        app.serve_lean("/v1/chat/completions", "POST", lean_chat_completions)
        self.batches = BatchRunner(self, config.batches)  # background batch jobs, behind interactive traffic
        self.batches.start()

    @app.post("/v1/chat/completions", response_model=ChatCompletionResponse)
    async def chat_completions(
        self, body: ChatCompletionRequest, request: Request, key: APIKey = Depends(authenticate)
    ) -> Response:
        """OpenAI chat completions, streaming (SSE) or not."""
        started = getattr(request.state, "arrived", None) or time.perf_counter()  # set by the middleware
        body, brief = Brief.of(body, request.headers, self.config.brief)  # the cap, an expand turn
        requested = body.model
        assignment = await self.experiments.assignment(body.model, key.user)
        template_version = None
        if assignment is not None:
            body, template_version = with_variant(body, *assignment)
        model = None if body.model == AUTO_MODEL else self._model(body.model)
        tags = parse_tags(request.headers.get(TAG_HEADER))
        record = RequestRecord(
            id=request.state.request_id, tenant=key.tenant, user=key.user, key_id=key.key_id,
            requested_model=requested, stream=body.stream, tags=",".join(tags) or None,
            experiment=assignment[0].id if assignment else None, variant=assignment[1].name if assignment else None,
            mode=brief.mode,
            content=Content(messages=[{"role": m.role, "content": m.text()} for m in body.messages]),
        )
        attempts: list[Attempt] = []
        default_tokens = model.default_max_tokens if model else max(m.default_max_tokens for m in self.config.models)
        estimated_tokens = estimate_prompt_tokens(body) + body.max_output_tokens(default_tokens)
        # The injection check (an Embedder call) runs alongside the limit checks and the reservation.
        inspection = asyncio.ensure_future(self.injection.screen(key.tenant, body.messages))
        read: CacheRead | None = None
        try:
            check_request_size(self.config.guard, body)
            read = CacheRead(self, body, key.tenant, model, request.headers.get("cache-control"))  # sent now
            limits, model, decision = await admit(self, key, body, model, record, tags, estimated_tokens)
        except RaygateError as exc:
            inspection.cancel()
            if read is not None:
                read.cancel()
            self._record(record, started, None, None, exc, attempts, reserved=False)
            raise
        grounding: Grounding | None = None
        try:
            record.flags = self.injection.flags(key.tenant, await inspection)
            if body.template is not None:
                template = await self.templates.get(body.template, template_version)
                memory = await self.templates.memory(key, template, self.config.memory.enabled)
                body, record.template = with_template(body, template, memory), f"{template.name}@v{template.version}"
            if (rag := body.rag or self.config.retriever.tenant_defaults.get(key.tenant)) and self.retriever:
                body, grounding = await ground(self.retriever, key.tenant, body, rag)
                record.rag_ms, record.rag_chunks = grounding.ms, grounding.chunk_ids
            body = await brief.attach(self, key, body)  # a brief request's conversation and instruction
            body = await self.conversations.expand(key, body, model, decision, record.id)  # history + summary
        except RaygateError as exc:
            read.cancel()
            self._record(record, started, None, None, exc, attempts)  # releases the reservation
            raise
        extension = brief.extension(grounding.extension() if grounding else None)
        if decision.model is not None and decision.model != model.name:
            record.downgraded_from, model = model.name, self._model(decision.model)
            if not vision_capable(body, model):
                refused = downgrade_refused(decision, model)
                read.cancel()
                self._record(record, started, None, None, refused, attempts)  # releases the reservation
                raise refused
        uncapped, body = body, capped_request(body, decision.max_tokens)
        plan, hit = await read.lookup(uncapped, body, model, decision, record.template)
        if hit is not None:
            return brief.tag(self._serve_hit(hit, body, record, model, started, limits, extension))
        record.cache_status = plan.status
        try:
            answer = await self.dispatcher.first_answer(body, model, attempts, client_language(request))
            record.ttft_ms, record.upstream_ms = (time.perf_counter() - started) * 1000, answer.upstream_s * 1000
        except RaygateError as exc:
            self._record(record, started, None, None, exc, attempts)
            exc.headers = {**exc.headers, "x-raygate-attempts": str(len(attempts))}
            raise
        headers = {**answer_headers(answer, started), **limits.headers(), CACHE_HEADER: plan.status,
                   **self._route_headers(record)}
        if record.flags:
            headers[FLAGS_HEADER] = record.flags
        if record.downgraded_from:
            headers["x-raygate-downgraded"] = f"{record.downgraded_from}->{model.name}"
        category = record.category or request.headers.get(CATEGORY_HEADER)
        if answer.stream is None:
            self._correct_tokens(key, answer.first.usage, estimated_tokens, limits.checked_at)
            record.content.answer = answer.first.choices[0].message.content  # type: ignore[union-attr]
            served = await self.evaluator.review(key, body, record, answer, headers)  # judged; maybe retried once
            self._record_after_answer(record, started, answer.model, answer.first.usage, None, attempts)
            answer, choice = served, served.first.choices[0]
            self._cache_store(plan, choice.message.content, choice.finish_reason, answer.model, answer.first.usage,
                              record, category)
            payload = answer.first.model_copy(update={"raygate": extension}).model_dump(mode="json")
            return brief.tag(Response(orjson.dumps(payload), media_type="application/json", headers=headers))
        collected = StreamCollector()

        def on_end(usage: UsageInfo | None, error: RaygateError | None) -> None:
            record.content.answer = collected.text()  # type: ignore[union-attr]
            self._correct_tokens(key, usage, estimated_tokens, limits.checked_at)
            self._record(record, started, answer.model, usage, error, attempts)
            if error is None and usage is not None:
                self.evaluator.sample(key, body, record, collected.text(), answer.model.name)
                self._cache_store(plan, collected.text(), collected.finish_reason, answer.model, usage, record,
                                  category)

        collected.add(answer.first)
        events = sse_events(answer.first, lambda: collected.wrap(self._rest(answer.stream, answer.model)),
                            include_usage=body.include_usage(), on_end=on_end, extension=extension)
        return brief.tag(StreamingResponse(events, media_type="text/event-stream", headers=headers))

    def _serve_hit(self, hit: CacheHit, body: ChatCompletionRequest, record: RequestRecord, model: ModelConfig,
                   started: float, limits: GuardDecision, extension: dict[str, Any] | None) -> Response:
        """Answer from the cache at once (streamed if asked): nothing billed, the saving recorded."""
        record.cache_status, record.ttft_ms = hit.status, (time.perf_counter() - started) * 1000
        record.content.answer = hit.entry.content  # type: ignore[union-attr]
        record.saved_usd = model.cost_usd(hit.entry.usage.prompt_tokens, hit.entry.usage.completion_tokens)
        self.cache.count(hit.status, record.saved_usd)
        self._record_after_answer(record, started, model, UsageInfo.of(0, 0), None, [])
        headers = {MODEL_HEADER: hit.entry.model, CACHE_HEADER: hit.status, "x-raygate-attempts": "0",
                   **limits.headers(), **({FLAGS_HEADER: record.flags} if record.flags else {}),
                   **self._route_headers(record)}
        return cached_answer(hit, record.id, body.stream, body.include_usage(), headers, extension)

    async def cache_lookup(self, plan: CachePlan, method: str = "lookup") -> CacheHit | None:
        """A lookup in either placement: a Cache deployment that cannot answer is a bypass, as Redis failing is."""
        try:
            return await self.cached(method, plan)
        except RaygateError as exc:
            logger.warning("Cache bypassed: the Cache deployment failed (%s)", type(exc).__name__)
            plan.status = "bypass"
            return None

    def _cache_store(self, plan: CachePlan, content: str | None, finish_reason: Any, model: ModelConfig,
                     usage: UsageInfo, record: RequestRecord, category: str | None) -> None:
        """Count the lookup's outcome (locally, flushed in batches) and keep the answer, off the client's path."""
        self.cache.count(plan.status)
        if plan.store and content:
            cost = model.cost_usd(usage.prompt_tokens, usage.completion_tokens)
            tags = record.tags.split(",") if record.tags else []
            self.spend.background.spawn(self.cached("store", plan, content, finish_reason, model.name, usage, cost,
                                                    record.user, tags, category))

    async def reconfigure(self, user_config: dict[str, Any]) -> None:
        """Serve's ``user_config``: prices, alert rules, the request log, the failure message, changed live
        (``serve_app.live``) on top of the args, without replacing this replica."""
        live = apply_live(self.args_config, LiveSettings.model_validate(user_config))
        self.config = self.dispatcher.config = self.adapters.config = live
        await self.spend.cost_guard("set_prices", self.config.prices())  # placed as a deployment: one replica
        self.thresholds.rules = self.config.alerts.rules
        self.request_log = RequestLog(self.config.logs, self.config.stores.data_dir)
        logger.info("Live settings applied: %s", sorted(k for k, v in user_config.items() if v is not None))

    @staticmethod
    def _route_headers(record: RequestRecord) -> dict[str, str]:
        return {ROUTE_HEADER: record.route} if record.route else {}

    def _correct_tokens(self, key: APIKey, usage: UsageInfo | None, estimated: int = 0,
                        checked_at: float | None = None) -> None:
        """Replace the tokens-per-minute estimate with the real count, off the client's path (a call the
        Guard never estimated, a judge's or a summary's, adds its usage: ``estimated`` 0)."""
        actual = usage.total_tokens if usage is not None else 0
        self.spend.background.spawn(self.guard("record_tokens", key, actual, estimated, checked_at))

    async def __del__(self) -> None:
        """Serve calls this when the replica stops: buffered ledger rows are not lost."""
        await self.batches.close()
        await self.spend.close()
        await self.watcher.close()
        await self.guard.close()
        await self.alerter.close()
        await self.cache.close()
        await self.router.close()
        await self.dispatcher.close()
        await self.ledger_buffer.close()
        await self.keys.close()
        await self.keys.redis.aclose()
        self.metrics.flush()

    def _model(self, name: str) -> ModelConfig:
        model = self.config.model(name) or self.adapters.resolve(name)
        if model is None:
            raise ModelNotFoundError(f"The model '{name}' does not exist.", param="model")
        return model

    async def _rest(self, stream: Any, model: ModelConfig) -> AsyncIterator[ChatCompletionStreamResponse | RaygateError]:
        while True:
            try:
                yield await next_item(stream, MODEL_CALL_TIMEOUT_S, f"Model {model.name}", UpstreamUnavailableError)
            except StopAsyncIteration:
                return

    def _record(
        self, record: RequestRecord, started: float, model: ModelConfig | None, usage: UsageInfo | None,
        error: RaygateError | None, attempts: list[Attempt], *, reserved: bool = True,
    ) -> None:
        """Settle the reservation, and queue the request's ledger row with one row per model call."""
        if reserved:
            self.spend.finish(record.id, model, usage)
        self.ledger_buffer.add(fill_record(record, started, model, usage, error, attempts))
        self.conversations.finish(record.id, record.content.answer if record.content and usage and not error else None)
        self.metrics.observe(record)
        self.batches.observe(record)
        self.request_log.write(record)

    def _record_after_answer(self, record: RequestRecord, started: float, model: ModelConfig | None,
                             usage: UsageInfo | None, error: RaygateError | None, attempts: list[Attempt]) -> None:
        """``_record`` on the loop's next turn, after the answer is written (no await on that path yields).
        The settle's task, made now, queues its script on that turn before the bookkeeping: one round trip
        with the token correction and the cache store, not one riding with the next request's admission."""
        self.spend.finish(record.id, model, usage)
        asyncio.get_running_loop().call_soon(
            functools.partial(self._record, record, started, model, usage, error, attempts, reserved=False))

    async def _send_to_ledger(self, rows: list[RequestRecord]) -> None:
        await call(self.ledger.record.remote(rows), LEDGER_CALL_TIMEOUT_S, "Ledger")
