"""The adapter registry: trained LoRA adapters under names, owned by raygate's data dir.

Layout under ``<data_dir>/adapters/``::

    registry.json     {"adapters": {name: entry}}; replaced atomically (temp file + os.replace)
    registry.lock     flock'd by every writer, so concurrent read-modify-writes never lose an entry
    <name>/           the registered copy of the adapter (peft files + raygate_adapter.json)

Registering copies the trainer's output dir, so deleting or retraining into it never
breaks a served adapter. Readers take no lock: a replaced file is whole or absent.
A request addresses an adapter as ``"<base model>:<adapter name>"`` (:func:`split_model_id`).

Errors are raygate's own (``serve_app.errors``), so the gateway's admin routes can let
them through to its one renderer: a bad name or dir is a 400, an unknown name a 404.
"""

from __future__ import annotations

import builtins
import fcntl
import logging
import os
import re
import shutil
import tempfile
import time
from collections.abc import Collection, Iterator
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from serve_app.errors import InvalidRequestError, NotFoundError

__all__ = [
    "ADAPTER_NAME_PATTERN",
    "METADATA_FILE",
    "AdapterEntry",
    "AdapterMetadata",
    "AdapterRegistry",
    "split_model_id",
    "validate_adapter_name",
]

logger = logging.getLogger(__name__)

ADAPTER_NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
METADATA_FILE = "raygate_adapter.json"
PEFT_CONFIG_FILE = "adapter_config.json"
REGISTRY_FILE = "registry.json"
LOCK_FILE = "registry.lock"
# Names that would collide with the registry's own files in the adapters dir.
_RESERVED_NAMES = frozenset({REGISTRY_FILE, LOCK_FILE})
GATEWAY_TIMEOUT_S = 300.0  # loading an adapter onto a model may wait for the model's replicas


class AdapterMetadata(BaseModel):
    """``raygate_adapter.json``, written by the trainer next to peft's files.

    Unknown keys are ignored rather than refused: the trainer may add some, and an
    older registry should still register its adapters.
    """

    model_config = ConfigDict(extra="ignore")

    base_model: str = Field(description="Path or id of the model the adapter was trained on.")
    dataset_hash: str = Field(description="Hash of the training data, to tell runs apart.")
    config: dict[str, Any] = Field(default_factory=dict, description="The train config.")
    metrics: dict[str, float | int] = Field(default_factory=dict, description="train/val loss, tokens_per_s, steps.")
    created_at: float = Field(description="When training finished (Unix seconds, or an ISO 8601 string).")

    @field_validator("created_at", mode="before")
    @classmethod
    def _parse_iso(cls, value: Any) -> Any:
        # The contract says Unix seconds; an ISO string (datetime.isoformat()) is taken too.
        if isinstance(value, str):
            try:
                return datetime.fromisoformat(value).timestamp()
            except ValueError:
                return value  # a numeric string, or pydantic's error
        return value


