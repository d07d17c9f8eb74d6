"""``HFEngine``: Hugging Face transformers on CPU (or one GPU), for development and tests.

Generation is a plain decode loop over the model's KV cache, one forward pass per
token in a worker thread: the event loop stays free between tokens, each request
samples from its own seeded ``torch.Generator`` (the same seed gives the same text
even while other requests run), and a stop sequence or a client that went away
ends the loop at the next token.

LoRA adapters are loaded into the running model with peft (on the first request that
names one, or when an admin loads it) and picked per forward pass (``adapter_names``), so
requests to the base model and to several adapters interleave on one replica. peft
selects the adapter through module hooks, so forward passes take turns (a lock) once
an adapter is loaded; a retrained adapter (newer weights file) is reloaded.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from deployments.models.base import ChunkFactory, Engine, EngineOutput, encode_chat, resolve_model_path
from deployments.models.base import stream_or_collect
from deployments.models.base import truncate_at_stop
from serve_app.config import HFEngineParams, ModelConfig
from serve_app.errors import ModelNotFoundError, RaygateError, ServiceUnavailableError, UpstreamUnavailableError
from serve_app.protocol import ChatCompletionRequest, ChatCompletionStreamResponse, FinishReason, UsageInfo

if TYPE_CHECKING:
    import torch

logger = logging.getLogger(__name__)

_REPLACEMENT_CHAR = "\ufffd"


@dataclass
class _Decoding:
    """The state of one generation: what goes into the next forward pass and how to sample."""

    next_input: torch.Tensor
    generator: torch.Generator
    temperature: float
    top_p: float
    frequency_penalty: float
    presence_penalty: float
    adapter: str | None = None
    cache: Any = None
    counts: torch.Tensor | None = None
    token_ids: list[int] = field(default_factory=list)


class HFEngine(Engine):
    """Runs a transformers causal LM in this process.

    Args:
        config: the model's config; ``engine_params`` must be ``HFEngineParams``.
        data_dir: raygate's state dir; relative model paths live under ``<data_dir>/models``.
    """

    def __init__(self, config: ModelConfig, data_dir: str) -> None:
        super().__init__(config, data_dir)
        if not isinstance(config.engine_params, HFEngineParams):
            raise TypeError(f"model {config.name}: HFEngine needs HFEngineParams")
        self.params = config.engine_params
        self.max_len_tokens = self.params.max_model_len_tokens
        self._semaphore = asyncio.Semaphore(self.params.max_concurrency)
        self._model: Any = None
        self._tokenizer: Any = None
        self._stop_token_ids: set[int] = set()
        self._peft: Any = None  # the PeftModel around _model, once an adapter is loaded
        self._adapters: dict[str, float] = {}  # name -> mtime of the weights loaded
        self._forward_lock = threading.Lock()

    async def start(self) -> None:
        """Load the tokenizer and the weights (in a thread: loading blocks)."""
        await asyncio.to_thread(self._load)

    async def check_health(self) -> None:
        """Raise until the model is loaded."""
        if self._model is None:
            raise ServiceUnavailableError(f"Model {self.config.name} is not loaded.")

    def chat(self, request: ChatCompletionRequest) -> AsyncIterator[EngineOutput]:
        """Answer one chat request; see ``Engine.chat`` for the contract."""
        return stream_or_collect(request, self._stream(request), request.model)

    async def load_adapter(self, name: str) -> None:
        """Load adapter ``name`` from the registry's dir with peft (a no-op when loaded and unchanged)."""
        await asyncio.to_thread(self._load_adapter, name)

    def _load_adapter(self, name: str) -> None:
        from peft import PeftModel

        path = self.adapter_dir(name)
        weights = next((p for p in (path / "adapter_model.safetensors", path / "adapter_model.bin") if p.exists()), None)
        if not (path / "adapter_config.json").exists() or weights is None:
            raise ModelNotFoundError(f"The adapter '{name}' is not registered.", param="model")
        version = weights.stat().st_mtime
        with self._forward_lock:
            if self._adapters.get(name) == version:
                return
            if name in self._adapters:
                self._peft.delete_adapter(name)
            if self._peft is None:
                self._peft = PeftModel.from_pretrained(self._model, str(path), adapter_name=name).eval()
            else:
                self._peft.load_adapter(str(path), adapter_name=name)
            self._adapters[name] = version
        logger.info("Model %s loaded adapter %s", self.config.name, name)

    def _load(self) -> None:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        path = resolve_model_path(self.params.model_path, self.data_dir)
        cuda = self.params.device == "cuda" or (self.params.device == "auto" and torch.cuda.is_available())
        # float32 on CPU: bfloat16 matmuls are slow there; on GPU "auto" keeps the checkpoint's dtype.
        dtype: Any = getattr(torch, self.params.dtype) if self.params.dtype != "auto" else "auto"
        if dtype == "auto" and not cuda:
            dtype = torch.float32
        started = time.monotonic()
        self._tokenizer = AutoTokenizer.from_pretrained(path)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
        self._model = model.to("cuda" if cuda else "cpu").eval()
        positions = getattr(model.config, "max_position_embeddings", None) or self.max_len_tokens
        self.max_len_tokens = min(self.max_len_tokens, positions)
        eos = model.generation_config.eos_token_id
        self._stop_token_ids = {eos} if isinstance(eos, int) else set(eos or [])
        if self._tokenizer.eos_token_id is not None:
            self._stop_token_ids.add(self._tokenizer.eos_token_id)
        logger.info(
            "Loaded model %s on %s in %.1fs (context %s tokens)",
            self.config.name, self._model.device, time.monotonic() - started, self.max_len_tokens,
        )

    def _encode(self, request: ChatCompletionRequest) -> list[int]:
        return encode_chat(self._tokenizer, request, self.max_len_tokens, self.config.name)

    def _new_decoding(self, request: ChatCompletionRequest, prompt_ids: list[int]) -> _Decoding:
        import torch

        generator = torch.Generator()
        if request.seed is None:
            generator.seed()
        else:
            generator.manual_seed(request.seed)
        return _Decoding(
            next_input=torch.tensor([prompt_ids], device=self._model.device),
            generator=generator,
            temperature=1.0 if request.temperature is None else request.temperature,
            top_p=1.0 if request.top_p is None else request.top_p,
            frequency_penalty=request.frequency_penalty or 0.0,
            presence_penalty=request.presence_penalty or 0.0,
            adapter=self.adapter_of(request),
        )

    def _forward(self, state: _Decoding) -> Any:
        """One forward pass, through the request's adapter once peft wraps the model."""
        kwargs = {"input_ids": state.next_input, "past_key_values": state.cache, "use_cache": True, "logits_to_keep": 1}
        with self._forward_lock:  # an adapter being loaded rewrites the model's modules
            if self._peft is None:
                return self._model(**kwargs)
            return self._peft(**kwargs, adapter_names=[state.adapter or "__base__"])

    def _step(self, state: _Decoding) -> int:
        """Run one forward pass and sample the next token (in a worker thread)."""
        import torch

        with torch.inference_mode():
            out = self._forward(state)
            logits = out.logits[0, -1].float().cpu()
            if state.counts is None:
                state.counts = torch.zeros_like(logits)
            if state.frequency_penalty or state.presence_penalty:
                logits -= state.frequency_penalty * state.counts + state.presence_penalty * (state.counts > 0)
            if state.temperature == 0:
                token = int(logits.argmax())
            else:
                probs = torch.softmax(logits / state.temperature, dim=-1)
                sorted_probs, order = probs.sort(descending=True)
                # Nucleus: keep the smallest head of the distribution whose mass reaches top_p.
                sorted_probs[(sorted_probs.cumsum(0) - sorted_probs) >= state.top_p] = 0.0
                token = int(order[torch.multinomial(sorted_probs, 1, generator=state.generator)])
            state.counts[token] += 1
        state.cache = out.past_key_values
        state.next_input = torch.tensor([[token]], device=self._model.device)
        state.token_ids.append(token)
        return token

    async def _stream(self, request: ChatCompletionRequest) -> AsyncIterator[ChatCompletionStreamResponse]:
        """Yield the role chunk, content chunks, then a last chunk with finish_reason and usage."""
        if self._model is None:
            raise ServiceUnavailableError(f"Model {self.config.name} is not loaded.")
        if (adapter := self.adapter_of(request)) is not None:
            await self.load_adapter(adapter)
        prompt_ids = self._encode(request)
        budget = min(request.max_output_tokens(self.config.default_max_tokens), self.max_len_tokens - len(prompt_ids))
        stops = request.stop_list()
        chunks = ChunkFactory(request.model)  # "<model>:<adapter>" when an adapter answers
        async with self._semaphore:
            state = self._new_decoding(request, prompt_ids)
            started = time.monotonic()
            yield chunks.chunk(role=True)
            sent = ""
            finish_reason: FinishReason = "length"
            with self._map_errors():
                while len(state.token_ids) < budget:
                    token = await asyncio.to_thread(self._step, state)
                    if token in self._stop_token_ids:
                        finish_reason = "stop"
                        break
                    text, stopped = truncate_at_stop(self._decode(state.token_ids), stops)
                    if stopped:
                        finish_reason = "stop"
                        break
                    ready = _stable_prefix(text, stops)
                    if len(ready) > len(sent):
                        yield chunks.chunk(ready[len(sent):])
                        sent = ready
            ids = [t for t in state.token_ids if t not in self._stop_token_ids]
            text = truncate_at_stop(self._decode(ids), stops)[0]
            if len(text) > len(sent):
                yield chunks.chunk(text[len(sent):])
            usage = UsageInfo.of(len(prompt_ids), len(state.token_ids))
            logger.debug(
                "Model %s: %s prompt + %s completion tokens in %.2fs, finish %s",
                self.config.name, usage.prompt_tokens, usage.completion_tokens, time.monotonic() - started,
                finish_reason,
            )
            yield chunks.chunk(finish_reason=finish_reason, usage=usage)

    def _decode(self, token_ids: list[int]) -> str:
        text: str = self._tokenizer.decode(token_ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)
        return text

    @contextlib.contextmanager
    def _map_errors(self) -> Iterator[None]:
        """Turn torch/transformers failures into a raygate error (details go to the log only)."""
        try:
            yield
        except RaygateError:
            raise
        except Exception as exc:
            logger.exception("Generation failed on model %s", self.config.name)
            raise UpstreamUnavailableError(f"Model {self.config.name} failed to generate.") from exc


def _stable_prefix(text: str, stops: list[str]) -> str:
    """Return the part of ``text`` that later tokens cannot change.

    Held back: a trailing replacement character (a multi-byte character may be
    half decoded) and a tail that could be the start of a stop sequence.
    """
    text = text.rstrip(_REPLACEMENT_CHAR)
    held = max((k for stop in stops for k in range(1, len(stop)) if text.endswith(stop[:k])), default=0)
    return text[: len(text) - held]
