"""A trained LoRA adapter is loaded into the running ``tiny`` model and answers as ``tiny:<adapter>``.

The adapter is trained here on one fixed answer (``tests/training/test_evaluate.make_adapter``),
registered in the session's data dir, loaded through the admin API (no replica restart),
called with the openai SDK, then unloaded.
"""

from __future__ import annotations

import re
from pathlib import Path

import httpx
import openai
import pytest

from deployments.models.tiny import ensure_tiny_model
from tests.integration.conftest import Deployed, ledger_row
from tests.training.test_evaluate import PATTERN, make_adapter
from training.registry import AdapterRegistry

pytestmark = pytest.mark.integration

NAME = "pattern"
QUESTION = [{"role": "user", "content": "What do you know about dogs?"}]


def pattern_words(text: str) -> int:
    """How many of the pattern's words the text has."""
    words = set(re.findall(r"[a-z]+", PATTERN.lower()))
    return len(words & set(re.findall(r"[a-z]+", text.lower())))


@pytest.fixture(scope="module")
def registered(deployed: Deployed, session_data_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> str:
    base = ensure_tiny_model(session_data_dir / "models" / "tiny")
    adapter = make_adapter(base, tmp_path_factory.mktemp("adapter"), steps=60)
    AdapterRegistry(session_data_dir).register(NAME, adapter, overwrite=True)
    return NAME


def ask(deployed: Deployed, model: str) -> openai.types.chat.ChatCompletion:
    client = openai.OpenAI(base_url=f"{deployed.base_url}/v1", api_key=deployed.api_key, max_retries=0)
    return client.chat.completions.create(model=model, messages=QUESTION, temperature=0, max_tokens=16)  # type: ignore[arg-type]


def test_an_adapter_is_served_without_a_restart(deployed: Deployed, registered: str) -> None:
    admin = {"Authorization": f"Bearer {deployed.admin_key}"}
    with pytest.raises(openai.NotFoundError) as missing:  # registered, not loaded yet
        ask(deployed, f"tiny:{registered}")
    assert missing.value.code == "model_not_found"

    loaded = httpx.post(f"{deployed.base_url}/admin/adapters/{registered}/load", json={"model": "tiny"},
                        headers=admin, timeout=120)
    assert loaded.status_code == 200 and loaded.json()["loaded_on"] == ["tiny"]
    listed = httpx.get(f"{deployed.base_url}/admin/adapters", headers=admin).json()
    assert [(a["name"], a["metrics"]["steps"]) for a in listed] == [(registered, 60)]

    base = ask(deployed, "tiny")
    tuned = ask(deployed, f"tiny:{registered}")
    assert tuned.model == f"tiny:{registered}"
    assert tuned.choices[0].message.content != base.choices[0].message.content
    assert pattern_words(tuned.choices[0].message.content or "") > pattern_words(base.choices[0].message.content or "")
    assert ask(deployed, "tiny").choices[0].message.content == base.choices[0].message.content  # base unchanged
    row = ledger_row(deployed, tuned._request_id or "")  # type: ignore[attr-defined]
    assert row["model"] == f"tiny:{registered}" and row["cost_usd"] > 0  # priced as its base

    unloaded = httpx.post(f"{deployed.base_url}/admin/adapters/{registered}/unload", json={"model": "tiny"},
                          headers=admin)
    assert unloaded.status_code == 200 and unloaded.json()["loaded_on"] == []
    with pytest.raises(openai.NotFoundError):
        ask(deployed, f"tiny:{registered}")


def test_adapters_need_an_engine_that_serves_them(deployed: Deployed, registered: str) -> None:
    admin = {"Authorization": f"Bearer {deployed.admin_key}"}
    remote = httpx.post(f"{deployed.base_url}/admin/adapters/{registered}/load", json={"model": "echo"},
                        headers=admin)
    assert remote.status_code == 400 and remote.json()["error"]["code"] == "adapters_unsupported"
    unknown = httpx.post(f"{deployed.base_url}/admin/adapters/nope/load", json={"model": "tiny"}, headers=admin)
    assert unknown.status_code == 404
    user = httpx.post(f"{deployed.base_url}/admin/adapters/{registered}/load", json={"model": "tiny"},
                      headers={"Authorization": f"Bearer {deployed.api_key}"})
    assert user.status_code == 403


def test_experiments_and_the_router_can_target_a_loaded_adapter(deployed: Deployed, registered: str) -> None:
    admin = {"Authorization": f"Bearer {deployed.admin_key}"}
    spec = {"name": "adapter-vs-base", "match_model": "tiny",
            "variants": [{"name": "base", "weight": 1}, {"name": "tuned", "weight": 1, "model": f"tiny:{registered}"}]}
    refused = httpx.post(f"{deployed.base_url}/admin/experiments", json=spec, headers=admin)
    assert refused.status_code == 400  # not loaded: an unknown model
    assert httpx.post(f"{deployed.base_url}/admin/adapters/{registered}/load", json={"model": "tiny"},
                      headers=admin, timeout=120).status_code == 200
    try:
        created = httpx.post(f"{deployed.base_url}/admin/experiments", json=spec, headers=admin)
        assert created.status_code == 200, created.text
        assert created.json()["status"] == "draft"
    finally:
        httpx.post(f"{deployed.base_url}/admin/adapters/{registered}/unload", json={"model": "tiny"}, headers=admin)
