"""Self-evaluation: a judge model scores answers against a rubric (LLM-as-judge).

A share of successful answers (``evaluation.sample_rate``, per tenant
``tenant_sample_rates``) is judged in a background task, off the client's path.
Non-streamed answers on ``sync_routes`` (a model, requested or answering, or a router
category) are judged before they are sent: a score under ``retry_below`` retries
once with ``stronger_model[model]`` and the client gets that answer
(``x-raygate-model``); the retry's answer is then judged in the background.

The judge is a configured model, called through the normal dispatch (retries,
fallbacks, circuit breakers) with the tenant's key: its reservation, its ledger row
(endpoint ``evaluation.judge``, id ``<request id>-judge``) and its spend are the
tenant's, like a conversation summary's. Scores go to the ledger's ``evaluations``
table (``deployments.evaluations``). A reply without a readable score stores a row
with no score and is logged and counted (``Evaluator.counts``).
"""

from __future__ import annotations

import logging
import random
import re
import time
from collections import Counter
from typing import TYPE_CHECKING, Any

import orjson

from deployments.evaluations import EvaluationRecord
from deployments.ledger import RequestRecord
from deployments.privacy import Content
from serve_app.auth import APIKey
from serve_app.constants import LEDGER_CALL_TIMEOUT_S, MODEL_HEADER
from serve_app.dispatch import Answer, Attempt
from serve_app.errors import RaygateError
from serve_app.evaluation_config import EvaluationConfig
from serve_app.handles import call
from serve_app.protocol import ChatCompletionRequest, ChatMessage
from serve_app.spend import capped_request

if TYPE_CHECKING:
    from serve_app.gateway import Gateway

logger = logging.getLogger(__name__)

JUDGE_ENDPOINT, RETRY_ENDPOINT = "evaluation.judge", "evaluation.retry"
SCORE_HEADER, RETRIED_HEADER = "x-raygate-judge-score", "x-raygate-retried-from"
JUDGE_INSTRUCTION = """You are a strict, impartial grader of an AI assistant's answer.
Rubric:
{rubric}

Judge only the answer to the user's question below. Reply with strict JSON and nothing else:
{{"score": <integer from 1 to 5>, "reason": "<one short sentence>"}}"""
_OBJECT = re.compile(r"\{.*?\}", re.DOTALL)
_DIGIT = re.compile(r"(?<![\d.])([1-5])(?!\d|\.\d)")


def judge_messages(rubric: str, question: str, answer: str, max_chars: int = 8000) -> list[ChatMessage]:
    """The judge's prompt: the rubric and the output format, then the question and the answer."""
    text = (f"Question:\n<<<\n{question[:max_chars]}\n>>>\n\n"
            f"Answer:\n<<<\n{answer[:max_chars]}\n>>>")
    return [ChatMessage(role="system", content=JUDGE_INSTRUCTION.format(rubric=rubric)),
            ChatMessage(role="user", content=text)]


def _score_of(value: Any) -> int | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)) and 1 <= value <= 5 and float(value).is_integer():
        return int(value)
    if isinstance(value, str) and value.strip() in {"1", "2", "3", "4", "5"}:
        return int(value.strip())
    return None


def parse_verdict(text: str | None) -> tuple[int | None, str | None]:
    """The score (1-5) and reason in a judge's reply.

    Strict JSON first (also inside a code fence or surrounding prose); else the first
    standalone integer 1-5 in the text, the text being the reason. (None, text) when none.
    """
    if not text or not text.strip():
        return None, None
    candidates = [text.strip(), *_OBJECT.findall(text)]
    for candidate in candidates:
        try:
            obj = orjson.loads(candidate)
        except orjson.JSONDecodeError:
            continue
        if isinstance(obj, dict) and (score := _score_of(obj.get("score"))) is not None:
            reason = obj.get("reason")
            return score, str(reason)[:1000] if reason is not None else None
    match = _DIGIT.search(text)
    return (int(match.group(1)) if match else None), text.strip()[:1000]


def sampled(rate: float, rng: random.Random) -> bool:
    """Whether one answer is judged at ``rate`` (0 never, 1 always)."""
    return rate > 0 and rng.random() < rate


def question_of(body: ChatCompletionRequest) -> str:
    """The user's question: the last user message's text."""
    return next((m.text() for m in reversed(body.messages) if m.role == "user"), "")


