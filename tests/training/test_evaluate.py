"""``training/evaluate.py`` on the tiny model and a LoRA adapter trained here on a fixed answer."""

from __future__ import annotations

import argparse
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from training.chat_data import encode_example
from training.cli import add_cli, run_cli
from training.evaluate import EvalConfig, EvalResult, evaluate, render_report

PATTERN = "Ray Serve routes every request to the right model."
TRAIN_TOPICS = ["the sea", "trains", "cats", "the weather", "a poem", "France", "numbers", "the library"]
VAL_TOPICS = ["dogs", "the wind", "apples", "mountains"]
QUESTIONS = ["Tell me about the park.", "a | b? *bold*", "<script>alert(1)</script>"]


def chats(topics: list[str]) -> list[list[dict[str, str]]]:
    """One chat per topic, every answer the same pattern sentence."""
    return [[{"role": "user", "content": f"What do you know about {topic}?"},
             {"role": "assistant", "content": PATTERN}] for topic in topics]


def write_jsonl(path: Path, rows: list[list[dict[str, str]]]) -> Path:
    path.write_text("".join(json.dumps({"messages": messages}) + "\n" for messages in rows), encoding="utf-8")
    return path


def make_adapter(model_dir: Path, out_dir: Path, *, steps: int = 40, lr: float = 3e-2) -> Path:
    """Train a LoRA (q/v, r=8) on the pattern chats with plain torch; save it as the trainer would."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(0)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32),
                           LoraConfig(r=8, target_modules=["q_proj", "v_proj"]))
    encoded = [(e["input_ids"], e["labels"]) for e in (encode_example(tokenizer, chat, 256)
                                                        for chat in chats(TRAIN_TOPICS)) if e is not None]
    width = max(len(ids) for ids, _ in encoded)
    pad = tokenizer.pad_token_id
    input_ids = torch.tensor([ids + [pad] * (width - len(ids)) for ids, _ in encoded])
    labels = torch.tensor([labels + [-100] * (width - len(labels)) for _, labels in encoded])
    attention = (torch.arange(width)[None, :] < torch.tensor([len(ids) for ids, _ in encoded])[:, None]).long()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    model.train()
    for _ in range(steps):
        model(input_ids=input_ids, attention_mask=attention, labels=labels).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.save_pretrained(out_dir)
    metadata = {"base_model": str(model_dir), "dataset_hash": "0" * 64, "config": {"lora_r": 8, "steps": steps},
                "metrics": {"train_loss": 0.1, "val_loss": 0.2, "val_loss_before": 7.0, "tokens_per_s": 1000.0,
                            "steps": steps},
                "created_at": time.time()}
    (out_dir / "raygate_adapter.json").write_text(json.dumps(metadata), encoding="utf-8")
    return out_dir


@dataclass
class Setup:
    model_dir: Path
    adapter_dir: Path
    validation_file: Path
    result: EvalResult
    report: Path


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> Setup:
    from deployments.models.tiny import make_tiny_model

    root = tmp_path_factory.mktemp("eval")
    model_dir = make_tiny_model(root / "tiny")
    adapter_dir = make_adapter(model_dir, root / "adapter")
    validation_file = write_jsonl(root / "val.jsonl", chats(VAL_TOPICS))
    config = EvalConfig(base_model=model_dir, adapter=adapter_dir, validation_file=validation_file,
                        questions=QUESTIONS, max_new_tokens=16, output=root / "report.md")
    result = evaluate(config)
    return Setup(model_dir, adapter_dir, validation_file, result, root / "report.md")


def test_the_adapter_lowers_the_validation_loss(setup: Setup) -> None:
    result = setup.result
    assert result.examples == len(VAL_TOPICS)
    assert result.tokens > len(VAL_TOPICS)
    assert result.tuned.loss < result.base.loss - 1.0, (result.base, result.tuned)


def test_perplexity_is_exp_of_the_loss(setup: Setup) -> None:
    for stats in (setup.result.base, setup.result.tuned):
        assert math.isclose(stats.perplexity, math.exp(stats.loss), rel_tol=1e-9)


def test_base_numbers_are_the_base_models_own(setup: Setup) -> None:
    """The adapter switched off must score exactly like the plain model: loss on assistant tokens only."""
    import torch
    import torch.nn.functional as F
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(setup.model_dir)
    model = AutoModelForCausalLM.from_pretrained(setup.model_dir, dtype=torch.float32).eval()
    total, count = 0.0, 0
    for chat in chats(VAL_TOPICS):
        prompt = tokenizer.apply_chat_template(chat[:-1], tokenize=False, add_generation_prompt=True)
        answer = f"{PATTERN}<|im_end|>\n"
        prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        answer_ids = tokenizer(answer, add_special_tokens=False)["input_ids"]
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([prompt_ids + answer_ids])).logits[0]
        predicted = logits[len(prompt_ids) - 1: -1]
        total += F.cross_entropy(predicted, torch.tensor(answer_ids), reduction="sum").item()
        count += len(answer_ids)
    assert count == setup.result.tokens
    assert math.isclose(setup.result.base.loss, total / count, rel_tol=1e-4)


def test_generations_compare_both_models(setup: Setup) -> None:
    generations = setup.result.generations
    assert [g.question for g in generations] == QUESTIONS
    assert all(g.base != g.adapter for g in generations)
    assert any(PATTERN[:20] in g.adapter for g in generations)


def test_markdown_report_has_both_models_and_every_question(setup: Setup) -> None:
    result, text = setup.result, setup.report.read_text(encoding="utf-8")
    assert result.output == str(setup.report)
    for stats in (result.base, result.tuned):
        assert f"{stats.loss:.4f}" in text and f"{stats.perplexity:.4f}" in text
    assert "What do you know" not in text  # validation chats are scored, not printed
    assert "Tell me about the park." in text
    assert "a \\| b? *bold*" in text  # a '|' would split the table's cell
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in text and "<script>" not in text
    rows = [line for line in text.splitlines() if line.startswith("| ") and line[2].isdigit()]
    assert len(rows) == len(QUESTIONS)
    assert all(line.replace("\\|", "").count("|") == 5 for line in rows)


def test_html_report_escapes_script(setup: Setup) -> None:
    text = render_report(setup.result, "html")
    assert "<script>" not in text
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in text
    assert f"{setup.result.tuned.loss:.4f}" in text and f"{setup.result.base.perplexity:.4f}" in text


def test_config_checks_the_report_suffix_and_reads_question_files(tmp_path: Path) -> None:
    base: dict[str, Any] = {"base_model": tmp_path, "adapter": tmp_path, "validation_file": tmp_path / "v.jsonl"}
    with pytest.raises(ValidationError, match=r"\.md or \.html"):
        EvalConfig(**base, output=tmp_path / "report.txt")
    with pytest.raises(ValidationError, match="extra"):
        EvalConfig(**base, temperature=0.5)
    (tmp_path / "q.txt").write_text("first?\n\n  second?  \n", encoding="utf-8")
    assert EvalConfig(**base, questions=str(tmp_path / "q.txt")).question_list() == ["first?", "second?"]
    assert EvalConfig(**base, questions=["only?"]).question_list() == ["only?"]


def test_cli_writes_an_html_report(setup: Setup, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    parser = argparse.ArgumentParser()
    add_cli(parser.add_subparsers(dest="command", required=True))
    (tmp_path / "q.txt").write_text("<b>Hi</b>\n", encoding="utf-8")
    output = tmp_path / "out" / "report.html"
    args = parser.parse_args(["eval", str(setup.adapter_dir), "--validation-file", str(setup.validation_file),
                              "--questions-file", str(tmp_path / "q.txt"), "--max-new-tokens", "4",
                              "--output", str(output)])
    assert run_cli(args) == 0  # the base model comes from raygate_adapter.json
    summary = json.loads(capsys.readouterr().out)
    assert summary["output"] == str(output)
    assert math.isclose(summary["adapter"]["loss"], setup.result.tuned.loss, rel_tol=1e-5)
    text = output.read_text(encoding="utf-8")
    assert text.startswith("<!DOCTYPE html>") and "&lt;b&gt;Hi&lt;/b&gt;" in text and "<b>" not in text

    bad = parser.parse_args(["eval", str(setup.adapter_dir), "--validation-file", str(setup.validation_file),
                             "--output", str(tmp_path / "report.pdf")])
    assert run_cli(bad) == 1
    assert ".md or .html" in capsys.readouterr().err
