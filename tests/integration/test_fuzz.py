"""Property-based fuzzing of the Gateway's OpenAPI with schemathesis.

Every operation in the app's OpenAPI document gets valid and invalid requests
(schemathesis's examples, coverage and fuzzing phases, both generation modes),
at most ``MAX_EXAMPLES`` fuzzed ones per operation, sent to the live gateway.
Each answer must:

* not be a 5xx. The one exception is a 503 whose ``code`` is ``upstream_*``: a model
  call that failed upstream is an answer, not a bug. On this healthy graph, whose
  fuzzed chat model is the fake ``echo``, none is expected;
* when it is an error, be OpenAI's JSON body, exactly ``{"error": {"message", "type",
  "param", "code"}}``, and a 4xx must not call itself an ``internal_error``;
* carry ``x-request-id``.

The session's cluster is shared, so the fuzzing leaves it as it found it:

* chat and embedding requests go to the cheap models (the document is narrowed to
  ``echo`` and a few tokens before schemathesis reads it), under a key of its own on
  the unlimited plan, so no other test's quota, rate limit or ledger rows move.
  Should Guard take the burst for a flood (a hundred requests in ten seconds) and
  block that key, the block is lifted and the request sent again;
* admin routes run with the admin key. Those that name a key (revoke, block, unblock)
  only ever get ids that cannot exist; plan and budget writes run in their own test,
  which puts the plans and budgets back afterwards.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis import Case
from schemathesis.core.transport import Response

from tests.integration.conftest import Deployed, create_key

pytestmark = pytest.mark.integration

MAX_EXAMPLES = 25
REQUEST_TIMEOUT_S = 15.0
FUZZ_CHAT_MODEL = "echo"
FUZZ_MAX_TOKENS = 8
EMBEDDING_MODEL = "all-minilm-l6-v2"
ERROR_KEYS = {"message", "type", "param", "code"}
# A failed upstream call is an answer (503 upstream_*), not a server bug.
ALLOWED_5XX_CODES = {"upstream_unavailable", "upstream_timeout"}
# Real key ids are 12 hex digits: an id with this prefix never names a key another test uses.
FAKE_KEY_ID_PREFIX = "fuzz-"
COST_CONFIG_WRITES = r"^/admin/(budgets|plans)/"
CONFIG_SETTLE_TIMEOUT_S = 10.0

# Derandomized: the same requests every run, so a failure here is a regression, not luck.
FUZZ_SETTINGS = settings(max_examples=MAX_EXAMPLES, deadline=None, database=None, derandomize=True,
                         print_blob=False)


# -- the schema under test ----------------------------------------------------------------------


def _narrow_property(schema: dict[str, Any], name: str, narrowed: dict[str, Any]) -> None:
    """Replace one property of an object schema, keeping its nullability."""
    old = schema["properties"][name]
    nullable = any(branch.get("type") == "null" for branch in old.get("anyOf", []))
    schema["properties"][name] = {"anyOf": [narrowed, {"type": "null"}]} if nullable else narrowed


def narrowed_openapi(raw: dict[str, Any]) -> dict[str, Any]:
    """The OpenAPI document with the expensive choices taken away.

    Positive cases name only the cheap models and ask for a few tokens; negative cases
    still send anything else (unknown models, huge ``max_tokens``), which the gateway
    must refuse or serve from ``echo``.
    """
    doc = copy.deepcopy(raw)
    schemas = doc["components"]["schemas"]
    chat = schemas["ChatCompletionRequest"]
    _narrow_property(chat, "model", {"type": "string", "enum": [FUZZ_CHAT_MODEL]})
    for name in ("max_tokens", "max_completion_tokens"):
        _narrow_property(chat, name, {"type": "integer", "minimum": 1, "maximum": FUZZ_MAX_TOKENS})
    embeddings = schemas["EmbeddingRequest"]
    _narrow_property(embeddings, "model", {"type": "string", "enum": [EMBEDDING_MODEL]})
    text = {"type": "string", "minLength": 1, "maxLength": 64}
    embeddings["properties"]["input"] = {"anyOf": [text, {"type": "array", "minItems": 1, "maxItems": 4,
                                                          "items": text}]}
    return doc


def load_schema() -> schemathesis.BaseSchema:
    """The app's OpenAPI document, narrowed.

    Read in-process at collection: schemathesis 4.32's fixture-based loader
    (``schemathesis.pytest.from_fixture``) sets ``Function._nodeid``, which pytest 9.2
    removed. ``test_served_openapi_is_the_fuzzed_one`` ties it to ``/openapi.json``.
    """
    from serve_app.gateway import app

    config = schemathesis.Config.from_dict({
        "request-timeout": REQUEST_TIMEOUT_S,
        "generation": {"mode": "all", "max-examples": MAX_EXAMPLES, "database": "none", "deterministic": True},
    })
    return schemathesis.openapi.from_dict(narrowed_openapi(app.openapi()), config=config)


SCHEMA = load_schema()
OPENAI_ROUTES = SCHEMA.exclude(path_regex=r"^/admin/")
ADMIN_ROUTES = SCHEMA.include(path_regex=r"^/admin/").exclude(path_regex=COST_CONFIG_WRITES,
                                                              method=["PUT", "DELETE"])
# One include() call ANDs its matchers; two calls would OR them.
COST_CONFIG_ROUTES = SCHEMA.include(path_regex=COST_CONFIG_WRITES, method=["PUT", "DELETE"])


# -- what every answer must satisfy -------------------------------------------------------------


def _reproducer(case: Case, response: Response) -> str:
    return (f"{case.operation.label} -> {response.status_code} {response.text[:500]!r}\n"
            f"reproduce (add -H 'Authorization: Bearer <key>'): {case.as_curl_command()}")


def assert_openai_error(status: int, content_type: str, body: Any, where: str) -> None:
    """A 4xx or 5xx answer: OpenAI's JSON error, a client error not called internal, no 5xx but upstream ones."""
    assert content_type.startswith("application/json"), where
    assert isinstance(body, dict) and set(body) == {"error"}, where
    error = body["error"]
    assert isinstance(error, dict) and set(error) == ERROR_KEYS, where
    assert isinstance(error["message"], str) and error["message"], where
    assert isinstance(error["type"], str) and error["type"], where
    assert error["param"] is None or isinstance(error["param"], str), where
    assert error["code"] is None or isinstance(error["code"], str), where
    if status < 500:
        assert error["type"] != "internal_error", where
    else:
        assert status == 503 and error["code"] in ALLOWED_5XX_CODES, where


