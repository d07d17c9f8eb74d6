"""``AnthropicEngine``: Anthropic's Messages API, through the official ``anthropic`` SDK.

It speaks OpenAI's chat format to raygate and Anthropic's to the upstream, on the
SDK's aiohttp transport with the SDK's retries off (raygate retries and falls back
itself). Every SDK call is wrapped in ``map_anthropic_errors()``, which maps each
HTTP situation to the raygate error ``RemoteEngine`` raises for it.

How requests translate, and why:

* ``system`` and ``developer`` messages, wherever they stand, become ``system``,
  joined by blank lines: Anthropic has one system prompt and no system turns.
* Consecutive ``user`` (or ``assistant``) messages merge into one turn whose content
  is a list of text blocks, which keeps their boundaries: Anthropic wants the roles
  to alternate. Empty messages are dropped (Anthropic refuses empty text blocks).
* The first turn must be the user's. A conversation that opens with the assistant
  is refused with a 400 rather than given an invented user turn, which would change
  both the answer and the bill behind the client's back.
* A last ``assistant`` message is a prefill: Claude continues it, where an OpenAI
  model would answer after it.
* ``tool`` messages are refused: raygate forwards no tool definitions.
* Image parts (user messages of ``vision: true`` models) become ``image`` blocks, in
  place among the text blocks: a data URL a ``base64`` source with its media type, an
  http(s) URL a ``url`` source; OpenAI's ``detail`` has no equivalent and is dropped.
* ``temperature`` and ``top_p`` are dropped: API version 2026-10-21, the one SDK
  2.x sends, refuses sampling parameters with a 400 (the SDK removed them). Pinning
  an older version (``extra_headers: {anthropic-version: "2023-06-01"}``) forwards
  them, ``temperature`` clamped to 1: Anthropic's range is 0-1, OpenAI's 0-2, and
  clamping keeps the usual values (0-1) meaning what they mean; scaling would not.
* ``stop`` becomes ``stop_sequences`` and ``user`` ``metadata.user_id``;
  ``frequency_penalty``, ``presence_penalty`` and ``seed`` have no Anthropic
  equivalent and are dropped.
* The output budget (``max_completion_tokens``, ``max_tokens`` or the model's
  default) is always sent: Anthropic requires ``max_tokens``.

Answers: ``prompt_tokens`` is ``input_tokens`` plus the cache writes and reads
(OpenAI's count includes cached tokens; Anthropic's splits them out); missing usage
is counted by ``tokens.py`` and flagged ``estimated``.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator, Sequence
from typing import Any

import anthropic
from anthropic.types import (
    RawContentBlockDeltaEvent,
    RawContentBlockStartEvent,
    RawMessageDeltaEvent,
    RawMessageStartEvent,
    RawMessageStreamEvent,
)

from deployments.models.provider import SDKClientMixin, client_kwargs, map_sdk_errors
from deployments.models.base import ChunkFactory, Engine, EngineOutput
from deployments.models.tokens import estimate_usage
from serve_app.config import ModelConfig, RemoteEngineParams
from serve_app.errors import (
    InvalidRequestError,
    RaygateError,
    ServiceUnavailableError,
    UpstreamError,
    UpstreamUnavailableError,
)
from serve_app.protocol import (
    AssistantMessage,
    ChatCompletionChoice,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatMessage,
    FinishReason,
    ImageContentPart,
    ImageURL,
    UsageInfo,
)

logger = logging.getLogger(__name__)

_MAX_TEMPERATURE = 1.0
_SYSTEM_ROLES = frozenset({"system", "developer"})
_DROPPED_FIELDS = ("frequency_penalty", "presence_penalty", "seed")
_SAMPLING_FIELDS = ("temperature", "top_p")
# The first API version that refuses sampling parameters (versions are ISO dates).
_NO_SAMPLING_API_VERSION = "2026-10-21"
_FINISH_REASONS: dict[str, FinishReason] = {
    "end_turn": "stop",
    "stop_sequence": "stop",
    "pause_turn": "stop",
    "max_tokens": "length",
    "model_context_window_exceeded": "length",
    "tool_use": "tool_calls",
    "refusal": "content_filter",
}
# Error types of an ``error`` event inside a 200 stream that a retry may cure.
_TRANSIENT_ERROR_TYPES = frozenset({"overloaded_error", "api_error", "timeout_error"})


def _stream_error(exc: anthropic.APIStatusError, model: str) -> RaygateError:
    """Translate an ``error`` event that arrived inside a 200 stream, by its error type."""
    logger.warning("Upstream of model %s failed mid-stream (%s)", model, exc.type)
    if exc.type == "rate_limit_error":
        return UpstreamUnavailableError(
            f"Model {model}: the upstream is rate limiting raygate.", code="upstream_rate_limited"
        )
    if exc.type in _TRANSIENT_ERROR_TYPES:
        return UpstreamUnavailableError(f"Model {model}: the upstream failed mid-stream ({exc.type}).")
    return UpstreamError(f"Model {model}: the upstream failed mid-stream.")


def map_anthropic_errors(model: str) -> contextlib.AbstractContextManager[None]:
    """Translate ``anthropic`` SDK exceptions into raygate errors (see ``provider.map_sdk_errors``),
    plus Anthropic's ``error`` events inside a 200 stream, mapped by their type."""
    return map_sdk_errors(anthropic, model, stream_error=_stream_error)


