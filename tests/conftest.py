"""Shared fixtures. The full toy world is built once into the same cache `make demo` uses."""

from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TOY_DIR = ROOT / ".cache" / "toyworld"


@pytest.fixture(scope="session")
def toy_world() -> Path:
    """The toy world at the calibrated recipe (about 2.5 minutes the first time, then cached)."""
    from toyworld.base import PretrainSettings
    from toyworld.prepare import prepare
    prepare(TOY_DIR, PretrainSettings())
    return TOY_DIR
