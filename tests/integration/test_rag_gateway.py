"""RAG through the gateway: ingest (JSON, PDF, HTML, the CLI), search, chat with citations, isolation, deletes."""

from __future__ import annotations

import json
import uuid
from pathlib import Path
from typing import Any

import httpx
import pytest

from serve_app.ingest import ingest
from tests.integration.conftest import Deployed, create_key, ledger_row
from tests.pdf import make_pdf

pytestmark = pytest.mark.integration

DOCS = {"documents": [
    {"id": "mites", "text": "# Red mites\n\nRed mites hide in perch cracks by day and bite hens at night.",
     "metadata": {"topic": "parasites", "year": 2021}},
    {"id": "light", "text": "# Lighting\n\nLaying hens need 16 hours of light per day to keep laying.",
     "metadata": {"topic": "husbandry", "year": 2019}},
]}


def api(deployed: Deployed, method: str, path: str, key: str | None = None, **kwargs: Any) -> httpx.Response:
    return httpx.request(method, f"{deployed.base_url}/v1{path}", timeout=60,
                         headers={"Authorization": f"Bearer {key or deployed.api_key}"}, **kwargs)


@pytest.fixture
def collection(deployed: Deployed) -> str:
    name = f"farm-{uuid.uuid4().hex[:8]}"
    response = api(deployed, "POST", f"/collections/{name}/documents", json=DOCS)
    assert response.status_code == 200, response.text
    assert response.json()["documents"] == 2 and response.json()["chunks"] == 2
    return name


def chat(deployed: Deployed, collection: str, key: str | None = None, **extra: Any) -> httpx.Response:
    body = {"model": "echo", "messages": [{"role": "system", "content": "You help farmers."},
                                          {"role": "user", "content": "How many hours of light do hens need?"}],
            "rag": {"collection": collection, "top_k": 2, "min_score": 0.1}, **extra}
    return api(deployed, "POST", "/chat/completions", key, json=body)


def test_search_with_filters(deployed: Deployed, collection: str) -> None:
    hits = api(deployed, "POST", f"/collections/{collection}/search",
               json={"query": "hours of light for laying hens", "min_score": 0.1}).json()["data"]
    assert hits[0]["document_id"] == "light" and hits[0]["metadata"]["topic"] == "husbandry"
    filtered = api(deployed, "POST", f"/collections/{collection}/search",
                   json={"query": "hours of light", "min_score": 0.0, "filter": {"year": {"gte": 2020}}}).json()
    assert [h["document_id"] for h in filtered["data"]] == ["mites"]


def test_chat_gets_numbered_sources_and_returns_citations(deployed: Deployed, collection: str) -> None:
    response = chat(deployed, collection)
    assert response.status_code == 200
    citations = response.json()["raygate"]["citations"]
    assert citations[0]["document_id"] == "light" and citations[0]["index"] == 1 and "score" in citations[0]
    system = deployed.upstream.last_body["messages"][0]["content"]
    assert system.startswith("You help farmers.") and "[1] (light)" in system and "16 hours" in system
    assert "rag" not in deployed.upstream.last_body
    row = ledger_row(deployed, response.headers["x-request-id"])
    assert row["rag_chunks"].startswith("light#0") and row["rag_ms"] > 0


def test_streamed_answer_ends_with_citations(deployed: Deployed, collection: str) -> None:
    body = {"model": "echo", "stream": True, "messages": [{"role": "user", "content": "When do red mites bite?"}],
            "rag": {"collection": collection, "top_k": 1, "min_score": 0.1}}
    with httpx.stream("POST", f"{deployed.base_url}/v1/chat/completions", json=body, timeout=60,
                      headers={"Authorization": f"Bearer {deployed.api_key}"}) as response:
        frames = [line[6:] for line in response.iter_lines() if line.startswith("data: ")]
    assert frames[-1] == "[DONE]"
    final = json.loads(frames[-2])
    assert final["choices"] == [] and final["raygate"]["citations"][0]["document_id"] == "mites"
    assert all("raygate" not in json.loads(f) for f in frames[:-2])


def test_other_tenants_never_see_the_collection(deployed: Deployed, collection: str) -> None:
    other = create_key(deployed.redis_url, f"t-{uuid.uuid4().hex[:6]}", "eve", "premium")
    search = api(deployed, "POST", f"/collections/{collection}/search", other, json={"query": "red mites"})
    assert search.status_code == 404 and search.json()["error"]["param"] == "collection"
    assert chat(deployed, collection, other).status_code == 404
    assert api(deployed, "GET", "/collections", other).json()["data"] == []
    assert api(deployed, "GET", "/collections", other, params={"tenant": "acme"}).status_code == 403


def test_pdf_and_html_uploads(deployed: Deployed, collection: str) -> None:
    pdf = make_pdf(["Vaccinate pullets against Marek disease at one day old."])
    html = b"<html><body><h1>Water</h1><p>Clean drinkers daily; hens drink twice what they eat.</p></body></html>"
    for name, data in (("marek.pdf", pdf), ("water.html", html)):
        response = api(deployed, "POST", f"/collections/{collection}/documents", files={"file": (name, data)})
        assert response.status_code == 200 and response.json()["ids"] == [name]
    hits = api(deployed, "POST", f"/collections/{collection}/search",
               json={"query": "Marek vaccination of chicks", "top_k": 1}).json()["data"]
    assert hits[0]["document_id"] == "marek.pdf"
    html_hit = api(deployed, "POST", f"/collections/{collection}/search",
                   json={"query": "how much do hens drink", "top_k": 1}).json()["data"][0]
    assert html_hit["document_id"] == "water.html" and html_hit["heading"] == "Water"
    bad = api(deployed, "POST", f"/collections/{collection}/documents", files={"file": ("x.docx", b"zz")})
    assert bad.status_code == 400 and bad.json()["error"]["code"] == "unsupported_file"


def test_cli_ingest_is_idempotent_and_deletes_work(deployed: Deployed, tmp_path: Path) -> None:
    name = f"cli-{uuid.uuid4().hex[:8]}"
    (tmp_path / "sub").mkdir()
    (tmp_path / "a.md").write_text("# Feed\n\nLayers eat about 120 g of feed per day.", encoding="utf-8")
    (tmp_path / "sub" / "b.txt").write_text("Broilers reach 2.5 kg in 42 days.", encoding="utf-8")
    (tmp_path / "ignored.bin").write_bytes(b"\x00")
    for _ in range(2):
        assert ingest(tmp_path, name, url=deployed.base_url, api_key=deployed.api_key) == 0
    listed = {c["name"]: c["chunks"] for c in api(deployed, "GET", "/collections").json()["data"]}
    assert listed[name] == 2  # the second run replaced, not duplicated
    assert api(deployed, "DELETE", f"/collections/{name}/documents/sub/b.txt").status_code == 200
    assert api(deployed, "DELETE", f"/collections/{name}/documents/sub/b.txt").status_code == 404
    assert api(deployed, "DELETE", f"/collections/{name}").status_code == 200
    assert api(deployed, "POST", f"/collections/{name}/search", json={"query": "feed"}).status_code == 404


def test_bad_names_and_documents_are_400(deployed: Deployed) -> None:
    assert api(deployed, "POST", "/collections/bad name!/documents", json=DOCS).status_code in (400, 404)
    response = api(deployed, "POST", "/collections/ok/documents", json={"documents": [{"id": "x"}]})
    assert response.status_code == 400 and "text" in (response.json()["error"]["param"] or "")
