"""`samples.jsonl`: a few of a step's rollouts as readable records."""

import statistics

from rollout.batch import Rollout, TeacherScores
from trainer.data.records import Example


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
        if scores is not None and scores[i] is not None:  # None: a learner scored it
            assert len(scores[i].token_logprobs) == len(rollout.completion_ids), "scores misaligned with rollouts"
            record["teacher_logprobs"] = scores[i].token_logprobs
        records.append(record)
    return records
