"""What a config implies about a run's roles: whether it has a teacher, an RL term, and how LoRA
weights reach the engines. Pure functions of the config, shared by the driver, the cluster and the
learners."""

from trainer.config.sections import Config


def uses_teacher(cfg: Config) -> bool:
    return cfg.loss.mode == "distill"


def uses_rl(cfg: Config) -> bool:
    return cfg.loss.mode == "grpo" or cfg.loss.rl_coef > 0


def adapter_sync(cfg: Config) -> bool:
    """LoRA with the adapter alone synced: the engines keep the base and serve adapters on it."""
    return cfg.model.lora.r > 0 and cfg.model.lora.sync == "adapter"


def needs_teacher_engine(cfg: Config) -> bool:
    """A separate engine holds the teacher's weights when the engine scores with non-live weights,
    unless the student engines can serve them as an adapter (or no adapter: the base)."""
    return (uses_teacher(cfg) and cfg.teacher.scorer == "engine" and cfg.teacher.weights in ("initial", "ema")
            and not adapter_sync(cfg))
