"""The strict base of every config model (its own module so sub-configs can import it freely)."""

from __future__ import annotations

from pathlib import Path

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
