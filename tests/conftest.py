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


@pytest.fixture(scope="session")
def local_ray():
    """A real local Ray for the tests that start engines and learners."""
    import os

    import ray
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level=30)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def small_eval(toy_world, tmp_path_factory) -> Path:
    """The first 48 held-out addition problems, to keep end-to-end evaluation short."""
    lines = (toy_world / "data" / "addition" / "eval.jsonl").read_text().splitlines()[:48]
    path = tmp_path_factory.mktemp("data") / "eval48.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path
