"""Schemas of the /v1 routes besides chat completions: models, embeddings, and raygate's feedback.

Split from ``serve_app.protocol`` (chat) as vLLM splits its protocol by endpoint; the shared
base model and text checks stay there.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field, field_validator, model_validator

from serve_app.protocol import OpenAIBaseModel, check_unicode

__all__ = ["EmbeddingData", "EmbeddingRequest", "EmbeddingResponse", "EmbeddingUsage", "FeedbackRequest", "ModelCard",
           "ModelList"]


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int = 0
    owned_by: str = "raygate"


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class EmbeddingRequest(OpenAIBaseModel):
    """``POST /v1/embeddings``: https://platform.openai.com/docs/api-reference/embeddings/create"""

    input: str | list[str] = Field(min_length=1)
    model: str = Field(min_length=1)
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = None
    user: str | None = None

    @field_validator("input", "user")
    @classmethod
    def _check_text(cls, value: str | list[str] | None) -> str | list[str] | None:
        check_unicode(*(value if isinstance(value, list) else (value,)))
        return value

    def inputs(self) -> list[str]:
        """Return the inputs as a list of strings."""
        texts = [self.input] if isinstance(self.input, str) else list(self.input)
        if any(not t for t in texts):
            raise ValueError("input strings must not be empty")
        return texts


class EmbeddingData(BaseModel):
    object: Literal["embedding"] = "embedding"
    index: int
    embedding: list[float] | str


class EmbeddingUsage(BaseModel):
    prompt_tokens: int
    total_tokens: int


class EmbeddingResponse(BaseModel):
    object: Literal["list"] = "list"
    data: list[EmbeddingData]
    model: str
    usage: EmbeddingUsage


# --- raygate extensions -------------------------------------------------------------


class FeedbackRequest(OpenAIBaseModel):
    """``POST /v1/feedback``: a verdict on one answer, by the key that asked for it."""

    request_id: str = Field(min_length=1, max_length=128, description="The answer's x-request-id.")
    rating: int | None = Field(None, ge=1, le=5)
    thumbs: Literal["up", "down"] | None = None
    comment: str | None = Field(None, max_length=2000)

    @model_validator(mode="after")
    def _needs_a_verdict(self) -> "FeedbackRequest":
        if self.rating is None and self.thumbs is None:
            raise ValueError("give a rating (1-5) or thumbs (up/down)")
        return self