def check_response(case: Case, response: Response) -> None:
    """No 5xx (but upstream 503s), OpenAI's error shape on every error, an x-request-id always."""
    where = _reproducer(case, response)
    assert response.headers.get("x-request-id"), where
    if response.status_code >= 400:
        content_type = response.headers.get("content-type", [""])[0]
        assert_openai_error(response.status_code, content_type, response.json(), where)


def _fake_key_ids(case: Case) -> None:
    """Make the admin routes that name a key (revoke, block, unblock) name one that cannot exist.

    Done here rather than in a ``map_*`` hook, which the examples and coverage phases skip.
    """
    if isinstance((case.path_parameters or {}).get("key_id"), str):
        case.path_parameters["key_id"] = FAKE_KEY_ID_PREFIX + case.path_parameters["key_id"]
    if isinstance(case.body, dict) and isinstance(case.body.get("key_id"), str):
        case.body = {**case.body, "key_id": FAKE_KEY_ID_PREFIX + case.body["key_id"]}


def _call(case: Case, deployed: Deployed, key: str) -> Response:
    return case.call(base_url=deployed.base_url, headers={"Authorization": f"Bearer {key}"},
                     timeout=REQUEST_TIMEOUT_S)


# -- the tests -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def fuzz_key(deployed: Deployed) -> tuple[str, str]:
    """A user key of its own on the unlimited plan, and its id."""
    key = create_key(deployed.redis_url, "fuzz", "fuzzer", "enterprise")
    return key, key.split("-")[1]


def _served_openapi(deployed: Deployed) -> dict[str, Any]:
    response = httpx.get(f"{deployed.base_url}/openapi.json", timeout=REQUEST_TIMEOUT_S)
    response.raise_for_status()
    document: dict[str, Any] = response.json()
    return document


def _placeholder_examples(node: Any, path: str = "") -> Iterator[str]:
    """Where the document says ``"example": {}``."""
    if isinstance(node, dict):
        if node.get("example") == {}:
            yield path
        for key, value in node.items():
            yield from _placeholder_examples(value, f"{path}/{key}")
    elif isinstance(node, list):
        for i, value in enumerate(node):
            yield from _placeholder_examples(value, f"{path}/{i}")


def test_served_openapi_is_the_fuzzed_one(deployed: Deployed) -> None:
    from serve_app.gateway import app

    assert _served_openapi(deployed) == app.openapi()


def test_served_openapi_has_no_placeholder_examples(deployed: Deployed) -> None:
    assert list(_placeholder_examples(_served_openapi(deployed))) == []


@OPENAI_ROUTES.parametrize()
@FUZZ_SETTINGS
def test_fuzz_openai_routes(case: Case, deployed: Deployed, fuzz_key: tuple[str, str]) -> None:
    key, key_id = fuzz_key
    response = _call(case, deployed, key)
    check_response(case, response)
    if response.status_code == 429:  # most likely Guard's flood block: lift it and try again
        httpx.delete(f"{deployed.base_url}/admin/blocks/{key_id}", timeout=REQUEST_TIMEOUT_S,
                     headers={"Authorization": f"Bearer {deployed.admin_key}"})
        check_response(case, _call(case, deployed, key))


