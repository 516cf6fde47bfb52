"""The step functions the loop calls: sample, reward, score, evaluate. Each returns data or a
metrics dict; none keeps state."""

import statistics
from collections import defaultdict
from dataclasses import dataclass

from rollout.batch import Rollout, TeacherScores
from rollout.pool import EnginePool
from rollout.prompts import encode_prompt, teacher_prompt
from trainer.config import Config
from trainer.data import DataReport, Example
from trainer.errors import DataError


@dataclass(frozen=True)
class EncodedPrompts:
    """Student and teacher prompt token ids by example id."""

    student: dict[str, list[int]]
    teacher: dict[str, list[int]]


def encode_prompts(examples: list[Example], tokenizer, template: str) -> EncodedPrompts:
    """Renders and tokenizes every prompt once, before the loop, so the step does neither."""
    return EncodedPrompts(
        student={e.id: encode_prompt(e.prompt, tokenizer) for e in examples},
        teacher={e.id: encode_prompt(teacher_prompt(e.prompt, e.context, template), tokenizer) for e in examples})


def drop_overlong(examples: list[Example], encoded: EncodedPrompts, max_model_len: int, max_tokens: int,
                  on_invalid: str, report: DataReport) -> list[Example]:
    """Keeps the examples whose student and teacher prompts leave room for `max_tokens` completion
    tokens within `max_model_len`. Any other is a DataError naming its file, line and field, or, with
    on_invalid='skip', is counted in `report`. (vLLM would refuse such a prompt in the middle of a step.)"""
    budget = max_model_len - max_tokens
    kept = []
    for e in examples:
        problem = None
        for who, ids, field in (("student", encoded.student, "prompt"), ("teacher", encoded.teacher, "context")):
            if len(ids[e.id]) > budget:
                problem = (f"field '{field}': the {who} prompt is {len(ids[e.id])} tokens; with rollout.max_tokens="
                           f"{max_tokens} it does not fit model.max_model_len={max_model_len}")
                break
        if problem is None:
            kept.append(e)
        elif on_invalid == "error":
            raise DataError(f"{e.where}: {problem}")
        else:
            report.skipped.append(f"{e.where}: {problem}")
    report.kept = len(kept)
    if not kept:
        raise DataError(f"{report.path}: no valid records ({len(report.skipped)} skipped)")
    return kept


def sample_rollouts(pool: EnginePool, examples: list[Example], encoded: EncodedPrompts, cfg: Config,
                    version: int) -> list[Rollout]:
    r = cfg.rollout
    return pool.generate([encoded.student[e.id] for e in examples], [e.id for e in examples],
                         expected_version=version, n=r.n, max_tokens=r.max_tokens, temperature=r.temperature,
                         top_p=r.top_p, top_k=r.top_k)


def teacher_prompt_ids(rollouts: list[Rollout], encoded: EncodedPrompts) -> list[list[int]]:
    """The teacher prompt of each rollout's example (rollouts of one example share it)."""
    return [encoded.teacher[r.example_id] for r in rollouts]


def score_on_engines(pool: EnginePool, rollouts: list[Rollout], teacher_prompts: list[list[int]],
                     topk: int) -> list[TeacherScores]:
    """The teacher's logprobs of the student's own completion tokens, after the teacher prompt."""
    sequences = [p + r.completion_ids for p, r in zip(teacher_prompts, rollouts, strict=True)]
    return pool.score(sequences, [len(p) for p in teacher_prompts], topk)


def reward_metrics(functions: dict, examples: list[Example], rollouts: list[Rollout], tokenizer) -> dict[str, float]:
    """`reward/<name>` per function and `reward/mean` over them, skipping None (TRL's convention)."""
    by_id = {e.id: e for e in examples}
    rows = [by_id[r.example_id] for r in rollouts]
    completions = tokenizer.batch_decode([r.completion_ids for r in rollouts], skip_special_tokens=True)
    prompts = [e.prompt for e in rows]
    columns = {"answer": [e.answer for e in rows], "context": [e.context for e in rows], "task": [e.task for e in rows]}
    metrics, means = {}, []
    for name, fn in functions.items():
        values = [v for v in fn(prompts, completions, **columns) if v is not None]
        if values:
            metrics[f"reward/{name}"] = statistics.fmean(values)
            means.append(metrics[f"reward/{name}"])
    if means:
        metrics["reward/mean"] = statistics.fmean(means)
    metrics["rollout/len_mean"] = statistics.fmean(len(r.completion_ids) for r in rollouts)
    return metrics


def sample_records(step: int, examples: list[Example], rollouts: list[Rollout], scores: list[TeacherScores] | None,
                   tokenizer, count: int = 4) -> list[dict]:
    """A few rollouts as readable records for `samples.jsonl`."""
    by_id = {e.id: e for e in examples}
    records = []
    for i, rollout in enumerate(rollouts[:count]):
        example = by_id[rollout.example_id]
        record = {"step": step, "id": example.id, "prompt": example.prompt, "answer": example.answer,
                  "completion": tokenizer.decode(rollout.completion_ids, skip_special_tokens=True),
                  "student_logprobs": rollout.logprobs}
        if scores is not None:
            record["teacher_logprobs"] = scores[i].token_logprobs
        records.append(record)
    return records


def evaluate(pool: EnginePool, examples: list[Example], encoded: EncodedPrompts, tokenizer, cfg: Config, answer_fn,
             version: int, teacher: bool = False) -> dict[str, float]:
    """Greedy accuracy per task: `eval/<task>/accuracy` with the student prompt, or
    `eval/<task>/teacher_accuracy` with the teacher prompt."""
    if not examples:
        return {}
    ids = encoded.teacher if teacher else encoded.student
    rollouts = pool.generate([ids[e.id] for e in examples], [e.id for e in examples],
                             expected_version=version, n=1, max_tokens=cfg.rollout.max_tokens, temperature=0.0)
    completions = tokenizer.batch_decode([r.completion_ids for r in rollouts], skip_special_tokens=True)
    scores = answer_fn([e.prompt for e in examples], completions, answer=[e.answer for e in examples])
    per_task = defaultdict(list)
    for example, score in zip(examples, scores, strict=True):
        if score is not None:
            per_task[example.task].append(score)
    name = "teacher_accuracy" if teacher else "accuracy"
    return {f"eval/{task}/{name}": statistics.fmean(values) for task, values in per_task.items()}
