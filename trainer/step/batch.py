"""What each `loss.mode` makes of a step's rollouts before the learner step: their rewards, group
advantages, the teacher prompts (dataset or sibling contexts) and SSD's length filter. Step
functions: each returns data and metrics, none keeps state.

    distill  rollouts of the student → teacher prompts (dataset context, or a successful sibling's)
             [+ rl_coef × GRPO term on the group advantages]
    grpo     rollouts of the student → group advantages → policy gradient alone
    ssd      samples of the frozen starting model → drop the shortest fraction → cross-entropy
    sft      the record's demonstration + EOS (nothing sampled) → cross-entropy
"""

import dataclasses
import math
import statistics
from dataclasses import dataclass

import torch

from rollout.batch import Rollout
from rollout.prompts import encode_prompt, teacher_prompt
from trainer.config import Config
from trainer.config.implied import task_teacher, uses_rl, uses_teacher
from trainer.data.prompts import EncodedPrompts
from trainer.data.records import Example
from trainer.learner import losses
from trainer.step.rollouts import drop_shortest

# ------------------------------------------------------------------------------------------------
# Rewards
# ------------------------------------------------------------------------------------------------

@dataclass
class RewardTable:
    """Every reward function's value per rollout (None = skipped), their sum (NaN where all skipped)
    and the feedback text the functions wrote through the side channel."""

    values: dict[str, list[float | None]]
    total: list[float]
    feedback: list[str | None]

    def metrics(self) -> dict[str, float]:
        """`reward/<name>` per function and `reward/mean` over them, skipping None (TRL's convention)."""
        out, means = {}, []
        for name, values in self.values.items():
            kept = [v for v in values if v is not None]
            if kept:
                out[f"reward/{name}"] = statistics.fmean(kept)
                means.append(out[f"reward/{name}"])
        if means:
            out["reward/mean"] = statistics.fmean(means)
        return out


def score_rewards(functions: dict, examples: list[Example], rollouts: list[Rollout], tokenizer) -> RewardTable:
    """Calls each reward the way TRL's GRPO trainer does: prompts, completions (text, or chat
    messages for chat prompts), completion_ids and every dataset column, plus `feedback`."""
    by_id = {e.id: e for e in examples}
    rows = [by_id[r.example_id] for r in rollouts]
    texts = tokenizer.batch_decode([r.completion_ids for r in rollouts], skip_special_tokens=True)
    completions = [[{"role": "assistant", "content": t}] if isinstance(e.prompt, list) else t
                   for t, e in zip(texts, rows, strict=True)]
    answers = [e.answer for e in rows]
    columns = {key: [e.extra.get(key) for e in rows] for key in {k for e in rows for k in e.extra}}
    columns |= {"answer": answers, "solution": answers, "context": [e.context for e in rows],
                "task": [e.task for e in rows], "id": [e.id for e in rows]}
    feedback: list[str | None] = [None] * len(rollouts)
    values = {}
    for name, fn in functions.items():
        result = list(fn(prompts=[e.prompt for e in rows], completions=completions,
                         completion_ids=[r.completion_ids for r in rollouts], feedback=feedback, **columns))
        if len(result) != len(rollouts):
            raise ValueError(f"reward {name!r} returned {len(result)} values for {len(rollouts)} completions")
        values[name] = [None if v is None else float(v) for v in result]
    total = [math.nan if all(v[i] is None for v in values.values()) else
             math.fsum(v[i] for v in values.values() if v[i] is not None) for i in range(len(rollouts))]
    return RewardTable(values, total, feedback)


# ------------------------------------------------------------------------------------------------
# Per mode: what the learner gets
# ------------------------------------------------------------------------------------------------

def with_advantages(rollouts: list[Rollout], table: RewardTable, group_size: int) -> tuple[list[Rollout], dict[str, float]]:
    """Stamps each rollout with its GRPO advantage over the `rollout.n` samples of its prompt."""
    rewards = torch.tensor(table.total, dtype=torch.float64)
    advantages = losses.group_advantages(rewards, group_size)
    metrics = {"rl/zero_variance_groups": losses.zero_variance_fraction(rewards, group_size),
               "rl/advantage_abs_mean": advantages.abs().mean().item()}
    return [dataclasses.replace(r, advantage=a) for r, a in zip(rollouts, advantages.tolist(), strict=True)], metrics


