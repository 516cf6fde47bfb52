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
    running = os.environ.get("SELFDISTILL_TEST_RAY_ADDRESS")  # a Ray already up, e.g. on a busy machine
    if running:
        ray.init(address=running, logging_level=30)
    else:
        ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level=30)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def warm_actors(local_ray):
    """Engines and learner groups handed from one in-process run to the next one built the same way
    (`trainer.cluster.warm`, as a stage sequence does): each run then costs its steps, not the
    start-up of vLLM and DeepSpeed. A taken-over actor holds exactly what a new one would (the
    resume test compares a warm run with fresh processes' runs to 1e-6)."""
    from trainer.cluster.warm import WarmActors
    warm = WarmActors()
    yield warm
    warm.close()


@pytest.fixture(scope="session")
def vllm_engine(toy_world, local_ray):
    """One vLLM engine actor on the toy base model, for the tests that only generate or score with
    it. A test that loads other weights into it puts the base back (`restore_base`)."""
    import ray

    from rollout.engine import RolloutEngine
    from trainer.cluster.engines import CPU_ENGINE_ENV
    engine = ray.remote(RolloutEngine).options(num_cpus=0, runtime_env={"env_vars": CPU_ENGINE_ENV}).remote(
        str(toy_world / "model"), max_logprobs=20)
    ray.get(engine.version.remote())
    yield engine
    ray.kill(engine)


def restore_base(engine, toy_world):
    """The toy base model's weights back into `engine`, at policy version 0."""
    import ray
    from safetensors.torch import load_file
    ray.get(engine.load_weights.remote(load_file(toy_world / "model" / "model.safetensors"), 0))


@pytest.fixture(scope="session")
def small_eval(toy_world, tmp_path_factory) -> Path:
    """The first 48 held-out addition problems, to keep end-to-end evaluation short."""
    lines = (toy_world / "data" / "addition" / "eval.jsonl").read_text().splitlines()[:48]
    path = tmp_path_factory.mktemp("data") / "eval48.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path
