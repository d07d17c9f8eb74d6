"""OpenAI API schemas, in one module.

Request models tolerate unknown fields (clients send newer OpenAI fields all the
time) and log their names, never their values. Fields follow the order of the
official reference: https://platform.openai.com/docs/api-reference/chat/create
"""

from __future__ import annotations

import base64
import binascii
import logging
import re
import time
import uuid
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

from pydantic import (BaseModel, ConfigDict, Field, TypeAdapter, ValidationError, ValidationInfo, field_validator,
                      model_validator)
from pydantic_core import InitErrorDetails, PydanticCustomError

from deployments.retriever_protocol import RagOptions

logger = logging.getLogger(__name__)

# The largest output budget a request may ask for (int32): above any context window, and small enough
# that the token counters in Redis (int64) and in its Lua scripts (doubles) stay exact.
MAX_OUTPUT_TOKENS = 2**31 - 1
# Image content parts: a data URL must hold one of the image types every vision upstream takes.
IMAGE_DATA_URL = re.compile(r"data:(image/(?:png|jpeg|gif|webp));base64,", re.IGNORECASE)
# What one image counts in raygate's prompt *estimates* (reservations, rate limits, and usage an upstream did
# not report): OpenAI's high-detail price of a 1024x1024 image (4 tiles x 170 + 85). Settling uses the real count.
IMAGE_PROMPT_TOKENS = 765


def check_unicode(*texts: str | None) -> None:
    """Refuse text with a lone surrogate (a JSON ``"\\ud800"`` escape): no tokenizer, upstream or encoder takes it.

    Raises:
        ValueError: a text is not valid Unicode.
    """
    for text in texts:
        if text is None or text.isascii():
            continue
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:
            raise ValueError("text must be valid Unicode (it has a lone surrogate)") from None


def new_id(prefix: str) -> str:
    """Return an OpenAI-style id such as ``chatcmpl-1f0c...``."""
    return f"{prefix}-{uuid.uuid4().hex}"


class OpenAIBaseModel(BaseModel):
    """Base of request and response schemas: extra fields are kept and their names logged."""

    model_config = ConfigDict(extra="allow")

    @model_validator(mode="wrap")
    @classmethod
    def _log_extra_fields(cls, data: Any, handler: Any) -> Any:
        result = handler(data)
        if isinstance(data, dict) and result.model_extra:
            logger.debug("%s ignored fields: %s", cls.__name__, sorted(result.model_extra))
        return result


class TextContentPart(OpenAIBaseModel):
    type: Literal["text"]
    text: str


class ImageURL(OpenAIBaseModel):
    """Where an image is: an http(s) URL, or the image itself as a base64 ``data:image/...`` URL."""

    url: str = Field(description="http(s) URL, or data:image/(png|jpeg|gif|webp);base64,<data>.")
    detail: Literal["auto", "low", "high"] | None = None

    @field_validator("url")
    @classmethod
    def _check_url(cls, url: str) -> str:
        if url[:5].lower() == "data:":
            match = IMAGE_DATA_URL.match(url)
            if match is None:
                raise ValueError("a data URL must be data:image/(png|jpeg|gif|webp);base64,<data>")
            data = url[match.end():]
            try:
                if not base64.b64decode(data, validate=True):
                    raise ValueError("the data URL holds no image")
            except binascii.Error:
                raise ValueError("the data URL's image is not valid base64") from None
            return url
        check_unicode(url)
        parts = urlsplit(url)
        if parts.scheme.lower() not in ("http", "https") or not parts.hostname:
            raise ValueError("the image URL must be an http(s) URL or a base64 data:image/... URL")
        return url

    def media_type(self) -> str | None:
        """A data URL's image type (``image/png``...); None for an http(s) URL."""
        match = IMAGE_DATA_URL.match(self.url)
        return match.group(1).lower() if match else None

    def data(self) -> str | None:
        """A data URL's base64 payload; None for an http(s) URL."""
        match = IMAGE_DATA_URL.match(self.url)
        return self.url[match.end():] if match else None

    def data_bytes(self) -> int:
        """The decoded size of a data URL's image (0 for an http(s) URL: raygate never fetches it)."""
        data = self.data()
        return len(data) // 4 * 3 - data[-2:].count("=") if data else 0


