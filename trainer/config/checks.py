"""Checks that span fields, run when a `Config` is built: impossible combinations fail when the
config loads, never in the middle of a run. Each problem is a (field path, message) pair; the
loader adds where the field was set (`file:line` or the override)."""

import re
import string
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # sections imports this module to run the checks
    from trainer.config.sections import Config


def cross_field_problems(cfg: "Config") -> list[tuple[str, str]]:
    """Checks that span fields; returns (field path, message) pairs, empty when the config is sound."""
    problems = []
    if not cfg.model.path:
        problems.append(("model.path", "is required (a directory written by save_pretrained)"))
    if not cfg.data.train and not cfg.stages:
        problems.append(("data.train", "is required (a .jsonl/.parquet file or a datasets directory)"))
    for i, stage in enumerate(cfg.stages):
        if not stage.train:
            problems.append((f"stages.{i}.train", "is required (a .jsonl/.parquet file or a datasets directory)"))
        if not re.fullmatch(r"[A-Za-z0-9._-]+", stage.name):
            problems.append((f"stages.{i}.name", f"must be letters, digits, '.', '_' or '-' (it names a directory), "
                                                 f"got {stage.name!r}"))
    names = [stage.name for stage in cfg.stages]
    for name in sorted({n for n in names if names.count(n) > 1}):
        problems.append((f"stages.{names.index(name)}.name", f"{name!r} names more than one stage"))
    problems += _teacher_problems(cfg)
    problems += _quantization_problems(cfg)
    problems += _colocation_problems(cfg)
    if cfg.rollout.min_tokens > cfg.rollout.max_tokens:
        problems.append(("rollout.min_tokens", f"must be at most rollout.max_tokens={cfg.rollout.max_tokens}, "
                                               f"got {cfg.rollout.min_tokens}"))
    if cfg.rollout.top_k == 0 or cfg.rollout.top_k < -1:
        problems.append(("rollout.top_k", f"must be -1 (off) or >= 1, got {cfg.rollout.top_k}"))
    if cfg.loss.estimator == "sampled" and cfg.loss.token_cap is not None:
        problems.append(("loss.token_cap", "caps a token's divergence; the 'sampled' estimator's per-token term is a "
                                           "policy-gradient surrogate, not a divergence: use estimator 'topk' or 'full'"))
    if cfg.loss.estimator == "sampled" and cfg.loss.divergence != "reverse_kl":
        problems.append(("loss.divergence", f"the 'sampled' estimator is the policy gradient of reverse_kl; "
                                            f"got {cfg.loss.divergence!r}: use estimator 'topk' or 'full' for it"))
    sequences = cfg.train.prompts_per_step * cfg.rollout.n
    if sequences % cfg.learner.num:
        problems.append(("learner.num", f"must divide train.prompts_per_step × rollout.n = {sequences} so that every "
                                        f"rank gets the same share, got {cfg.learner.num}"))
    problems += _objective_problems(cfg)
    problems += _cache_problems(cfg)
    if not cfg.model.lora.target_modules:
        problems.append(("model.lora.target_modules", "must name at least one module, or be [all-linear]"))
    if cfg.rollout.backend == "transformers" and cfg.model.lora.r > 0 and cfg.model.lora.sync == "adapter":
        problems.append(("model.lora.sync", "'adapter' needs vLLM's LoRA serving; rollout.backend='transformers' "
                                            "takes merged weights only: set model.lora.sync=merged"))
    if not re.fullmatch(r"[A-Za-z0-9._-]+", cfg.name):
        problems.append(("name", f"must be letters, digits, '.', '_' or '-' (it names a directory), got {cfg.name!r}"))
    return problems


def _template_fields(template: str) -> set[str]:
    try:
        return {name for _, name, _, _ in string.Formatter().parse(template) if name is not None}
    except ValueError as e:  # e.g. a lone '{'
        return {f"<{e}>"}


