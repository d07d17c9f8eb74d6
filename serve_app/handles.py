"""Calls through Serve handles: bounded in time, Ray's failures turned into raygate errors."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any, TypeVar

from ray import exceptions as ray_exceptions
from ray.serve import exceptions as serve_exceptions

from serve_app.errors import RaygateError, ServiceUnavailableError, UpstreamTimeoutError

logger = logging.getLogger(__name__)
T = TypeVar("T")

REPLICA_UNAVAILABLE = "replica_unavailable"
_REPLICA_GONE = (ray_exceptions.ActorDiedError, ray_exceptions.ActorUnavailableError)
_RAY_FAILURES = (
    ray_exceptions.RayActorError,
    ray_exceptions.RayTaskError,
    serve_exceptions.BackPressureError,
    serve_exceptions.DeploymentUnavailableError,
)


@asynccontextmanager
async def map_handle_errors(component: str, unavailable: type[RaygateError] = ServiceUnavailableError) -> AsyncIterator[None]:
    """Translate a handle call's failures: timeouts, dead or overloaded replicas.

    Args:
        component: what was called, for messages and logs.
        unavailable: the error raised when the component cannot answer.
    """
    try:
        yield
    except RaygateError as exc:
        # A replica's error arrives as Ray's dual class (RayTaskError + the error's class), whose
        # attribute lookup finds class defaults before the error's own values (its ``code``):
        # raise the error itself.
        cause = exc.__dict__.get("cause")
        raise cause if isinstance(cause, RaygateError) else exc from None
    except TimeoutError as exc:
        raise UpstreamTimeoutError(f"{component} did not answer in time.") from exc
    except _REPLICA_GONE as exc:
        # The replica died or restarts: Serve routes the retry to another one. Not the model's fault,
        # so circuit breakers leave it out (serve_app.dispatch).
        logger.warning("%s call failed: %s", component, type(exc).__name__)
        raise unavailable(f"{component} is unavailable right now; try again shortly.",
                          code=REPLICA_UNAVAILABLE) from exc
    except _RAY_FAILURES as exc:
        logger.warning("%s call failed: %s", component, type(exc).__name__)
        raise unavailable(f"{component} is unavailable right now; try again shortly.") from exc


async def call(response: Any, timeout_s: float, component: str,
               unavailable: type[RaygateError] = ServiceUnavailableError) -> Any:
    """Await a ``DeploymentResponse`` (or an embedded component's coroutine) within ``timeout_s``, errors translated.

    ``asyncio.timeout``, not ``wait_for``: no task per call (Python 3.11's ``wait_for`` makes one).
    """
    async with map_handle_errors(component, unavailable), asyncio.timeout(timeout_s):
        return await response


async def next_item(stream: Any, timeout_s: float, component: str,
                    unavailable: type[RaygateError] = ServiceUnavailableError) -> Any:
    """Return the next item of a ``DeploymentResponseGenerator`` within ``timeout_s``.

    Raises:
        StopAsyncIteration: the stream ended.
    """
    async with map_handle_errors(component, unavailable), asyncio.timeout(timeout_s):
        return await stream.__anext__()
