"""Batch jobs, run inside each Gateway replica behind its interactive traffic.

Each replica's ``BatchRunner`` claims one unfinished batch at a time from the Ledger
(``deployments.batches``: the state lives there, so a batch survives the replica), and runs
its requests through the very chat path interactive requests take (``Gateway.chat_completions``:
guard, cost guard, cache, dispatch with retries and fallbacks, ledger rows tagged ``batch``).
Lower priority than interactive traffic means:

* at most ``batches.max_concurrency`` batch requests in flight per replica;
* no new one starts while the replica's interactive p95 time to first byte (``LoadGate``) is
  above ``batches.pause_above_ms`` (the batch shows ``raygate.paused``);
* a rate limit (429 ``rate_limit_exceeded``) makes an item wait and try again instead of failing;
  other refusals (``insufficient_quota``, a bad request, an upstream outage) are its result.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import time
import uuid
from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import orjson
from pydantic import ValidationError
from starlette.requests import Request

from deployments.batches import Claim, Item
from deployments.ledger import RequestRecord
from serve_app.auth import APIKey
from serve_app.batch_config import BatchConfig
from serve_app.constants import LEDGER_CALL_TIMEOUT_S
from serve_app.errors import AuthenticationError, InvalidRequestError, RaygateError
from serve_app.handles import call
from serve_app.protocol import ChatCompletionRequest
from serve_app.retry import retry_after_s
from serve_app.spend import TAG_HEADER

if TYPE_CHECKING:
    from serve_app.gateway import Gateway

logger = logging.getLogger(__name__)
BATCH_REQUEST_PREFIX = "batch_req_"
BATCH_TAG = "batch"
PAUSE_CHECK_S = 0.25
RATE_LIMIT_WAIT_S = 1.0


class LoadGate:
    """Interactive requests' time to first byte over a trailing window; ``paused`` while its p95 is high.

    Args:
        settings: ``pause_above_ms``, ``pause_window_s`` and ``pause_min_samples``.
        clock: seconds, monotonic (tests pass their own).
    """

    def __init__(self, settings: BatchConfig, clock: Callable[[], float] = time.monotonic) -> None:
        self.settings = settings
        self.clock = clock
        self._samples: deque[tuple[float, float]] = deque()

    def observe(self, ttfb_ms: float) -> None:
        self._samples.append((self.clock(), ttfb_ms))

    def p95_ms(self) -> float | None:
        """The window's p95 (None with fewer than ``pause_min_samples`` samples)."""
        horizon = self.clock() - self.settings.pause_window_s
        while self._samples and self._samples[0][0] < horizon:
            self._samples.popleft()
        if len(self._samples) < self.settings.pause_min_samples:
            return None
        values = sorted(ms for _, ms in self._samples)
        return values[min(len(values) - 1, int(0.95 * len(values)))]

    def paused(self) -> bool:
        p95 = self.p95_ms()
        return p95 is not None and p95 > self.settings.pause_above_ms


def item_request(request_id: str) -> Request:
    """The request a batch item goes through the chat route as: its id, tagged ``batch`` for the ledger."""
    return Request({"type": "http", "method": "POST", "path": "/v1/chat/completions", "query_string": b"",
                    "headers": [(TAG_HEADER.encode(), BATCH_TAG.encode())], "state": {"request_id": request_id}})


async def execute(gateway: "Gateway", key: APIKey, body: str, request_id: str) -> tuple[int, Any, RaygateError | None]:
    """Run one batch request through the chat route: (HTTP status, response body, the error if it failed)."""
    try:
        request = ChatCompletionRequest.model_validate_json(body)
        response = await gateway.chat_completions(request, item_request(request_id), key)
        return response.status_code, orjson.loads(bytes(response.body)), None
    except ValidationError as exc:
        error: RaygateError = InvalidRequestError(f"Invalid body: {exc.errors()[0]['msg']}", param="body")
    except RaygateError as exc:
        error = exc
    except Exception:  # noqa: BLE001 - one broken item must not stop the batch
        logger.exception("Batch request %s failed", request_id)
        error = RaygateError("The request failed inside the gateway.")
    return error.status_code, {"error": error.to_info().model_dump()}, error