def translate_messages(messages: Sequence[ChatMessage]) -> tuple[str | None, list[dict[str, Any]]]:
    """Split OpenAI chat messages into Anthropic's ``system`` and alternating ``messages``.

    Args:
        messages: the request's messages.

    Returns:
        The system prompt (None when there is none) and the turns.

    Raises:
        InvalidRequestError: a ``tool`` message, no user text, or an assistant first turn.
    """
    system: list[str] = []
    turns: list[tuple[str, list[dict[str, Any]]]] = []
    for message in messages:
        if message.role in _SYSTEM_ROLES:
            if text := message.text():
                system.append(text)
        elif message.role == "tool":
            raise InvalidRequestError("Tool messages are not supported for Anthropic models.", param="messages")
        elif (blocks := _blocks(message)) and turns and turns[-1][0] == message.role:
            turns[-1][1].extend(blocks)
        elif blocks:
            turns.append((message.role, blocks))
    if not turns or turns[0][0] != "user":
        raise InvalidRequestError(
            "Anthropic models need a conversation that starts with a user message "
            "(after any system messages); this one "
            + ("has no user or assistant text." if not turns else "starts with an assistant message."),
            param="messages",
        )
    anthropic_messages = [
        {"role": role, "content": blocks[0]["text"] if len(blocks) == 1 and blocks[0]["type"] == "text" else blocks}
        for role, blocks in turns
    ]
    return "\n\n".join(system) or None, anthropic_messages


def _blocks(message: ChatMessage) -> list[dict[str, Any]]:
    """A user or assistant message as Anthropic content blocks: its text, or, with images, its parts in order."""
    if not message.images() or not isinstance(message.content, list):
        text = message.text()
        return [{"type": "text", "text": text}] if text else []
    return [_image_block(part.image_url) if isinstance(part, ImageContentPart) else {"type": "text", "text": part.text}
            for part in message.content if isinstance(part, ImageContentPart) or part.text]


def _image_block(image: ImageURL) -> dict[str, Any]:
    """An image part as Anthropic's image block: a base64 source for a data URL, a url source otherwise."""
    data = image.data()
    if data is not None:
        return {"type": "image", "source": {"type": "base64", "media_type": image.media_type(), "data": data}}
    return {"type": "image", "source": {"type": "url", "url": image.url}}


def _finish_reason(stop_reason: str | None) -> FinishReason:
    return _FINISH_REASONS.get(stop_reason or "", "stop")


def _input_tokens(usage: Any) -> int | None:
    """Return all prompt tokens of an Anthropic usage: uncached, cache writes and cache reads."""
    if usage is None or usage.input_tokens is None:
        return None
    return int(usage.input_tokens + (usage.cache_creation_input_tokens or 0) + (usage.cache_read_input_tokens or 0))


class _StreamTally:
    """What a stream said besides text deltas: stop reason and usage (and the text, for estimates)."""

    def __init__(self) -> None:
        self.parts: list[str] = []
        self.stop_reason: str | None = None
        self.input_tokens: int | None = None
        self.output_tokens: int | None = None

    def feed(self, event: RawMessageStreamEvent) -> str:
        """Take one event; return its text ("" for events without any)."""
        text = ""
        if isinstance(event, RawContentBlockDeltaEvent):
            text = getattr(event.delta, "text", "") if event.delta.type == "text_delta" else ""
        elif isinstance(event, RawContentBlockStartEvent):
            text = getattr(event.content_block, "text", "") if event.content_block.type == "text" else ""
        elif isinstance(event, RawMessageStartEvent):
            self.input_tokens = _input_tokens(getattr(event.message, "usage", None))
        elif isinstance(event, RawMessageDeltaEvent):
            self.stop_reason = event.delta.stop_reason or self.stop_reason
            usage = getattr(event, "usage", None)
            if usage is not None:  # cumulative counts: the last one wins
                self.output_tokens = usage.output_tokens
                self.input_tokens = _input_tokens(usage) or self.input_tokens
        if text:
            self.parts.append(text)
        return text


