"""Settings of stored conversations (``conversation_id`` in chat) and of users' memory (``/v1/users/me/memory``)."""

from __future__ import annotations

from pydantic import Field, PositiveInt

from serve_app.config_base import BaseConfig


class ConversationsConfig(BaseConfig):
    """Conversations kept in the ledger; a chat request naming one gets its history prepended."""

    enabled: bool = Field(True, description="Serve /v1/conversations and accept conversation_id in chat requests.")
    max_messages: PositiveInt = Field(
        200, le=100_000, description="Messages kept per conversation; the oldest (after its pinned system "
                                     "messages) are deleted beyond this.")
    summary_model: str | None = Field(
        None, description="A configured (cheap) model that summarises the oldest turns when the history does not "
                          "fit the model's context; without one they are dropped.")
    summary_max_tokens: PositiveInt = Field(256, le=8192, description="Output budget of a summary.")


class MemoryConfig(BaseConfig):
    """Per-user facts and preferences, a JSON object given to prompt templates as ``memory``."""

    enabled: bool = Field(True, description="Serve /v1/users/me/memory and give templates the memory variable.")
    max_keys: PositiveInt = Field(64, le=10_000, description="Keys a user's memory may hold.")
    max_bytes: PositiveInt = Field(16_384, le=1_048_576, description="Size of the memory as compact UTF-8 JSON.")
