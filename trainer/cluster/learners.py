"""The learner ranks' actors: the one place that wraps `Learner` in `ray.remote`, wires their
process group, and drives them as one."""

import socket

import ray
from ray.exceptions import RayActorError
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from core.errors import LearnerDiedError
from rollout.pool import all_answer, shards
from trainer.cluster.placement import actor_options, group_cpu_share, has_gpus, place
from trainer.config import Config, config_to_dict
from trainer.config.implied import quantized_student
from trainer.learner import batching
from trainer.learner.learner import Learner
from trainer.learner.metrics import merge_rank_metrics


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


@ray.remote(num_cpus=0)
def _rendezvous() -> tuple[str, int]:
    return ray.util.get_node_ip_address(), _free_port()


class LearnerGroup:
    """The data-parallel learner ranks, driven as one. `wait=False` returns while they start, so
    that they start side by side with the engines (`wait_started`)."""

    def __init__(self, cfg: Config, wait: bool = True):
        gpu = has_gpus()
        self.group = group = place(cfg, cfg.learner.num, gpu, "learners")
        # The process group's address is rank 0's node: the rendezvous runs in rank 0's bundle.
        address, port = ray.get(_rendezvous.options(scheduling_strategy=PlacementGroupSchedulingStrategy(
            group, placement_group_bundle_index=0)).remote())
        config = config_to_dict(cfg)
        self.lora, self.save_merged = cfg.model.lora.r > 0, cfg.model.lora.save_merged
        self.quantized = quantized_student(cfg)
        self.max_tokens_per_micro_batch = cfg.learner.max_tokens_per_micro_batch
        self.cpu_share = None if gpu else group_cpu_share(cfg, group, cfg.learner.cpu_threads, cfg.learner.num)
        threads = self.cpu_share.threads if self.cpu_share else 1
        self.actors = [ray.remote(Learner).options(**actor_options(gpu, group, rank)).remote(
                           config, rank, cfg.learner.num, address, port, threads)
                       for rank in range(cfg.learner.num)]
        if wait:
            self.wait_started()

    def wait_started(self) -> None:
        """Returns once every rank has started; a rank that died meanwhile is named."""
        self._get([a.ready.remote() for a in self.actors], "start-up")

    def reconfigure(self, cfg: Config):
        """Every rank rebuilds its models, optimizer and DeepSpeed engine for another run's config
        (`trainer.cluster.warm`); the actors, their process group and their threads stay."""
        self.lora, self.save_merged = cfg.model.lora.r > 0, cfg.model.lora.save_merged
        self.quantized = quantized_student(cfg)
        self.max_tokens_per_micro_batch = cfg.learner.max_tokens_per_micro_batch
        config = config_to_dict(cfg)
        self._get([actor.configure.remote(config) for actor in self.actors], "configure")

    def alive(self, timeout_s: float = 60.0) -> bool:
        """Every rank answers (a group with a dead rank is not reused)."""
        return all_answer([actor.ready.remote() for actor in self.actors], timeout_s)

    def train_step(self, rollouts, teacher_prompts, scores, total_tokens: int) -> dict[str, float]:
        parts = self._rank_parts(rollouts)
        refs = [actor.train_step.remote([rollouts[i] for i in part], [teacher_prompts[i] for i in part],
                                        [scores[i] for i in part] if scores is not None else None, total_tokens)
                for actor, part in zip(self.actors, parts)]
        per_rank = self._get(refs, "train_step")
        if len({m["learner/skipped"] for m in per_rank}) != 1:  # DeepSpeed decides on the global norm
            raise RuntimeError(f"learner ranks disagree on skipping the step: {[m['learner/skipped'] for m in per_rank]}")
        loads = [sum(batching.sequence_length(rollouts[i]) for i in part) for part in parts]
        return merge_rank_metrics(per_rank) | {"learner/rank_token_imbalance": max(loads) * len(loads) / max(sum(loads), 1)}

    def _rank_parts(self, rollouts) -> list[list[int]]:
        """Each rank's rows of the batch: contiguous near-equal counts, or with a token budget
        near-equal token totals (`trainer.learner.batching`)."""
        if self.max_tokens_per_micro_batch is None:
            return [list(range(len(rollouts)))[part] for part in shards(len(rollouts), len(self.actors))]
        if len(rollouts) < len(self.actors):
            raise ValueError(f"{len(rollouts)} sequences can't be shared by {len(self.actors)} learner ranks with "
                             "learner.max_tokens_per_micro_batch: every rank needs one")
        return batching.balanced_rank_parts([batching.sequence_length(r) for r in rollouts], len(self.actors))

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

    def save_pretrained(self, directory: str, which: str = "master"):
        self._get([actor.save_pretrained.remote(directory, which) for actor in self.actors], "save_pretrained")

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
        (peft format); `hf/` (save_pretrained of the full-precision weights; with LoRA only when
        `model.lora.save_merged`); with `model.quantization`, `quantized/` (the quantized weights the
        engines serve, dequantized: what vLLM loads to serve the quantized student)."""
        self._get([actor.save.remote(directory) for actor in self.actors], "save")
        if self.lora:
            self.save_adapter(f"{directory}/adapter")
        if not self.lora or self.save_merged:
            self.save_pretrained(f"{directory}/hf")
        if self.quantized:
            self.save_pretrained(f"{directory}/quantized", which="student")

    def load(self, directory: str):
        self._get([actor.load.remote(directory) for actor in self.actors], "load")

    def close(self):
        """Frees the actors and their placement group (a stage sequence starts new ones)."""
        for actor in self.actors:
            ray.kill(actor)
        ray.util.remove_placement_group(self.group)
