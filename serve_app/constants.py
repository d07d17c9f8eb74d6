"""Timeouts and limits with names, so that every wait in raygate is bounded and visible."""

from typing import Final

ENGINE_START_TIMEOUT_S: Final = 600.0
MODEL_CALL_TIMEOUT_S: Final = 300.0
EMBEDDER_CALL_TIMEOUT_S: Final = 60.0
LEDGER_CALL_TIMEOUT_S: Final = 30.0
COMPONENT_CALL_TIMEOUT_S: Final = 5.0
HEALTH_CHECK_TIMEOUT_S: Final = 5.0
REDIS_TIMEOUT_S: Final = 2.0
SERVE_READY_TIMEOUT_S: Final = 900.0

DEFAULT_MAX_OUTPUT_TOKENS: Final = 256
REQUEST_ID_HEADER: Final = "x-request-id"
MODEL_HEADER: Final = "x-raygate-model"
APP_NAME: Final = "raygate"
FLAGS_HEADER: Final = "x-raygate-flags"
RETRIEVER_CALL_TIMEOUT_S: Final = 120.0  # ingestion embeds whole documents
ROUTE_HEADER: Final = "x-raygate-route"
