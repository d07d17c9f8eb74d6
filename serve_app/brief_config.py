"""Settings of brief-then-expand answers (``brief: true`` / ``x-raygate-brief: 1``, then ``expand: true``)."""

from __future__ import annotations

from pydantic import Field, PositiveInt, field_validator

from serve_app.config_base import BaseConfig

DEFAULT_INSTRUCTION = (
    "Answer briefly: at most 2-3 sentences with the essentials only, no preamble and no lists. The user can ask "
    "you to expand on your answer later.")
DEFAULT_EXPAND_INSTRUCTION = "Please expand on your previous answer with full detail."


class BriefConfig(BaseConfig):
    """A short answer first, kept in a conversation; ``expand`` continues that conversation in full."""

    enabled: bool = Field(True, description="Accept brief and expand in chat requests (they need conversations).")
    instruction: str = Field(DEFAULT_INSTRUCTION, max_length=4000,
                             description="The system instruction added to a brief request.")
    max_tokens: PositiveInt = Field(96, le=8192, description="Output cap of a brief answer (a smaller "
                                                             "max_tokens from the client is kept).")
    expand_instruction: str = Field(DEFAULT_EXPAND_INSTRUCTION, max_length=4000,
                                    description="The user turn an expand request adds to the conversation.")

    @field_validator("instruction", "expand_instruction")
    @classmethod
    def _not_blank(cls, text: str) -> str:
        if not text.strip():
            raise ValueError("must not be empty")
        return text.strip()
