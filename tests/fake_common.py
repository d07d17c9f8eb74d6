"""What both sides of the fake upstream (OpenAI and Anthropic) count and say."""

from __future__ import annotations

from typing import Any

PHRASE = "the quick brown fox jumps over the lazy dog".split()


def _text_of(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):  # OpenAI content parts
        return " ".join(p.get("text", "") for p in content if isinstance(p, dict))
    return ""


def count_prompt_words(body: dict[str, Any]) -> int:
    """Return the fake's prompt token count: whitespace words of all message contents."""
    return sum(len(_text_of(m.get("content")).split()) for m in body.get("messages") or () if isinstance(m, dict))
