"""Where the actors run: joining or starting Ray, one placement group per group of actors (one
bundle per actor, packed onto as few nodes as possible or spread across nodes: `ray.placement`),
and each CPU actor's share of its node's cores.

On CPU the actors share their node's cores, and each takes the share of them that is free while it
computes (`cpu_threads`): in a sync step the phases run one after another, so the engines have the
cores to themselves while they sample and the learners while they train; with `train.async` the
engines sample while the learners train, and every actor gets its slice.
"""

import logging
import os
import uuid
from dataclasses import dataclass
from typing import TYPE_CHECKING

import ray
from ray.util.placement_group import PlacementGroup, placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from core.errors import SelfDistillError
from trainer.config import Config
from trainer.config.implied import external_models, needs_teacher_engine

if TYPE_CHECKING:
    from rollout.pool import EnginePool
    from trainer.cluster.learners import LearnerGroup


logger = logging.getLogger(__name__)


# An actor never writes to a terminal: a progress bar (model loading, `save_pretrained`) would reach
# the driver's log as carriage-return noise.
ACTOR_ENV = {"TQDM_DISABLE": "1", "HF_HUB_DISABLE_PROGRESS_BARS": "1"}


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


def has_gpus() -> bool:
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


def actor_options(gpu: bool, group: PlacementGroup, index: int, env: dict | None = None) -> dict:
    resources = actor_resources(gpu)
    options = {"num_cpus": resources["CPU"], "num_gpus": resources.get("GPU", 0),
               "scheduling_strategy": PlacementGroupSchedulingStrategy(group, placement_group_bundle_index=index)}
    options["runtime_env"] = {"env_vars": ACTOR_ENV | (env or {})}
    return options


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
    return cfg.rollout.engines + int(needs_teacher_engine(cfg)) + len(external_models(cfg, "engine")) + cfg.learner.num


@ray.remote(num_cpus=0)
def _node_cores() -> int:
    return len(os.sched_getaffinity(0))


@dataclass(frozen=True)
class CpuShare:
    """How a CPU group's actors were started: their torch threads, and the cores of their node."""

    threads: int
    node_cores: int

    def fits(self, cfg: Config, explicit: int | None, group_size: int) -> bool:
        """Whether `cfg` would start a group of `group_size` on this node with the same threads (the
        sharers decide only the thread count: a group of an async run, two cores split among four
        actors, runs one thread as a sync run's pair of engines does)."""
        return self.threads == cpu_threads(explicit, self.node_cores, cpu_sharers(cfg, group_size))


def group_cpu_share(cfg: Config, group: PlacementGroup, explicit: int | None, group_size: int) -> CpuShare:
    """`cpu_threads` for the actors of `group`, with the cores of the node its first bundle is on."""
    cores = ray.get(_node_cores.options(scheduling_strategy=PlacementGroupSchedulingStrategy(
        group, placement_group_bundle_index=0)).remote())
    return CpuShare(cpu_threads(explicit, cores, cpu_sharers(cfg, group_size)), cores)


def placement_report(cfg: Config, students: "EnginePool", teachers: "list[EnginePool]",
                     learners: "LearnerGroup") -> dict:
    """Where each actor really runs, asked of the actors themselves (not the placement plan):
    {"strategy", "student_engines": [{"node_ip", "node_id"}, ...], "teacher_engines", "learners"} by rank."""
    groups = {"student_engines": students.actors, "teacher_engines": [a for pool in teachers for a in pool.actors],
              "learners": learners.actors}
    ips = {node["NodeID"]: node["NodeManagerAddress"] for node in ray.nodes()}
    report = {"strategy": cfg.ray.placement}
    for name, actors in groups.items():
        node_ids = ray.get([a.__ray_call__.remote(lambda _: ray.get_runtime_context().get_node_id()) for a in actors])
        report[name] = [{"node_ip": ips.get(node_id, "?"), "node_id": node_id} for node_id in node_ids]
        if actors:
            logger.info("%s on %s", name.replace("_", " "), ", ".join(entry["node_ip"] for entry in report[name]))
    return report