class ImageContentPart(OpenAIBaseModel):
    """An image in a user message, for models configured ``vision: true``."""

    type: Literal["image_url"]
    image_url: ImageURL


ContentPart = Annotated[TextContentPart | ImageContentPart, Field(discriminator="type")]
# One adapter per part type, keyed by the part's index so a validation error names it (content.1.image_url.url).
_PART_ADAPTERS: dict[str, TypeAdapter[Any]] = {
    "text": TypeAdapter(dict[int, TextContentPart]),
    "image_url": TypeAdapter(dict[int, ImageContentPart]),
}


def _content_part(index: int, raw: Any) -> TextContentPart | ImageContentPart:
    kind = raw.get("type") if isinstance(raw, dict) else getattr(raw, "type", None)
    adapter = _PART_ADAPTERS.get(kind) if isinstance(kind, str) else None
    if adapter is None:
        raise ValueError(f"content part {index} must have type 'text' or 'image_url'")
    part: TextContentPart | ImageContentPart = adapter.validate_python({index: raw})[index]
    return part


class ChatMessage(OpenAIBaseModel):
    """One message of a conversation. Content is text, or a list of text parts and (user messages) image parts."""

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = None
    name: str | None = None

    @field_validator("content", mode="wrap")
    @classmethod
    def _parse_parts(cls, value: Any, handler: Any) -> Any:
        # Each part is validated by its type, so an error names the part, not a branch of the union.
        if isinstance(value, list):
            return [_content_part(index, raw) for index, raw in enumerate(value)]
        if value is not None and not isinstance(value, str):
            raise ValueError("content must be a string or a list of content parts")
        return handler(value)

    @field_validator("content", "name")
    @classmethod
    def _check_text(cls, value: str | list[ContentPart] | None) -> str | list[ContentPart] | None:
        check_unicode(*(part.text for part in value if isinstance(part, TextContentPart))
                      if isinstance(value, list) else (value,))
        return value

    @field_validator("content")
    @classmethod
    def _images_only_from_users(cls, value: str | list[ContentPart] | None,
                                info: ValidationInfo) -> str | list[ContentPart] | None:
        role = info.data.get("role")
        if isinstance(value, list) and role != "user" and any(isinstance(p, ImageContentPart) for p in value):
            raise ValueError(f"image content parts are only allowed in user messages, not in {role} messages")
        return value

    def text(self) -> str:
        """Return the message's text as one string (images contribute none)."""
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content if isinstance(part, TextContentPart))

    def images(self) -> list[ImageURL]:
        """Return the message's images, in order (only user messages have any)."""
        if not isinstance(self.content, list):
            return []
        return [part.image_url for part in self.content if isinstance(part, ImageContentPart)]


class StreamOptions(OpenAIBaseModel):
    include_usage: bool = False


