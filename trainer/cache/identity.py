"""What a cache is, as its manifest's `identity` says it, and what a run expects of it."""

from trainer.cache.store import model_fingerprint, tokenizer_fingerprint
from trainer.config import Config

RUN_KEYS = ("teacher_model", "tokenizer", "template", "k")
"""The identity fields a run checks a cache against: what makes its targets the run's teacher's.
The dataset and the completions are recorded, not checked: a cache trains on its own records."""


def teacher_identity(cfg: Config, tokenizer, model: str | None = None, template: str | None = None) -> dict:
    """The run's teacher as a cache records it: its checkpoint (`teacher.model`, else the student's
    starting weights), the tokenizer, the teacher template and `loss.topk`."""
    return {"teacher_model": model_fingerprint(model or cfg.teacher.model or cfg.model.path),
            "tokenizer": tokenizer_fingerprint(tokenizer), "template": template or cfg.teacher.template,
            "k": cfg.loss.topk}
