"""The one engine interface every model backend implements."""

from __future__ import annotations

import abc
import contextlib
import importlib
import logging
import time
from collections.abc import AsyncGenerator, AsyncIterator
from pathlib import Path
from typing import Any

from serve_app.config import ModelConfig
from serve_app.errors import InvalidRequestError
from serve_app.protocol import (
    AssistantMessage,
    ChatCompletionChoice,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatCompletionStreamChoice,
    ChatCompletionStreamResponse,
    DeltaMessage,
    FinishReason,
    UsageInfo,
    new_id,
)

logger = logging.getLogger(__name__)

EngineOutput = ChatCompletionResponse | ChatCompletionStreamResponse

ENGINE_CLASSES: dict[str, str] = {
    "hf": "deployments.models.hf:HFEngine",
    "vllm": "deployments.models.vllm:VLLMEngine",
    "remote": "deployments.models.remote:RemoteEngine",
    "remote/anthropic": "deployments.models.anthropic:AnthropicEngine",
}


class Engine(abc.ABC):
    """A model backend: a chat request in, a completion or a stream of chunks out.

    Args:
        config: the model's config (engine params, prices, limits).
        data_dir: raygate's state dir; relative model paths live under ``<data_dir>/models``.
    """

    def __init__(self, config: ModelConfig, data_dir: str) -> None:
        self.config = config
        self.data_dir = data_dir

    @abc.abstractmethod
    async def start(self) -> None:
        """Load weights or open connections. Called once, bounded by the caller's timeout."""

    async def check_health(self) -> None:
        """Raise if the engine cannot serve. The default trusts a started engine."""

    async def close(self) -> None:
        """Release connections and workers when the replica stops. The default holds none."""

    async def load_adapter(self, name: str) -> None:
        """Load (or reload, if retrained) the LoRA adapter registered as ``name`` from ``adapter_dir``.

        Engines that cannot serve adapters refuse; requests reach an adapter as ``<model>:<name>``.
        """
        raise InvalidRequestError(f"Model {self.config.name} ({self.config.engine}) cannot serve LoRA adapters.",
                                  param="model", code="adapters_unsupported")

    def adapter_of(self, request: ChatCompletionRequest) -> str | None:
        """The adapter a request names (``model: "<model>:<adapter>"``), or None for the base model."""
        prefix = self.config.name + ":"
        return request.model[len(prefix):] if request.model.startswith(prefix) else None

    def adapter_dir(self, name: str) -> Path:
        """Where the registry keeps adapter ``name`` (``training.registry``: ``<data_dir>/adapters/<name>``)."""
        return Path(self.data_dir) / "adapters" / name

    @abc.abstractmethod
    def chat(self, request: ChatCompletionRequest) -> AsyncIterator[EngineOutput]:
        """Answer one chat request.

        Args:
            request: the validated request; ``request.model`` is the raygate model name.

        Yields:
            When ``request.stream`` is true, ``ChatCompletionStreamResponse`` chunks:
            the first carries ``role``, the last carries ``finish_reason`` and
            ``usage`` (always, whatever ``stream_options`` says: the gateway decides
            what the client sees). Otherwise exactly one ``ChatCompletionResponse``
            with ``usage``.

        Raises:
            serve_app.errors.RaygateError: failures, already translated (no library
            exception leaves an engine).
        """


def load_engine_class(config: ModelConfig) -> type[Engine]:
    """Import the engine class a model needs (lazily: vLLM/torch load only when used)."""
    provider = getattr(config.engine_params, "provider", "openai")
    engine = config.engine if provider == "openai" else f"{config.engine}/{provider}"
    module_name, _, class_name = ENGINE_CLASSES[engine].partition(":")
    cls: type[Engine] = getattr(importlib.import_module(module_name), class_name)
    return cls


def resolve_model_path(model_path: str, data_dir: str) -> Path:
    """Return the model dir; relative paths live under ``<data_dir>/models``.

    The tiny model is generated on first use so a fresh machine needs no download.
    """
    from deployments.models.tiny import TINY_MODEL_NAME, ensure_tiny_model

    path = Path(model_path).expanduser()
    if not path.is_absolute():
        path = Path(data_dir) / "models" / path
    if model_path == TINY_MODEL_NAME:
        ensure_tiny_model(path)
    return path


