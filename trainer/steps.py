"""The step functions the loop calls: sample, reward, score, evaluate. Each returns data or a
metrics dict; none keeps state."""

import hashlib
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


def rollout_seed(seed: int, step: int, position: int) -> int:
    """The sampling seed of the `position`-th prompt of a step: a pure function of the run's seed,
    so that rollouts are reproducible across resumes and engine restarts."""
    digest = hashlib.blake2b(f"{seed}:{step}:{position}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") % 2**31


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
                    version: int, step: int, adapter: str | None = None) -> list[Rollout]:
    r = cfg.rollout
    return pool.generate([encoded.student[e.id] for e in examples], [e.id for e in examples],
                         expected_version=version, seeds=[rollout_seed(cfg.train.seed, step, i) for i in range(len(examples))],
                         n=r.n, max_tokens=r.max_tokens, min_tokens=r.min_tokens, temperature=r.temperature,
                         top_p=r.top_p, top_k=r.top_k, adapter=adapter)


def score_on_engines(pool: EnginePool, rollouts: list[Rollout], teacher_prompts: list[list[int]],
                     topk: int, adapter: str | None = None) -> list[TeacherScores]:
    """The teacher's logprobs of the student's own completion tokens, after the teacher prompt
    (`adapter`: the vLLM LoRA adapter that plays the teacher, None = the engine's own weights)."""
    sequences = [p + r.completion_ids for p, r in zip(teacher_prompts, rollouts, strict=True)]
    return pool.score(sequences, [len(p) for p in teacher_prompts], topk, adapter=adapter)


def sample_records(step: int, examples: list[Example], rollouts: list[Rollout], scores: list[TeacherScores] | None,
                   tokenizer, rewards: list[dict[str, float]], count: int = 4) -> list[dict]:
    """The first `count` rollouts of the step as readable records for `samples.jsonl`: prompt,
    completion and its tokens, rewards (as the step computed them), and per token the student's
    sampling logprob and (when the engine scored) the teacher's logprob of that same token.
    `scores[i]` and `rewards[i]` belong to `rollouts[i]`."""
    by_id = {e.id: e for e in examples}
    chosen = rollouts[:count]
    rows = [by_id[r.example_id] for r in chosen]
    completions = tokenizer.batch_decode([r.completion_ids for r in chosen], skip_special_tokens=True)
    records = []
    for i, (rollout, example, completion) in enumerate(zip(chosen, rows, completions, strict=True)):
        values = rewards[i]
        record = {"step": step, "id": example.id, "task": example.task, "prompt": example.prompt,
                  "answer": example.answer, "completion": completion,
                  "reward": statistics.fmean(values.values()) if values else None, "rewards": values,
                  "tokens": [tokenizer.decode([t]) for t in rollout.completion_ids],
                  "student_logprobs": rollout.logprobs}
        if scores is not None:
            assert len(scores[i].token_logprobs) == len(rollout.completion_ids), "scores misaligned with rollouts"
            record["teacher_logprobs"] = scores[i].token_logprobs
        records.append(record)
    return records


def evaluate(pool: EnginePool, examples: list[Example], encoded: EncodedPrompts, tokenizer, cfg: Config, answer_fn,
             version: int, teacher: bool = False, adapter: str | None = None) -> dict[str, float]:
    """Greedy accuracy per task: `eval/<task>/accuracy` with the student prompt, or
    `eval/<task>/teacher_accuracy` with the teacher prompt."""
    if not examples:
        return {}
    ids = encoded.teacher if teacher else encoded.student
    rollouts = pool.generate([ids[e.id] for e in examples], [e.id for e in examples],
                             expected_version=version, n=1, max_tokens=cfg.rollout.max_tokens, temperature=0.0,
                             adapter=adapter)
    completions = tokenizer.batch_decode([r.completion_ids for r in rollouts], skip_special_tokens=True)
    scores = answer_fn([e.prompt for e in examples], completions, answer=[e.answer for e in examples])
    per_task = defaultdict(list)
    for example, score in zip(examples, scores, strict=True):
        if score is not None:
            per_task[example.task].append(score)
    name = "teacher_accuracy" if teacher else "accuracy"
    return {f"eval/{task}/{name}": statistics.fmean(values) for task, values in per_task.items()}


def adapter_sync(cfg: Config) -> bool:
    """LoRA with the adapter alone synced: the engines keep the base and serve adapters on it."""
    return cfg.model.lora.r > 0 and cfg.model.lora.sync == "adapter"


STUDENT_ADAPTER, TEACHER_ADAPTER = "student", "teacher"


def engine_adapters(cfg: Config) -> tuple[str | None, str | None]:
    """The vLLM adapter names the student and the teacher are served with (None = the engine's own
    weights: the base under adapter sync, otherwise whatever was last synced)."""
    if not adapter_sync(cfg):
        return None, None
    return STUDENT_ADAPTER, {"initial": None, "ema": TEACHER_ADAPTER, "live": STUDENT_ADAPTER}[cfg.teacher.weights]


def sync_weights(cfg: Config, learners, transport, students: EnginePool, teacher_engines: EnginePool | None,
                 version: int, teacher_version: int) -> None:
    """After a step: the student's weights (or adapter) to its engines; an EMA teacher's to wherever it scores."""
    if adapter_sync(cfg):
        students.sync(transport, learners.export_adapter("student"), version, adapter=STUDENT_ADAPTER)
        if cfg.teacher.weights == "ema" and cfg.teacher.scorer == "engine":
            students.sync(transport, learners.export_adapter("teacher"), teacher_version, adapter=TEACHER_ADAPTER)
        return
    students.sync(transport, learners.export("student"), version)
    if teacher_engines is not None and cfg.teacher.weights == "ema":
        teacher_engines.sync(transport, learners.export("teacher"), teacher_version)
