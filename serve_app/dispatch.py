"""Getting a first answer from a model: retries, fallbacks, circuit breakers, graceful failure.

Everything here happens before the first byte reaches the client; after it,
nothing is retried (the client has seen part of an answer).
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from dataclasses import dataclass, field
from typing import Any

from serve_app.circuit import CircuitBreakers, Permission
from serve_app.config import GatewayConfig, ModelConfig, base_model_name
from serve_app.errors import InvalidRequestError, RaygateError, UpstreamTimeoutError, UpstreamUnavailableError
from serve_app.handles import REPLICA_UNAVAILABLE, call, next_item
from serve_app.placement import Placed
from serve_app.protocol import ChatCompletionRequest
from serve_app.retry import next_delay_s, retry_after_s
from serve_app.tasks import BackgroundTasks

logger = logging.getLogger(__name__)

CONTEXT_LENGTH_CODE = "context_length_exceeded"
_FINAL_CODES = ("upstream_timeout", "upstream_rate_limited")


@dataclass
class Attempt:
    """One call to one model, as the ledger records it."""

    model: str
    status: int = 200
    error_code: str | None = None
    latency_ms: float = 0.0


@dataclass
class Answer:
    """The first answer of a request: a completion, or a stream's first chunk and the rest."""

    model: ModelConfig
    first: Any
    stream: Any | None
    attempts: list[Attempt]
    upstream_s: float = 0.0


@dataclass
class _Progress:
    attempts: list[Attempt] = field(default_factory=list)
    last_error: RaygateError | None = None
    retry_after_s: float | None = None
    upstream_s: float = 0.0


