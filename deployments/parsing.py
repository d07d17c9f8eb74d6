"""Uploaded files as text: .txt and .md as they are, .pdf through pypdf, .html through BeautifulSoup.

HTML headings become Markdown headings, so the chunker still cuts at them.
"""

from __future__ import annotations

import io
from pathlib import PurePath

SUPPORTED = (".txt", ".md", ".markdown", ".pdf", ".html", ".htm")


class UnsupportedFile(ValueError):
    """The file's type is not one raygate reads, or its content cannot be read as that type."""


def pdf_text(data: bytes) -> str:
    """The text of each page, pages separated by blank lines."""
    from pypdf import PdfReader
    from pypdf.errors import PdfReadError

    try:
        reader = PdfReader(io.BytesIO(data))
        return "\n\n".join((page.extract_text() or "").strip() for page in reader.pages)
    except (PdfReadError, ValueError, KeyError) as exc:
        raise UnsupportedFile(f"The PDF could not be read: {type(exc).__name__}.") from exc


def html_text(data: bytes) -> str:
    """Visible text, with h1-h6 as Markdown headings and block elements as paragraphs."""
    from bs4 import BeautifulSoup

    soup = BeautifulSoup(data, "html.parser")
    for hidden in soup(["script", "style", "noscript", "template", "head"]):
        hidden.decompose()
    for level in range(1, 7):
        for heading in soup.find_all(f"h{level}"):
            heading.replace_with(f"\n\n{'#' * level} {heading.get_text(' ', strip=True)}\n\n")
    for block in soup.find_all(["p", "li", "div", "section", "article", "tr", "br", "pre", "blockquote"]):
        block.insert_after("\n\n")
    lines = [line.strip() for line in soup.get_text().splitlines()]
    return "\n".join(lines)


def file_text(filename: str, data: bytes) -> str:
    """Read an upload by its extension.

    Raises:
        UnsupportedFile: another extension, or bytes that are not what the extension says.
    """
    suffix = PurePath(filename).suffix.lower()
    if suffix == ".pdf":
        return pdf_text(data)
    if suffix in (".html", ".htm"):
        return html_text(data)
    if suffix in (".txt", ".md", ".markdown"):
        try:
            return data.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise UnsupportedFile("Text files must be UTF-8.") from exc
    raise UnsupportedFile(f"Unsupported file type '{suffix or filename}'; raygate reads {', '.join(SUPPORTED)}.")
