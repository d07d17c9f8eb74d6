"""The fake upstream's OpenAI side: chat completion bodies and SSE frames, precomputed as bytes.

The fake must push thousands of requests a second through 1-2 cores, so each
(model, word count) answer is rendered once and reused.
"""

from __future__ import annotations

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
