"""Where the actors come from: the one place that wraps `RolloutEngine` and `Learner` in
`ray.remote`, starts them, and wires the learners' process group.

Engines for the student always exist. A separate teacher engine exists when the engine scores with
weights other than the student's (`teacher.scorer=engine` with `initial` or `ema` weights); a `live`
teacher scores on the student engines themselves.
"""

import logging
import os
import socket

import ray
from ray.exceptions import RayActorError

from rollout.engine import RolloutEngine
from rollout.pool import EnginePool, shards
from trainer.config import Config, config_to_dict
from trainer.errors import LearnerDiedError
from trainer.learner import Learner

CPU_ENGINE_ENV = {"VLLM_ENABLE_V1_MULTIPROCESSING": "0", "OMP_NUM_THREADS": "1",
                  "VLLM_LOGGING_LEVEL": os.environ.get("VLLM_LOGGING_LEVEL", "WARNING")}


def start_ray(cfg: Config):
    """Joins `ray.address`, or the cluster a `ray job submit` entrypoint runs in (RAY_ADDRESS);
    otherwise starts a private local Ray. "local" matters: a bare `ray.init()` would silently join
    whatever cluster `ray start` last left running on this machine."""
    if ray.is_initialized():
        return
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    address = cfg.ray.address or os.environ.get("RAY_ADDRESS") or "local"
    ray.init(address=address, include_dashboard=False if address == "local" else None,
             logging_level=logging.WARNING, log_to_driver=True)


def _has_gpus() -> bool:
    return ray.cluster_resources().get("GPU", 0) > 0


def _actor_options(gpu: bool, env: dict | None = None) -> dict:
    # On CPU the actors share the machine's cores (they are scheduled, not reserved): a 2-core
    # laptop runs engines and learners side by side. On GPUs each actor owns one device.
    options = {"num_gpus": 1, "num_cpus": 1} if gpu else {"num_cpus": 0}
    if env:
        options["runtime_env"] = {"env_vars": env}
    return options


def build_engines(cfg: Config, count: int, name: str) -> EnginePool:
    gpu = _has_gpus()
    # A dead engine is restarted by Ray; the pool gives it the current weights and redoes its shard.
    remote = ray.remote(RolloutEngine).options(**_actor_options(gpu, None if gpu else CPU_ENGINE_ENV),
                                               max_restarts=cfg.rollout.max_restarts)
    max_len = cfg.model.max_model_len
    actors = [remote.remote(cfg.model.path, dtype=cfg.model.dtype, max_model_len=max_len,
                            seed=cfg.train.seed + i, max_logprobs=cfg.loss.topk,
                            gpu_memory_utilization=cfg.rollout.gpu_memory_utilization,
                            tokenizer=cfg.model.tokenizer)
              for i in range(count)]
    ray.get([a.version.remote() for a in actors])  # surface start-up errors here
    return EnginePool(name, actors, max_restarts=cfg.rollout.max_restarts)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


@ray.remote(num_cpus=0)
def _rendezvous() -> tuple[str, int]:
    return ray.util.get_node_ip_address(), _free_port()


class LearnerGroup:
    """The data-parallel learner ranks, driven as one."""

    def __init__(self, cfg: Config):
        gpu = _has_gpus()
        remote = ray.remote(Learner).options(**_actor_options(gpu))
        address, port = ray.get(_rendezvous.remote())
        config = config_to_dict(cfg)
        self.actors = [remote.remote(config, rank, cfg.learner.num, address, port) for rank in range(cfg.learner.num)]
        self._get([a.ready.remote() for a in self.actors], "start-up")

    def train_step(self, rollouts, teacher_prompts, scores, total_tokens: int) -> dict[str, float]:
        parts = shards(len(rollouts), len(self.actors))
        refs = [actor.train_step.remote(rollouts[p], teacher_prompts[p], scores[p] if scores is not None else None,
                                        total_tokens) for actor, p in zip(self.actors, parts)]
        per_rank = self._get(refs, "train_step")
        if len({m["learner/skipped"] for m in per_rank}) != 1:  # DeepSpeed decides on the global norm
            raise RuntimeError(f"learner ranks disagree on skipping the step: {[m['learner/skipped'] for m in per_rank]}")
        return merge_rank_metrics(per_rank)

    def export(self, which: str = "student") -> "ray.ObjectRef":
        """An object-store reference to rank 0's full weights (all ranks join, for ZeRO-3)."""
        refs = [actor.export_weights.remote(which) for actor in self.actors]
        # The other ranks return None; rank 0's weights stay in the object store, and a cheap call
        # after them tells whether rank 0 is still alive, without fetching the weights here.
        self._get(refs[1:] + [self.actors[0].ready.remote()], "export_weights", ranks=[*range(1, len(refs)), 0])
        return refs[0]

    def save_pretrained(self, directory: str):
        self._get([actor.save_pretrained.remote(directory) for actor in self.actors], "save_pretrained")

    def _get(self, refs: list, what: str, ranks: list[int] | None = None) -> list:
        """ray.get of one call per rank (`ranks`, default 0..N-1), in order. A dead rank stops the
        run at once, named: the others may be blocked in a collective waiting for it."""
        ranks = list(range(len(refs))) if ranks is None else ranks
        pending = {ref: (i, rank) for i, (ref, rank) in enumerate(zip(refs, ranks, strict=True))}
        results = [None] * len(refs)
        while pending:
            ready, _ = ray.wait(list(pending), num_returns=1)
            i, rank = pending.pop(ready[0])
            try:
                results[i] = ray.get(ready[0])
            except RayActorError as e:
                raise LearnerDiedError(f"learner rank {rank} died during {what}: "
                                       f"{str(e).strip().splitlines()[0]}") from None
        return results


def merge_rank_metrics(per_rank: list[dict[str, float]]) -> dict[str, float]:
    """Token-weighted mean of the ranks' per-token metrics; rank 0's for the rest (lr, grad norm)."""
    tokens = [m.get("tokens", 0.0) for m in per_rank]
    total = sum(tokens) or 1.0
    merged = dict(per_rank[0])
    for key in per_rank[0]:
        if key.startswith(("distill/", "health/")):
            merged[key] = sum(m.get(key, 0.0) * t for m, t in zip(per_rank, tokens)) / total
    merged["tokens"] = sum(tokens)
    return merged
