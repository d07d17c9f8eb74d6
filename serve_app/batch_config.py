"""Settings of background batch jobs (``/v1/files`` and ``/v1/batches``, run by ``serve_app.batching``)."""

from __future__ import annotations

from pydantic import Field, PositiveFloat, PositiveInt

from serve_app.config_base import BaseConfig


class BatchConfig(BaseConfig):
    """Batch jobs the OpenAI way, run inside the Gateway replicas behind interactive traffic.

    A replica runs one batch at a time with at most ``max_concurrency`` requests in flight, and
    starts none while its interactive requests' p95 time to first byte over ``pause_window_s``
    is above ``pause_above_ms``: batches take the capacity interactive traffic leaves.
    """

    enabled: bool = Field(True, description="Serve /v1/files and /v1/batches and run batch jobs.")
    max_concurrency: PositiveInt = Field(4, le=256, description="Batch requests in flight per Gateway replica.")
    pause_above_ms: PositiveFloat = Field(
        5000.0, description="Pause batch work while interactive p95 time to first byte is above this.")
    pause_window_s: PositiveFloat = Field(10.0, le=600, description="The trailing window of that p95.")
    pause_min_samples: PositiveInt = Field(5, description="Interactive requests in the window before it counts.")
    max_requests: PositiveInt = Field(50_000, le=1_000_000, description="Requests one batch may hold.")
    max_active_per_user: PositiveInt = Field(
        20, le=10_000, description="A user's batches not yet finished; beyond this, creating one is a 429.")
    lease_s: PositiveFloat = Field(
        30.0, le=3600, description="A running batch is claimed for this long and renewed while it runs; a "
                                   "replica that died lets another take the batch over after it.")
    poll_interval_s: PositiveFloat = Field(2.0, le=60, description="How often an idle replica looks for work.")
    completion_windows: list[str] = Field(["24h"], min_length=1,
                                          description="Accepted completion_window values ('<hours>h').")
