"""Weight transports: how the learner's new weights reach the engines.

`ObjectStoreTransport` (CPU, and any cluster): rank 0 exports a state dict; it travels through Ray's
object store once and every engine reloads it in place. With LoRA it is either the merged weights
(the same path) or the adapter alone, which the engines install on the base they keep. A GPU transport (NCCL broadcast from rank 0
into the engines, bucketed) fits the same `sync` signature.

Every sync has a deadline: an engine that does not answer in time raises `WeightSyncError` naming
it, instead of hanging the run.
"""

import time

import ray

from core.errors import WeightSyncError


class ObjectStoreTransport:
    def __init__(self, timeout_s: float):
        self.timeout_s = timeout_s

    def sync(self, weights_ref: "ray.ObjectRef", engines: dict[str, "ray.actor.ActorHandle"], version: int,
             adapter: str | None = None) -> float:
        """Loads the weights behind `weights_ref` into every engine; returns the seconds it took.
        With `adapter`, the reference holds a LoRA adapter, installed under that name on the
        engines' own base weights (`RolloutEngine.load_adapter`)."""
        started = time.perf_counter()
        pending = {(engine.load_adapter.remote(weights_ref, version, adapter) if adapter else
                    engine.load_weights.remote(weights_ref, version)): name for name, engine in engines.items()}
        ready, late = ray.wait(list(pending), num_returns=len(pending), timeout=self.timeout_s)
        if late:
            names = ", ".join(sorted(pending[ref] for ref in late))
            raise WeightSyncError(f"weight sync to version {version} timed out after {self.timeout_s:.0f}s "
                                  f"waiting for {names}")
        ray.get(ready)  # re-raises an engine's own error
        return time.perf_counter() - started