class Evaluator:
    """The Gateway's judge: sampling, sync scoring with one retry, and storing scores.

    Args:
        gateway: the Gateway replica (config, dispatcher, spend, Ledger, ``_record``).
        rng: the sampling draw (seeded in tests).
    """

    def __init__(self, gateway: "Gateway", rng: random.Random | None = None) -> None:
        self.gateway = gateway
        self.rng = rng or random.Random()
        self.counts: Counter[str] = Counter()

    @property
    def config(self) -> EvaluationConfig:
        return self.gateway.config.evaluation

    def rate(self, tenant: str) -> float:
        """The sample rate of a tenant's answers."""
        return self.config.tenant_sample_rates.get(tenant, self.config.sample_rate)

    def is_sync(self, record: RequestRecord, model: str) -> bool:
        """Whether a request's answer is judged before it is sent."""
        routes = self.config.sync_routes
        return bool(routes) and (model in routes or record.requested_model in routes or record.category in routes)

    def sample(self, key: APIKey, body: ChatCompletionRequest, record: RequestRecord, answer: str | None,
               model: str) -> None:
        """Judge a share of successful answers in the background."""
        if self.config.judge_model is None or not answer or not sampled(self.rate(key.tenant), self.rng):
            return
        self.gateway.spend.background.spawn(self.judge(key, record.id, question_of(body), answer, model, "sampled"))

    async def review(self, key: APIKey, body: ChatCompletionRequest, record: RequestRecord, answer: Answer,
                     headers: dict[str, str]) -> Answer:
        """A non-streamed answer: judged now on a sync route (a poor one retried once with the stronger model,
        whose answer is returned), else maybe sampled. ``headers`` get the score and the retry."""
        text = answer.first.choices[0].message.content
        if self.config.judge_model is None or not text or not self.is_sync(record, answer.model.name):
            self.sample(key, body, record, text, answer.model.name)
            return answer
        question = question_of(body)
        score = await self.judge(key, record.id, question, text, answer.model.name, "sync")
        if score is not None:
            headers[SCORE_HEADER] = str(score)
        stronger = self.config.stronger_model.get(answer.model.name)
        if score is None or score >= self.config.retry_below or stronger is None:
            return answer
        retried = await self._retry(key, body, record, stronger)
        if retried is None:
            return answer
        self.counts["retried"] += 1
        headers[MODEL_HEADER], headers[RETRIED_HEADER] = retried.model.name, answer.model.name
        headers.pop(SCORE_HEADER, None)  # the score was the first answer's; the retry's is judged in the background
        retried_text = retried.first.choices[0].message.content or ""
        self.gateway.spend.background.spawn(
            self.judge(key, f"{record.id}-retry", question, retried_text, retried.model.name, "sync"))
        return retried

    async def _retry(self, key: APIKey, body: ChatCompletionRequest, record: RequestRecord,
                     model_name: str) -> Answer | None:
        """Answer again with the stronger model: its own reservation and ledger row (``<id>-retry``)."""
        gateway = self.gateway
        model = gateway._model(model_name)
        retry = RequestRecord(id=f"{record.id}-retry", tenant=key.tenant, user=key.user, key_id=key.key_id,
                              endpoint=RETRY_ENDPOINT, requested_model=model.name, tags=record.tags,
                              content=Content(messages=record.content.messages) if record.content else None)
        request = body.model_copy(update={"model": model.name, "stream": False, "stream_options": None})
        started, attempts = time.perf_counter(), []
        try:
            decision = await gateway.spend.reserve(retry.id, key, request, model, [])
        except RaygateError as exc:
            logger.info("Evaluation retry of %s not reserved (%s)", record.id, exc.code)
            return None
        try:
            answer = await gateway.dispatcher.first_answer(capped_request(request, decision.max_tokens), model, attempts)
        except RaygateError as exc:
            gateway._record(retry, started, None, None, exc, attempts)
            logger.info("Evaluation retry of %s failed (%s); the first answer is sent", record.id, exc.code)
            return None
        text = answer.first.choices[0].message.content
        if retry.content is not None:
            retry.content.answer = text
        gateway.conversations.finish(record.id, text)  # the conversation keeps the answer the client got
        gateway._record(retry, started, answer.model, answer.first.usage, None, attempts)
        gateway._correct_tokens(key, answer.first.usage)  # the user's tokens per minute count it too
        return answer

    async def judge(self, key: APIKey, request_id: str, question: str, answer: str, answer_model: str,
                    mode: str) -> int | None:
        """Score one answer with the judge model and store the score. Never raises.

        Returns:
            The score, or None when the judge could not be called or gave no readable score.
        """
        gateway, settings = self.gateway, self.config
        assert settings.judge_model is not None
        judge = gateway._model(settings.judge_model)
        body = ChatCompletionRequest(model=judge.name, max_tokens=settings.judge_max_tokens, temperature=0,
                                     messages=judge_messages(settings.rubric, question, answer, settings.max_chars))
        record = RequestRecord(id=f"{request_id}-judge", tenant=key.tenant, user=key.user, key_id=key.key_id,
                               endpoint=JUDGE_ENDPOINT, requested_model=judge.name)
        started, attempts, reserved = time.perf_counter(), list[Attempt](), False
        try:
            decision = await gateway.spend.reserve(record.id, key, body, judge, [])
            reserved = True
            if decision.model is not None and decision.model != judge.name:
                record.downgraded_from, judge = judge.name, gateway._model(decision.model)
            reply = await gateway.dispatcher.first_answer(capped_request(body, decision.max_tokens), judge, attempts)
        except RaygateError as exc:
            gateway._record(record, started, None, None, exc, attempts, reserved=reserved)
            self.counts["failed"] += 1
            logger.warning("Judging %s failed (%s)", request_id, exc.code)
            return None
        gateway._record(record, started, reply.model, reply.first.usage, None, attempts)
        gateway._correct_tokens(key, reply.first.usage)
        score, reason = parse_verdict(reply.first.choices[0].message.content)
        self.counts["scored" if score is not None else "unparsed"] += 1
        if score is None:
            logger.warning("The judge's reply on %s had no score: %r", request_id, (reason or "")[:200])
        evaluation = EvaluationRecord(request_id=request_id, score=score, reason=reason, judge_model=reply.model.name,
                                      answer_model=answer_model, mode=mode)  # type: ignore[arg-type]
        try:
            await call(gateway.ledger.store.remote("evaluations.add", evaluation), LEDGER_CALL_TIMEOUT_S, "Ledger")
        except RaygateError as exc:
            self.counts["unstored"] += 1
            logger.warning("Storing the score of %s failed: %s", request_id, exc.code)
        return score
