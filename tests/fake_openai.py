"""The fake upstream's OpenAI side: chat completion bodies and SSE frames, precomputed as bytes.

The fake must push thousands of requests a second through 1-2 cores, so each
(model, word count) answer is rendered once and reused. Two answers depend on the request:
a judge's verdict (``judge_answer``) and, with ``lengths="budget"``, a length that follows
the output budget (``budget_words``).
"""

from __future__ import annotations

import re
import zlib
from typing import Any

import orjson

from tests.fake_anthropic import _pieces


class _Answer:
    """Precomputed bytes of one (model, word count) answer."""

    def __init__(self, model: str, n_words: int, finish_reason: str, pieces: list[str] | None = None) -> None:
        self.n_words = n_words
        pieces = _pieces(n_words) if pieces is None else pieces
        self.text = "".join(pieces)
        m = orjson.dumps(model)
        head = b'{"id":"chatcmpl-fake","object":"chat.completion.chunk","created":0,"model":' + m
        self.json_head = (
            b'{"id":"chatcmpl-fake","object":"chat.completion","created":0,"model":' + m
            + b',"choices":[{"index":0,"message":{"role":"assistant","content":' + orjson.dumps(self.text)
            + b'},"finish_reason":"' + finish_reason.encode() + b'"}]'
        )

        def frame(delta: bytes, finish: bytes, usage_null: bool) -> bytes:
            tail = b',"usage":null' if usage_null else b""
            return (
                b"data: " + head + b',"choices":[{"index":0,"delta":' + delta
                + b',"finish_reason":' + finish + b"}]" + tail + b"}\n\n"
            )

        # Two renderings of the frames: with and without OpenAI's '"usage":null'.
        self.frames: dict[bool, list[bytes]] = {}
        for usage_null in (False, True):
            frames = [frame(b'{"role":"assistant","content":""}', b"null", usage_null)]
            frames += [frame(b'{"content":' + orjson.dumps(p) + b"}", b"null", usage_null) for p in pieces]
            frames.append(frame(b"{}", b'"' + finish_reason.encode() + b'"', usage_null))
            self.frames[usage_null] = frames
        self.joined = {k: b"".join(v) for k, v in self.frames.items()}
        self.usage_head = b"data: " + head + b',"choices":[],"usage":'


def _usage(prompt: int, completion: int) -> bytes:
    return b'{"prompt_tokens":%d,"completion_tokens":%d,"total_tokens":%d}' % (prompt, completion, prompt + completion)


JUDGE_PREFIX = "fake-judge"
_SCORE_MARK = re.compile(r"\[score=(\w+)\]")


def judge_answer(model: str, body: dict[str, Any], n_words: int) -> _Answer:
    """A judge's verdict: ``fake-judge-N`` always scores N; ``fake-judge`` scores the first ``[score=N]`` in the
    prompt (4 when there is none); a mark or suffix that is not a digit (``[score=none]``) gets a reply with no
    score. Strict JSON, as the judge is asked."""
    suffix = model.removeprefix(JUDGE_PREFIX).lstrip("-")
    prompt = " ".join(str(m.get("content")) for m in body["messages"] if isinstance(m, dict))
    mark = suffix or ((found := _SCORE_MARK.search(prompt)) and found.group(1)) or "4"
    text = (orjson.dumps({"score": int(mark), "reason": f"fake judge scored {mark}"}).decode() if mark.isdigit()
            else "I cannot grade this answer.")
    return _Answer(model, n_words, "stop", [text])


BREVITY = re.compile(r"\b(brief|briefly|short|concise|sentences?)\b", re.IGNORECASE)


def _text(message: Any) -> str:
    content = message.get("content") if isinstance(message, dict) else None
    return content if isinstance(content, str) else str(content or "")


def budget_words(body: dict[str, Any], default: int) -> int:
    """``lengths="budget"``: 50-100 % of the output budget (``default`` when the request sets none), chosen by a
    hash of the first user turn (the question, so an expansion is as long as the full answer would be), halved
    when a system message asks for brevity; never above the budget."""
    limit = body.get("max_completion_tokens") or body.get("max_tokens")
    budget = limit if isinstance(limit, int) and limit > 0 else default
    messages = [m for m in body["messages"] if isinstance(m, dict)]
    question = next((_text(m) for m in messages if m.get("role") == "user"), "")
    share = 0.5 + zlib.crc32(question.encode("utf-8", "replace")) % 51 / 100
    if any(m.get("role") in ("system", "developer") and BREVITY.search(_text(m)) for m in messages):
        share /= 2
    return max(1, min(budget, round(budget * share)))
