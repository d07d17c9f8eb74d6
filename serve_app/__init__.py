"""raygate: an OpenAI-compatible LLM gateway built as a Ray Serve deployment graph."""

__version__ = "0.1.0"
