"""The tiny test model: deterministic, loadable, with a working ChatML tokenizer."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from deployments.models import tiny
from serve_app.config import TINY_MODEL_NAME

REPO_ROOT = Path(__file__).resolve().parents[3]


def _hashes(path: Path) -> dict[str, str]:
    return {f.name: hashlib.sha256(f.read_bytes()).hexdigest() for f in sorted(path.iterdir())}


def test_reexports_the_configured_name() -> None:
    assert tiny.TINY_MODEL_NAME is TINY_MODEL_NAME


def test_same_seed_gives_byte_identical_files_across_processes(tiny_model_path: Path, tmp_path: Path) -> None:
    # Another process with another hash seed: nothing may depend on dict order or process state.
    script = "import sys; from pathlib import Path; from deployments.models.tiny import make_tiny_model; "
    script += "make_tiny_model(Path(sys.argv[1]), seed=0)"
    env = {**os.environ, "PYTHONHASHSEED": "12345"}
    subprocess.run([sys.executable, "-c", script, str(tmp_path / "again")], cwd=REPO_ROOT, env=env, check=True)
    expected = _hashes(tiny_model_path)
    assert {"config.json", "generation_config.json", "model.safetensors", "tokenizer.json"} <= set(expected)
    assert _hashes(tmp_path / "again") == expected


def test_another_seed_changes_the_weights_only(tiny_model_path: Path, tmp_path: Path) -> None:
    other = _hashes(tiny.make_tiny_model(tmp_path / "other", seed=1))
    base = _hashes(tiny_model_path)
    assert other["model.safetensors"] != base["model.safetensors"]
    assert other["tokenizer.json"] == base["tokenizer.json"]


def test_config_fits_vllm_cpu(tiny_model_path: Path) -> None:
    config = json.loads((tiny_model_path / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"]
    assert config["hidden_size"] // config["num_attention_heads"] == config["head_dim"] == 64
    assert config["num_key_value_heads"] == 2 and config["num_hidden_layers"] == 2
    assert config["max_position_embeddings"] == 2048
    assert config["dtype"] == "float32"
    assert config["rope_parameters"]["rope_theta"] > 0


def test_tokenizer_and_model_load_with_auto_classes(tiny_model_path: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_path)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_path)
    assert 1000 <= len(tokenizer) <= 2000
    assert model.config.vocab_size == len(tokenizer)
    assert tokenizer.eos_token == "<|im_end|>" and model.config.eos_token_id == tokenizer.eos_token_id
    assert tokenizer.bos_token is not None and tokenizer.pad_token is not None
    assert model.generation_config.eos_token_id == tokenizer.eos_token_id
    text = "Bonjour ! The café opens at 9, n'est-ce pas ?"
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert tokenizer.decode(ids) == text
    assert len(ids) < len(text.encode())  # merges were learnt, not just bytes


def test_chat_template_renders_chatml(tiny_model_path: Path) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_path)
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Salut"}]
    rendered = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert rendered == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nSalut<|im_end|>\n<|im_start|>assistant\n"
    )
    without = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=False)
    assert without == rendered.removesuffix("<|im_start|>assistant\n")
    ids = tokenizer(rendered, add_special_tokens=False)["input_ids"]
    assert ids.count(tokenizer.convert_tokens_to_ids("<|im_start|>")) == 3
    assert ids.count(tokenizer.eos_token_id) == 2


def test_ensure_builds_once_for_concurrent_callers(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    builds: list[Path] = []
    lock = threading.Lock()
    real_make = tiny.make_tiny_model

    def counting_make(path: Path, seed: int = 0) -> Path:
        with lock:
            builds.append(path)
        return real_make(path, seed)

    monkeypatch.setattr(tiny, "make_tiny_model", counting_make)
    target = tmp_path / "models" / "tiny"
    with ThreadPoolExecutor(max_workers=3) as pool:
        results = list(pool.map(lambda _: tiny.ensure_tiny_model(target), range(3)))
    assert results == [target] * 3
    assert builds == [target]
    assert (target / "model.safetensors").is_file()
    # Only the model and its lock file are left: the temporary build dir was renamed away.
    assert sorted(p.name for p in target.parent.iterdir()) == ["tiny", "tiny.lock"]
    before = (target / "model.safetensors").stat().st_mtime_ns
    tiny.ensure_tiny_model(target)
    assert (target / "model.safetensors").stat().st_mtime_ns == before
    assert builds == [target]
