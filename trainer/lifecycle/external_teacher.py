"""Another checkpoint as the teacher (`teacher.model`): what a run checks before it starts. The
student's tokens are scored by the teacher id for id, so both must read ids the same way: the same
tokenizer vocabulary, and a teacher whose logits cover every row of the student's."""

from pathlib import Path

from transformers import AutoConfig, AutoTokenizer

from core.errors import ConfigError
from trainer.config import Config


def vocabulary_difference(student: dict[str, int], teacher: dict[str, int]) -> str | None:
    """The first token id the two vocabularies (token → id) read differently, in words; None when
    they are the same."""
    student_by_id, teacher_by_id = ({i: t for t, i in vocab.items()} for vocab in (student, teacher))
    for token_id in sorted(student_by_id.keys() | teacher_by_id.keys()):
        mine, theirs = student_by_id.get(token_id), teacher_by_id.get(token_id)
        if mine != theirs:
            return (f"token id {token_id} is {mine!r} for the student and {theirs!r} for the teacher "
                    f"(vocabularies of {len(student)} and {len(teacher)} tokens)")
    return None


def check_external_teacher(cfg: Config, path: str, student_tokenizer) -> None:
    """Refuses a teacher checkpoint (`teacher.model`, `teachers.<task>.model`) that can't score the
    student's tokens: a missing checkpoint, another tokenizer (naming the first token that differs),
    or fewer logit rows than the student has."""
    if not (Path(path) / "config.json").is_file():
        raise ConfigError(f"teacher checkpoint {path!r} (teacher.model) is not a checkpoint directory (no config.json there)")
    difference = vocabulary_difference(student_tokenizer.get_vocab(), AutoTokenizer.from_pretrained(path).get_vocab())
    if difference is not None:
        raise ConfigError(f"teacher checkpoint {path} (teacher.model) does not share the student's tokenizer "
                          f"({cfg.model.tokenizer or cfg.model.path}): {difference}")
    student_rows = AutoConfig.from_pretrained(cfg.model.path).vocab_size
    teacher_rows = AutoConfig.from_pretrained(path).vocab_size
    if teacher_rows < student_rows:
        raise ConfigError(f"teacher checkpoint {path} (teacher.model) has {teacher_rows} vocabulary rows, fewer than the student's "
                          f"{student_rows}: its logits can't cover the student's")
