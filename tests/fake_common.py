"""What both sides of the fake upstream (OpenAI and Anthropic) count and say, and the faults they share."""

from __future__ import annotations

import dataclasses
import random
from collections import deque
from dataclasses import dataclass
from typing import Any, Literal

from aiohttp import web

FaultKind = Literal["status", "hang", "drop", "no_usage", "stream_error", "not_json", "trickle"]
DEFAULT_HANG_S = 60.0


@dataclass
class Fault:
    """One queued fault.

    Attributes:
        kind: ``status`` (answer ``status`` with an OpenAI error body), ``hang`` (sleep
            ``hang_s`` before any header), ``drop`` (close the connection after
            ``after_chunks`` SSE frames; non-stream requests get half a body) or
            ``no_usage`` (answer normally, without usage) or ``stream_error`` (streams only:
            after ``after_chunks`` events, an Anthropic ``error`` event of the type Anthropic
            uses for ``status``, or an OpenAI-compatible ``{"error": ...}`` chunk; other
            requests answer normally) or ``not_json``
            (a non-streamed request gets a 200 whose body is HTML) or ``trickle`` (OpenAI streams
            only: each SSE frame sent alone, ``hang_s`` after the one before).
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


class FaultQueue:
    """The faults a fake upstream applies, queued from Python (or ``/_control``), or drawn by chaos."""

    def __init__(self) -> None:
        self.faults: deque[Fault] = deque()
        self._chaos: tuple[float, random.Random, list[Fault]] = (0.0, random.Random(0), [])

    def add_fault(self, fault: Fault) -> None:
        """Queue a fault; requests take faults from the head of the queue."""
        self.faults.append(fault)

    def fail(self, status: int = 500, *, times: int | None = 1, retry_after_s: float | None = None,
             message: str = "fake upstream failure") -> None:
        """Answer the next ``times`` requests with ``status`` (and ``Retry-After`` when given)."""
        self.add_fault(Fault("status", times, status=status, message=message, retry_after_s=retry_after_s))

    def hang(self, *, times: int | None = 1, seconds: float = DEFAULT_HANG_S) -> None:
        """Sleep ``seconds`` before any header of the next ``times`` requests (``stop()`` wakes them)."""
        self.add_fault(Fault("hang", times, hang_s=seconds))

    def drop_stream(self, *, after_chunks: int = 2, times: int | None = 1) -> None:
        """Close the connection after ``after_chunks`` SSE frames of the next ``times`` requests."""
        self.add_fault(Fault("drop", times, after_chunks=after_chunks))

    def omit_usage(self, *, times: int | None = 1) -> None:
        """Answer the next ``times`` requests without any usage."""
        self.add_fault(Fault("no_usage", times))

    def garble(self, *, times: int | None = 1) -> None:
        """Answer the next ``times`` non-streamed requests 200 with a body that is not JSON (a broken proxy)."""
        self.add_fault(Fault("not_json", times))

    def stream_error(self, status: int = 529, *, after_chunks: int = 3, times: int | None = 1,
                     message: str = "fake upstream failure") -> None:
        """Send an error after ``after_chunks`` events: an Anthropic ``error`` event (the type of ``status``), or
        an OpenAI-compatible chunk ``{"error": {"message", "code": status}}`` after a ``:`` comment."""
        self.add_fault(Fault("stream_error", times, status=status, message=message, after_chunks=after_chunks))

    def trickle(self, gap_s: float, *, times: int | None = 1) -> None:
        """Send the next ``times`` OpenAI streams frame by frame, ``gap_s`` apart (a slow, live upstream)."""
        self.add_fault(Fault("trickle", times, hang_s=gap_s))

    def chaos(self, rate: float, *, seed: int = 0, hang_s: float = 5.0) -> None:
        """Give each request, with probability ``rate``, one random fault: 500, 502, 503, 429, a hang, a drop.

        Queued faults still come first. ``rate=0`` turns chaos off.
        """
        rng = random.Random(seed)
        kinds = [Fault("status", 1, status=500), Fault("status", 1, status=502), Fault("status", 1, status=503),
                 Fault("status", 1, status=429, retry_after_s=0), Fault("hang", 1, hang_s=hang_s),
                 Fault("drop", 1, after_chunks=0)]
        self._chaos = (rate, rng, kinds)

    def _take_fault(self) -> Fault | None:
        if not self.faults:
            rate, rng, kinds = self._chaos
            if rate > 0 and rng.random() < rate:
                return dataclasses.replace(rng.choice(kinds))
            return None
        fault = self.faults[0]
        if fault.times is not None:
            fault.times -= 1
            if fault.times <= 0:
                self.faults.popleft()
        return fault

    def clear_faults(self) -> None:
        """Drop the queued faults and turn chaos off."""
        self.faults.clear()
        self._chaos = (0.0, random.Random(0), [])


async def drop_mid_body(request: web.Request, response: web.StreamResponse, data: bytes) -> web.StreamResponse:
    """Send ``data`` in a chunked body, then cut the connection mid-body."""
    await response.prepare(request)
    await response.write(data)  # write() waits for the buffer to drain
    assert request.transport is not None
    request.transport.close()
    return response