class ChunkFactory:
    """Builds the chunks of one streamed answer with a shared id and model."""

    def __init__(self, model: str) -> None:
        self.id = new_id("chatcmpl")
        self.model = model
        self.created = int(time.time())

    def chunk(
        self, content: str | None = None, *, role: bool = False, finish_reason: FinishReason | None = None,
        usage: UsageInfo | None = None,
    ) -> ChatCompletionStreamResponse:
        """Return one chunk."""
        delta = DeltaMessage(role="assistant" if role else None, content=content)
        choice = ChatCompletionStreamChoice(delta=delta, finish_reason=finish_reason)
        return ChatCompletionStreamResponse(
            id=self.id, created=self.created, model=self.model, choices=[choice], usage=usage
        )


async def stream_or_collect(
    request: ChatCompletionRequest, chunks: AsyncGenerator[ChatCompletionStreamResponse, None], model: str
) -> AsyncIterator[EngineOutput]:
    """``Engine.chat`` for engines that generate a stream natively: pass it on, or fold it into one answer.

    ``aclosing``: a consumer's ``aclose()`` must reach the generator (``async for`` does not
    forward it), or generation runs on (holding its slot) until garbage collection.
    """
    async with contextlib.aclosing(chunks) as stream:
        if request.stream:
            async for chunk in stream:
                yield chunk
        else:
            yield await collect_stream(stream, model)


async def collect_stream(
    chunks: AsyncIterator[ChatCompletionStreamResponse], model: str
) -> ChatCompletionResponse:
    """Fold a chunk stream into one completion (for engines that only stream natively)."""
    parts: list[str] = []
    finish_reason: FinishReason | None = "stop"
    usage = UsageInfo()
    response_id = None
    async for chunk in chunks:
        response_id = response_id or chunk.id
        for choice in chunk.choices:
            parts.append(choice.delta.content or "")
            finish_reason = choice.finish_reason or finish_reason
        usage = chunk.usage or usage
    message = AssistantMessage(content="".join(parts))
    return ChatCompletionResponse(
        id=response_id or new_id("chatcmpl"),
        model=model,
        choices=[ChatCompletionChoice(message=message, finish_reason=finish_reason)],
        usage=usage,
    )


def encode_chat(tokenizer: Any, request: ChatCompletionRequest, max_len_tokens: int, model: str) -> list[int]:
    """Render a local model's chat template and tokenize it, as vLLM's server does (no extra special tokens).

    Raises:
        InvalidRequestError: the template rejects the messages, or the prompt leaves no room
            in the context window (``code`` ``context_length_exceeded``: the dispatcher's
            cue for ``context_fallback``), or the request has images (``model_not_vision_capable``).
    """
    if request.images():  # the Gateway refuses images for these (text-only) models; never drop them silently
        raise InvalidRequestError(f"The model '{model}' does not accept images.", param="messages",
                                  code="model_not_vision_capable")
    messages = [{"role": "system" if m.role == "developer" else m.role, "content": m.text()} for m in request.messages]
    try:
        prompt = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    except Exception as exc:
        logger.info("Chat template of model %s failed: %s", model, type(exc).__name__)
        raise InvalidRequestError(
            "The messages cannot be formatted with this model's chat template.", param="messages"
        ) from exc
    ids: list[int] = tokenizer.encode(prompt, add_special_tokens=False)
    if len(ids) >= max_len_tokens:
        raise InvalidRequestError(
            f"This model's maximum context length is {max_len_tokens} tokens, but the messages "
            f"use {len(ids)} tokens. Please shorten the messages.",
            param="messages", code="context_length_exceeded",
        )
    return ids


def truncate_at_stop(text: str, stops: list[str]) -> tuple[str, bool]:
    """Cut ``text`` at the first stop sequence; return the text and whether one was found."""
    cut = min((i for i in (text.find(s) for s in stops if s) if i >= 0), default=-1)
    return (text[:cut], True) if cut >= 0 else (text, False)