def _teacher_problems(cfg: "Config") -> list[tuple[str, str]]:
    """Checks of every teacher (the `teacher` section and each task's): its template, an external
    checkpoint's weights, and where it scores."""
    from trainer.config.implied import quantized_student, task_teacher
    problems = []
    teachers = [("teacher", cfg.teacher)] + [(f"teachers.{task}", task_teacher(cfg, task)) for task in cfg.teachers]
    for where, teacher in teachers:
        fields = _template_fields(teacher.template)
        quantized = quantized_student(cfg)  # the full-precision start teaches the quantized student
        if teacher.model is None and not quantized and fields != {"prompt", "context"}:
            problems.append((f"{where}.template", "must use exactly the fields {prompt} and {context} (a teacher of the "
                                                  f"student's own weights learns only from the context), got {sorted(fields)}"))
        if teacher.model is None and quantized and ("prompt" not in fields or not fields <= {"prompt", "context"}):
            problems.append((f"{where}.template", f"must use {{prompt}} and may use {{context}}, got {sorted(fields)}"))
        if teacher.model is not None and ("prompt" not in fields or not fields <= {"prompt", "context"}):
            problems.append((f"{where}.template", f"must use {{prompt}} and may use {{context}}, got {sorted(fields)}"))
        if teacher.model is not None and teacher.weights != "initial":
            problems.append((f"{where}.weights", "another checkpoint (teacher.model) is a frozen teacher: needs 'initial', "
                                                 f"got {teacher.weights!r} (ema and live are the student's own weights)"))
        if teacher.model is None and teacher.weights != cfg.teacher.weights:
            problems.append((f"{where}.weights", f"the student's own weights play one teacher per run: "
                                                 f"teacher.weights={cfg.teacher.weights!r}, got {teacher.weights!r}"))
        if cfg.loss.estimator == "full" and teacher.scorer != "learner":
            problems.append(("loss.estimator", f"'full' needs the full-vocabulary teacher of {where}.scorer='learner' "
                                               f"(got {where}.scorer={teacher.scorer!r}); the engine scorer gives only "
                                               "top-k logprobs: use estimator 'topk' or 'sampled'"))
    if cfg.loss.mode != "distill" and (cfg.teacher.model is not None or cfg.teachers):
        problems.append(("teacher.model" if cfg.teacher.model is not None else "teachers",
                         f"loss.mode={cfg.loss.mode!r} uses no teacher"))
    return problems


def _quantization_problems(cfg: "Config") -> list[tuple[str, str]]:
    """What quantization-aware training of the student does not combine with."""
    scheme = cfg.model.quantization.scheme
    if scheme == "none":
        return []
    problems = []
    if cfg.teacher.weights != "initial":
        problems.append(("teacher.weights", f"with model.quantization the teacher is the full-precision start "
                                            f"('initial'), not the quantized student: got {cfg.teacher.weights!r}"))
    for key, refused, why in (("model.lora.r", cfg.model.lora.r > 0, "LoRA on a quantized base is not supported yet"),
                              ("learner.zero_stage", cfg.learner.zero_stage == 3,
                               "ZeRO-3 with fake-quantized layers is untested: use zero_stage 2"),
                              ("loss.mode", cfg.loss.mode == "ssd", "SSD samples the frozen full-precision model")):
        if refused:
            problems.append((key, f"does not combine with model.quantization.scheme={scheme!r}: {why}"))
    return problems


def _colocation_problems(cfg: "Config") -> list[tuple[str, str]]:
    """What engines inside the learner ranks (`rollout.colocate`) do not combine with."""
    problems = []
    if cfg.rollout.sleep and not (cfg.rollout.colocate and cfg.rollout.backend == "vllm"):
        problems.append(("rollout.sleep", "needs rollout.colocate=true and rollout.backend=vllm: only an engine "
                                          "that shares the learner's device has memory to give back while it trains"))
    if not cfg.rollout.colocate:
        return problems
    for key, refused, why in (
            ("train.async", cfg.train.async_, "overlapping generation with training needs engines on devices of their "
                                              "own; colocated engines share the learner's"),
            ("loss.mode", cfg.loss.mode == "ssd", "SSD samples a frozen copy of the starting model on engines of its own"),
            ("model.lora.r", cfg.model.lora.r > 0, "colocated engines serving LoRA adapters are not built yet"),
            ("learner.zero_stage", cfg.learner.zero_stage == 3 and cfg.rollout.backend == "transformers",
             "a ZeRO-3 rank holds a shard of the weights, and a transformers engine reading it would gather them at "
             "every token: use zero_stage 2, or rollout.backend=vllm (its engines gather them once per sync)")):
        if refused:
            problems.append((key, f"does not combine with rollout.colocate=true: {why}"))
    return problems