class Dispatcher:
    """Calls models for the Gateway.

    Args:
        config: the application config (models, graceful-failure messages).
        models: each model's ``ModelServer``, by model name: behind its deployment's handle or embedded
            in this replica (``placement.models``); called the same way.
        circuits: shared circuit breakers, or None to disable them.
    """

    def __init__(self, config: GatewayConfig, models: dict[str, Placed], circuits: CircuitBreakers | None) -> None:
        self.config = config
        self.models = models
        self.circuits = circuits
        self.background = BackgroundTasks()

    async def first_answer(self, body: ChatCompletionRequest, model: ModelConfig, attempts: list[Attempt],
                           language: str | None = None) -> Answer:
        """Try the model, retrying and then falling back, until one gives a first answer.

        Args:
            body: the request.
            model: the requested model.
            attempts: filled with every call made, whatever the outcome (for the ledger).
            language: the client's preferred language, for the failure message.

        Raises:
            InvalidRequestError: the request itself is at fault (never retried).
            UpstreamUnavailableError: every option failed (503, with Retry-After when known).
        """
        progress = _Progress(attempts=attempts)
        deadline = time.monotonic() + model.retry.total_timeout_s
        # A fallback that cannot read the request's images is no option (the Gateway checked ``model``).
        images = bool(body.images())
        chain = [model] + [m for m in map(self._model, model.fallbacks) if m.vision or not images]
        index = 0
        while index < len(chain) and time.monotonic() < deadline:
            candidate = chain[index]
            index += 1
            try:
                answer = await self._try_model(body, candidate, deadline, progress)
            except InvalidRequestError as exc:
                context = candidate.context_fallback
                if exc.code != CONTEXT_LENGTH_CODE or context is None or context in {m.name for m in chain} \
                        or (images and not self._model(context).vision):
                    raise
                chain.insert(index, self._model(context))
                continue
            if answer is not None:
                return answer
        if time.monotonic() >= deadline and progress.last_error is None:
            progress.last_error = UpstreamTimeoutError("No model answered in time.")
        raise self._final_error(progress, language)

    async def _try_model(self, body: ChatCompletionRequest, model: ModelConfig, deadline: float,
                         progress: _Progress) -> Answer | None:
        """Call one model up to its retry budget; None when it cannot answer."""
        for retry_number in range(model.retry.max_attempts):
            if await self._permission(model) == "skip":
                progress.attempts.append(Attempt(model.name, 503, "circuit_open"))
                progress.last_error = UpstreamUnavailableError(f"Model {model.name}'s circuit is open.")
                await self._note_cooldown(model, progress)
                return None
            remaining_s = deadline - time.monotonic()
            if remaining_s <= 0:
                return None
            started = time.monotonic()
            try:
                first, stream = await self._call(body, model, min(model.retry.attempt_timeout_s, remaining_s))
            except RaygateError as exc:
                elapsed_s = time.monotonic() - started
                progress.upstream_s += elapsed_s
                progress.attempts.append(Attempt(model.name, exc.status_code, exc.code, elapsed_s * 1000))
                if isinstance(exc, InvalidRequestError):
                    raise
                if exc.code != REPLICA_UNAVAILABLE:  # a dead replica says nothing of the model's health
                    await self._record(model, ok=False)
                progress.last_error = exc
                progress.retry_after_s = retry_after_s(exc) or progress.retry_after_s
                delay_s = next_delay_s(exc, retry_number, model.retry)
                if delay_s is None or time.monotonic() + delay_s >= deadline:
                    return None
                logger.info("Model %s failed (%s); retry %d in %.2fs", model.name, exc.code, retry_number + 1, delay_s)
                await asyncio.sleep(delay_s)
                continue
            elapsed_s = time.monotonic() - started
            progress.upstream_s += elapsed_s
            progress.attempts.append(Attempt(model.name, 200, None, elapsed_s * 1000))
            self.background.spawn(self._record(model, ok=True))
            return Answer(model, first, stream, progress.attempts, progress.upstream_s)
        return None

    async def _call(self, body: ChatCompletionRequest, model: ModelConfig, timeout_s: float) -> tuple[Any, Any]:
        """One call: the completion, or a stream's first chunk (peeked) and the stream."""
        request = body.model_copy(update={"model": model.name})
        deployment = model.name if model.name in self.models else base_model_name(model.name)
        component = f"Model {model.name}"
        if not body.stream:
            result = await call(self.models[deployment].invoke("complete", request), timeout_s, component,
                                UpstreamUnavailableError)
            if isinstance(result, RaygateError):
                raise result
            return result, None
        stream = self.models[deployment].stream("stream", request)
        try:
            first = await next_item(stream, timeout_s, component, UpstreamUnavailableError)
        except StopAsyncIteration as exc:
            raise UpstreamUnavailableError(f"{component} returned no answer.") from exc
        if isinstance(first, RaygateError):
            stream.cancel()
            raise first
        return first, stream

    async def close(self) -> None:
        """Close the embedded models' engines (a deployment closes its own) and the circuits' connection."""
        for model in self.models.values():
            await model.close()
        if self.circuits is not None:
            await self.circuits.close()

    async def _permission(self, model: ModelConfig) -> Permission:
        if self.circuits is None:
            return "allow"
        try:
            return await self.circuits.permission(model.name, model.circuit_breaker)
        except RaygateError:
            return "allow"  # Redis down: fail open rather than refuse every request

    async def _record(self, model: ModelConfig, ok: bool) -> None:
        if self.circuits is None:
            return
        try:
            state = await self.circuits.record(model.name, ok, model.circuit_breaker)
        except RaygateError:
            return
        if not ok and state == "open":
            logger.warning("Circuit of model %s is open", model.name)

    async def _note_cooldown(self, model: ModelConfig, progress: _Progress) -> None:
        if self.circuits is None:
            return
        try:
            left_s = await self.circuits.cooldown_left_s(model.name, model.circuit_breaker)
        except RaygateError:
            return
        progress.retry_after_s = min(left_s, progress.retry_after_s or left_s)

    def _final_error(self, progress: _Progress, language: str | None) -> UpstreamUnavailableError:
        """The graceful 503: a human message, a precise code, Retry-After when known."""
        last = progress.last_error
        code = last.code if last is not None and last.code in _FINAL_CODES else "upstream_unavailable"
        settings = self.config.gateway
        message = settings.unavailable_messages.get(language or "", settings.unavailable_message)
        headers = {"retry-after": str(math.ceil(progress.retry_after_s))} if progress.retry_after_s else {}
        return UpstreamUnavailableError(message, code=code, headers=headers)

    def _model(self, name: str) -> ModelConfig:
        model = self.config.model(name)
        if model is None:  # config validation makes this unreachable
            raise UpstreamUnavailableError(f"Model {name} is not configured.")
        return model

