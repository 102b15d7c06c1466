"""Shared fixtures. Keep this small: fixtures used by one folder live in that folder's conftest."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> dict[str, Path]:
    """One tiny random model directory per family (llama, qwen2, gpt_neox, gpt2), built once per session."""
    from atman_vllm.models import FAMILIES, build_tiny_model

    root = tmp_path_factory.mktemp("tiny_models")
    return {family: build_tiny_model(family, root / family, seed=0) for family in FAMILIES}