class AnthropicEngine(SDKClientMixin, Engine):
    """Forwards chat requests to Anthropic's Messages API.

    Args:
        config: the model's config; ``engine_params`` must be ``RemoteEngineParams``
            with ``provider: anthropic``. ``base_url`` may end in ``/v1`` or not
            (``https://api.anthropic.com``): the SDK adds ``/v1/messages`` itself.
        data_dir: unused (nothing is stored locally).
    """

    def __init__(self, config: ModelConfig, data_dir: str) -> None:
        super().__init__(config, data_dir)
        if not isinstance(config.engine_params, RemoteEngineParams):
            raise TypeError(f"model {config.name}: AnthropicEngine needs RemoteEngineParams")
        self.params: RemoteEngineParams = config.engine_params
        self.client: anthropic.AsyncAnthropic | None = None
        pinned = {k.lower(): v for k, v in self.params.extra_headers.items()}.get("anthropic-version")
        self.forwards_sampling = pinned is not None and pinned < _NO_SAMPLING_API_VERSION

    async def start(self) -> None:
        """Create the SDK client; no network call, the first request opens connections."""
        params = self.params
        self.client = anthropic.AsyncAnthropic(base_url=params.base_url.rstrip("/").removesuffix("/v1"),
                                               **client_kwargs(anthropic, self.config, params))

    def _create_kwargs(self, request: ChatCompletionRequest) -> dict[str, Any]:
        system, messages = translate_messages(request.messages)
        kwargs: dict[str, Any] = {
            "model": self.params.model,
            "messages": messages,
            "max_tokens": request.max_output_tokens(self.config.default_max_tokens),
        }
        if system is not None:
            kwargs["system"] = system
        if request.stop_list():
            kwargs["stop_sequences"] = request.stop_list()
        if request.user is not None:
            kwargs["metadata"] = {"user_id": request.user}
        dropped = [name for name in _DROPPED_FIELDS if getattr(request, name) is not None]
        sampling = {name: getattr(request, name) for name in _SAMPLING_FIELDS if getattr(request, name) is not None}
        if sampling and self.forwards_sampling:  # SDK 2.x has no arguments for them any more
            if "temperature" in sampling:
                sampling["temperature"] = min(sampling["temperature"], _MAX_TEMPERATURE)
            kwargs["extra_body"] = sampling
        else:
            dropped += sampling
        if dropped:
            logger.debug("Model %s: Anthropic refuses %s; dropped", self.config.name, dropped)
        return kwargs

    async def chat(self, request: ChatCompletionRequest) -> AsyncIterator[EngineOutput]:
        """Answer one request through Anthropic; see ``Engine.chat`` for the contract.

        Yields:
            One ``ChatCompletionResponse``, or stream chunks whose last one carries
            ``finish_reason`` and ``usage`` (estimated when the upstream sends none).

        Raises:
            serve_app.errors.RaygateError: an untranslatable request (400) or the
            upstream's failure, translated.
        """
        if self.client is None:
            raise ServiceUnavailableError(f"Model {self.config.name} is not started.")
        kwargs = self._create_kwargs(request)
        with map_anthropic_errors(self.config.name):
            if not request.stream:
                yield await self._complete(self.client, kwargs, request)
                return
            async for chunk in self._stream(self.client, kwargs, request):
                yield chunk

    async def _usage(
        self, request: ChatCompletionRequest, text: str, input_tokens: int | None, output_tokens: int | None
    ) -> UsageInfo:
        if input_tokens is not None and output_tokens is not None:
            return UsageInfo.of(input_tokens, output_tokens)
        logger.debug("Upstream of model %s reported no usage; counting tokens", self.config.name)
        return await estimate_usage(request.messages, text, self.params.model,
                                    prompt_tokens=input_tokens, completion_tokens=output_tokens)

    async def _complete(
        self, client: anthropic.AsyncAnthropic, kwargs: dict[str, Any], request: ChatCompletionRequest
    ) -> ChatCompletionResponse:
        message = await client.messages.create(**kwargs)
        content = "".join(block.text for block in message.content or () if block.type == "text")
        usage = getattr(message, "usage", None)
        return ChatCompletionResponse(
            model=self.config.name,
            choices=[ChatCompletionChoice(
                message=AssistantMessage(content=content), finish_reason=_finish_reason(message.stop_reason)
            )],
            usage=await self._usage(request, content, _input_tokens(usage), usage.output_tokens if usage else None),
        )

    async def _stream(
        self, client: anthropic.AsyncAnthropic, kwargs: dict[str, Any], request: ChatCompletionRequest
    ) -> AsyncIterator[EngineOutput]:
        # Text goes out as it comes; the stop reason and usage arrive in message_delta
        # (input tokens in message_start), and go out together in one final chunk.
        factory = ChunkFactory(self.config.name)
        first = True
        tally = _StreamTally()
        stream = await client.messages.create(**kwargs, stream=True)
        async with stream:
            async for event in stream:
                text = tally.feed(event)
                if text:
                    yield factory.chunk(text, role=first)
                    first = False
        if tally.stop_reason is None:
            logger.warning("Upstream of model %s ended a stream without stop_reason", self.config.name)
        usage = await self._usage(request, "".join(tally.parts), tally.input_tokens, tally.output_tokens)
        yield factory.chunk(role=first, finish_reason=_finish_reason(tally.stop_reason), usage=usage)
