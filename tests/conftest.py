"""Shared fixtures: the default model is loaded once per test session (its weights are read-only)."""
from __future__ import annotations

import pytest

from engine.loader import Checkpoint, load_checkpoint


@pytest.fixture(scope="session")
def ckpt() -> Checkpoint:
    return load_checkpoint()
