"""The learner's DeepSpeed and optimizer settings, as pure functions of the config."""

import math

import torch

from trainer.config import Config

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def micro_steps(cfg: Config) -> int:
    """Micro-batches per optimizer step on one rank (the gradient-accumulation steps)."""
    per_rank = cfg.train.prompts_per_step * cfg.rollout.n // cfg.learner.num
    return math.ceil(per_rank / cfg.learner.micro_batch)


def deepspeed_config(cfg: Config) -> dict:
    dtype = cfg.model.dtype
    return {
        "train_micro_batch_size_per_gpu": cfg.learner.micro_batch,
        "gradient_accumulation_steps": micro_steps(cfg),
        "gradient_clipping": cfg.learner.grad_clip or 0.0,
        "zero_optimization": {"stage": cfg.learner.zero_stage},
        "bf16": {"enabled": dtype == "bfloat16"},
        "fp16": {"enabled": dtype == "float16"},
        "zero_allow_untested_optimizer": True,  # the client AdamW: nothing to compile on CPU
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }


def lr_lambda(cfg: Config):
    """Linear warm-up, then constant or cosine decay to zero at `train.steps`."""
    warmup, total, schedule = cfg.learner.warmup_steps, cfg.train.steps, cfg.learner.schedule

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        if schedule == "constant":
            return 1.0
        return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warmup) / max(1, total - warmup))))
    return factor
