"""Fixtures shared by the model engine tests: the tiny model, built once per session."""

from __future__ import annotations

from pathlib import Path

import pytest

from deployments.models.tiny import make_tiny_model
from serve_app.config import ModelConfig


@pytest.fixture(scope="session")
def tiny_model_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny model (seed 0), built once into a session temp dir."""
    return make_tiny_model(tmp_path_factory.mktemp("models") / "tiny", seed=0)


@pytest.fixture(scope="session")
def tiny_model_config(tiny_model_path: Path) -> ModelConfig:
    """A ``hf`` model config pointing at the tiny model by absolute path."""
    return ModelConfig(name="tiny", engine="hf", engine_params={"model_path": str(tiny_model_path)})
