"""Shared fixtures. Keep minimal."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The embedded default model (default corpus, vocab, size and seed), built once per test
    session into a temporary directory. Read-only for tests: copy it before modifying."""
    from diagnose.tinymodel import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("models") / "tiny")
