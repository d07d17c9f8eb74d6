"""Chunking: token budget, heading paths, paragraph boundaries and overlap; parsing of uploads."""

from __future__ import annotations

import pytest

from deployments.chunking import TokenCounter, chunk_text, sections
from deployments.embedder import default_model_path
from deployments.parsing import UnsupportedFile, file_text
from tests.pdf import make_pdf


@pytest.fixture(scope="module")
def tokens() -> TokenCounter:
    return TokenCounter(default_model_path())


def sentences(n: int, topic: str = "ventilation") -> str:
    return " ".join(f"Fact {i} about {topic} in the poultry house." for i in range(n))


def test_sections_follow_the_heading_path() -> None:
    doc = "# Layers\n\nIntro.\n\n## Water\n\nDrink.\n\n### Nipples\n\nHeight.\n\n## Feed\n\nGrain.\n"
    assert [h for h, _ in sections(doc)] == ["Layers", "Layers > Water", "Layers > Water > Nipples", "Layers > Feed"]


def test_chunks_fit_the_budget_and_overlap_by_whole_sentences(tokens: TokenCounter) -> None:
    doc = f"# Barn\n\n## Air\n\n{sentences(40)}\n\n## Light\n\nSixteen hours of light."
    chunks = chunk_text(doc, 60, 15, tokens.count, tokens.split)
    air = [c for c in chunks if c.heading == "Barn > Air"]
    assert len(air) > 3 and all(tokens.count(c.text) <= 60 for c in chunks)
    for before, after in zip(air, air[1:]):
        last_sentence = before.text.rsplit(". ", 1)[-1]
        assert after.text.startswith(last_sentence.rstrip(".")), "the next chunk repeats the previous one's end"
    assert chunks[-1].heading == "Barn > Light" and chunks[-1].text == "Sixteen hours of light."
    assert chunks[-1].embedded_text() == "Barn > Light\nSixteen hours of light."
    assert [c.index for c in chunks] == list(range(len(chunks)))


def test_paragraphs_are_not_merged_across_headings(tokens: TokenCounter) -> None:
    chunks = chunk_text("# A\n\nOne.\n\n# B\n\nTwo.", 200, 20, tokens.count, tokens.split)
    assert [(c.heading, c.text) for c in chunks] == [("A", "One."), ("B", "Two.")]


def test_a_sentence_longer_than_a_chunk_is_cut_at_tokens(tokens: TokenCounter) -> None:
    long_sentence = " ".join(["coccidiosis"] * 300)
    chunks = chunk_text(long_sentence, 50, 0, tokens.count, tokens.split)
    assert len(chunks) > 1 and all(tokens.count(c.text) <= 50 for c in chunks)


def test_uploads_are_read_by_type() -> None:
    assert "Red mites" in file_text("notes.pdf", make_pdf(["Red mites live in cracks."]))
    html = b"<html><head><script>x()</script></head><body><h2>Mites</h2><p>Red mites hide.</p></body></html>"
    assert file_text("page.html", html).split() == ["##", "Mites", "Red", "mites", "hide."]
    assert file_text("a.md", "# Titre\n\nÉté".encode()) == "# Titre\n\nÉté"
    with pytest.raises(UnsupportedFile, match="Unsupported file type"):
        file_text("a.docx", b"x")
    with pytest.raises(UnsupportedFile, match="PDF could not be read"):
        file_text("a.pdf", b"not a pdf")
