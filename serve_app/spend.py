"""The Gateway's side of CostGuard: reserve before the model call, settle or release after it.

Settling and releasing leave the client's path (background tasks); a reservation
a crashed replica never settles expires in CostGuard and is reclaimed.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from deployments.cost_guard_protocol import ReserveDecision, ReserveRequest, ThresholdCrossing
from serve_app.auth import APIKey
from serve_app.config import ModelConfig
from serve_app.errors import RaygateError
from serve_app.placement import Placed
from serve_app.tasks import BackgroundTasks
from serve_app.protocol import IMAGE_PROMPT_TOKENS, ChatCompletionRequest, UsageInfo

logger = logging.getLogger(__name__)

TAG_HEADER = "x-raygate-tag"
MAX_TAGS = 8
_PER_MESSAGE_TOKENS = 4


def estimate_prompt_tokens(body: ChatCompletionRequest) -> int:
    """A cheap, generous prompt estimate for the reservation (settle uses the real count).

    Bytes / 3 over-counts most languages' tokens (OpenAI's rule of thumb is ~4 characters
    a token), so a reservation rarely falls short of the real prompt. Each image adds
    ``IMAGE_PROMPT_TOKENS`` (765, OpenAI's high-detail price of a 1024x1024 image).
    """
    text = sum(len(m.text().encode("utf-8")) // 3 + _PER_MESSAGE_TOKENS for m in body.messages)
    return text + IMAGE_PROMPT_TOKENS * len(body.images())


def parse_tags(header: str | None) -> list[str]:
    """Return the caller's tags from ``x-raygate-tag: a, b`` (at most a few, trimmed)."""
    if not header:
        return []
    return [t.strip()[:64] for t in header.split(",") if t.strip()][:MAX_TAGS]


class Spend:
    """Reserves and settles a request's tokens and cost through CostGuard.

    Args:
        cost_guard: CostGuard, embedded or behind its handle.
        on_crossings: given the budget thresholds crossed for the first time in a period.
    """

    def __init__(self, cost_guard: Placed,
                 on_crossings: Callable[[list[ThresholdCrossing]], object] | None = None) -> None:
        self.cost_guard = cost_guard
        self.on_crossings = on_crossings
        self.background = BackgroundTasks()

    async def reserve(self, request_id: str, key: APIKey, body: ChatCompletionRequest, model: ModelConfig,
                      tags: list[str]) -> ReserveDecision:
        """Reserve the request's worst case against the key's quota and every budget.

        Raises:
            QuotaExceededError: a limit cannot take it (429 ``insufficient_quota``).
            PermissionDeniedError: the key's plan does not allow the model.
        """
        request = ReserveRequest(
            request_id=request_id, tenant=key.tenant, user=key.user, plan=key.plan, model=model.name, tags=tags,
            prompt_tokens_estimate=estimate_prompt_tokens(body),
            max_tokens=body.max_output_tokens(model.default_max_tokens),
        )
        decision: ReserveDecision = await self.cost_guard("reserve", request)
        error = decision.to_error()
        if error is not None:
            raise error
        return decision

    def finish(self, request_id: str, model: ModelConfig | None, usage: UsageInfo | None) -> None:
        """Settle with the real usage, or release everything when no tokens were produced."""
        self.background.spawn(self._finish(request_id, model, usage))

    async def _finish(self, request_id: str, model: ModelConfig | None, usage: UsageInfo | None) -> None:
        try:
            if usage is None or model is None:
                await self.cost_guard("release", request_id)
                return
            result = await self.cost_guard("settle", request_id, usage.prompt_tokens, usage.completion_tokens,
                                           model.name)
        except RaygateError as exc:  # the reservation expires and is reclaimed
            logger.warning("Settling request %s failed: %s", request_id, exc.code)
            return
        if result.crossings and self.on_crossings is not None:
            self.on_crossings(result.crossings)  # the alerter stores and sends in its own tasks

    async def close(self) -> None:
        """Wait for pending settlements, then release the component's connections."""
        await self.background.wait(timeout_s=5)
        await self.cost_guard.close()



def capped_request(body: ChatCompletionRequest, max_tokens: int) -> ChatCompletionRequest:
    """Send what was reserved: the decided max_tokens (the plan's cap) upstream."""
    if body.max_completion_tokens == max_tokens or (
        body.max_completion_tokens is None and body.max_tokens == max_tokens
    ):
        return body
    return body.model_copy(update={"max_tokens": max_tokens, "max_completion_tokens": None})