class AdapterEntry(AdapterMetadata):
    """One registered adapter: its metadata plus the registry's own fields."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(description="The registry name; requests use '<base>:<name>'.")
    path: str = Field(description="The registry-owned copy of the adapter dir.")
    registered_at: float = Field(description="When it was registered (Unix seconds).")
    loaded_on: list[str] = Field(default_factory=list, description="Models the adapter is loaded on.")


class _RegistryFile(BaseModel):
    model_config = ConfigDict(extra="forbid")

    adapters: dict[str, AdapterEntry] = Field(default_factory=dict)


def validate_adapter_name(name: str, *, param: str = "name") -> str:
    """Return ``name`` if it is a valid adapter name.

    Names become directory names and the part after ``:`` in model ids, so they are
    restricted to ``^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$`` (no ``/``, no leading ``.``).

    Raises:
        InvalidRequestError: the name is not valid.
    """
    if not ADAPTER_NAME_PATTERN.fullmatch(name) or name in _RESERVED_NAMES:
        raise InvalidRequestError(
            f"Invalid adapter name {name!r}: use 1-64 letters, digits, '.', '_' or '-', "
            "starting with a letter or digit.",
            param=param,
            code="invalid_adapter_name",
        )
    return name


def split_model_id(model_id: str, *, known_models: Collection[str] = ()) -> tuple[str, str | None]:
    """Split a request's ``model`` into the base model and an optional adapter name.

    ``"tiny:support-bot"`` is adapter ``support-bot`` on model ``tiny``; ``"tiny"`` has no
    adapter. The split is at the last ``:``, so a base id may itself contain colons;
    an id listed in ``known_models`` is taken whole (OpenAI's ``ft:...`` ids).

    Args:
        model_id: the ``model`` field of a request.
        known_models: model ids that are never split.

    Returns:
        ``(base, adapter)``, ``adapter`` None when the id names no adapter.

    Raises:
        InvalidRequestError: empty base, or an invalid adapter name.
    """
    if model_id in known_models or ":" not in model_id:
        return model_id, None
    base, _, adapter = model_id.rpartition(":")
    if not base:
        raise InvalidRequestError(f"Invalid model id {model_id!r}: no base model before ':'.", param="model")
    return base, validate_adapter_name(adapter, param="model")


def read_metadata(adapter_dir: Path) -> AdapterMetadata:
    """Check that ``adapter_dir`` holds a trained adapter and return its metadata.

    Raises:
        InvalidRequestError: not a dir, no peft config, or missing/invalid metadata.
    """
    if not adapter_dir.is_dir():
        raise InvalidRequestError(f"Adapter dir {str(adapter_dir)!r} does not exist.", code="invalid_adapter")
    for required in (PEFT_CONFIG_FILE, METADATA_FILE):
        if not (adapter_dir / required).is_file():
            raise InvalidRequestError(
                f"{str(adapter_dir)!r} is not a trained adapter: it has no {required} "
                "(expected peft's save_pretrained output plus raygate_adapter.json from `raygate train`).",
                code="invalid_adapter",
            )
    try:
        return AdapterMetadata.model_validate_json((adapter_dir / METADATA_FILE).read_bytes())
    except ValidationError as exc:
        raise InvalidRequestError(
            f"{str(adapter_dir / METADATA_FILE)!r} is not valid adapter metadata: {exc.errors()[0]['msg']} "
            f"at {'.'.join(map(str, exc.errors()[0]['loc'])) or 'top level'}.",
            code="invalid_adapter",
        ) from exc


class AdapterRegistry:
    """The adapters registered under a data dir; safe to use from several processes.

    Args:
        data_dir: raygate's data dir; the registry lives in ``<data_dir>/adapters/``.
    """

    def __init__(self, data_dir: str | Path) -> None:
        self.root = Path(data_dir).expanduser().resolve() / "adapters"
        self.file = self.root / REGISTRY_FILE

    def list(self) -> builtins.list[AdapterEntry]:
        """Return every entry, sorted by name."""
        return sorted(self._read().adapters.values(), key=lambda entry: entry.name)

    def get(self, name: str) -> AdapterEntry:
        """Return one entry.

        Raises:
            InvalidRequestError: invalid name.
            NotFoundError: no adapter by that name.
        """
        validate_adapter_name(name)
        entry = self._read().adapters.get(name)
        if entry is None:
            raise self._not_found(name)
        return entry

    def register(self, name: str, adapter_dir: str | Path, *, overwrite: bool = False) -> AdapterEntry:
        """Copy a trained adapter into the registry under ``name``.

        The copy is made before the lock is taken (it can be large) and renamed into
        place under it, so a failed or refused register leaves nothing behind.

        Args:
            name: the adapter's name.
            adapter_dir: the trainer's output dir.
            overwrite: replace an adapter registered under the same name. Its
                ``loaded_on`` is kept: it records what the gateway holds.

        Returns:
            The new entry.

        Raises:
            InvalidRequestError: invalid name, not an adapter dir, or the name is taken.
        """
        validate_adapter_name(name)
        source = Path(adapter_dir).expanduser().resolve()
        metadata = read_metadata(source)
        if not overwrite and name in self._read().adapters:
            raise self._exists(name)
        self.root.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{name}.new-", dir=self.root))
        trash = Path(tempfile.mkdtemp(prefix=f".{name}.old-", dir=self.root))
        try:
            shutil.copytree(source, staging / name)
            target = self.root / name
            with self._locked() as registry:
                previous = registry.adapters.get(name)
                if previous is not None and not overwrite:
                    raise self._exists(name)
                if target.exists():  # the previous copy, or an orphan of a crashed register
                    os.replace(target, trash / name)
                os.replace(staging / name, target)
                entry = AdapterEntry(
                    name=name,
                    path=str(target),
                    registered_at=time.time(),
                    loaded_on=previous.loaded_on if previous else [],
                    **metadata.model_dump(),
                )
                registry.adapters[name] = entry
                self._write(registry)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
            shutil.rmtree(trash, ignore_errors=True)
        logger.info("Registered adapter %s (base %s)", name, entry.base_model)
        return entry

    def remove(self, name: str, *, force: bool = False) -> AdapterEntry:
        """Unregister an adapter and delete its copy.

        Args:
            name: the adapter's name.
            force: remove it even while a model has it loaded.

        Returns:
            The removed entry.

        Raises:
            InvalidRequestError: invalid name, or loaded somewhere and not ``force``.
            NotFoundError: no adapter by that name.
        """
        validate_adapter_name(name)
        with self._locked() as registry:
            entry = registry.adapters.get(name)
            if entry is None:
                raise self._not_found(name)
            if entry.loaded_on and not force:
                raise InvalidRequestError(
                    f"Adapter {name!r} is loaded on {', '.join(entry.loaded_on)}: unload it first.",
                    code="adapter_in_use",
                )
            del registry.adapters[name]
            self._write(registry)
            shutil.rmtree(entry.path, ignore_errors=True)
        logger.info("Removed adapter %s", name)
        return entry

    def mark_loaded(self, name: str, model: str) -> AdapterEntry:
        """Record that ``model`` has the adapter loaded (idempotent); return the entry."""
        return self._update_loaded(name, model, loaded=True)

    def mark_unloaded(self, name: str, model: str) -> AdapterEntry:
        """Record that ``model`` no longer has the adapter loaded (idempotent); return the entry."""
        return self._update_loaded(name, model, loaded=False)

    def _update_loaded(self, name: str, model: str, *, loaded: bool) -> AdapterEntry:
        validate_adapter_name(name)
        with self._locked() as registry:
            entry = registry.adapters.get(name)
            if entry is None:
                raise self._not_found(name)
            models = [m for m in entry.loaded_on if m != model]
            entry.loaded_on = sorted(models + [model]) if loaded else models
            self._write(registry)
        return entry

    def _read(self) -> _RegistryFile:
        try:
            return _RegistryFile.model_validate_json(self.file.read_bytes())
        except FileNotFoundError:
            return _RegistryFile()

    def _write(self, registry: _RegistryFile) -> None:
        # Same dir as the target, so os.replace is an atomic rename.
        fd, tmp = tempfile.mkstemp(prefix=f".{REGISTRY_FILE}.", dir=self.root)
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                f.write(registry.model_dump_json(indent=2))
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.file)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    @contextmanager
    def _locked(self) -> Iterator[_RegistryFile]:
        """Hold the writers' lock; yield the registry as read under it."""
        self.root.mkdir(parents=True, exist_ok=True)
        with open(self.root / LOCK_FILE, "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                yield self._read()
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    @staticmethod
    def _not_found(name: str) -> NotFoundError:
        return NotFoundError(f"No adapter named {name!r} is registered.", param="name", code="adapter_not_found")

    @staticmethod
    def _exists(name: str) -> InvalidRequestError:
        return InvalidRequestError(
            f"An adapter named {name!r} is already registered: pick another name or overwrite it.",
            param="name",
            code="adapter_exists",
        )
