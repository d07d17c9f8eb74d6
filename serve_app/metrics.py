"""Prometheus metrics through Ray's metrics pipeline, and ``GET /metrics`` for single-node use.

Every Gateway replica records into ``ray.serve.metrics`` (so each replica on each node
is exported by Ray's metrics agent, which Prometheus scrapes through Ray's service
discovery file; Ray prefixes the names with ``ray_``). One hook, ``observe``, reads a
finished request's ledger row, so every outcome — answered, cached, refused, failed —
is counted the same way. ``GET /metrics`` answers the local node's raygate series,
named as this module names them (``raygate_..._total``, ``_seconds``).
"""

from __future__ import annotations

import asyncio
import re
import urllib.request
from typing import Any

from deployments.ledger import RequestRecord

LATENCY_BOUNDARIES = [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60]
OVERHEAD_BOUNDARIES = [0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25]
# name (as exported, without Ray's prefix) -> (kind, description, tag keys)
METRICS: dict[str, tuple[str, str, tuple[str, ...]]] = {
    "raygate_requests": ("counter", "Chat requests by model, route category, HTTP status and cache result.",
                         ("model", "route", "status", "cache")),
    "raygate_request_latency_seconds": ("histogram", "End-to-end latency of chat requests.", ("model",)),
    "raygate_time_to_first_token_seconds": ("histogram", "Time to the first byte of an answer.", ("model",)),
    "raygate_upstream_latency_seconds": ("histogram", "Time spent in model calls.", ("model",)),
    "raygate_gateway_overhead_seconds": ("histogram", "Latency not spent in model calls.", ("model",)),
    "raygate_tokens": ("counter", "Tokens by model and kind (prompt, completion).", ("model", "kind")),
    "raygate_cost_usd": ("counter", "Spend in USD by model, tenant and tag.", ("model", "tenant", "tag")),
    "raygate_cache_saved_usd": ("counter", "What cache hits saved, in USD.", ("model",)),
    "raygate_cache_lookups": ("counter", "Cache results (hit, semantic-hit, miss, bypass).", ("result",)),
    "raygate_cache_evictions": ("counter", "Cache entries evicted by the size bound.", ()),
    "raygate_fallbacks": ("counter", "Requests answered by a fallback model.", ("model",)),
    "raygate_retries": ("counter", "Model calls beyond the first of a request.", ("model",)),
    "raygate_circuit_skips": ("counter", "Model calls skipped because the circuit was open.", ("model",)),
    "raygate_rate_limited": ("counter", "Requests refused by the Guard (rate limits, blocks).", ("reason",)),
    "raygate_denied": ("counter", "Requests refused by CostGuard or a plan.", ("reason",)),
    "raygate_budget_remaining_usd": ("gauge", "What is left of each USD budget this period.", ("budget",)),
    "raygate_batch_requests": ("counter", "Batch requests finished, by outcome (ok, failed).", ("outcome",)),
    "raygate_batch_paused": ("gauge", "1 while this replica's batch work waits for interactive latency.", ()),
}
_BOUNDARIES = {"raygate_gateway_overhead_seconds": OVERHEAD_BOUNDARIES}
FLUSH_S = 1.0  # counters are summed locally this long before they reach Ray
_RATE_CODES = {"rate_limit_exceeded"}
_DENIED_CODES = {"insufficient_quota", "model_not_allowed", "permission_denied"}


