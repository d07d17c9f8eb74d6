"""The embedded Valkey that `serve run` gets when no REDIS_URL is set."""

from __future__ import annotations

from pathlib import Path

import pytest
import redis

from serve_app.stores import REDIS_URL_FILE, embedded_redis_url

pytestmark = pytest.mark.integration


def test_detached_valkey_is_started_once_and_recorded(ray_cluster: int, tmp_path: Path) -> None:
    url = embedded_redis_url(str(tmp_path))
    assert embedded_redis_url(str(tmp_path)) == url  # a second build finds the same actor
    assert (tmp_path / REDIS_URL_FILE).read_text() == url
    client = redis.Redis.from_url(url)
    assert client.ping()
    client.close()
    assert (tmp_path / "valkey").is_dir()