def _objective_problems(cfg: "Config") -> list[tuple[str, str]]:
    """Checks of loss.mode, the RL term and the sibling teacher context."""
    problems = []
    mode, uses_rl = cfg.loss.mode, cfg.loss.mode == "grpo" or cfg.loss.rl_coef > 0
    if cfg.loss.rl_coef > 0 and mode != "distill":
        problems.append(("loss.rl_coef", f"adds the RL term to the distillation loss; loss.mode={mode!r} "
                                         "has none (grpo is the RL term alone)"))
    needs_groups = [what for what, on in (("the RL term", uses_rl), ("teacher.context='sibling'",
                                                                     cfg.teacher.context == "sibling")) if on]
    if needs_groups and cfg.rollout.n < 2:
        problems.append(("rollout.n", f"{' and '.join(needs_groups)} compares samples of the same prompt: "
                                      f"needs rollout.n >= 2, got {cfg.rollout.n}"))
    if needs_groups and not cfg.rewards:
        problems.append(("rewards", f"{' and '.join(needs_groups)} needs at least one reward function"))
    if cfg.teacher.context == "sibling" and mode != "distill":
        problems.append(("teacher.context", f"'sibling' builds the distillation teacher's context; "
                                            f"loss.mode={mode!r} uses no teacher"))
    fields = {name for _, name, _, _ in string.Formatter().parse(cfg.teacher.sibling_template) if name is not None}
    if "solution" not in fields or not fields <= {"solution", "feedback"}:
        problems.append(("teacher.sibling_template", f"must use {{solution}} and may use {{feedback}}, got {sorted(fields)}"))
    if cfg.train.async_ and mode == "sft":
        problems.append(("train.async", "loss.mode='sft' samples nothing: there is no generation to overlap"))
    if cfg.train.async_ and mode in ("distill", "grpo") and cfg.loss.is_cap is None:
        problems.append(("loss.is_cap", "train.async trains on rollouts one policy version old; set the truncated "
                                        "importance weight's cap that corrects for it (e.g. 2.0)"))
    if mode == "sft" and cfg.rollout.n != 1:
        problems.append(("rollout.n", f"loss.mode='sft' trains on one demonstration per prompt: needs 1, got {cfg.rollout.n}"))
    if mode == "sft" and cfg.loss.sft_target == "answer" and cfg.data.columns.answer is None:
        problems.append(("loss.sft_target", "'answer' needs data.columns.answer (it is null)"))
    return problems


def _cache_problems(cfg: "Config") -> list[tuple[str, str]]:
    """Checks of the cached share of a step: a teacher cache (`teacher.cache`) or replay."""
    from trainer.config.implied import cache_source, cached_prompts
    problems = []
    source = cache_source(cfg)
    if cfg.teacher.cache is not None and cfg.replay.fraction > 0:
        problems.append(("replay.fraction", "a run trains from one cache: teacher.cache, or replay's (set one of "
                                            "teacher.cache=null and replay.fraction=0)"))
    if source is None:
        return problems
    key = "teacher.cache_fraction" if source == "teacher.cache" else "replay.fraction"
    if cfg.loss.mode != "distill":
        problems.append((source if source == "teacher.cache" else key,
                         f"trains against a teacher's cached distributions; loss.mode={cfg.loss.mode!r} uses no teacher"))
    if cfg.loss.estimator == "full":
        problems.append(("loss.estimator", f"'full' needs every teacher's full distribution; {source} holds the top-k "
                                           "and the tail: use estimator 'topk' or 'sampled'"))
    if cached_prompts(cfg) < 1:
        problems.append((key, f"× train.prompts_per_step={cfg.train.prompts_per_step} rounds to no cached prompt"))
    if source == "replay" and not cfg.replay.data and not cfg.replay.teacher_format:
        problems.append(("replay.data", "replay.fraction > 0 with nothing to replay: give prior prompts, or keep "
                                        "replay.teacher_format=true"))
    return problems
