"""What a step trains on, from the engines: the student's samples, the frozen model's (SSD) or the
demonstrations (SFT), and the teacher's scores of them. Step functions: each returns data, none
keeps state."""

import hashlib
import math
from collections.abc import Callable

from rollout.batch import Rollout, TeacherScores
from rollout.pool import EnginePool
from trainer.config import Config
from trainer.config.implied import task_teacher
from trainer.data.prompts import EncodedPrompts
from trainer.data.records import Example


def rollout_seed(seed: int, step: int, position: int) -> int:
    """The sampling seed of the `position`-th prompt of a step: a pure function of the run's seed,
    so that rollouts are reproducible across resumes and engine restarts."""
    digest = hashlib.blake2b(f"{seed}:{step}:{position}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") % 2**31


def sample_rollouts(pool: EnginePool, examples: list[Example], encoded: EncodedPrompts, cfg: Config,
                    version: int, step: int, adapter: str | None = None) -> list[Rollout]:
    r = cfg.rollout
    return pool.generate([encoded.student[e.id] for e in examples], [e.id for e in examples],
                         expected_version=version, seeds=[rollout_seed(cfg.train.seed, step, i) for i in range(len(examples))],
                         n=r.n, max_tokens=r.max_tokens, min_tokens=r.min_tokens, temperature=r.temperature,
                         top_p=r.top_p, top_k=r.top_k, adapter=adapter)


# ------------------------------------------------------------------------------------------------
# Rollouts
# ------------------------------------------------------------------------------------------------

def collect_rollouts(cfg: Config, students: EnginePool, frozen: EnginePool | None, examples: list[Example],
                     encoded: EncodedPrompts, tokenizer, version: int, step: int,
                     adapter: str | None = None) -> list[Rollout]:
    """The completions this step trains on: the student's samples (served as `adapter` under LoRA
    adapter sync); the frozen starting model's (ssd, at policy version 0 forever); or the
    demonstrations themselves (sft). Nothing for no prompts (a step trained from a teacher cache alone)."""
    if not examples:
        return []
    if cfg.loss.mode == "sft":
        return demonstration_rollouts(examples, encoded, tokenizer, cfg.loss.sft_target, version)
    if cfg.loss.mode == "ssd":
        return sample_rollouts(frozen, examples, encoded, cfg, 0, step)
    return sample_rollouts(students, examples, encoded, cfg, version, step, adapter=adapter)


def sft_target_ids(example: Example, tokenizer, target: str) -> list[int]:
    """The completion the student should write, as token ids ending with EOS: the `answer` (the toy
    world's student writes `132<eos>` after `Q:47+85=`) or the `context` demonstration."""
    text = example.answer if target == "answer" else example.context
    if text is None:
        raise ValueError(f"{example.where}: loss.sft_target={target!r} but the record has no {target}")
    return tokenizer(text, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]


def demonstration_rollouts(examples: list[Example], encoded: EncodedPrompts, tokenizer, target: str,
                           version: int) -> list[Rollout]:
    return [Rollout(example_id=e.id, prompt_ids=encoded.student[e.id], completion_ids=sft_target_ids(e, tokenizer, target),
                    logprobs=[], policy_version=version, finish_reason="stop") for e in examples]


def drop_shortest(rollouts: list[Rollout], fraction: float) -> tuple[list[int], dict[str, float]]:
    """SSD's filter: drops floor(fraction × N) of the samples, shortest completions first (ties by
    order); returns the indices of the rest, in order."""
    count = math.floor(fraction * len(rollouts))
    by_length = sorted(range(len(rollouts)), key=lambda i: len(rollouts[i].completion_ids))
    dropped = set(by_length[:count])
    kept = [i for i in range(len(rollouts)) if i not in dropped]
    return kept, {"ssd/dropped_fraction": count / max(len(rollouts), 1),
                  "ssd/kept_len_min": float(min((len(rollouts[i].completion_ids) for i in kept), default=0))}


def score_on_engines(pool: EnginePool, rollouts: list[Rollout], teacher_prompts: list[list[int]],
                     topk: int, adapter: str | None = None) -> list[TeacherScores]:
    """The teacher's logprobs of the student's own completion tokens, after the teacher prompt
    (`adapter`: the vLLM LoRA adapter that plays the teacher, None = the engine's own weights)."""
    sequences = [p + r.completion_ids for p, r in zip(teacher_prompts, rollouts, strict=True)]
    return pool.score(sequences, [len(p) for p in teacher_prompts], topk, adapter=adapter)


def score_by_teacher(cfg: Config, rollouts: list[Rollout], teacher_prompts: list[list[int]],
                     pool_of: Callable[[str | None], EnginePool], adapter: str | None) -> list[TeacherScores | None] | None:
    """Each rollout scored by its task's teacher (`trainer.config.implied.task_teacher`) on the
    engines `pool_of(teacher.model)`, each pool on its share; None where a learner scores the
    rollout, and None when no rollout is scored on an engine. `adapter` serves the student's own
    teacher weights (an external checkpoint is its engine's own weights)."""
    rows_of: dict[str | None, list[int]] = {}
    for row, rollout in enumerate(rollouts):
        teacher = task_teacher(cfg, rollout.task)
        if teacher.scorer == "engine":
            rows_of.setdefault(teacher.model, []).append(row)
    if not rows_of:
        return None
    scores: list[TeacherScores | None] = [None] * len(rollouts)
    for model, rows in rows_of.items():
        part = score_on_engines(pool_of(model), [rollouts[i] for i in rows], [teacher_prompts[i] for i in rows],
                                cfg.loss.topk, adapter=adapter if model is None else None)
        for row, score in zip(rows, part, strict=True):
            scores[row] = score
    return scores
