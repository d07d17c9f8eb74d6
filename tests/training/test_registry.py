"""``training/registry.py``: the adapter registry, model-id addressing and ``raygate adapters``."""

from __future__ import annotations

import argparse
import json
import multiprocessing
import shutil
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from serve_app.errors import InvalidRequestError, NotFoundError
from tests.training.test_evaluate import make_adapter
from training.cli import add_cli, run_cli
from training.registry import AdapterRegistry, split_model_id

PER_PROCESS = 4  # registers per process
MARKS_PER_PROCESS = 150  # quick read-modify-writes: without the lock, some are lost


@pytest.fixture(scope="module")
def adapter_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real peft adapter (untrained: the registry only copies it) plus raygate_adapter.json."""
    from deployments.models.tiny import make_tiny_model

    root = tmp_path_factory.mktemp("adapter")
    return make_adapter(make_tiny_model(root / "tiny"), root / "adapter", steps=0)


@pytest.fixture
def source(adapter_dir: Path, tmp_path: Path) -> Path:
    """A private copy of the adapter, which a test may delete or break."""
    return Path(shutil.copytree(adapter_dir, tmp_path / "trained"))


def test_register_list_get_remove(source: Path, tmp_path: Path) -> None:
    registry = AdapterRegistry(tmp_path / "data")
    assert registry.list() == []
    entry = registry.register("support-bot", source)
    metadata = json.loads((source / "raygate_adapter.json").read_text())
    assert entry.path == str((tmp_path / "data" / "adapters" / "support-bot").resolve())
    assert (entry.base_model, entry.dataset_hash, entry.metrics, entry.config, entry.created_at) == (
        metadata["base_model"], metadata["dataset_hash"], metadata["metrics"], metadata["config"],
        metadata["created_at"])
    assert entry.registered_at >= entry.created_at and entry.loaded_on == []
    assert isinstance(entry.metrics["steps"], int)

    registry.register("v2.1_b", source)
    assert [e.name for e in registry.list()] == ["support-bot", "v2.1_b"]
    assert AdapterRegistry(tmp_path / "data").get("support-bot") == entry  # read back from registry.json
    assert "support-bot" in json.loads((tmp_path / "data" / "adapters" / "registry.json").read_text())["adapters"]

    with pytest.raises(InvalidRequestError, match="already registered") as info:
        registry.register("support-bot", source)
    assert info.value.code == "adapter_exists"
    assert registry.register("support-bot", source, overwrite=True).registered_at >= entry.registered_at

    assert registry.remove("support-bot").name == "support-bot"
    assert not Path(entry.path).exists()
    assert [e.name for e in registry.list()] == ["v2.1_b"]
    with pytest.raises(NotFoundError, match="No adapter named 'support-bot'"):
        registry.get("support-bot")
    with pytest.raises(NotFoundError):
        registry.remove("support-bot")
    assert sorted(p.name for p in (tmp_path / "data" / "adapters").iterdir()) == [
        "registry.json", "registry.lock", "v2.1_b"]  # no staging dirs or temp files left behind


def test_the_registry_owns_its_copy(source: Path, tmp_path: Path) -> None:
    from peft import PeftConfig

    registry = AdapterRegistry(tmp_path / "data")
    entry = registry.register("owned", source)
    shutil.rmtree(source)
    copy = Path(registry.get("owned").path)
    assert copy == Path(entry.path) and copy.parent == (tmp_path / "data" / "adapters").resolve()
    assert (copy / "adapter_model.safetensors").is_file()
    assert PeftConfig.from_pretrained(copy).target_modules == {"q_proj", "v_proj"}


@pytest.mark.parametrize("name", ["", "-lead", ".hidden", "a/b", "../up", "a b", "x" * 65, "tiny:bot",
                                  "registry.json"])
def test_bad_names_are_rejected(name: str, source: Path, tmp_path: Path) -> None:
    registry = AdapterRegistry(tmp_path / "data")
    with pytest.raises(InvalidRequestError, match="Invalid adapter name") as info:
        registry.register(name, source)
    assert info.value.status_code == 400 and info.value.code == "invalid_adapter_name"
    assert registry.list() == []


def test_dirs_that_are_not_trained_adapters_are_rejected(source: Path, tmp_path: Path) -> None:
    registry = AdapterRegistry(tmp_path / "data")
    with pytest.raises(InvalidRequestError, match="does not exist"):
        registry.register("a", tmp_path / "missing")
    (source / "raygate_adapter.json").write_text('{"base_model": "tiny"}')
    with pytest.raises(InvalidRequestError, match="not valid adapter metadata: Field required at dataset_hash"):
        registry.register("a", source)
    (source / "raygate_adapter.json").unlink()
    with pytest.raises(InvalidRequestError, match="has no raygate_adapter.json"):
        registry.register("a", source)
    (source / "adapter_config.json").unlink()
    with pytest.raises(InvalidRequestError, match="has no adapter_config.json"):
        registry.register("a", source)
    assert registry.list() == []


def test_iso_created_at_is_taken(source: Path, tmp_path: Path) -> None:
    metadata = json.loads((source / "raygate_adapter.json").read_text())
    metadata["created_at"] = "2026-01-02T03:04:05+00:00"
    (source / "raygate_adapter.json").write_text(json.dumps(metadata))
    assert AdapterRegistry(tmp_path / "data").register("iso", source).created_at == 1767323045.0


def _register_many(data_dir: str, source: str, prefix: str, start: Any) -> None:
    start.wait()
    registry = AdapterRegistry(data_dir)
    for i in range(PER_PROCESS):
        registry.register(f"{prefix}-{i}", source)
    for i in range(MARKS_PER_PROCESS):
        registry.mark_loaded("shared", f"model-{prefix}-{i}")


def test_concurrent_registers_from_two_processes_all_land(source: Path, tmp_path: Path) -> None:
    registry = AdapterRegistry(tmp_path / "data")
    registry.register("shared", source)
    context = multiprocessing.get_context("spawn")
    start = context.Event()
    workers = [context.Process(target=_register_many, args=(str(tmp_path / "data"), str(source), prefix, start))
               for prefix in ("p", "q")]
    for worker in workers:
        worker.start()
    start.set()
    for worker in workers:
        worker.join(timeout=60)
        assert worker.exitcode == 0
    names = {e.name for e in registry.list()}
    assert names == {"shared"} | {f"{p}-{i}" for p in ("p", "q") for i in range(PER_PROCESS)}
    assert len(registry.get("shared").loaded_on) == 2 * MARKS_PER_PROCESS


def test_mark_loaded_and_unloaded(source: Path, tmp_path: Path) -> None:
    registry = AdapterRegistry(tmp_path / "data")
    registry.register("bot", source)
    assert registry.mark_loaded("bot", "tiny").loaded_on == ["tiny"]
    assert registry.mark_loaded("bot", "tiny").loaded_on == ["tiny"]  # idempotent
    registry.mark_loaded("bot", "other")
    assert AdapterRegistry(tmp_path / "data").get("bot").loaded_on == ["other", "tiny"]
    with pytest.raises(InvalidRequestError, match="loaded on other, tiny") as info:
        registry.remove("bot")
    assert info.value.code == "adapter_in_use"
    assert registry.mark_unloaded("bot", "tiny").loaded_on == ["other"]
    assert registry.mark_unloaded("bot", "tiny").loaded_on == ["other"]
    assert registry.get("bot").loaded_on == ["other"]
    with pytest.raises(NotFoundError):
        registry.mark_loaded("nope", "tiny")
    assert registry.remove("bot", force=True).loaded_on == ["other"]


@pytest.mark.parametrize(("model_id", "expected"), [
    ("tiny", ("tiny", None)),
    ("tiny:support-bot", ("tiny", "support-bot")),
    ("Qwen/Qwen2.5-0.5B-Instruct:v1.2_x", ("Qwen/Qwen2.5-0.5B-Instruct", "v1.2_x")),
    ("host:8000/model:bot", ("host:8000/model", "bot")),
])
def test_split_model_id(model_id: str, expected: tuple[str, str | None]) -> None:
    assert split_model_id(model_id) == expected


def test_split_model_id_rejects_bad_parts_and_keeps_known_ids() -> None:
    for model_id in ("tiny:", "tiny:../x", "tiny:-x", ":bot"):
        with pytest.raises(InvalidRequestError) as info:
            split_model_id(model_id)
        assert info.value.param == "model" and info.value.status_code == 400
    assert split_model_id("ft:gpt-4o-mini:acme::abc", known_models={"ft:gpt-4o-mini:acme::abc"}) == (
        "ft:gpt-4o-mini:acme::abc", None)


def _cli(*argv: str) -> int:
    parser = argparse.ArgumentParser()
    add_cli(parser.add_subparsers(dest="command", required=True))
    return run_cli(parser.parse_args(list(argv)))


def test_cli_register_and_list(source: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str],
                               monkeypatch: pytest.MonkeyPatch) -> None:
    data = str(tmp_path / "data")
    assert _cli("adapters", "--data-dir", data, "register", "cli-bot", str(source)) == 0
    assert json.loads(capsys.readouterr().out)["name"] == "cli-bot"
    assert _cli("adapters", "--data-dir", data, "register", "cli-bot", str(source)) == 1
    assert "already registered" in capsys.readouterr().err
    assert _cli("adapters", "--data-dir", data, "register", "bad/name", str(source)) == 1
    assert "Invalid adapter name" in capsys.readouterr().err

    monkeypatch.setenv("RAYGATE_DATA_DIR", data)  # the default data dir
    assert _cli("adapters", "list") == 0
    table = capsys.readouterr().out
    assert "Adapters" in table and "cli-bot" in table and "0.2000" in table  # the val_loss column
    assert _cli("adapters", "list", "--json") == 0
    assert [json.loads(line)["name"] for line in capsys.readouterr().out.splitlines()] == ["cli-bot"]
    assert _cli("adapters", "remove", "cli-bot") == 0
    assert _cli("adapters", "list", "--json") == 0
    assert "removed cli-bot" in capsys.readouterr().out


@dataclass
class FakeGateway:
    """What the local HTTP server received, and what it answers next."""

    url: str
    requests: list[dict[str, Any]] = field(default_factory=list)
    status: int = 200
    body: dict[str, Any] = field(default_factory=dict)


@pytest.fixture
def gateway() -> Iterator[FakeGateway]:
    """A tiny HTTP server on 127.0.0.1 that records each POST and answers ``status``/``body``."""
    fake = FakeGateway(url="")

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            length = int(self.headers.get("Content-Length", "0"))
            fake.requests.append({"path": self.path, "authorization": self.headers.get("Authorization"),
                                  "json": json.loads(self.rfile.read(length))})
            payload = json.dumps(fake.body).encode()
            self.send_response(fake.status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)

        def log_message(self, format: str, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    fake.url = f"http://127.0.0.1:{server.server_address[1]}"
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield fake
    server.shutdown()
    server.server_close()
    thread.join()


def test_cli_load_and_unload_call_the_gateway(gateway: FakeGateway, capsys: pytest.CaptureFixture[str],
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    gateway.body = {"name": "bot", "loaded_on": ["tiny"]}
    assert _cli("adapters", "load", "bot", "--model", "tiny", "--url", gateway.url + "/", "--admin-key", "k1") == 0
    assert json.loads(capsys.readouterr().out) == gateway.body
    monkeypatch.setenv("RAYGATE_ADMIN_KEY", "from-env")
    gateway.body = {"name": "bot", "loaded_on": []}
    assert _cli("adapters", "unload", "bot", "--model", "tiny", "--url", gateway.url) == 0
    assert json.loads(capsys.readouterr().out) == gateway.body
    assert gateway.requests == [
        {"path": "/admin/adapters/bot/load", "authorization": "Bearer k1", "json": {"model": "tiny"}},
        {"path": "/admin/adapters/bot/unload", "authorization": "Bearer from-env", "json": {"model": "tiny"}},
    ]


def test_cli_load_reports_errors(gateway: FakeGateway, capsys: pytest.CaptureFixture[str],
                                 monkeypatch: pytest.MonkeyPatch) -> None:
    gateway.status = 404
    gateway.body = {"error": {"message": "No adapter named 'bot' is registered.", "type": "invalid_request_error",
                              "param": "name", "code": "adapter_not_found"}}
    assert _cli("adapters", "load", "bot", "--model", "tiny", "--url", gateway.url, "--admin-key", "k") == 1
    assert "404 No adapter named 'bot' is registered." in capsys.readouterr().err

    monkeypatch.delenv("RAYGATE_ADMIN_KEY", raising=False)
    assert _cli("adapters", "load", "bot", "--model", "tiny", "--url", gateway.url) == 1
    assert "admin key" in capsys.readouterr().err
    assert _cli("adapters", "load", "a/b", "--model", "tiny", "--url", gateway.url, "--admin-key", "k") == 1
    assert "Invalid adapter name" in capsys.readouterr().err
    assert len(gateway.requests) == 1  # neither refused call reached the gateway

    closed = ThreadingHTTPServer(("127.0.0.1", 0), BaseHTTPRequestHandler)
    port = closed.server_address[1]
    closed.server_close()  # nothing listens there now
    assert _cli("adapters", "unload", "bot", "--model", "tiny", "--url", f"http://127.0.0.1:{port}",
                "--admin-key", "k") == 1
    assert "cannot reach the gateway" in capsys.readouterr().err
