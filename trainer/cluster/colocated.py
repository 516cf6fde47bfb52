"""Engines inside the learner ranks (`rollout.colocate`): each rank samples, and as the teacher
scores, its own shard of the batch with the weights it trains, so no weights leave its process.

`ColocatedPool` is an `EnginePool` whose actors are the learner ranks: the driver's step functions
(sampling, scoring, evaluation, the stale-rollout check) use it exactly as they use engine actors.
Its calls go to `Learner.colocated(role, method, ...)`, which runs the rank's engine for the student
(`student`) or for its copy of the student's own teacher weights (`teacher`), built by
`trainer.learner.colocated_engines`. A sync is `set_version` on every rank: a transformers engine
reads the weights the optimizer just updated in place and only stamps the new policy version (an EMA
teacher's copy is updated in place the same way); an in-process vLLM engine loads them from the
rank's parameters first.

The pool owns no actors: the learner group starts, keeps and frees them. A learner rank that dies
is the run's end (`LearnerDiedError`), as it is for training.
"""

import time

import ray
from ray.exceptions import RayActorError

from core.errors import LearnerDiedError
from rollout.pool import EnginePool


class ColocatedPool(EnginePool):
    def __init__(self, role: str, learner_actors: list):
        super().__init__(role, learner_actors, max_restarts=0)
        self.role = role

    def _call(self, actor, method: str, *args, **kwargs) -> "ray.ObjectRef":
        return actor.colocated.remote(self.role, method, *args, **kwargs)

    def _recover(self, i: int, error: RayActorError, lost: str):
        raise LearnerDiedError(f"learner rank {i} died during {lost} (its colocated {self.role} engine): "
                               f"{str(error).strip().splitlines()[0]}") from None

    def sync(self, transport, weights_ref, version: int, adapter: str | None = None) -> float:
        """Every rank's engine takes the weights it serves from the rank itself: nothing goes through `transport`."""
        return self.advance(version)

    def advance(self, version: int) -> float:
        """The served modules were updated: every rank's engine serves them (reloading them, for vLLM)
        and its samples carry `version` from now on. Returns the seconds it took (the colocated sync)."""
        started = time.perf_counter()
        ray.get([self._call(actor, "set_version", version) for actor in self.actors])
        return time.perf_counter() - started

    def wait_started(self) -> None:
        """The learner group's start is the engines' start."""

    def alive(self, timeout_s: float = 60.0) -> bool:
        raise NotImplementedError("a colocated pool is never kept warm on its own: its learner group is")

    def start_over(self, transport, weights_ref) -> None:
        raise NotImplementedError("a colocated pool is never taken over: its learner group is, and rebuilds it")

    def close(self):
        """The learner group frees the actors."""
