"""``RemoteEngine``: any OpenAI-compatible upstream, with the official ``openai`` SDK's headers and errors.

The calls themselves go through ``UpstreamHTTP`` on aiohttp: the SDK client supplies
the headers and turns each failure into the SDK's own exception, without its request
machinery (the typed ``create()`` cost a third of the Gateway's CPU per request, its
low-level ``post()`` still a fifth). raygate reads the fields it needs from the JSON into
its own models, and retries and falls back itself, across models. Every call is wrapped
in ``map_openai_errors()`` so only raygate errors leave this module.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import AsyncIterator
from typing import Any, get_args

import openai

from deployments.models.base import ChunkFactory, Engine, EngineOutput
from deployments.models.provider import SDKClientMixin, client_kwargs, map_sdk_errors
from deployments.models.tokens import estimate_usage
from deployments.models.upstream_http import UpstreamHTTP, json_object
from serve_app.config import ModelConfig, RemoteEngineParams
from serve_app.errors import ServiceUnavailableError, UpstreamError
from serve_app.protocol import (
    AssistantMessage,
    ChatCompletionChoice,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatMessage,
    FinishReason,
    UsageInfo,
    new_id,
)

logger = logging.getLogger(__name__)

_FINISH_REASONS: frozenset[str] = frozenset(get_args(FinishReason))
_FORWARDED_FIELDS = ("temperature", "top_p", "frequency_penalty", "presence_penalty", "stop", "seed", "user")


def map_openai_errors(model: str) -> contextlib.AbstractContextManager[None]:
    """Translate ``openai`` SDK exceptions into raygate errors (see ``provider.map_sdk_errors``)."""
    return map_sdk_errors(openai, model)


def _content(message: ChatMessage) -> str | list[dict[str, Any]]:
    """A message's content for the upstream: its text, or, when it has images, its parts as the client sent them."""
    if not message.images() or not isinstance(message.content, list):
        return message.text()
    return [part.model_dump(mode="json", exclude_unset=True) for part in message.content]


def _usage(body: dict[str, Any]) -> UsageInfo | None:
    """The ``usage`` an upstream's completion or chunk reports, if any."""
    counted = body.get("usage")
    if not isinstance(counted, dict) or counted.get("prompt_tokens") is None:
        return None
    return UsageInfo.of(int(counted["prompt_tokens"]), int(counted.get("completion_tokens") or 0))


def _finish_reason(value: str | None) -> FinishReason:
    # Upstreams may send reasons raygate's schema lacks (``function_call``, vendor ones).
    return value if value in _FINISH_REASONS else "stop"  # type: ignore[return-value]


def _json_object(raw: bytes, model: str) -> dict[str, Any]:
    """The upstream's 200 body as a JSON object; anything else is the upstream's fault (502)."""
    body = json_object(raw)
    if body is None:
        logger.warning("Upstream of model %s answered 200 with a body that is not a JSON object", model)
        raise UpstreamError(f"Model {model}: the upstream's answer was not a JSON object.")
    return body


