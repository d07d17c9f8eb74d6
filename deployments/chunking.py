"""Token-aware chunking that respects headings and paragraphs, with overlap.

A document is split into sections at Markdown headings; a section's paragraphs are
packed into chunks of at most ``size`` tokens (counted with the embedding model's own
tokenizer, so a chunk never exceeds what the model reads); a paragraph too long for
one chunk is split at sentences, and a sentence too long at tokens. Each chunk after
the first of a section starts with the last ``overlap`` tokens' worth of sentences of
the chunk before, and every chunk carries its heading path ("Title > Section") so a
chunk read alone still says what it is about.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass

_HEADING = re.compile(r"^(#{1,6})\s+(.+?)\s*#*\s*$")
_SENTENCE = re.compile(r"(?<=[.!?;:])\s+(?=\S)")

CountTokens = Callable[[str], int]


@dataclass
class Chunk:
    """One piece of a document, ready to embed."""

    index: int
    text: str = ""
    heading: str = ""

    def embedded_text(self) -> str:
        """What is embedded and shown: the heading path, then the text."""
        return f"{self.heading}\n{self.text}" if self.heading else self.text


def sections(text: str) -> list[tuple[str, list[str]]]:
    """Split Markdown into (heading path, paragraphs) at headings."""
    path: list[tuple[int, str]] = []
    out: list[tuple[str, list[str]]] = [("", [])]
    paragraph: list[str] = []

    def end_paragraph() -> None:
        if paragraph:
            out[-1][1].append(" ".join(line.strip() for line in paragraph))
            paragraph.clear()

    for line in text.splitlines():
        match = _HEADING.match(line)
        if match:
            end_paragraph()
            level = len(match.group(1))
            path = [(lvl, title) for lvl, title in path if lvl < level] + [(level, match.group(2))]
            out.append((" > ".join(title for _, title in path), []))
        elif line.strip():
            paragraph.append(line)
        else:
            end_paragraph()
    end_paragraph()
    return [(heading, paragraphs) for heading, paragraphs in out if paragraphs]


def _pieces(paragraph: str, size: int, count: CountTokens, split_tokens: Callable[[str, int], list[str]]) -> list[str]:
    """A paragraph as units no longer than ``size`` tokens: itself, its sentences, or token slices."""
    if count(paragraph) <= size:
        return [paragraph]
    units: list[str] = []
    for sentence in _SENTENCE.split(paragraph):
        units += [sentence] if count(sentence) <= size else split_tokens(sentence, size)
    return units


def chunk_text(text: str, size: int, overlap: int, count: CountTokens,
               split_tokens: Callable[[str, int], list[str]]) -> list[Chunk]:
    """Chunks of at most ``size`` tokens (plus the heading), consecutive ones sharing ``overlap`` tokens.

    Args:
        text: the document (Markdown or plain text).
        size: token budget of a chunk's text.
        overlap: tokens of the previous chunk repeated at the start of the next, within a section.
        count: the tokenizer's count of a text.
        split_tokens: cuts a text into pieces of at most n tokens.
    """
    chunks: list[Chunk] = []
    for heading, paragraphs in sections(text):
        units = [u for p in paragraphs for u in _pieces(p, size, count, split_tokens)]
        current: list[str] = []
        for unit in units:
            if current and count(" ".join([*current, unit])) > size:
                chunks.append(Chunk(index=len(chunks), text=" ".join(current), heading=heading))
                current = _tail(current, overlap, count)
                while current and count(" ".join([*current, unit])) > size:
                    current = current[1:]
            current.append(unit)
        if current:
            chunks.append(Chunk(index=len(chunks), text=" ".join(current), heading=heading))
    return chunks


def _tail(units: list[str], overlap: int, count: CountTokens) -> list[str]:
    """The last units of a chunk whose tokens fit in ``overlap`` (whole sentences only)."""
    tail: list[str] = []
    for unit in reversed(units):
        if count(" ".join([unit, *tail])) > overlap:
            break
        tail.insert(0, unit)
    return tail


class TokenCounter:
    """The embedding model's tokenizer (``tokenizer.json`` of a sentence-transformers dir), without torch."""

    def __init__(self, model_dir: str) -> None:
        from tokenizers import Tokenizer

        self.tokenizer = Tokenizer.from_file(f"{model_dir}/tokenizer.json")
        self.tokenizer.no_truncation()
        self.tokenizer.no_padding()

    def count(self, text: str) -> int:
        return len(self.tokenizer.encode(text, add_special_tokens=False).ids)

    def split(self, text: str, size: int) -> list[str]:
        """Cut a text into pieces of at most ``size`` tokens, at token boundaries (by character offsets)."""
        offsets = self.tokenizer.encode(text, add_special_tokens=False).offsets
        return [text[offsets[i][0]:offsets[min(i + size, len(offsets)) - 1][1]].strip()
                for i in range(0, len(offsets), size)]
