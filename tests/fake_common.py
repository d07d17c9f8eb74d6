"""What both sides of the fake upstream (OpenAI and Anthropic) count and say, and the faults they share."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

FaultKind = Literal["status", "hang", "drop", "no_usage", "stream_error", "not_json"]
DEFAULT_HANG_S = 60.0


@dataclass
class Fault:
    """One queued fault.

    Attributes:
        kind: ``status`` (answer ``status`` with an OpenAI error body), ``hang`` (sleep
            ``hang_s`` before any header), ``drop`` (close the connection after
            ``after_chunks`` SSE frames; non-stream requests get half a body) or
            ``no_usage`` (answer normally, without usage) or ``stream_error`` (Anthropic
            streams only: an ``error`` event after ``after_chunks`` events, of the type
            Anthropic uses for ``status``; other requests answer normally) or ``not_json``
            (a non-streamed request gets a 200 whose body is HTML).
        times: requests it applies to; ``None`` means every request until ``reset()``.
    """

    kind: FaultKind
    times: int | None = 1
    status: int = 500
    message: str = "fake upstream failure"
    retry_after_s: float | None = None
    hang_s: float = DEFAULT_HANG_S
    after_chunks: int = 2


PHRASE = "the quick brown fox jumps over the lazy dog".split()
# What the fake bills per image part (OpenAI ``image_url`` or Anthropic ``image``): OpenAI's low-detail price.
IMAGE_TOKENS = 85


def _text_of(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):  # OpenAI content parts
        return " ".join(p.get("text", "") for p in content if isinstance(p, dict))
    return ""


def _images_of(content: Any) -> int:
    if not isinstance(content, list):
        return 0
    return sum(1 for p in content if isinstance(p, dict) and p.get("type") in ("image_url", "image"))


def count_prompt_words(body: dict[str, Any]) -> int:
    """Return the fake's prompt token count: whitespace words of all message contents, ``IMAGE_TOKENS`` an image."""
    messages = [m for m in body.get("messages") or () if isinstance(m, dict)]
    return sum(len(_text_of(m.get("content")).split()) + IMAGE_TOKENS * _images_of(m.get("content")) for m in messages)
