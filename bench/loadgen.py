"""bench.compare's load generator: one keep-alive HTTP/1.1 connection per client, parsed by httptools.

On 2 shared cores the load generator takes CPU from the server it measures. aiohttp's client
spends 0.16–0.20 ms of CPU a request at raygate's rates; this one writes a prebuilt request
head and lets httptools (uvicorn's C parser) read the answer, for a fraction of that
(bench/RESULTS.md, "Hot-path cuts, round 7"). It does only what the benchmark needs: POST with
a JSON body, answers framed by Content-Length or chunked encoding, a new connection when the
server closes one.
"""

from __future__ import annotations

import asyncio
import re
import time
from urllib.parse import urlsplit

import httptools

__all__ = ["Answer", "Connection"]


class Answer:
    """One answer as the benchmark reads it: status, the header it checks, body, time to first text."""

    def __init__(self, content_re: re.Pattern[bytes] | None, started: float) -> None:
        self.status = 0
        self.cache: str | None = None
        self.body = bytearray()
        self.ttft_ms: float | None = None
        self._content_re = content_re
        self._started = started
        self._scanned = 0  # where the search for the first text goes on from (an event may span reads)

    def on_body(self, chunk: bytes) -> None:
        self.body += chunk
        if self._content_re is not None and self.ttft_ms is None:
            if self._content_re.search(self.body, max(self._scanned - 64, 0)):
                self.ttft_ms = (time.perf_counter() - self._started) * 1000
            self._scanned = len(self.body)


class Connection(asyncio.Protocol):
    """A client's connection to one ``http://host:port/path`` URL, reopened when the server closes it."""

    def __init__(self, url: str, headers: dict[str, str]) -> None:
        parts = urlsplit(url)
        self._host, self._port = parts.hostname or "127.0.0.1", parts.port or 80
        # The headers aiohttp's client sent (the load generator before this one), so servers see the same request.
        lines = [f"POST {parts.path or '/'} HTTP/1.1", f"Host: {parts.netloc}",
                 *(f"{name}: {value}" for name, value in headers.items()),
                 "Accept: */*", "Accept-Encoding: gzip, deflate", "User-Agent: raygate-bench"]
        self._head = ("\r\n".join(lines) + "\r\nContent-Length: ").encode("latin-1")
        self._transport: asyncio.Transport | None = None
        self._parser: httptools.HttpResponseParser | None = None
        self._answer: Answer | None = None
        self._done: asyncio.Future[None] | None = None
        self._keep_alive = True

    async def post(self, body: bytes, content_re: re.Pattern[bytes] | None = None) -> Answer:
        """Send ``body``; return the whole answer (raises ``ConnectionError`` if the server hangs up first)."""
        loop = asyncio.get_running_loop()
        if self._transport is None or self._transport.is_closing():
            await loop.create_connection(lambda: self, self._host, self._port)
        self._answer = Answer(content_re, time.perf_counter())
        self._done = loop.create_future()
        self._parser = httptools.HttpResponseParser(self)
        assert self._transport is not None
        self._transport.write(self._head + str(len(body)).encode() + b"\r\n\r\n" + body)
        await self._done
        answer, self._answer = self._answer, None
        if not self._keep_alive:
            self.close()
        return answer

    def close(self) -> None:
        """Close the connection (the next ``post`` opens another)."""
        if self._transport is not None:
            self._transport.close()
            self._transport = None

    # asyncio.Protocol
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport  # type: ignore[assignment]
        self._keep_alive = True

    def data_received(self, data: bytes) -> None:
        if self._parser is None:
            return
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserError as exc:
            self._fail(ConnectionError(f"bad HTTP answer: {exc}"))

    def connection_lost(self, exc: Exception | None) -> None:
        self._transport = None
        self._fail(ConnectionError("the server closed the connection"))

    def _fail(self, exc: Exception) -> None:
        if self._done is not None and not self._done.done():
            self._done.set_exception(exc)
        self.close()

    # httptools callbacks
    def on_header(self, name: bytes, value: bytes) -> None:
        if name.lower() == b"x-raygate-cache" and self._answer is not None:
            self._answer.cache = value.decode("latin-1")

    def on_headers_complete(self) -> None:
        assert self._parser is not None and self._answer is not None
        self._answer.status = self._parser.get_status_code()
        self._keep_alive = self._parser.should_keep_alive()

    def on_body(self, body: bytes) -> None:
        if self._answer is not None:
            self._answer.on_body(body)

    def on_message_complete(self) -> None:
        if self._done is not None and not self._done.done():
            self._done.set_result(None)