def sibling_contexts(rollouts: list[Rollout], table: RewardTable, group_size: int, texts: list[str],
                     template: str, success_reward: float) -> list[str | None]:
    """SDPO's teacher context for each rollout: a *successful other* rollout of the same group (total
    reward ≥ success_reward; the next one after it, cyclically, so that siblings are spread), plus the
    feedback on this rollout. None where no other rollout of the group succeeded."""
    contexts = []
    for i in range(len(rollouts)):
        start = i - i % group_size
        order = [start + (i - start + k) % group_size for k in range(1, group_size)]
        success = next((j for j in order if table.total[j] >= success_reward), None)  # NaN compares False
        if success is None:
            contexts.append(None)
            continue
        contexts.append(template.format(solution=texts[success], feedback=table.feedback[i] or "").strip())
    return contexts


def teacher_inputs(cfg: Config, examples: list[Example], rollouts: list[Rollout], table: RewardTable | None,
                   encoded: EncodedPrompts, tokenizer) -> tuple[list[Rollout], list[list[int]], dict[str, float]]:
    """Teacher prompt ids per rollout, and rollouts marked `distill=False` where no teacher context exists.
    Modes without a teacher get the student prompts as placeholders (the learner reads none)."""
    if not uses_teacher(cfg):
        return rollouts, [r.prompt_ids for r in rollouts], {}
    by_id = {e.id: e for e in examples}
    rollouts = [dataclasses.replace(r, task=by_id[r.example_id].task) for r in rollouts]
    if cfg.teacher.context == "dataset":
        return rollouts, [encoded.teacher[r.example_id] for r in rollouts], {}
    texts = tokenizer.batch_decode([r.completion_ids for r in rollouts], skip_special_tokens=True)
    contexts = sibling_contexts(rollouts, table, cfg.rollout.n, texts, cfg.teacher.sibling_template,
                                cfg.teacher.success_reward)
    prompts, marked = [], []
    for rollout, context in zip(rollouts, contexts, strict=True):
        example = by_id[rollout.example_id]
        if context is None:  # no loss; the dataset prompt only keeps the teacher's batch aligned
            prompts.append(encoded.teacher[rollout.example_id])
            marked.append(dataclasses.replace(rollout, distill=False))
        else:
            template = task_teacher(cfg, example.task).template
            prompts.append(encode_prompt(teacher_prompt(example.prompt, context, template), tokenizer))
            marked.append(rollout)
    missing = sum(c is None for c in contexts)
    return marked, prompts, {"teacher/no_sibling_fraction": missing / max(len(contexts), 1)}


@dataclass
class StepBatch:
    rollouts: list[Rollout]
    teacher_prompts: list[list[int]]
    metrics: dict[str, float]
    rewards: list[dict[str, float]]
    """Each rollout's reward values by function name (the skipped ones left out), for samples.jsonl."""


def prepare_batch(cfg: Config, reward_fns: dict, examples: list[Example], rollouts: list[Rollout],
                  encoded: EncodedPrompts, tokenizer) -> StepBatch:
    """Rewards and their curves, then what the mode makes of the rollouts (see the module docstring)."""
    if not rollouts:  # a step trained from a teacher cache alone
        return StepBatch([], [], {}, [])
    metrics: dict[str, float] = {}
    table = None
    rewards: list[dict[str, float]] = [{} for _ in rollouts]
    if cfg.loss.mode != "sft" and reward_fns:  # SFT trains on the demonstrations: nothing to score
        table = score_rewards(reward_fns, examples, rollouts, tokenizer)
        metrics |= table.metrics()
        rewards = [{name: values[i] for name, values in table.values.items() if values[i] is not None}
                   for i in range(len(rollouts))]
    metrics["rollout/len_mean"] = statistics.fmean(len(r.completion_ids) for r in rollouts)
    if uses_rl(cfg):
        rollouts, rl_metrics = with_advantages(rollouts, table, cfg.rollout.n)
        metrics |= rl_metrics
    if cfg.loss.mode == "ssd":
        kept, ssd_metrics = drop_shortest(rollouts, cfg.loss.ssd_drop_shortest)
        rollouts, rewards = [rollouts[i] for i in kept], [rewards[i] for i in kept]
        metrics |= ssd_metrics
    rollouts, teacher_prompts, teacher_metrics = teacher_inputs(cfg, examples, rollouts, table, encoded, tokenizer)
    return StepBatch(rollouts, teacher_prompts, metrics | teacher_metrics, rewards)
