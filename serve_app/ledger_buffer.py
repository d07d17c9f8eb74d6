"""``LedgerBuffer``: the Gateway's side of the ledger, rows sent in batches off the request path."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

from deployments.ledger import RequestRecord

logger = logging.getLogger(__name__)


class LedgerBuffer:
    """Gateway-side buffer: collects rows and sends them in batches, off the request path.

    Args:
        send: coroutine that delivers a batch (the Ledger handle's ``record``).
        flush_interval_s: longest a row waits before it is sent.
        batch_size: a full batch is sent at once.
    """

    def __init__(
        self, send: Callable[[list[RequestRecord]], Awaitable[object]], *, flush_interval_s: float, batch_size: int
    ) -> None:
        self._send = send
        self._rows: list[RequestRecord] = []
        self._interval_s = flush_interval_s
        self._batch_size = batch_size
        self._wakeup = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    def add(self, row: RequestRecord) -> None:
        """Queue a row; never blocks and never raises."""
        self._rows.append(row)
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run())
        if len(self._rows) >= self._batch_size:
            self._wakeup.set()

    async def flush(self) -> None:
        """Send everything buffered now. A failed batch is kept for the next try."""
        rows, self._rows = self._rows, []
        if not rows:
            return
        try:
            await self._send(rows)
        except Exception:  # noqa: BLE001 - the ledger being briefly down must not lose rows
            logger.warning("Ledger write of %d rows failed; will retry", len(rows))
            self._rows[:0] = rows

    async def close(self) -> None:
        """Stop the background sender and send what is left."""
        if self._task is not None:
            self._task.cancel()
            self._task = None
        await self.flush()

    async def _run(self) -> None:
        while True:
            try:
                await asyncio.wait_for(self._wakeup.wait(), self._interval_s)
            except TimeoutError:
                pass
            self._wakeup.clear()
            await self.flush()
