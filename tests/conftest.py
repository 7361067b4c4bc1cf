"""Shared fixtures: W&B off in unit tests, the demo assets, tiny models and tokenizers."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from tokalign.config import default_assets_dir  # noqa: E402

ASSETS = default_assets_dir()
REPO = Path(__file__).resolve().parents[1]


def need_assets() -> Path:
    if not (ASSETS / "models").is_dir():
        pytest.skip(f"demo assets not found at {ASSETS} (set TOKALIGN_ASSETS)")
    return ASSETS


@pytest.fixture
def assets() -> Path:
    return need_assets()
