"""One adapter for a component wherever it runs: inside this Gateway replica, or behind a handle.

``embedded`` components are plain objects called in process (no hop; they scale
with the Gateway and talk to Redis directly); ``deployment`` components are Serve
deployments reached through a handle (scaled on their own). The Gateway calls
both the same way, so moving a component is one line of serve_config.yaml.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
from collections.abc import AsyncGenerator, Awaitable, Callable
from typing import Any

from serve_app.config import GatewayConfig
from serve_app.constants import COMPONENT_CALL_TIMEOUT_S
from serve_app.handles import call
from serve_app.tasks import BackgroundTasks


class LocalStream:
    """An embedded component's async generator, with what callers use of a ``DeploymentResponseGenerator``.

    Args:
        items: the generator (e.g. ``ModelServer.stream(request)``).
        background: where ``cancel`` runs the generator's clean-up.
    """

    def __init__(self, items: AsyncGenerator[Any, None], background: BackgroundTasks) -> None:
        self._items = items
        self._background = background

    def __aiter__(self) -> LocalStream:
        return self

    def __anext__(self) -> Awaitable[Any]:
        """The next item; ``StopAsyncIteration`` at the end, as a handle's stream."""
        return self._items.__anext__()

    def cancel(self) -> None:
        """Stop the generator: its ``finally`` blocks run (an upstream stream is closed)."""
        self._background.spawn(self._items.aclose())


class Placed:
    """Calls a component's async methods in process or through its Serve handle.

    Args:
        name: the component, for error messages.
        target: the component object, or its ``DeploymentHandle``.
        remote: whether ``target`` is a handle.
        timeout_s: bound on a remote call.
        start: for an embedded component whose start needs the running event loop (the Gateway's
            ``__init__`` has none): awaited once, by the first call; calls that arrive meanwhile wait
            for the same start, and a failed start is tried again by the next call.
    """

    def __init__(self, name: str, target: Any, *, remote: bool, timeout_s: float = COMPONENT_CALL_TIMEOUT_S,
                 start: Callable[[], Awaitable[None]] | None = None) -> None:
        self.name = name
        self.target = target
        self.remote = remote
        self.timeout_s = timeout_s
        self._start = start
        self._started = start is None
        self._starting: asyncio.Future[None] | None = None
        self._background = BackgroundTasks()

    async def __call__(self, method: str, *args: Any, **kwargs: Any) -> Any:
        """Call ``method`` with the arguments; the same result and errors either way."""
        if self.remote:
            return await call(self.invoke(method, *args, **kwargs), self.timeout_s, self.name)
        return await self.invoke(method, *args, **kwargs)

    def invoke(self, method: str, *args: Any, **kwargs: Any) -> Awaitable[Any]:
        """Start a call and return it unawaited: a ``DeploymentResponse`` or a coroutine.

        For callers that bound each call themselves (``handles.call(placed.invoke(...), timeout_s, ...)``:
        a model's attempt timeout, a health probe), the same way for both placements.
        """
        if self.remote:
            return getattr(self.target, method).remote(*args, **kwargs)
        if not self._started:
            return self._started_call(method, args, kwargs)
        return getattr(self.target, method)(*args, **kwargs)

    def stream(self, method: str, *args: Any, **kwargs: Any) -> Any:
        """Start a streaming call: a ``DeploymentResponseGenerator`` or a ``LocalStream``.

        Either has ``__anext__`` (bound it with ``handles.next_item``) and ``cancel()``.
        """
        if self.remote:
            return getattr(self._streaming, method).remote(*args, **kwargs)
        items = getattr(self.target, method)(*args, **kwargs) if self._started else \
            self._started_stream(method, args, kwargs)
        return LocalStream(items, self._background)

    async def close(self) -> None:
        """Release an embedded component's connections (a deployment closes its own)."""
        if not self.remote and hasattr(self.target, "close"):
            await self.target.close()

    @functools.cached_property
    def _streaming(self) -> Any:
        # Configured once: .options() per call costs time on the hot path.
        return self.target.options(stream=True)

    async def _ready(self, start: Callable[[], Awaitable[None]]) -> None:
        starting = self._starting
        if starting is None or (starting.done() and (starting.cancelled() or starting.exception() is not None)):
            starting = self._starting = asyncio.ensure_future(start())
        # Shielded: a caller that times out or goes away must not cancel the start the others wait for.
        await asyncio.shield(starting)
        self._started = True  # later calls go straight to the target

    async def _started_call(self, method: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        if self._start is not None:
            await self._ready(self._start)
        return await getattr(self.target, method)(*args, **kwargs)

    async def _started_stream(self, method: str, args: tuple[Any, ...],
                              kwargs: dict[str, Any]) -> AsyncGenerator[Any, None]:
        if self._start is not None:
            await self._ready(self._start)
        async with contextlib.aclosing(getattr(self.target, method)(*args, **kwargs)) as items:
            async for item in items:
                yield item


def placed_models(config: GatewayConfig, handles: dict[str, Any]) -> dict[str, Placed]:
    """Each configured model, by name: its deployment's handle, or its ``ModelServer`` in this replica.

    Args:
        config: the application config (``placement.models`` decides which models are embedded).
        handles: the handles of the models placed as deployments.
    """
    from deployments.models.server import ModelServer  # the engine modules load only where a model runs

    models: dict[str, Placed] = {}
    for model in config.models:
        name = f"Model {model.name}"
        if config.placement.embeds(model):
            server = ModelServer(model, config.stores.data_dir)
            models[model.name] = Placed(name, server, remote=False, start=server.start)
        else:
            models[model.name] = Placed(name, handles[model.name], remote=True)
    return models