class BatchRunner:
    """Claims batches from the Ledger and runs their requests at low priority (see the module doc).

    Args:
        gateway: the replica's Gateway (its Ledger handle, key store, metrics and chat route).
        settings: the ``batches`` settings.
    """

    def __init__(self, gateway: "Gateway", settings: BatchConfig) -> None:
        self.gateway = gateway
        self.settings = settings
        self.owner = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self.gate = LoadGate(settings)
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._cancelled: set[str] = set()

    def start(self) -> None:
        """Begin looking for work (at once when built on the replica's event loop, else on first use)."""
        if self._task is not None or not self.settings.enabled:
            return
        with contextlib.suppress(RuntimeError):  # no running loop yet
            self._task = asyncio.get_running_loop().create_task(self._run())

    def wake(self, cancelled: str | None = None) -> None:
        """A batch was created (or ``cancelled`` here): look now rather than at the next poll."""
        if cancelled is not None:
            self._cancelled.add(cancelled)
        self.start()
        self._wake.set()

    def observe(self, record: RequestRecord) -> None:
        """Feed the gate with an interactive request's time to first byte (batch requests do not count)."""
        if record.ttft_ms is not None and not record.id.startswith(BATCH_REQUEST_PREFIX):
            self.gate.observe(record.ttft_ms)

    async def close(self) -> None:
        """Stop, and give the batch up so another replica continues it at once."""
        if self._task is None:
            return
        self._task.cancel()
        self._task = None
        with contextlib.suppress(Exception):
            await self._store("batches.release", self.owner)

    async def _store(self, operation: str, *args: Any) -> Any:
        return await call(self.gateway.ledger.store.remote(operation, *args), LEDGER_CALL_TIMEOUT_S, "Ledger")

    async def _run(self) -> None:
        while True:
            try:
                claim: Claim | None = await self._store("batches.claim", self.owner, self.settings.lease_s)
                if claim is not None:
                    await self._work(claim)
                    continue
            except asyncio.CancelledError:
                raise
            except Exception:  # noqa: BLE001 - the Ledger down for a while: try again later
                logger.warning("Batch runner: the Ledger is unreachable; retrying", exc_info=True)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self.settings.poll_interval_s)
            self._wake.clear()

    async def _work(self, claim: Claim) -> None:
        """Run the claimed batch's pending items page by page, then finalize it (unless the lease was lost)."""
        logger.info("Batch %s: running (%s)", claim.id, claim.status)
        key = await self.gateway.keys.lookup_id(claim.key_id)
        heartbeat = asyncio.get_running_loop().create_task(self._heartbeat(claim))
        try:
            cursor, page_size = 0, self.settings.max_concurrency * 4
            while claim.status == "in_progress":
                page = await self._store("batches.pending", claim.id, self.owner, self.settings.lease_s, cursor,
                                         page_size)
                if page is None:
                    logger.warning("Batch %s: lease lost to another replica", claim.id)
                    return
                claim.status = page.status
                if not page.items or page.status != "in_progress" or time.time() >= page.expires_at:
                    break
                results = await self._run_page(claim, key, page.items, page.expires_at)
                cursor = page.items[-1].line
                if await self._store("batches.record", claim.id, self.owner, self.settings.lease_s, results) is None:
                    return
            batch = await self._store("batches.finalize", claim.id, self.owner)
            logger.info("Batch %s: %s", claim.id, batch.status)
        finally:
            heartbeat.cancel()
            self._cancelled.discard(claim.id)

    async def _heartbeat(self, claim: Claim) -> None:
        """Renew the lease while items run, note the pause, and learn of a cancel from another replica."""
        paused: bool | None = None
        while True:
            await asyncio.sleep(min(self.settings.lease_s / 3, 1.0))
            now_paused = self.gate.paused()
            status = await self._store("batches.renew", claim.id, self.owner, self.settings.lease_s,
                                       now_paused if now_paused != paused else None)
            paused = now_paused
            self.gateway.metrics.set("raygate_batch_paused", float(now_paused))
            if status is None or status == "cancelling":
                self._cancelled.add(claim.id)

    async def _run_page(self, claim: Claim, key: APIKey | None, items: list[Item],
                        expires_at: float) -> list[tuple[int, bool, str]]:
        """Run items with at most ``max_concurrency`` in flight, starting none while paused or after a cancel."""
        slots = asyncio.Semaphore(self.settings.max_concurrency)

        async def one(item: Item) -> tuple[int, bool, str] | None:
            async with slots:
                while self.gate.paused() and claim.id not in self._cancelled:
                    await asyncio.sleep(PAUSE_CHECK_S)
                if claim.id in self._cancelled or time.time() >= expires_at:
                    return None
                return await self._item(key, item, expires_at)

        done = await asyncio.gather(*(one(item) for item in items))
        return [result for result in done if result is not None]

    async def _item(self, key: APIKey | None, item: Item, expires_at: float) -> tuple[int, bool, str]:
        """One request's result line (OpenAI's batch output format); rate limits wait and try again."""
        while True:
            request_id = f"{BATCH_REQUEST_PREFIX}{uuid.uuid4().hex}"
            if key is None:
                error = AuthenticationError("The API key that created this batch has been revoked.")
                status, payload = error.status_code, {"error": error.to_info().model_dump()}
            else:
                status, payload, error = await execute(self.gateway, key, item.body, request_id)
            if error is not None and error.code == "rate_limit_exceeded" and time.time() < expires_at:
                await asyncio.sleep(retry_after_s(error) or RATE_LIMIT_WAIT_S)
                continue
            self.gateway.metrics.inc("raygate_batch_requests", outcome="ok" if status < 400 else "failed")
            line = {"id": request_id, "custom_id": item.custom_id,
                    "response": {"status_code": status, "request_id": request_id, "body": payload}, "error": None}
            return item.line, status < 400, orjson.dumps(line).decode()
