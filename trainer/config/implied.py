"""What a config implies about a run's roles: whether it has a teacher, an RL term, how LoRA
weights reach the engines, and which teacher each task has and where it scores. Pure functions of the config, shared by the driver, the cluster and the
learners."""

import dataclasses

from trainer.config.sections import Config, TeacherConfig


def uses_teacher(cfg: Config) -> bool:
    return cfg.loss.mode == "distill"


def uses_rl(cfg: Config) -> bool:
    return cfg.loss.mode == "grpo" or cfg.loss.rl_coef > 0


def adapter_sync(cfg: Config) -> bool:
    """LoRA with the adapter alone synced: the engines keep the base and serve adapters on it."""
    return cfg.model.lora.r > 0 and cfg.model.lora.sync == "adapter"


def quantized_student(cfg: Config) -> bool:
    """The student is trained and served quantized (`model.quantization`)."""
    return cfg.model.quantization.scheme != "none"


def task_teacher(cfg: Config, task: str) -> TeacherConfig:
    """The teacher of a task: the `teacher` section, with what `teachers.<task>` sets instead."""
    override = cfg.teachers.get(task)
    if override is None:
        return cfg.teacher
    return dataclasses.replace(cfg.teacher, **{k: v for k, v in dataclasses.asdict(override).items() if v is not None})


def all_teachers(cfg: Config) -> list[TeacherConfig]:
    """The `teacher` section and every task's teacher (a run's data may use any of them)."""
    return [cfg.teacher] + [task_teacher(cfg, task) for task in cfg.teachers]


def colocated(cfg: Config) -> bool:
    """The learner ranks host the student's engines, and its own teacher weights' (`rollout.colocate`)."""
    return cfg.rollout.colocate


def cache_source(cfg: Config) -> str | None:
    """Where a step's cached records come from: a teacher cache (`teacher.cache`), the run's replay
    cache (`replay`), or nowhere (None)."""
    if cfg.teacher.cache is not None:
        return "teacher.cache"
    return "replay" if cfg.replay.fraction > 0 else None


def cached_prompts(cfg: Config) -> int:
    """The prompts of each step drawn from the cache (one cached completion each)."""
    source = cache_source(cfg)
    if source is None:
        return 0
    fraction = cfg.teacher.cache_fraction if source == "teacher.cache" else cfg.replay.fraction
    return round(fraction * cfg.train.prompts_per_step)


def on_policy_prompts(cfg: Config) -> int:
    """The prompts of each step sampled on-policy (`rollout.n` completions each)."""
    return cfg.train.prompts_per_step - cached_prompts(cfg)


def scores_live(cfg: Config) -> bool:
    """Some rollout is scored by a live teacher: there is a teacher, and a step samples on-policy."""
    return uses_teacher(cfg) and on_policy_prompts(cfg) > 0


def needs_teacher_engine(cfg: Config) -> bool:
    """A separate engine (colocated: one in each learner rank) holds the student's own teacher weights
    (`teacher.weights`, shared by every teacher without a `model`) when the engine scores them and
    they are not live, unless the student engines can serve them as an adapter (or no adapter: the base)."""
    return (cfg.teacher.weights in ("initial", "ema") and not adapter_sync(cfg)
            and own_teacher_scored_on_engines(cfg))


def own_teacher_scored_on_engines(cfg: Config) -> bool:
    """Some task's teacher is the student's own weights, scored by an engine (on live rollouts:
    training from a cache alone scores nothing)."""
    return scores_live(cfg) and any(t.model is None and t.scorer == "engine" for t in all_teachers(cfg))


def own_teacher_on_learners(cfg: Config) -> bool:
    """Each learner holds a copy of the student's own teacher weights: to score them (initial, or
    an EMA), to keep the EMA up to date, or for its colocated teacher engine to serve."""
    return uses_teacher(cfg) and (cfg.teacher.weights == "ema" or any(
        t.model is None and t.scorer == "learner" and t.weights == "initial" for t in all_teachers(cfg))
        or (colocated(cfg) and needs_teacher_engine(cfg)))


def external_models(cfg: Config, scorer: str | None = None) -> list[str]:
    """The other checkpoints that teach some task with `scorer` (None: with either), in a fixed
    order: each has an engine of its own (`engine`) or a frozen copy on every learner (`learner`)."""
    if not uses_teacher(cfg):
        return []
    return sorted({t.model for t in all_teachers(cfg) if t.model is not None and scorer in (None, t.scorer)})


def external_role(cfg: Config, model: str) -> str:
    """The engine role of an external teacher checkpoint: `teacher-1`, `teacher-2`, … (`teacher` is
    the student's own teacher weights)."""
    return f"teacher-{external_models(cfg, 'engine').index(model) + 1}"


def engine_model(cfg: Config, role: str) -> tuple[str, str | None]:
    """The (model path, tokenizer path) an engine of `role` loads: an external teacher's engine its
    checkpoint (with the tokenizer saved in it); every other engine the student's."""
    if role.startswith("teacher-"):
        return external_models(cfg, "engine")[int(role.removeprefix("teacher-")) - 1], None
    return cfg.model.path, cfg.model.tokenizer
