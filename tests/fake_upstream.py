"""A fake OpenAI- and Anthropic-compatible upstream, for tests and benchmarks.

``FakeUpstream`` is a small aiohttp server that answers ``POST /v1/chat/completions``
(JSON or SSE), Anthropic's ``POST /v1/messages`` (JSON or SSE with ``event:`` lines)
and ``GET /v1/models`` with a deterministic text and exact usage, so tests can
assert what an engine reports and benchmarks measure raygate, not a model:

* the answer is ``words`` words of a fixed phrase (fewer when ``max_tokens`` /
  ``max_completion_tokens`` is smaller; then ``finish_reason`` is ``"length"``,
  Anthropic's ``stop_reason`` ``"max_tokens"``);
* ``prompt_tokens`` is the number of whitespace-separated words in all message
  contents, plus ``IMAGE_TOKENS`` (85) per image part; ``completion_tokens`` the number
  of words emitted (one per content chunk).
  Anthropic's ``input_tokens`` counts the words of ``system`` too;
* a model named ``fake-judge-N`` answers ``{"score": N, "reason": ...}``; ``fake-judge`` takes
  N from a ``[score=N]`` mark in the prompt (4 without one; ``[score=none]``: no score);
* ``/v1/messages`` behaves as ``tests/fake_anthropic.py`` says (stop sequences, strict
  roles, Anthropic's rules on sampling parameters);
* with ``lengths="budget"`` (``bench.brief``) a chat answer's length follows the request
  instead: ``budget_words`` (a share of ``max_tokens`` set by the first user turn, smaller when a
  system message asks for brevity). Synthetic, but deterministic.

Faults are queued at run time, from Python (``fail``, ``hang``, ``drop_stream``,
``omit_usage``, ``garble``, ``stream_error``, ``trickle``, ``chaos``: ``tests.fake_common.FaultQueue``)
or with ``POST /_control``; each request takes the fault at the head of the queue, whichever
route it calls. Status faults have each API's error body (``{"error": {...}}`` or
``{"type": "error", "error": {...}}``).
What the upstream saw (count, last body, last headers) is kept on the instance and
served by ``GET /_control``.

It must push thousands of requests a second through 1-2 cores, so the JSON bodies
and SSE frames are built from bytes precomputed per (model, length), access logging
is off, and nothing is copied per request that a test can compute on demand.

Usage::

    fake = FakeUpstream(latency_ms=0)
    base_url = await fake.start()          # "http://127.0.0.1:<port>/v1"
    ...
    await fake.stop()

    with FakeUpstream().run_in_thread() as base_url:   # for sync code
        ...

    python -m tests.fake_upstream --port 8100 --latency-ms 50
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import threading
from collections.abc import AsyncIterator, Iterator
from dataclasses import asdict
from typing import Any, Literal

import orjson
from aiohttp import web

from tests.fake_anthropic import (
    _MessagesAnswer,
    _content_error,
    _cut_at_stop,
    _pieces,
    _roles_error,
    _sampling_error,
    _sse_event,
    anthropic_error_response,
    anthropic_error_type,
    count_input_words,
)
from tests.fake_common import Fault, FaultQueue, count_prompt_words, drop_mid_body
from tests.fake_openai import JUDGE_PREFIX, _Answer, _usage, budget_words, judge_answer

logger = logging.getLogger(__name__)

DEFAULT_WORDS = 16
class FakeUpstream(FaultQueue):
    """A deterministic OpenAI-compatible server with run-time fault injection.

    Args:
        latency_ms: delay before the response headers of every ``/v1`` request.
        words: words in each answer (before ``max_tokens`` caps it); with ``lengths="budget"``, the budget
            of a request without ``max_tokens``.
        lengths: ``"fixed"`` (``words``, capped by ``max_tokens``) or ``"budget"`` (``budget_words``).
    """

    def __init__(self, *, latency_ms: float = 0.0, words: int = DEFAULT_WORDS,
                 lengths: Literal["fixed", "budget"] = "fixed") -> None:
        self.latency_ms = latency_ms
        self.words = words
        self.lengths = lengths
        self.base_url = ""
        super().__init__()
        self.request_count = 0
        self.client_ports: set[int] = set()  # one per connection the clients opened
        self.last_path: str | None = None
        self.last_body: dict[str, Any] | None = None
        self._last_headers: Any = None
        self._answers: dict[tuple[str, int, bool], _Answer] = {}
        self._messages_answers: dict[tuple[str, int], _MessagesAnswer] = {}
        self._runner: web.AppRunner | None = None
        self._stopping: asyncio.Event | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    # -- what the upstream saw -------------------------------------------------

    @property
    def last_headers(self) -> dict[str, str]:
        """Headers of the last ``/v1`` request, keys lower-cased (``authorization`` included)."""
        return {k.lower(): v for k, v in (self._last_headers or {}).items()}

    @property
    def last_api_key(self) -> str | None:
        """The bearer token (or ``x-api-key``) of the last ``/v1`` request."""
        headers = self.last_headers
        auth = headers.get("authorization", "")
        return auth.removeprefix("Bearer ") if auth else headers.get("x-api-key")

    def reset(self) -> None:
        """Clear the faults (chaos included) and what was recorded."""
        self.clear_faults()
        self.request_count = 0
        self.client_ports = set()
        self.last_path = self.last_body = self._last_headers = None

    # -- lifecycle ---------------------------------------------------------------

    @classmethod
    @contextlib.asynccontextmanager
    async def started(cls, **options: Any) -> AsyncIterator["FakeUpstream"]:
        """A fake serving on the running event loop (async fixtures), stopped on exit."""
        fake = cls(**options)
        await fake.start()
        try:
            yield fake
        finally:
            await fake.stop()

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> str:
        """Serve on ``host:port`` (0 picks a free port).

        Returns:
            The OpenAI-style base URL, ``http://host:port/v1``.
        """
        app = web.Application()
        app.router.add_post("/v1/chat/completions", self._chat)
        app.router.add_get("/v1/models", self._models)
        app.router.add_post("/v1/messages", self._messages)
        app.router.add_get("/_control", self._get_control)
        app.router.add_post("/_control", self._post_control)
        self._loop = asyncio.get_running_loop()
        self._stopping = asyncio.Event()
        self._runner = web.AppRunner(app, access_log=None, shutdown_timeout=1.0)
        await self._runner.setup()
        site = web.TCPSite(self._runner, host, port, backlog=1024)
        await site.start()
        bound_port = self._runner.addresses[0][1]
        self.base_url = f"http://{host}:{bound_port}/v1"
        return self.base_url

    async def stop(self) -> None:
        """Wake hanging requests and close the server."""
        if self._stopping is not None:
            self._stopping.set()
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    @contextlib.contextmanager
    def run_in_thread(self, host: str = "127.0.0.1", port: int = 0) -> Iterator[str]:
        """Serve from a background thread with its own event loop, for sync code.

        Yields:
            The base URL. The Python fault methods may be called from the caller's thread.
        """
        loop = asyncio.new_event_loop()
        thread = threading.Thread(target=loop.run_forever, name="fake-upstream", daemon=True)
        thread.start()
        try:
            yield asyncio.run_coroutine_threadsafe(self.start(host, port), loop).result(timeout=10)
        finally:
            asyncio.run_coroutine_threadsafe(self.stop(), loop).result(timeout=10)
            loop.call_soon_threadsafe(loop.stop)
            thread.join(timeout=10)
            loop.close()

    # -- handlers ----------------------------------------------------------------

    def _answer(self, model: str, n_words: int, cut: bool | None = None) -> _Answer:
        cut = n_words < self.words if cut is None else cut
        answer = self._answers.get((model, n_words, cut))
        if answer is None:
            answer = _Answer(model, n_words, "length" if cut else "stop")
            self._answers[(model, n_words, cut)] = answer
        return answer

    async def _before_headers(self, request: web.Request, body: Any) -> Fault | None:
        """Record the request, apply latency and pre-header faults; return the fault taken."""
        self.request_count += 1
        if request.transport is not None:
            self.client_ports.add(request.transport.get_extra_info("peername")[1])
        self.last_path = request.path
        self.last_body = body
        self._last_headers = request.headers
        fault = self._take_fault()
        if self.latency_ms > 0:
            await asyncio.sleep(self.latency_ms / 1000)
        if fault is not None and fault.kind == "hang":
            assert self._stopping is not None
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._stopping.wait(), fault.hang_s)
        return fault

    @staticmethod
    def _status_response(fault: Fault) -> web.Response:
        error_type = "invalid_request_error" if fault.status < 500 else "server_error"
        body = {"error": {"message": fault.message, "type": error_type, "param": None, "code": None}}
        headers = {"Retry-After": f"{fault.retry_after_s:g}"} if fault.retry_after_s is not None else None
        return web.Response(status=fault.status, body=orjson.dumps(body), content_type="application/json",
                            headers=headers)

    async def _read(self, request: web.Request) -> tuple[Any, Fault | None]:
        """The request's JSON body (None when it is not JSON) and the fault this request takes."""
        try:
            body = orjson.loads(await request.read())
        except orjson.JSONDecodeError:
            body = None
        return body, await self._before_headers(request, body)

    async def _chat(self, request: web.Request) -> web.StreamResponse:
        body, fault = await self._read(request)
        if not isinstance(body, dict) or not isinstance(body.get("messages"), list):
            return self._status_response(Fault("status", status=400, message="messages is required"))
        if fault is not None and fault.kind == "status":
            return self._status_response(fault)
        limit = body.get("max_completion_tokens") or body.get("max_tokens")
        n_words = min(self.words, limit) if isinstance(limit, int) and limit > 0 else self.words
        model = str(body.get("model", ""))
        if self.lengths == "budget" and not model.startswith(JUDGE_PREFIX):
            n_words = budget_words(body, self.words)
            answer = self._answer(model, n_words, n_words == limit)
        else:
            answer = (judge_answer(model, body, n_words) if model.startswith(JUDGE_PREFIX)
                      else self._answer(model, n_words))
        with_usage = fault is None or fault.kind != "no_usage"
        usage = _usage(count_prompt_words(body), n_words) if with_usage else b""
        if not body.get("stream"):
            payload = answer.json_head + (b',"usage":' + usage if usage else b"") + b"}"
            if fault is not None and fault.kind == "not_json":
                return web.Response(body=b"<html>502 Bad Gateway</html>", content_type="text/html")
            if fault is not None and fault.kind == "drop":
                return await drop_mid_body(request, web.StreamResponse(headers={"Content-Type": "application/json"}),
                                           payload[: len(payload) // 2])
            return web.Response(body=payload, content_type="application/json")

        options = body.get("stream_options")
        include_usage = with_usage and isinstance(options, dict) and bool(options.get("include_usage"))
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
        if fault is not None and fault.kind == "drop":
            return await drop_mid_body(request, response, b"".join(answer.frames[include_usage][: fault.after_chunks]))
        await response.prepare(request)
        if fault is not None and fault.kind == "stream_error":  # OpenRouter's way: a comment, then an error chunk
            error = {"error": {"message": fault.message, "code": fault.status}}
            await response.write(b": PROCESSING\n\n" + b"".join(answer.frames[include_usage][: fault.after_chunks])
                                 + b"data: " + orjson.dumps(error) + b"\n\n")
            await response.write_eof()
            return response
        tail = answer.usage_head + usage + b"}\n\n" if include_usage else b""
        if fault is not None and fault.kind == "trickle":
            for frame in [*answer.frames[include_usage], tail]:
                await response.write(frame)
                await asyncio.sleep(fault.hang_s)
            await response.write(b"data: [DONE]\n\n")
        else:
            await response.write(answer.joined[include_usage] + tail + b"data: [DONE]\n\n")
        await response.write_eof()
        return response

    async def _models(self, request: web.Request) -> web.Response:
        await self._before_headers(request, None)
        body = {"object": "list", "data": [{"id": "fake-model", "object": "model", "created": 0,
                                            "owned_by": "fake-upstream"}]}
        return web.Response(body=orjson.dumps(body), content_type="application/json")

    def _messages_answer(self, model: str, n_words: int, stops: list[str]) -> _MessagesAnswer:
        if not stops:  # the common case is cached; stop sequences are rare and tests only
            answer = self._messages_answers.get((model, n_words))
            if answer is None:
                stop_reason = "max_tokens" if n_words < self.words else "end_turn"
                answer = _MessagesAnswer(model, _pieces(n_words), stop_reason, None)
                self._messages_answers[(model, n_words)] = answer
            return answer
        pieces, hit = _cut_at_stop(_pieces(n_words), stops)
        stop_reason = "stop_sequence" if hit is not None else "max_tokens" if n_words < self.words else "end_turn"
        return _MessagesAnswer(model, pieces, stop_reason, hit)

    async def _messages(self, request: web.Request) -> web.StreamResponse:
        """Anthropic's ``POST /v1/messages``: https://docs.anthropic.com/en/api/messages"""
        body, fault = await self._read(request)
        if not isinstance(body, dict) or not isinstance(body.get("messages"), list):
            return anthropic_error_response(400, "messages: Field required")
        limit = body.get("max_tokens")
        if not isinstance(limit, int) or limit < 1:
            return anthropic_error_response(400, "max_tokens: Field required")
        refusal = _roles_error(body["messages"]) or _content_error(body["messages"]) \
            or _sampling_error(request.headers.get("anthropic-version", ""), body)
        if refusal is not None:
            return anthropic_error_response(400, refusal)
        if fault is not None and fault.kind == "status":
            return anthropic_error_response(fault.status, fault.message, fault.retry_after_s)
        stops = body.get("stop_sequences") or []
        if not isinstance(stops, list) or not all(isinstance(x, str) for x in stops):
            return anthropic_error_response(400, "stop_sequences: Input should be a valid list of strings")
        answer = self._messages_answer(str(body.get("model", "")), min(self.words, limit), stops)
        input_tokens = None if fault is not None and fault.kind == "no_usage" else count_input_words(body)
        if not body.get("stream"):
            payload = answer.json(input_tokens)
            if fault is not None and fault.kind == "drop":
                return await drop_mid_body(request, web.StreamResponse(headers={"Content-Type": "application/json"}),
                                           payload[: len(payload) // 2])
            return web.Response(body=payload, content_type="application/json")

        frames = answer.frames(input_tokens)
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
        if fault is not None and fault.kind == "drop":
            return await drop_mid_body(request, response, b"".join(frames[: fault.after_chunks]))
        if fault is not None and fault.kind == "stream_error":
            error = {"type": "error", "error": {"type": anthropic_error_type(fault.status), "message": fault.message}}
            frames = frames[: fault.after_chunks] + [_sse_event(b"error", orjson.dumps(error))]
        await response.prepare(request)
        await response.write(b"".join(frames))
        await response.write_eof()
        return response

    async def _get_control(self, request: web.Request) -> web.Response:
        state = {
            "request_count": self.request_count,
            "last_path": self.last_path,
            "last_body": self.last_body,
            "last_headers": self.last_headers,
            "faults": [asdict(f) for f in self.faults],
            "latency_ms": self.latency_ms,
            "words": self.words,
        }
        return web.Response(body=orjson.dumps(state), content_type="application/json")

    async def _post_control(self, request: web.Request) -> web.Response:
        """Change settings or queue faults.

        Body: ``{"reset": true}``, ``{"latency_ms": 50}``, ``{"words": 8}`` and/or
        ``{"faults": [{"kind": "status", "status": 429, "retry_after_s": 2, "times": 1}, ...]}``.
        """
        try:
            control = orjson.loads(await request.read())
            if control.get("reset"):
                self.reset()
            if "latency_ms" in control:
                self.latency_ms = float(control["latency_ms"])
            if "words" in control:
                self.words = int(control["words"])
            for fault in control.get("faults", []):
                self.add_fault(Fault(**fault))
        except (orjson.JSONDecodeError, AttributeError, TypeError, ValueError) as exc:
            return web.json_response({"error": {"message": f"bad control body: {exc}"}}, status=400)
        return await self._get_control(request)


async def _serve_forever(host: str, port: int, latency_ms: float, words: int, chaos_rate: float) -> None:
    fake = FakeUpstream(latency_ms=latency_ms, words=words)
    if chaos_rate:
        fake.chaos(chaos_rate, seed=1)
    base_url = await fake.start(host, port)
    print(f"fake upstream listening on {base_url}", flush=True)  # benchmarks read this line
    try:
        await asyncio.Event().wait()
    finally:
        await fake.stop()


def main(argv: list[str] | None = None) -> None:
    """``python -m tests.fake_upstream --port P --latency-ms L``."""
    parser = argparse.ArgumentParser(description="Fake OpenAI- and Anthropic-compatible upstream.")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8100)
    parser.add_argument("--latency-ms", type=float, default=0.0)
    parser.add_argument("--words", type=int, default=DEFAULT_WORDS)
    parser.add_argument("--chaos-rate", type=float, default=0.0, help="share of requests given a random fault")
    args = parser.parse_args(argv)
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(_serve_forever(args.host, args.port, args.latency_ms, args.words, args.chaos_rate))


if __name__ == "__main__":
    main()
