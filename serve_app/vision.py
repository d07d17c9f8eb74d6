"""Image content parts at the gateway: which models may see them, and how big they may be.

The schema (``serve_app.protocol.ImageURL``) checks each image's URL; this module checks a
request's images against the model it resolved to, before anything is reserved:

* a model without ``vision: true`` gets no images: 400 ``model_not_vision_capable``;
* a data URL's image larger than ``gateway.max_image_bytes`` (decoded) is a 400
  ``image_too_large`` naming the part;
* a non-vision fallback is skipped for requests with images (``vision_capable``), as is a
  non-vision ``context_fallback``; a downgrade to a non-vision model is refused by the quota.
"""

from __future__ import annotations

from deployments.cost_guard_protocol import ReserveDecision
from serve_app.config import ModelConfig
from serve_app.errors import InvalidRequestError, QuotaExceededError
from serve_app.protocol import ChatCompletionRequest, ImageContentPart

NOT_VISION_CAPABLE = "model_not_vision_capable"


def vision_capable(body: ChatCompletionRequest, model: ModelConfig) -> bool:
    """Whether ``model`` may take this request: it has no images, or the model reads them."""
    return model.vision or not body.images()


def check_images(body: ChatCompletionRequest, model: ModelConfig, max_image_bytes: int) -> None:
    """Refuse images a model cannot read, and data URLs over the size cap.

    Raises:
        InvalidRequestError: 400, ``param`` ``messages`` (or the oversized part's URL).
    """
    if not body.images():
        return
    if not model.vision:
        raise InvalidRequestError(
            f"The model '{model.name}' does not accept images; send text only, or use a vision-capable model.",
            param="messages", code=NOT_VISION_CAPABLE)
    for m, message in enumerate(body.messages):
        if not isinstance(message.content, list):
            continue
        for p, part in enumerate(message.content):
            if isinstance(part, ImageContentPart) and part.image_url.data_bytes() > max_image_bytes:
                raise InvalidRequestError(
                    f"The image is {part.image_url.data_bytes()} bytes; at most {max_image_bytes} are allowed.",
                    param=f"messages.{m}.content.{p}.image_url.url", code="image_too_large")


def downgrade_refused(decision: ReserveDecision, downgrade: ModelConfig) -> QuotaExceededError:
    """The answer to an image request the quota would move to a model that cannot read images (429)."""
    limit = f" ({decision.limit})" if decision.limit else ""
    return QuotaExceededError(
        f"This request does not fit your limits{limit} on the model '{decision.requested_model}', and the model "
        f"it would be downgraded to, '{downgrade.name}', does not accept images.", param="model")
