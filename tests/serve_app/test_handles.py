"""Handle failures become raygate errors; a replica that died is told apart from a failing model."""

from __future__ import annotations

import asyncio

import pytest
from ray import exceptions as ray_exceptions
from ray.serve import exceptions as serve_exceptions

from serve_app.errors import ServiceUnavailableError, UpstreamTimeoutError, UpstreamUnavailableError
from serve_app.handles import REPLICA_UNAVAILABLE, call


async def failing(exc: BaseException) -> None:
    raise exc


async def test_a_dead_replica_is_replica_unavailable() -> None:
    with pytest.raises(UpstreamUnavailableError) as caught:
        await call(failing(ray_exceptions.ActorUnavailableError("gone", None)), 1.0, "Model m",
                   UpstreamUnavailableError)
    assert caught.value.code == REPLICA_UNAVAILABLE and caught.value.status_code == 503


async def test_other_failures_keep_their_codes() -> None:
    with pytest.raises(ServiceUnavailableError) as overloaded:
        await call(failing(serve_exceptions.BackPressureError(num_queued_requests=1, max_queued_requests=1)), 1.0,
                   "Ledger")
    assert overloaded.value.code != REPLICA_UNAVAILABLE
    with pytest.raises(UpstreamTimeoutError):
        await call(asyncio.sleep(1), 0.01, "Model m")
