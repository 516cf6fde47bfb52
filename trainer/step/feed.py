"""Where each step's rollouts come from: sampled when the step asks (on-policy), or one step ahead
(`train.async`), so that the engines sample step t+1 while the learners train step t.

    sync:   [sample t][score t][train t][sync] [sample t+1][score t+1][train t+1][sync] …
    async:  [sample t][score t][train t     ][sync] [score t+1][train t+1 ][sync] …
                      [sample t+1 at v_t    ]       [sample t+2 at v_t+1  ]

Step t+1 is drawn before step t's update reaches the engines, so it is trained one policy version
late: the lag is at most 1, checked on every step (`check_policy_lag`), and the learners' truncated
importance weight (`loss.is_cap`) corrects for it. Sampling runs in one driver thread that only
waits on the engine actors; weights are synced only after it has finished, so an engine never
changes weights in the middle of a batch (Ray runs an actor's calls one at a time anyway).

The data sampler is advanced when a step's prompts are drawn, so a checkpoint after step t records
the sampler's state from before step t+1's draw (`sampler_state`): a resumed run draws step t+1's
prompts again (on-policy this once, at the resumed weights).
"""

from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

from core.errors import StaleRolloutError
from rollout.batch import Rollout
from trainer.data.records import Example
from trainer.data.sampler import PromptSampler

MAX_POLICY_LAG = 1
"""train.async trains on rollouts at most this many policy versions old."""


def check_policy_lag(rollout_versions: set[int], learner_version: int, max_lag: int) -> int:
    """The largest lag of a step's rollouts behind the learners' version; StaleRolloutError if it
    exceeds `max_lag` (or a rollout is from a version the learners have not reached)."""
    lags = {learner_version - v for v in rollout_versions}
    if max(lags) > max_lag or min(lags) < 0:
        raise StaleRolloutError(f"rollouts of policy versions {sorted(rollout_versions)} at learner version "
                                f"{learner_version}: the lag must be within 0..{max_lag}")
    return max(lags)


@dataclass
class _Pending:
    step: int
    examples: list[Example]
    sampler_state: dict
    future: Future


class RolloutFeed:
    """`take(step, version)` returns the step's prompts and rollouts; with `ahead`, `prefetch(step,
    version)` starts sampling a later step on the engines' current weights (`version`)."""

    def __init__(self, sampler: PromptSampler, prompts_per_step: int,
                 sample: Callable[[list[Example], int, int], list[Rollout]], ahead: bool, max_lag: int | None):
        """`sample(examples, version, step)` draws the rollouts (it blocks on the engines); `max_lag`:
        None where the rollouts carry no policy of the learners' (SSD samples a frozen model)."""
        self.sampler, self.prompts_per_step, self.sample = sampler, prompts_per_step, sample
        self.max_lag = max_lag if max_lag is None or ahead else 0
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="rollouts") if ahead else None
        self._pending: _Pending | None = None

    def _draw(self, dataset: list[Example]) -> tuple[list[Example], dict]:
        state = self.sampler.state_dict()
        return [dataset[i] for i in self.sampler.next_indices(self.prompts_per_step)], state

    def prefetch(self, dataset: list[Example], step: int, version: int) -> None:
        if self._executor is None:
            return
        examples, state = self._draw(dataset)
        future = self._executor.submit(self.sample, examples, version, step)
        self._pending = _Pending(step, examples, state, future)

    def take(self, dataset: list[Example], step: int, version: int) -> tuple[list[Example], list[Rollout], dict[str, float]]:
        """The prompts and rollouts of `step`, trained at learner version `version`, and the lag metric."""
        if self._pending is not None and self._pending.step == step:
            pending, self._pending = self._pending, None
            examples, rollouts = pending.examples, pending.future.result()
        else:
            examples, _ = self._draw(dataset)
            rollouts = self.sample(examples, version, step)
        metrics = {}
        if self.max_lag is not None and rollouts:  # none: the step trains from a teacher cache alone
            metrics["async/policy_lag"] = float(check_policy_lag({r.policy_version for r in rollouts}, version,
                                                                 self.max_lag))
        return examples, rollouts, metrics

    def wait(self) -> None:
        """Blocks until a prefetch has finished on the engines (before their weights change)."""
        if self._pending is not None:
            self._pending.future.exception()

    def sampler_state(self) -> dict:
        """The sampler's state after the last step taken (before a pending prefetch's draw)."""
        return self._pending.sampler_state if self._pending is not None else self.sampler.state_dict()

    def close(self) -> None:
        """Lets a pending prefetch finish (the engines are about to be killed) and stops the thread."""
        self.wait()
        if self._executor is not None:
            self._executor.shutdown()
