"""Fine-tuned LoRA adapters behind the gateway: ``model: "<base>:<adapter>"`` and the admin routes that load them.

The registry (``training.registry``, a JSON file under ``data_dir``) says which adapters
exist and on which base models they are loaded. Each Gateway replica keeps a copy of it,
re-read when the file changes (one ``stat`` per lookup), and turns ``<base>:<adapter>``
into the base model's config under the adapter's name: the request goes to the base
model's deployment, which answers through the adapter (peft in ``hf``, a LoRARequest in
``vllm``) without a restart. Prices, retries and fallbacks are the base model's; the
ledger, metrics and cache keep the adapter's name, so experiments can compare them.

Loading (``POST /admin/adapters/{name}/load``) marks the adapter loaded on the model in
the registry and loads it into one replica at once; the others load it on first use.
Unloading makes the gateway refuse the name again (404 ``model_not_found``).
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

from fastapi import APIRouter, Depends
from pydantic import BaseModel, Field

from serve_app.config import GatewayConfig, ModelConfig
from serve_app.deps import get_gateway, require_admin
from serve_app.errors import InvalidRequestError, NotFoundError, RaygateError
from serve_app.handles import call
from training.registry import AdapterEntry, AdapterRegistry, split_model_id

if TYPE_CHECKING:
    from serve_app.gateway import Gateway

router = APIRouter(prefix="/admin/adapters", dependencies=[Depends(require_admin)])
ADAPTER_ENGINES = {"hf", "vllm"}
LOAD_TIMEOUT_S = 120.0


class AdapterIndex:
    """The registry as this replica last read it.

    Args:
        config: the application config (the base models).
        data_dir: where the registry lives.
    """

    def __init__(self, config: GatewayConfig, data_dir: str) -> None:
        self.config = config
        self.registry = AdapterRegistry(data_dir)
        self._names = [m.name for m in config.models]
        self._entries: dict[str, AdapterEntry] = {}
        self._seen: tuple[int, int] | None = None

    def entries(self) -> dict[str, AdapterEntry]:
        """Every registered adapter by name (re-read when the registry file changed)."""
        try:
            stat = os.stat(self.registry.file)
            seen = (stat.st_mtime_ns, stat.st_size)
        except FileNotFoundError:
            seen = None
        if seen != self._seen:
            self._entries = {e.name: e for e in self.registry.list()} if seen else {}
            self._seen = seen
        return self._entries

    def resolve(self, model_id: str) -> ModelConfig | None:
        """The config serving ``<base>:<adapter>`` when that adapter is loaded on that base, else None."""
        if ":" not in model_id:
            return None
        try:
            base_name, adapter = split_model_id(model_id, known_models=self._names)
        except RaygateError:
            return None
        base = self.config.model(base_name)
        entry = self.entries().get(adapter) if adapter else None
        if base is None or entry is None or base_name not in entry.loaded_on:
            return None
        return base.model_copy(update={"name": model_id})


class LoadBody(BaseModel):
    """Which base model to load the adapter on (or unload it from)."""

    model: str = Field(min_length=1, max_length=256, description="A configured model with the hf or vllm engine.")


def _base_model(gateway: "Gateway", name: str) -> ModelConfig:
    model = gateway.config.model(name)
    if model is None:
        raise NotFoundError(f"The model '{name}' does not exist.", param="model", code="model_not_found")
    enabled = model.engine == "hf" or getattr(model.engine_params, "enable_lora", False)
    if model.engine not in ADAPTER_ENGINES or not enabled:
        raise InvalidRequestError(f"The model '{name}' cannot serve LoRA adapters (hf, or vllm with enable_lora).",
                                  param="model", code="adapters_unsupported")
    return model


@router.get("", response_model=list[AdapterEntry])
async def list_adapters(gateway: "Gateway" = Depends(get_gateway)) -> list[AdapterEntry]:
    """Every registered adapter: base model, dataset hash, training config and metrics, where it is loaded."""
    return list(gateway.adapters.entries().values())


@router.post("/{name}/load", response_model=AdapterEntry)
async def load_adapter(name: str, body: LoadBody, gateway: "Gateway" = Depends(get_gateway)) -> AdapterEntry:
    """Serve adapter ``name`` on ``body.model`` as ``<model>:<name>``, without restarting the model's replicas."""
    model = _base_model(gateway, body.model)
    gateway.adapters.registry.get(name)  # 404 before touching a replica
    error = await call(gateway.models[model.name].invoke("load_adapter", name), LOAD_TIMEOUT_S, f"Model {model.name}")
    if error is not None:
        raise error
    return gateway.adapters.registry.mark_loaded(name, model.name)


@router.post("/{name}/unload", response_model=AdapterEntry)
async def unload_adapter(name: str, body: LoadBody, gateway: "Gateway" = Depends(get_gateway)) -> AdapterEntry:
    """Stop serving ``<model>:<name>`` (requests for it get 404 again)."""
    return gateway.adapters.registry.mark_unloaded(name, _base_model(gateway, body.model).name)