class GatewayMetrics:
    """The raygate metrics of one replica (created lazily: Ray's metric classes need a running worker)."""

    def __init__(self) -> None:
        self._metrics: dict[str, Any] | None = None
        self._pending: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}  # counter sums not yet flushed
        self._flush_at: asyncio.TimerHandle | None = None

    def _get(self) -> dict[str, Any]:
        if self._metrics is None:
            import ray
            from ray.serve import metrics as serve_metrics

            if not ray.is_initialized():  # Serve's local testing mode: nothing to export to
                self._metrics = {name: _Discard() for name in METRICS}
                return self._metrics

            made: dict[str, Any] = {}
            for name, (kind, description, tags) in METRICS.items():
                if kind == "histogram":
                    made[name] = serve_metrics.Histogram(
                        name, description, boundaries=_BOUNDARIES.get(name, LATENCY_BOUNDARIES), tag_keys=tags)
                else:
                    cls = serve_metrics.Counter if kind == "counter" else serve_metrics.Gauge
                    made[name] = cls(name, description, tag_keys=tags)
            self._metrics = made
        return self._metrics

    def inc(self, name: str, value: float = 1.0, **tags: str) -> None:
        """Add to a counter; the sums reach Ray within ``FLUSH_S`` (see ``flush``)."""
        if value > 0:
            key = (name, tuple(tags.items()))
            self._pending[key] = self._pending.get(key, 0.0) + value
            if self._flush_at is None:
                self._schedule_flush()

    def _schedule_flush(self) -> None:
        try:
            self._flush_at = asyncio.get_running_loop().call_later(FLUSH_S, self.flush)
        except RuntimeError:  # no event loop (a sync caller): at once
            self.flush()

    def flush(self) -> None:
        """Hand the summed counters to Ray: one call per series, not one per request.

        A finished request moves about six counters; Ray's ``Counter.inc`` costs a few
        microseconds of Python each, and Ray's agent exports only every few seconds
        anyway, so sums a second old lose nothing but that second if the replica dies.
        """
        if self._flush_at is not None:
            self._flush_at.cancel()  # called directly (the replica stops): the timer has nothing left to do
            self._flush_at = None
        pending, self._pending = self._pending, {}
        metrics = self._get()
        for (name, tags), value in pending.items():
            metrics[name].inc(value, tags=dict(tags) or None)

    def observe_value(self, name: str, value: float, **tags: str) -> None:
        self._get()[name].observe(value, tags=tags or None)

    def set(self, name: str, value: float, **tags: str) -> None:
        self._get()[name].set(value, tags=tags or None)

    def observe(self, record: RequestRecord) -> None:
        """Count one finished chat request from its ledger row."""
        model = record.model or record.requested_model
        self.inc("raygate_requests", model=model, route=record.category or "none", status=str(record.status),
                 cache=record.cache_status or "none")
        self.observe_value("raygate_request_latency_seconds", record.latency_ms / 1000, model=model)
        if record.ttft_ms is not None:
            self.observe_value("raygate_time_to_first_token_seconds", record.ttft_ms / 1000, model=model)
        if record.upstream_ms is not None:
            self.observe_value("raygate_upstream_latency_seconds", record.upstream_ms / 1000, model=model)
            overhead = max(record.latency_ms - record.upstream_ms, 0.0) / 1000
            self.observe_value("raygate_gateway_overhead_seconds", overhead, model=model)
        self.inc("raygate_tokens", record.prompt_tokens, model=model, kind="prompt")
        self.inc("raygate_tokens", record.completion_tokens, model=model, kind="completion")
        for tag in (record.tags or "").split(",") if record.tags else ["none"]:
            self.inc("raygate_cost_usd", record.cost_usd, model=model, tenant=record.tenant, tag=tag)
        self.inc("raygate_cache_saved_usd", record.saved_usd, model=model)
        if record.cache_status:
            self.inc("raygate_cache_lookups", result=record.cache_status)
        if record.fallback:
            self.inc("raygate_fallbacks", model=model)
        self.inc("raygate_retries", max(record.attempts - 1, 0), model=model)
        for attempt in record.attempt_log:
            if attempt.error_code == "circuit_open":
                self.inc("raygate_circuit_skips", model=attempt.model)
        if record.status == 429 and record.error_code in _RATE_CODES | {None}:
            self.inc("raygate_rate_limited", reason=record.error_code or "blocked")
        elif record.error_code in _DENIED_CODES:
            self.inc("raygate_denied", reason=record.error_code or "denied")


class _Discard:
    """Stands in for a metric where Ray is not running."""

    def inc(self, *args: Any, **kwargs: Any) -> None: ...

    def observe(self, *args: Any, **kwargs: Any) -> None: ...

    def set(self, *args: Any, **kwargs: Any) -> None: ...


_SERIES = re.compile(r"^(# (?:HELP|TYPE) )?ray_(raygate_\w+)(.*)$")


def prometheus_text(exported: str) -> str:
    """The raygate series of a Ray metrics page, under their own names (Ray's ``ray_`` prefix dropped)."""
    lines = []
    for line in exported.splitlines():
        match = _SERIES.match(line)
        if match:
            lines.append(f"{match.group(1) or ''}{match.group(2)}{match.group(3)}")
    return "\n".join(lines) + "\n"


async def local_metrics() -> str:
    """This node's raygate metrics as Prometheus text (read from Ray's metrics agent on this node)."""
    import ray

    node_id = ray.get_runtime_context().get_node_id()
    node = next(n for n in ray.nodes() if n["NodeID"] == node_id)
    url = f"http://{node['NodeManagerAddress']}:{node['MetricsExportPort']}/metrics"
    text = await asyncio.to_thread(lambda: urllib.request.urlopen(url, timeout=5).read().decode())  # noqa: S310
    return prometheus_text(text)
