"""``ModelServer``: hosts one engine for one configured model, as its own deployment or in the Gateway.

``ModelDeployment`` is the ``Model_<name>`` Serve deployment. With ``placement.models: embedded`` a
remote model's ``ModelServer`` runs inside each Gateway replica instead (``serve_app.placement``):
no Serve hop per request, and the same methods, errors and values either way.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator

from deployments.models.base import Engine, EngineOutput, load_engine_class
from serve_app.config import ModelConfig
from serve_app.constants import ENGINE_START_TIMEOUT_S, HEALTH_CHECK_TIMEOUT_S
from serve_app.errors import RaygateError, ServiceUnavailableError, UpstreamUnavailableError
from serve_app.protocol import ChatCompletionRequest, ChatCompletionResponse, ChatCompletionStreamResponse

logger = logging.getLogger(__name__)


class ModelServer:
    """Serves one model. Errors are returned (or yielded) as ``RaygateError`` values.

    Returning errors rather than raising keeps their type and fields intact across
    Ray's process boundary, and lets the gateway tell a failure before the first
    byte (worth a fallback) from one after it.

    Args:
        config: the model's config.
        data_dir: raygate's state dir (model files live under it).
        engine_cls: the engine to run; by default the one ``config.engine`` names.
    """

    def __init__(self, config: ModelConfig, data_dir: str, *, engine_cls: type[Engine] | None = None) -> None:
        self.config = config
        cls = engine_cls or load_engine_class(config)
        self.engine = cls(config, data_dir)

    async def start(self) -> None:
        """Start the engine, within ``ENGINE_START_TIMEOUT_S``; once, before the first request.

        Raises:
            UpstreamUnavailableError: it did not start (a deployment's replica then fails to start; an
                embedded model fails the request, which retries or falls back, and the next call tries again).
        """
        logger.info("Starting %s engine for model %s", self.config.engine, self.config.name)
        try:
            await asyncio.wait_for(self.engine.start(), ENGINE_START_TIMEOUT_S)
        except Exception as exc:
            logger.exception("Engine of model %s did not start", self.config.name)
            raise UpstreamUnavailableError(f"Model {self.config.name} could not start.") from exc
        logger.info("Model %s ready", self.config.name)

    async def complete(self, request: ChatCompletionRequest) -> ChatCompletionResponse | RaygateError:
        """Answer a non-streaming request.

        Returns:
            The completion, or the error that stopped it.
        """
        request = request.model_copy(update={"stream": False})
        try:
            async for output in self.engine.chat(request):
                if isinstance(output, ChatCompletionResponse):
                    return output
            return UpstreamUnavailableError(f"Model {self.config.name} returned no answer.")
        except RaygateError as exc:
            return exc
        except Exception:  # noqa: BLE001 - an engine bug must not leak a trace to clients
            logger.exception("Engine of model %s failed", self.config.name)
            return UpstreamUnavailableError(f"Model {self.config.name} failed.")

    async def load_adapter(self, name: str) -> RaygateError | None:
        """Load a registered LoRA adapter into this replica now (others load it on first use).

        Returns:
            None once loaded, else the error (an engine without adapters, an unknown adapter).
        """
        try:
            await self.engine.load_adapter(name)
            return None
        except RaygateError as exc:
            return exc
        except Exception:  # noqa: BLE001 - a bad adapter file must not leak a trace
            logger.exception("Model %s could not load adapter %s", self.config.name, name)
            return UpstreamUnavailableError(f"Model {self.config.name} could not load the adapter '{name}'.")

    async def stream(self, request: ChatCompletionRequest) -> AsyncIterator[ChatCompletionStreamResponse | RaygateError]:
        """Answer a streaming request.

        Yields:
            Chunks (the last one with usage); on failure, one ``RaygateError`` and no more.
        """
        request = request.model_copy(update={"stream": True})
        try:
            # aclosing: when the client goes away, the engine hears of it and stops generating.
            async with contextlib.aclosing(self.engine.chat(request)) as outputs:
                async for output in self._chunks(outputs):
                    yield output
        except RaygateError as exc:
            yield exc
        except Exception:  # noqa: BLE001
            logger.exception("Engine of model %s failed mid-stream", self.config.name)
            yield UpstreamUnavailableError(f"Model {self.config.name} failed.")

    async def check_health(self) -> None:
        """Raise when the engine cannot serve (Serve restarts the replica)."""
        try:
            await asyncio.wait_for(self.engine.check_health(), HEALTH_CHECK_TIMEOUT_S)
        except RaygateError:
            raise
        except Exception as exc:
            raise ServiceUnavailableError(f"Model {self.config.name} is unhealthy.") from exc

    async def close(self) -> None:
        """Let the engine release what it holds (connections, workers, GPU memory)."""
        await self.engine.close()

    @staticmethod
    async def _chunks(outputs: AsyncIterator[EngineOutput]) -> AsyncIterator[ChatCompletionStreamResponse]:
        async for output in outputs:
            if isinstance(output, ChatCompletionStreamResponse):
                yield output


class ModelDeployment(ModelServer):
    """The ``Model_<name>`` Serve deployment: a ``ModelServer`` with Serve's lifecycle hooks.

    Serve awaits an async ``__init__`` (the engine is up before the replica takes requests) and
    calls ``__del__`` when the replica stops. They live here, not on ``ModelServer``: an embedded
    instance is closed by the Gateway, and an async ``__del__`` there would leave an un-awaited
    coroutine behind when it is garbage-collected.
    """

    async def __init__(  # type: ignore[misc]
        self, config: ModelConfig, data_dir: str, *, engine_cls: type[Engine] | None = None
    ) -> None:
        super().__init__(config, data_dir, engine_cls=engine_cls)
        await self.start()

    async def __del__(self) -> None:
        """Serve calls this when the replica stops: let the engine release what it holds."""
        await self.close()
