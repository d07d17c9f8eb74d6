"""Chat JSONL for training and evaluation: reading it, tokenising with the chat template, batching.

One tokenisation serves the trainer and the evaluator, so the loss they report is over
the same tokens: the final assistant answer (and the template's end of turn), never the prompt.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

__all__ = ["IGNORE_INDEX", "collate", "encode_example", "encode_file", "load_conversations"]

logger = logging.getLogger(__name__)

IGNORE_INDEX = -100  # torch's cross_entropy skips these labels


def load_conversations(path: Path) -> list[list[dict[str, str]]]:
    """Read a chat JSONL file.

    Raises:
        ValueError: a line is not ``{"messages": [...]}`` ending with an assistant message.
    """
    conversations = []
    for number, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        messages = json.loads(line).get("messages")
        if not messages or not isinstance(messages, list) or messages[-1].get("role") != "assistant":
            raise ValueError(f"{path}:{number}: expected {{'messages': [...]}} ending with an assistant message")
        conversations.append(messages)
    return conversations


def encode_example(tokenizer: Any, messages: list[dict[str, str]], max_length: int) -> dict[str, list[int]] | None:
    """Tokenise one conversation with the model's chat template; loss only on the final answer.

    The prompt is ``messages[:-1]`` templated with the generation prompt: the tokens the
    model sees before it answers. Every token after it (the answer and the template's
    end-of-turn) is a label; everything before is ``-100``.

    Returns:
        ``input_ids`` and ``labels``, or None when truncation leaves no answer token.
    """
    ids = tokenizer.apply_chat_template(messages, tokenize=True, return_dict=False)
    prompt = tokenizer.apply_chat_template(messages[:-1], tokenize=True, return_dict=False, add_generation_prompt=True)
    # A BPE merge across the boundary would make the prompt no prefix of the whole: use the shared part.
    n_prompt = next((i for i, (a, b) in enumerate(zip(ids, prompt)) if a != b), min(len(ids), len(prompt)))
    ids = list(ids[:max_length])
    if n_prompt >= len(ids):
        return None
    return {"input_ids": ids, "labels": [IGNORE_INDEX] * n_prompt + ids[n_prompt:]}


def collate(examples: list[dict[str, list[int]]], pad_id: int) -> dict[str, "torch.Tensor"]:
    """Right-pad a batch: pad tokens get attention 0 and label -100."""
    import torch

    width = max(len(e["input_ids"]) for e in examples)
    batch = {"input_ids": [], "attention_mask": [], "labels": []}
    for e in examples:
        pad = width - len(e["input_ids"])
        batch["input_ids"].append(e["input_ids"] + [pad_id] * pad)
        batch["attention_mask"].append([1] * len(e["input_ids"]) + [0] * pad)
        batch["labels"].append(e["labels"] + [IGNORE_INDEX] * pad)
    return {k: torch.tensor(v, dtype=torch.long) for k, v in batch.items()}


def encode_file(tokenizer: Any, path: Path, max_length: int) -> list[dict[str, list[int]]]:
    encoded = [encode_example(tokenizer, m, max_length) for m in load_conversations(path)]
    kept = [e for e in encoded if e is not None]
    if len(kept) < len(encoded):
        logger.warning("%s: %s conversations have no answer token within max_length", path, len(encoded) - len(kept))
    if not kept:
        raise ValueError(f"{path}: no usable conversation")
    return kept