@ADMIN_ROUTES.parametrize()
@FUZZ_SETTINGS
def test_fuzz_admin_routes(case: Case, deployed: Deployed) -> None:
    _fake_key_ids(case)
    check_response(case, _call(case, deployed, deployed.admin_key))


def _cost_config(client: httpx.Client) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    plans, budgets = client.get("/admin/plans"), client.get("/admin/budgets")
    plans.raise_for_status()
    budgets.raise_for_status()
    return plans.json(), budgets.json()


@pytest.fixture
def restored_cost_config(deployed: Deployed) -> Iterator[None]:
    """Plans and budgets as they were before the test, put back through the admin API."""
    headers = {"Authorization": f"Bearer {deployed.admin_key}"}
    with httpx.Client(base_url=deployed.base_url, headers=headers, timeout=REQUEST_TIMEOUT_S) as client:
        plans, budgets = _cost_config(client)
        yield
        for name, plan in plans.items():
            client.put(f"/admin/plans/{name}", json=plan).raise_for_status()
        kept = {b["id"]: b for b in budgets}
        for budget in _cost_config(client)[1]:
            if budget["id"] not in kept:
                client.delete(f"/admin/budgets/{budget['id']}").raise_for_status()
        for budget_id, budget in kept.items():
            client.put(f"/admin/budgets/{budget_id}", json=budget).raise_for_status()
        # Each CostGuard reloads within config_refresh_s; a GET reloads the one it reaches at once.
        deadline = time.monotonic() + CONFIG_SETTLE_TIMEOUT_S
        while _cost_config(client) != (plans, budgets) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert _cost_config(client) == (plans, budgets)


@COST_CONFIG_ROUTES.parametrize()
# The fixture is per operation, not per example: each operation's writes are undone after its last one.
@settings(FUZZ_SETTINGS, suppress_health_check=[HealthCheck.function_scoped_fixture])
def test_fuzz_cost_config_writes(case: Case, deployed: Deployed, restored_cost_config: None) -> None:
    check_response(case, _call(case, deployed, deployed.admin_key))


# Inputs the fuzzer does not reach (text that is not Unicode, numbers past what a store holds, non-finite
# floats) and that once answered 500 or 503: each must be a client error now.
EDGE_CASES = [
    ("GET", "/admin/requests", {"offset": str(2**63)}, None),
    ("GET", "/admin/costs", {"from": "-inf", "to": "inf"}, None),
    ("GET", "/admin/costs", {"from": "nan"}, None),
    ("GET", "/admin/costs", {"to": "1e308"}, None),
    ("GET", "/admin/costs/recommendations", {"to": "1e309"}, None),
    ("PUT", "/admin/budgets/fuzz-edge", None, b'{"scope": "tag", "scope_value": "fuzz-never", "limit_usd": Infinity}'),
    ("PUT", "/admin/budgets/fuzz-edge", None,
     b'{"scope": "tag", "scope_value": "fuzz-never", "limit_tokens": 1180591620717411303424}'),
    ("PUT", "/admin/budgets/fuzz-edge", None, b'{"scope": "tag", "scope_value": "fuzz-never", "limit_usd": 1e300}'),
    ("POST", "/admin/keys", None, b'{"tenant": "a\\ud800", "user": "fuzz"}'),
    ("POST", "/v1/chat/completions", None, b'{"model": "echo", "messages": [{"role": "user", "content": "a\\ud800"}]}'),
    ("POST", "/v1/chat/completions", None,
     b'{"model": "echo", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 9007199254740992}'),
    ("POST", "/v1/embeddings", None, b'{"model": "all-minilm-l6-v2", "input": "a\\ud800"}'),
    ("DELETE", "/v1/models", None, None),
]


@pytest.mark.parametrize(("method", "path", "params", "content"), EDGE_CASES)
def test_edge_cases_are_client_errors(deployed: Deployed, method: str, path: str, params: dict[str, str] | None,
                                      content: bytes | None) -> None:
    headers = {"Authorization": f"Bearer {deployed.admin_key}", "content-type": "application/json"}
    response = httpx.request(method, f"{deployed.base_url}{path}", params=params, content=content, headers=headers,
                             timeout=REQUEST_TIMEOUT_S)
    where = f"{method} {path} {params or ''} {content!r} -> {response.status_code} {response.text[:300]}"
    assert 400 <= response.status_code < 500, where
    assert response.status_code != 405 or response.headers.get("allow"), where
    assert_openai_error(response.status_code, response.headers.get("content-type", ""), response.json(), where)
