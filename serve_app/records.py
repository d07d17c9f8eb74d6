"""The ledger row of a finished chat request: outcome, usage, cost and one row per model call."""

from __future__ import annotations

import time

from deployments.ledger import AttemptRecord, RequestRecord
from serve_app.config import ModelConfig
from serve_app.dispatch import Attempt
from serve_app.errors import RaygateError
from serve_app.protocol import UsageInfo


def fill_record(record: RequestRecord, started: float, model: ModelConfig | None, usage: UsageInfo | None,
                error: RaygateError | None, attempts: list[Attempt]) -> RequestRecord:
    """Complete ``record`` with how the request ended, and return it.

    The last call's row carries the usage (earlier ones failed before an answer); a stream that
    failed after its first byte marks that call with the error.
    """
    record.latency_ms = (time.perf_counter() - started) * 1000
    record.attempt_log = [
        AttemptRecord(number=i, model=a.model, status=a.status, error_code=a.error_code, latency_ms=a.latency_ms)
        for i, a in enumerate(attempts, start=1)
    ]
    record.attempts = len(attempts)
    if model is not None:
        record.model = model.name
        record.fallback = bool(attempts) and model.name != attempts[0].model
    if usage is not None and model is not None:
        cost = model.cost_usd(usage.prompt_tokens, usage.completion_tokens)
        record.prompt_tokens, record.completion_tokens = usage.prompt_tokens, usage.completion_tokens
        record.cost_usd, record.usage_estimated = cost, usage.estimated
        if record.attempt_log:  # a cache hit made no call
            record.attempt_log[-1] = record.attempt_log[-1].model_copy(update={
                "prompt_tokens": usage.prompt_tokens, "completion_tokens": usage.completion_tokens,
                "cost_usd": cost, "usage_estimated": usage.estimated})
    if error is not None:
        record.status, record.error_code = error.status_code, error.code
        if record.attempt_log and record.attempt_log[-1].status == 200:  # failed after the first byte
            record.attempt_log[-1] = record.attempt_log[-1].model_copy(
                update={"status": error.status_code, "error_code": error.code})
    return record