class RemoteEngine(SDKClientMixin, Engine):
    """Forwards chat requests to an OpenAI-compatible upstream.

    Args:
        config: the model's config; ``engine_params`` must be ``RemoteEngineParams``.
        data_dir: unused (nothing is stored locally).
    """

    def __init__(self, config: ModelConfig, data_dir: str) -> None:
        super().__init__(config, data_dir)
        if not isinstance(config.engine_params, RemoteEngineParams):
            raise TypeError(f"model {config.name}: RemoteEngine needs RemoteEngineParams")
        self.params: RemoteEngineParams = config.engine_params
        self.client: openai.AsyncOpenAI | None = None
        self.http: UpstreamHTTP | None = None

    async def start(self) -> None:
        """Create the SDK client and the connection pool; no network call, the first request connects."""
        self.client = openai.AsyncOpenAI(base_url=self.params.base_url,
                                         **client_kwargs(openai, self.config, self.params))
        self.http = UpstreamHTTP(self.client, self.params.timeout_s, self.params.max_connections)

    async def close(self) -> None:
        """Close the connection pool and the SDK client."""
        if self.http is not None:
            await self.http.close()
            self.http = None
        await super().close()

    def _create_kwargs(self, request: ChatCompletionRequest) -> dict[str, Any]:
        kwargs: dict[str, Any] = {
            "model": self.params.model,
            "messages": [{"role": m.role, "content": _content(m)} for m in request.messages],
            "max_tokens": request.max_output_tokens(self.config.default_max_tokens),
        }
        for name in _FORWARDED_FIELDS:
            value = getattr(request, name)
            if value is not None:
                kwargs[name] = value
        return kwargs

    async def _estimate_usage(self, request: ChatCompletionRequest, completion: str) -> UsageInfo:
        logger.debug("Upstream of model %s reported no usage; counting tokens", self.config.name)
        return await estimate_usage(request.messages, completion, self.params.model)

    async def chat(self, request: ChatCompletionRequest) -> AsyncIterator[EngineOutput]:
        """Answer one request through the upstream; see ``Engine.chat`` for the contract.

        Yields:
            One ``ChatCompletionResponse``, or stream chunks whose last one carries
            ``finish_reason`` and ``usage`` (estimated when the upstream sends none).

        Raises:
            serve_app.errors.RaygateError: the upstream's failure, translated.
        """
        if self.http is None:
            raise ServiceUnavailableError(f"Model {self.config.name} is not started.")
        kwargs = self._create_kwargs(request)
        with map_openai_errors(self.config.name):
            if not request.stream:
                yield await self._complete(self.http, kwargs, request)
                return
            async for chunk in self._stream(self.http, kwargs, request):
                yield chunk

    async def _complete(
        self, http: UpstreamHTTP, kwargs: dict[str, Any], request: ChatCompletionRequest
    ) -> ChatCompletionResponse:
        raw = await http.post("/chat/completions", kwargs)
        completion = _json_object(raw, self.config.name)
        choices = completion.get("choices") or [{}]
        choice = choices[0] if isinstance(choices[0], dict) else {}
        content = (choice.get("message") or {}).get("content") or ""
        usage = _usage(completion) or await self._estimate_usage(request, content)
        return ChatCompletionResponse(
            id=str(completion.get("id") or new_id("chatcmpl")),
            created=int(completion.get("created") or time.time()),
            model=self.config.name,
            choices=[ChatCompletionChoice(message=AssistantMessage(content=str(content)),
                                          finish_reason=_finish_reason(choice.get("finish_reason")))],
            usage=usage,
        )

    async def _stream(
        self, http: UpstreamHTTP, kwargs: dict[str, Any], request: ChatCompletionRequest
    ) -> AsyncIterator[EngineOutput]:
        # Content chunks go out as they come; finish_reason and usage may arrive in
        # separate upstream chunks (usage last, with no choices), so they are held and
        # sent together in one final chunk.
        factory = ChunkFactory(self.config.name)
        first = True
        parts: list[str] = []  # the text, counted only if the upstream sends no usage
        finish: str | None = None
        usage: UsageInfo | None = None
        body = {**kwargs, "stream": True, "stream_options": {"include_usage": True}}
        async with contextlib.aclosing(http.events("/chat/completions", body)) as stream:
            async for upstream_chunk in stream:
                usage = _usage(upstream_chunk) or usage
                for choice in (upstream_chunk.get("choices") or [])[:1]:
                    text = (choice.get("delta") or {}).get("content")
                    if text:
                        yield factory.chunk(text, role=first)
                        first = False
                        parts.append(text)
                    finish = choice.get("finish_reason") or finish
        if finish is None:
            logger.warning("Upstream of model %s ended a stream without finish_reason", self.config.name)
        if usage is None:
            usage = await self._estimate_usage(request, "".join(parts))
        yield factory.chunk(role=first, finish_reason=_finish_reason(finish), usage=usage)
