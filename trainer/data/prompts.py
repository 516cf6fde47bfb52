"""Every prompt rendered and tokenized once, before the loop: the student's and the teacher's, and
the records whose prompts leave no room for a completion."""

from collections.abc import Callable
from dataclasses import dataclass

from core.errors import DataError
from rollout.prompts import encode_prompt, teacher_prompt
from trainer.data.records import DataReport, Example


@dataclass(frozen=True)
class EncodedPrompts:
    """Student and teacher prompt token ids by example id."""

    student: dict[str, list[int]]
    teacher: dict[str, list[int]]


def encode_prompts(examples: list[Example], tokenizer, template: str | Callable[[str], str]) -> EncodedPrompts:
    """Renders and tokenizes every prompt once, before the loop, so the step does neither. `template`:
    the teacher template, or a function of the example's task that gives it (a teacher per task)."""
    template_of = template if callable(template) else lambda task: template
    return EncodedPrompts(
        student={e.id: encode_prompt(e.prompt, tokenizer) for e in examples},
        teacher={e.id: encode_prompt(teacher_prompt(e.prompt, e.context, template_of(e.task)), tokenizer)
                 for e in examples})


def drop_overlong(examples: list[Example], encoded: EncodedPrompts, max_model_len: int, max_tokens: int,
                  on_invalid: str, report: DataReport, micro_batch_tokens: int | None = None) -> list[Example]:
    """Keeps the examples whose student and teacher prompts leave room for `max_tokens` completion
    tokens within `max_model_len`, and whose student sequence fits `micro_batch_tokens` (the
    learner's token budget, for the training set). Any other is a DataError naming its file, line
    and field, or, with on_invalid='skip', is counted in `report`. (vLLM would refuse such a prompt,
    and the learner such a sequence, in the middle of a step.)"""
    budget = max_model_len - max_tokens
    kept = []
    for e in examples:
        problem = None
        for who, ids, field in (("student", encoded.student, "prompt"), ("teacher", encoded.teacher, "context")):
            if len(ids[e.id]) > budget:
                problem = (f"field '{field}': the {who} prompt is {len(ids[e.id])} tokens; with rollout.max_tokens="
                           f"{max_tokens} it does not fit model.max_model_len={max_model_len}")
                break
        if problem is None and micro_batch_tokens is not None and len(encoded.student[e.id]) + max_tokens > micro_batch_tokens:
            problem = (f"field 'prompt': the student prompt is {len(encoded.student[e.id])} tokens; with rollout.max_tokens="
                       f"{max_tokens} it does not fit learner.max_tokens_per_micro_batch={micro_batch_tokens}")
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
