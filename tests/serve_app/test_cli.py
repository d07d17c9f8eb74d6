"""The raygate command: make-tiny-model and keys, against a real Valkey."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from serve_app.cli import main


def test_make_tiny_model(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["make-tiny-model", str(tmp_path / "tiny"), "--seed", "3"]) == 0
    assert Path(capsys.readouterr().out.strip()) == tmp_path / "tiny"
    config = json.loads((tmp_path / "tiny" / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"]
    assert config["hidden_size"] // config["num_attention_heads"] >= 64  # vLLM on CPU needs head_dim >= 64


def test_keys_create_list_revoke(valkey_url: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["keys", "--redis-url", valkey_url, "create", "--tenant", "farm", "--user", "ann", "--plan", "premium"]) == 0
    created = json.loads(capsys.readouterr().out)
    assert created["key"].startswith(f"rg-{created['key_id']}-")
    assert (created["tenant"], created["user"], created["plan"], created["admin"]) == ("farm", "ann", "premium", False)

    assert main(["keys", "--redis-url", valkey_url, "list"]) == 0
    listed = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert any(k["key_id"] == created["key_id"] and not k["revoked"] for k in listed)
    assert created["key"] not in json.dumps(listed)

    assert main(["keys", "--redis-url", valkey_url, "revoke", created["key_id"]]) == 0
    assert "revoked" in capsys.readouterr().out
    main(["keys", "--redis-url", valkey_url, "list"])
    listed = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert next(k for k in listed if k["key_id"] == created["key_id"])["revoked"] is True


def test_keys_without_a_redis_say_how_to_get_one(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("REDIS_URL", raising=False)
    monkeypatch.setenv("RAYGATE_DATA_DIR", str(tmp_path))
    with pytest.raises(SystemExit) as info:
        main(["keys", "create", "--tenant", "t", "--user", "u"])
    assert "raygate up" in str(info.value)
