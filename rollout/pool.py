"""EnginePool: N engine actors used as one. It splits a batch into contiguous shards (one per
engine), gathers the results back in order, and checks that every rollout carries the policy
version the driver expects.

Engines die (a lost node, an OOM kill). Ray restarts an engine actor (`rollout.max_restarts`), and
the restarted one has loaded the base model at version 0, so the pool remembers the last weights it
synced and their version, pushes them into the restarted engine, and redoes the shard that engine
lost. Nothing else is redone and every prompt's results come back exactly once, in order.
"""

import logging
import time

import ray
from ray.exceptions import RayActorError

from core.errors import EngineDiedError, StaleRolloutError
from rollout.batch import Rollout, TeacherScores

logger = logging.getLogger(__name__)

RESTART_TIMEOUT_S = 600
"""How long a dead engine may take to come back (a restart loads the model again)."""


def shards(count: int, parts: int) -> list[slice]:
    """Contiguous, near-equal slices of range(count); the first `count % parts` are one longer."""
    base, extra = divmod(count, parts)
    bounds = [0]
    for i in range(parts):
        bounds.append(bounds[-1] + base + (i < extra))
    return [slice(a, b) for a, b in zip(bounds, bounds[1:]) if b > a]


class EnginePool:
    def __init__(self, name: str, actors: list, max_restarts: int = 0, placement_group=None, cpu_share=None):
        self.name, self.actors, self.max_restarts, self.placement_group = name, actors, max_restarts, placement_group
        self.cpu_share = cpu_share
        """How the actors were started on a CPU (`trainer.cluster.placement.CpuShare`; None on GPUs or
        unknown): what decides whether another run can take them over (`trainer.cluster.warm`)."""
        self.weights: dict[str | None, tuple["ray.ObjectRef", int]] = {}
        """The last synced (weights, version) per adapter name (None = the full weights): what a
        restarted engine must load."""
        self.restarts: list[dict] = []
        """One record per recovered engine death, drained by the driver into its logs."""
        self._drained = 0

    @property
    def named(self) -> dict[str, object]:
        return {f"{self.name}-{i}": actor for i, actor in enumerate(self.actors)}

    def _map(self, method: str, *columns: list, **kwargs) -> list:
        parts = shards(len(columns[0]), len(self.actors))
        results: list = [None] * len(parts)
        pending = {}
        for i, part in enumerate(parts):
            pending[self._call(self.actors[i], method, *(c[part] for c in columns), **kwargs)] = i
        while pending:
            ready, _ = ray.wait(list(pending), num_returns=1)
            i = pending.pop(ready[0])
            try:
                results[i] = ray.get(ready[0])
            except RayActorError as e:
                self._recover(i, e, f"{method} of {parts[i].stop - parts[i].start} items")
                pending[self._call(self.actors[i], method, *(c[parts[i]] for c in columns), **kwargs)] = i
        return [item for result in results for item in result]

    def _call(self, actor, method: str, *args, **kwargs) -> "ray.ObjectRef":
        """One engine call: the engine actor's own method."""
        return getattr(actor, method).remote(*args, **kwargs)

    def _recover(self, i: int, error: RayActorError, lost: str):
        """Waits for Ray to restart engine i and gives it the current weights; raises if it cannot."""
        name, actor = f"{self.name}-{i}", self.actors[i]
        if _actor_id(error) not in (None, actor._actor_id.hex()):
            raise error  # another actor's failure (e.g. a learner behind a weights ref): not ours to recover
        deaths = 1 + sum(r["engine"] == name for r in self.restarts)
        if deaths > self.max_restarts:
            raise EngineDiedError(f"{name} died {deaths} time(s), more than rollout.max_restarts="
                                  f"{self.max_restarts}: {_first_line(error)}") from None
        logger.warning("%s died during %s; waiting for its restart (%d of %d): %s",
                       name, lost, deaths, self.max_restarts, _first_line(error))
        deadline = time.monotonic() + RESTART_TIMEOUT_S
        while True:  # a call made before Ray has noticed the death fails too; ask again until it is back
            try:
                ray.get(actor.version.remote())
                break
            except RayActorError as e:
                if time.monotonic() > deadline:
                    raise EngineDiedError(f"{name} died and was not back after {RESTART_TIMEOUT_S}s: "
                                          f"{_first_line(e)}") from None
                time.sleep(1.0)
        try:  # the full weights first, then the adapters on top (LoRA adapter sync keeps the base)
            for adapter, (weights, version) in sorted(self.weights.items(), key=lambda item: item[0] is not None):
                ray.get(actor.load_adapter.remote(weights, version, adapter) if adapter
                        else actor.load_weights.remote(weights, version))
        except RayActorError as e:
            raise EngineDiedError(f"{name} died and did not come back: {_first_line(e)}") from None
        version = ray.get(actor.version.remote())
        self.restarts.append({"engine": name, "lost": lost, "version": version})
        logger.warning("%s restarted at policy version %d; redoing its %s", name, version, lost)

    def sync(self, transport, weights_ref: "ray.ObjectRef", version: int, adapter: str | None = None) -> float:
        """Loads new weights (or the LoRA `adapter`) into every engine with `transport`; an engine that
        dies meanwhile is restarted and given them. Returns the seconds the sync took."""
        self.weights[adapter] = (weights_ref, version)
        while True:  # bounded: _recover raises once an engine has died more than max_restarts times
            try:
                return transport.sync(weights_ref, self.named, version, adapter=adapter)
            except RayActorError as e:
                dead = [i for i, a in enumerate(self.actors) if a._actor_id.hex() == _actor_id(e)]
                if not dead:
                    raise
                self._recover(dead[0], e, "weight sync")  # pushes the new weights; the others reload them again

    def drain_restarts(self) -> list[dict]:
        """The restarts recovered since the last call."""
        restarts, self._drained = self.restarts[self._drained:], len(self.restarts)
        return restarts

    def generate(self, prompt_ids: list[list[int]], example_ids: list[str], expected_version: int,
                 seeds: list[int] | None = None, **sampling) -> list[Rollout]:
        if seeds is None:
            rollouts = self._map("generate", prompt_ids, example_ids, **sampling)
        else:
            rollouts = self._map("generate", prompt_ids, example_ids, seeds, **sampling)
        stale = {r.policy_version for r in rollouts} - {expected_version}
        if stale:
            raise StaleRolloutError(f"{self.name} engines produced rollouts of policy versions {sorted(stale)}, "
                                    f"expected {expected_version}: a weight sync was lost")
        return rollouts

    def wait_started(self) -> None:
        """Returns once every engine has started; raises an engine's start-up error."""
        ray.get([actor.version.remote() for actor in self.actors])

    def alive(self, timeout_s: float = 60.0) -> bool:
        """Every engine answers (a pool whose engine died for good is not reused)."""
        return all_answer([actor.version.remote() for actor in self.actors], timeout_s)

    def start_over(self, transport, weights_ref: "ray.ObjectRef | None") -> None:
        """Another run takes this pool over (`trainer.cluster.warm`): it forgets the old run's synced
        weights, restarts and adapters, and loads `weights_ref` (the new run's starting weights) at
        policy version 0, as a freshly started engine would hold them. None: the engines keep the
        checkpoint they started from, never synced since (an external teacher's)."""
        self.weights, self.restarts, self._drained = {}, [], 0
        ray.get([actor.forget_adapters.remote() for actor in self.actors])
        if weights_ref is not None:
            self.sync(transport, weights_ref, 0)

    def close(self):
        """Frees the actors and their placement group (a stage sequence starts new ones)."""
        for actor in self.actors:
            ray.kill(actor)
        if self.placement_group is not None:
            ray.util.remove_placement_group(self.placement_group)

    def score(self, sequences: list[list[int]], completion_starts: list[int], topk: int,
              adapter: str | None = None) -> list[TeacherScores]:
        return self._map("score", sequences, completion_starts, topk=topk, adapter=adapter)

def all_answer(refs: list, timeout_s: float) -> bool:
    """Whether every one of these actor calls returns within `timeout_s` (none died)."""
    try:
        ray.get(refs, timeout=timeout_s)
        return True
    except (RayActorError, ray.exceptions.GetTimeoutError):
        return False


def _actor_id(error: RayActorError) -> str | None:
    actor_id = error.actor_id
    return actor_id.hex() if isinstance(actor_id, bytes) else actor_id


def _first_line(error: Exception) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__
