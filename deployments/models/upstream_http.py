"""``UpstreamHTTP``: an OpenAI-compatible upstream's two calls, made on aiohttp with the SDK's headers and errors.

The ``openai`` SDK's request machinery (its options models, the httpx2 request and
response it builds around its aiohttp transport, the retry loop raygate turns off)
costs about 290 us of CPU per call where this module's whole call costs 80 us (32
concurrent calls, ``python -m bench.upstream_calls``): a fifth of the Gateway's CPU per
request. raygate makes two calls, a completion and a stream of chunks, so those go
straight to aiohttp, and the SDK client stays the authority on the rest:

- the headers it sends: the key (``auth_headers``), organization, project, user agent
  and the operator's ``extra_headers`` (``default_headers``);
- the exception each failure becomes: a status error is the SDK's own
  (``_make_status_error_from_response``, so ``RateLimitError`` keeps its
  ``retry-after``), a failed connection its ``APIConnectionError``, a timeout its
  ``APITimeoutError``, an ``error`` in a stream its ``APIError``; ``map_sdk_errors``
  turns them into raygate errors as before.

Timeouts keep the SDK's meaning: ``timeout_s`` bounds the connect and each read, not
the whole answer, so a long stream that keeps sending is not cut.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import httpx2
import openai
import orjson

MAX_LINE_BYTES = 1 << 20  # an SSE line (one chunk) may be this long; aiohttp's default stops at 128 KiB


class UpstreamHTTP:
    """POSTs JSON to one upstream on a pooled aiohttp session, raising what the SDK would.

    Args:
        client: the SDK client whose base URL, headers and error types are used.
        timeout_s: seconds to connect, and to wait for each read.
        max_connections: the connection pool's size.
    """

    def __init__(self, client: openai.AsyncOpenAI, timeout_s: float, max_connections: int) -> None:
        self.client = client
        self.base_url = str(client.base_url).rstrip("/")
        sdk_headers = {name: value for name, value in client.default_headers.items() if isinstance(value, str)}
        self.headers = {**client.auth_headers, **sdk_headers}  # the operator's headers win, as in the SDK
        self.timeout = aiohttp.ClientTimeout(total=None, connect=timeout_s, sock_read=timeout_s)
        self.session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=max_connections), read_bufsize=MAX_LINE_BYTES // 2)

    async def close(self) -> None:
        await self.session.close()

    async def post(self, path: str, body: dict[str, Any]) -> bytes:
        """The 2xx answer's body.

        Raises:
            openai.APIStatusError: the upstream answered 4xx or 5xx.
            openai.APIConnectionError: the connection failed, or a read timed out (``APITimeoutError``).
        """
        url = self.base_url + path
        try:
            async with self.session.post(url, data=orjson.dumps(body), headers=self.headers,
                                         timeout=self.timeout) as response:
                raw = await response.read()
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise _connection_error(exc, url) from exc
        if response.status >= 400:
            raise self._status_error(response, raw, url)
        return raw

    async def events(self, path: str, body: dict[str, Any]) -> AsyncIterator[dict[str, Any]]:
        """The JSON objects of a server-sent event stream, up to ``[DONE]``.

        Raises:
            openai.APIStatusError / openai.APIConnectionError: as ``post``, also mid-stream.
            openai.APIError: an event carried an ``error``, or was not a JSON object.
        """
        url = self.base_url + path
        try:
            async with self.session.post(url, data=orjson.dumps(body), headers=self.headers,
                                         timeout=self.timeout) as response:
                if response.status >= 400:
                    raise self._status_error(response, await response.read(), url)
                async for data in _sse_data(response.content):
                    if data.startswith("[DONE]"):
                        await response.read()  # the rest of the body, so the connection is reused
                        return
                    yield _event(data, url)
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise _connection_error(exc, url) from exc

    def _status_error(self, response: aiohttp.ClientResponse, raw: bytes, url: str) -> openai.APIStatusError:
        answer = httpx2.Response(response.status, headers=list(response.headers.items()), content=raw,
                                 request=httpx2.Request("POST", url))
        return self.client._make_status_error_from_response(answer)  # noqa: SLF001 - the SDK's own mapping


def _connection_error(exc: BaseException, url: str) -> openai.APIConnectionError:
    request = httpx2.Request("POST", url)
    if isinstance(exc, TimeoutError):  # aiohttp's read and connect timeouts are TimeoutErrors
        return openai.APITimeoutError(request=request)
    return openai.APIConnectionError(request=request)


def json_object(raw: bytes | str) -> dict[str, Any] | None:
    """``raw`` parsed, if it is a JSON object; None for anything else (a proxy's HTML page, a list)."""
    try:
        value = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return None
    return value if isinstance(value, dict) else None


def _event(data: str, url: str) -> dict[str, Any]:
    """One event's JSON object; an ``error`` in it, or anything but an object, is the upstream's failure."""
    event = json_object(data)
    if event is None:
        raise openai.APIError("The upstream sent a stream event that is not a JSON object.",
                              httpx2.Request("POST", url), body=None)
    error = event.get("error")
    if error:
        message = error.get("message") if isinstance(error, dict) else None
        raise openai.APIError(message if isinstance(message, str) and message else "An error occurred during streaming",
                              httpx2.Request("POST", url), body=error)
    return event


async def _sse_data(lines: aiohttp.StreamReader) -> AsyncIterator[str]:
    """Each event's ``data`` (its ``data:`` lines joined), per the server-sent events format.

    Other fields (``event:``, ``id:``, ``retry:``) and ``:`` comments carry nothing an
    OpenAI-compatible chat stream needs; an ``error`` event's payload is in its data.
    """
    data: list[str] = []
    async for raw in lines:
        line = raw.decode("utf-8", errors="replace").rstrip("\r\n")
        if not line:
            if data:
                yield "\n".join(data)
                data = []
        elif line.startswith("data:"):
            data.append(line[6:] if line.startswith("data: ") else line[5:])
    if data:
        yield "\n".join(data)
