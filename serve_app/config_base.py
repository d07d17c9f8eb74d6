"""The strict base of every config model (its own module so sub-configs can import it freely)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict


class BaseConfig(BaseModel):
    """Strict base: unknown keys are errors; ``from_file`` reads YAML safely."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    @classmethod
    def from_file(cls, path: str | Path) -> "BaseConfig":
        """Load and validate a YAML file."""
        with open(path, encoding="utf-8") as f:
            return cls.model_validate(yaml.load(f, Loader=yaml.SafeLoader))


class PlanTable(BaseConfig):
    """A config with one field per plan an API key can carry (``free``, ``premium``, ``enterprise``)."""

    def get(self, plan: str) -> Any:
        """Return a plan's entry by name.

        Raises:
            KeyError: not a known plan.
        """
        if plan not in type(self).model_fields:
            raise KeyError(plan)
        return getattr(self, plan)


def base_model_name(model_id: str) -> str:
    """The configured model behind ``<base>:<adapter>`` (a LoRA adapter it serves); a plain name is itself."""
    return model_id.rsplit(":", 1)[0]
