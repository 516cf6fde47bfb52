"""EnginePool: N engine actors used as one. It splits a batch into contiguous shards (one per
engine), gathers the results back in order, and checks that every rollout carries the policy
version the driver expects."""

import ray

from rollout.batch import Rollout, TeacherScores
from trainer.errors import StaleRolloutError


def shards(count: int, parts: int) -> list[slice]:
    """Contiguous, near-equal slices of range(count); the first `count % parts` are one longer."""
    base, extra = divmod(count, parts)
    bounds = [0]
    for i in range(parts):
        bounds.append(bounds[-1] + base + (i < extra))
    return [slice(a, b) for a, b in zip(bounds, bounds[1:]) if b > a]


class EnginePool:
    def __init__(self, name: str, actors: list, placement_group=None):
        self.name, self.actors, self.placement_group = name, actors, placement_group

    @property
    def named(self) -> dict[str, object]:
        return {f"{self.name}-{i}": actor for i, actor in enumerate(self.actors)}

    def _map(self, method: str, *columns: list, **kwargs) -> list:
        parts = shards(len(columns[0]), len(self.actors))
        refs = [getattr(actor, method).remote(*(c[part] for c in columns), **kwargs)
                for actor, part in zip(self.actors, parts)]
        return [item for result in ray.get(refs) for item in result]

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

    def close(self):
        """Frees the actors and their placement group (a stage sequence starts new ones)."""
        for actor in self.actors:
            ray.kill(actor)
        if self.placement_group is not None:
            ray.util.remove_placement_group(self.placement_group)

    def score(self, sequences: list[list[int]], completion_starts: list[int], topk: int,
              adapter: str | None = None) -> list[TeacherScores]:
        return self._map("score", sequences, completion_starts, topk=topk, adapter=adapter)