class ChatCompletionRequest(OpenAIBaseModel):
    """``POST /v1/chat/completions``."""

    messages: list[ChatMessage] = Field(default_factory=list, description="At least one, unless expand is true.")
    model: str = Field(min_length=1)
    frequency_penalty: float | None = Field(default=None, ge=-2.0, le=2.0)
    max_completion_tokens: int | None = Field(default=None, ge=1, le=MAX_OUTPUT_TOKENS)
    max_tokens: int | None = Field(default=None, ge=1, le=MAX_OUTPUT_TOKENS)
    n: int = Field(default=1, ge=1, le=1)
    presence_penalty: float | None = Field(default=None, ge=-2.0, le=2.0)
    # What vLLM's msgpack transport and torch accept; larger seeds would fail deep in an engine.
    seed: int | None = Field(default=None, ge=-(2**63), le=2**64 - 1)
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    user: str | None = None
    rag: RagOptions | None = Field(default=None, description="raygate extension: ground the answer in a collection.")
    template: str | None = Field(default=None, min_length=1, max_length=64,
                                 description="raygate extension: a prompt template rendered as the system prompt.")
    variables: dict[str, Any] = Field(default_factory=dict, description="raygate extension: the template's variables.")
    conversation_id: str | None = Field(default=None, min_length=1, max_length=128,
                                        description="raygate extension: a stored conversation this request continues "
                                                    "(send only the new turn; the history is prepended).")
    brief: bool = Field(default=False, description="raygate extension: a short answer, kept in a conversation "
                                                   "that expand continues (also x-raygate-brief: 1).")
    expand: bool = Field(default=False, description="raygate extension: expand the previous (brief) answer of "
                                                    "conversation_id; messages may then be empty.")

    @model_validator(mode="after")
    def _messages_unless_expanding(self) -> "ChatCompletionRequest":
        # Errors name their field (param), as a field constraint's would.
        problem = (("messages", "too_short", "List should have at least 1 item (none is allowed only with expand)")
                   if not self.messages and not self.expand else
                   ("conversation_id", "missing", "expand needs the conversation_id of the answer to expand")
                   if self.expand and self.conversation_id is None else
                   ("expand", "brief_and_expand", "brief and expand cannot both be true") if self.expand and self.brief
                   else None)
        if problem is not None:
            field, kind, message = problem
            raise ValidationError.from_exception_data(type(self).__name__, [InitErrorDetails(
                type=PydanticCustomError(kind, message), loc=(field,), input=getattr(self, field))])
        return self

    @field_validator("stop")
    @classmethod
    def _check_stop(cls, value: str | list[str] | None) -> str | list[str] | None:
        if isinstance(value, list) and len(value) > 4:
            raise ValueError("at most 4 stop sequences are allowed")
        check_unicode(*(value if isinstance(value, list) else (value,)))
        return value

    @field_validator("user", "conversation_id")
    @classmethod
    def _check_user(cls, value: str | None) -> str | None:
        check_unicode(value)
        return value

    def stop_list(self) -> list[str]:
        """Return the stop sequences as a list."""
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)

    def max_output_tokens(self, default: int) -> int:
        """Return the output budget: max_completion_tokens, else max_tokens, else ``default``."""
        return self.max_completion_tokens or self.max_tokens or default

    def include_usage(self) -> bool:
        """Return whether a stream should end with a usage chunk."""
        return bool(self.stream_options and self.stream_options.include_usage)

    def images(self) -> list[ImageURL]:
        """Return every image of the conversation (image content parts of user messages)."""
        return [image for message in self.messages for image in message.images()]


class UsageInfo(BaseModel):
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0
    # raygate-internal: counted by raygate because the upstream reported none. Crosses
    # Ray's process boundary (pickle) but never reaches clients (excluded from dumps).
    estimated: bool = Field(default=False, exclude=True)

    @classmethod
    def of(cls, prompt_tokens: int, completion_tokens: int, *, estimated: bool = False) -> "UsageInfo":
        """Build usage with the total filled in."""
        return cls(
            prompt_tokens=prompt_tokens,
            completion_tokens=completion_tokens,
            total_tokens=prompt_tokens + completion_tokens,
            estimated=estimated,
        )


FinishReason = Literal["stop", "length", "content_filter", "tool_calls"]


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None = None


class ChatCompletionChoice(BaseModel):
    index: int = 0
    message: AssistantMessage
    finish_reason: FinishReason | None = "stop"


class ChatCompletionResponse(BaseModel):
    id: str = Field(default_factory=lambda: new_id("chatcmpl"))
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[ChatCompletionChoice]
    usage: UsageInfo
    raygate: dict[str, Any] | None = Field(default=None, exclude_if=lambda v: v is None,
                                           description="raygate extension: cache status, citations.")


class DeltaMessage(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None


class ChatCompletionStreamChoice(BaseModel):
    index: int = 0
    delta: DeltaMessage
    finish_reason: FinishReason | None = None


class ChatCompletionStreamResponse(BaseModel):
    """One streamed chunk. The last chunk of an engine's stream carries ``usage``."""

    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[ChatCompletionStreamChoice]
    usage: UsageInfo | None = None
    raygate: dict[str, Any] | None = Field(default=None, exclude_if=lambda v: v is None,
                                           description="raygate extension, on the final chunk: citations.")
