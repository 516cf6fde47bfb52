"""Actors kept warm between the runs of one driver process.

Starting an engine or a learner rank is most of what a short run costs: a vLLM engine imports vLLM,
loads the model and warms up (about 10 s on a CPU, minutes on a GPU with a real model), a learner
imports DeepSpeed and joins its process group. A driver that runs several runs one after another (a
stage sequence, or a test session) hands its actors to the next run instead of killing them, when
the next run would have started them the same way:

- an engine pool is taken over when it was built with the same arguments (backend, count, dtype,
  lengths, top-k, LoRA rank, threads, seed) for a model of the same architecture and tokenizer; it
  then loads the new run's starting weights at policy version 0, through the same sync as every
  step, and forgets the old run's adapters, so it holds exactly what a freshly started one would
  (an external teacher's engine keeps its checkpoint: it is taken over only for the same files);
- a learner group is taken over when it has the same ranks and threads, and hosts in-process vLLM
  engines (`rollout.colocate` with vLLM) only if the next run does too; every rank rebuilds its
  models, optimizer and DeepSpeed engine from the new config (`Learner.configure`).

Nothing of a run's state survives into the next: weights, optimizer, scheduler, EMA teacher and RNG
seed are the new run's, and a resumed run restores its checkpoint as usual. An actor that died is
never taken over. At most `MAX_IDLE_ACTORS` wait, and on a GPU cluster a run that finds no match
frees every waiting actor first (they hold devices the new ones need).
"""

import hashlib
import json
import logging
from collections.abc import Callable
from pathlib import Path

from rollout.pool import EnginePool
from trainer.cluster.engines import build_engines, engine_lora_rank
from trainer.cluster.learners import LearnerGroup
from trainer.cluster.placement import has_gpus
from trainer.config import Config
from trainer.config.implied import engine_model

logger = logging.getLogger(__name__)

MAX_IDLE_ACTORS = 8
"""Actors waiting for a next run; the longest-waiting are freed beyond it (each vLLM engine on a CPU
holds about 1 GB)."""

# fields of config.json, generation_config.json and tokenizer_config.json that a `save_pretrained`
# export of a model writes differently from the model it loaded
_VOLATILE_KEYS = {"_name_or_path", "name_or_path", "transformers_version", "torch_dtype", "dtype", "is_local",
                  "local_files_only"}


def model_signature(model_path: str, tokenizer_path: str | None) -> str:
    """What an engine's model must share with another to be served by the same engine: the
    architecture (config.json), the generation config (its EOS) and the tokenizer, less the fields
    that a `save_pretrained` export rewrites."""
    digest = hashlib.sha256()
    files = [Path(model_path) / "config.json", Path(model_path) / "generation_config.json"]
    files += sorted(p for p in Path(tokenizer_path or model_path).glob("*")
                    if p.name.startswith(("tokenizer", "special_tokens", "vocab", "merges", "chat_template")))
    for path in files:
        if not path.is_file():
            continue
        content = path.read_bytes()
        if path.suffix == ".json":
            fields = {k: v for k, v in json.loads(content).items() if k not in _VOLATILE_KEYS}
            content = json.dumps(fields, sort_keys=True).encode()
        digest.update(path.name.encode() + b"\0" + content)
    return digest.hexdigest()


def engine_key(cfg: Config, count: int, role: str) -> tuple:
    """How an engine pool is built, less its threads (`_threads_fit`)."""
    return ("engines", cfg.rollout.backend, count, engine_lora_rank(cfg, role), cfg.model.dtype,
            cfg.model.max_model_len, cfg.loss.topk, cfg.rollout.gpu_memory_utilization, cfg.rollout.max_restarts,
            cfg.train.seed, cfg.ray.placement, model_signature(*engine_model(cfg, role))) + _own_weights(cfg, role)


def _own_weights(cfg: Config, role: str) -> tuple:
    """An external teacher's engine keeps the checkpoint it loaded (nothing is ever synced into it),
    so it is taken over only by a run of the same weights files, and as it is (`holds_own_weights`)."""
    if not holds_own_weights(role):
        return ()
    return tuple(sorted((p.name, p.stat().st_size, p.stat().st_mtime_ns)
                        for p in Path(engine_model(cfg, role)[0]).glob("*.safetensors")))


def holds_own_weights(role: str) -> bool:
    """An external teacher's engine (`teacher-<i>`, see `trainer.config.implied.external_role`)."""
    return role.startswith("teacher-")


def learner_key(cfg: Config) -> tuple:
    """How a learner group is built, less its threads (`_threads_fit`)."""
    # ranks that host in-process vLLM engines keep them until they end (`trainer.learner.colocated_engines`)
    hosts_vllm = cfg.rollout.colocate and cfg.rollout.backend == "vllm"
    return ("learners", cfg.learner.num, cfg.ray.placement, hosts_vllm)


def _threads_fit(actors: EnginePool | LearnerGroup, explicit: int | None, cfg: Config, group_size: int) -> bool:
    """Whether `actors` run the torch threads that `cfg` would start them with (always, on GPUs)."""
    return actors.cpu_share is None or actors.cpu_share.fits(cfg, explicit, group_size)


class WarmActors:
    """The idle engine pools and learner groups of a driver, by how they were built."""

    def __init__(self):
        self._idle: list[tuple[tuple, EnginePool | LearnerGroup]] = []

    def engines(self, cfg: Config, count: int, role: str) -> tuple[EnginePool, bool]:
        """An engine pool for `role`: an idle one built the same way (True: it still holds the old
        run's weights, see `EnginePool.start_over`), or a new one, still starting (False)."""
        taken = self._take(engine_key(cfg, count, role),
                           lambda pool: _threads_fit(pool, cfg.rollout.cpu_threads, cfg, count))
        if taken is not None:
            taken.name = role
            return taken, True
        return build_engines(cfg, count, role, wait=False), False

    def learners(self, cfg: Config) -> LearnerGroup:
        """A learner group for `cfg`: an idle one reconfigured for it, or a new one, still starting."""
        taken = self._take(learner_key(cfg),
                           lambda group: _threads_fit(group, cfg.learner.cpu_threads, cfg, cfg.learner.num))
        if taken is not None:
            taken.reconfigure(cfg)
            return taken
        return LearnerGroup(cfg, wait=False)

    def keep(self, key_and_actors: list[tuple[tuple, EnginePool | LearnerGroup]]) -> None:
        """After a run: its live actors wait for the next one."""
        for key, actors in key_and_actors:
            if actors.alive():
                self._idle.append((key, actors))
            else:
                actors.close()
        while sum(len(actors.actors) for _, actors in self._idle) > MAX_IDLE_ACTORS:
            self._idle.pop(0)[1].close()

    def close(self) -> None:
        """Frees every idle actor."""
        for _, actors in self._idle:
            actors.close()
        self._idle = []

    def _take(self, key: tuple, fits: Callable[[EnginePool | LearnerGroup], bool]) -> EnginePool | LearnerGroup | None:
        for i, (idle_key, actors) in enumerate(self._idle):
            if idle_key == key and fits(actors):
                return self._idle.pop(i)[1]
        if self._idle and has_gpus():
            logger.info("no waiting actors fit; freeing %d idle actor group(s) for new ones", len(self._idle))
            self.close()
        return None
