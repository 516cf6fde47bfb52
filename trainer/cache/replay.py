"""Replay against forgetting: a share of each step comes from prior tasks, trained to the
distributions of the model the run starts from (the parent), in the spirit of Learning without
Forgetting. Those targets are scored once, when the run starts, into `<run dir>/replay/`, by the
run's own student engines while they still hold the parent's weights (policy version 0): the
parent samples a completion of each replayed prompt and scores it, reading exactly what the
student will read.

Two formats are replayed:
- the prior tasks' prompts (`replay.data`) as the student sees them: what the model could do;
- with `replay.teacher_format`, the prompts of the new data and of the prior tasks in the
  teacher's format (the teacher template with the record's context): the model reading its
  privileged context, which is the teacher the *next* adaptation needs.
"""

from pathlib import Path

import numpy as np

from core.errors import ConfigError
from rollout.pool import EnginePool
from rollout.prompts import encode_prompt, teacher_prompt
from trainer.cache.identity import teacher_identity
from trainer.cache.scoring import Sampling, ScoreItem, fill_cache
from trainer.cache.store import TeacherCache, read_manifest
from trainer.config import Config
from trainer.config.implied import task_teacher
from trainer.data.records import Example, fingerprint, load_examples

PLAIN = "{prompt}"
"""The parent reads what the student will read: no privileged context is added by the scorer."""


def replay_sets(cfg: Config) -> list[str]:
    data = cfg.replay.data
    return [] if not data else [data] if isinstance(data, str) else list(data)


def _drawn(examples: list[Example], count: int, seed: int, index: int) -> list[Example]:
    order = np.random.default_rng([seed, index]).permutation(len(examples))[:count]
    return [examples[i] for i in sorted(order)]


def replay_items(cfg: Config, tokenizer) -> tuple[list[ScoreItem], dict]:
    """The prompts to replay, and what they are (for the identity): each prior set's prompts in the
    student's format, then, with `teacher_format`, the new data's and each prior set's in the teacher's."""
    items, described = [], {}
    formats = [(path, "student") for path in replay_sets(cfg)]
    if cfg.replay.teacher_format:
        formats += [(path, "teacher") for path in [cfg.data.train, *replay_sets(cfg)]]
    for index, (path, form) in enumerate(formats):
        examples, _ = load_examples(path, cfg.data.columns, cfg.data.on_invalid)
        drawn = _drawn(examples, cfg.replay.prompts, cfg.train.seed, index)
        described[f"{form}:{path}"] = {"fingerprint": fingerprint(examples), "prompts": len(drawn)}
        for e in drawn:
            prompt = e.prompt if form == "student" else teacher_prompt(e.prompt, e.context, task_teacher(cfg, e.task).template)
            ids = encode_prompt(prompt, tokenizer)
            items.append(ScoreItem(example_id=f"replay-{form}:{e.id}", task=e.task, where=e.where, student_prompt=ids,
                                   teacher_prompt=ids, sample_prompt=ids))
    return items, described


def replay_cache(cfg: Config, run_dir: Path, tokenizer, students: EnginePool, adapter: str | None, vocab_size: int,
                 max_model_len: int, resumed: bool) -> TeacherCache:
    """The run's replay cache, scored now by the student engines at policy version 0 (the parent),
    or read back when a resumed run finished it before its first step."""
    directory = run_dir / "replay"
    items, described = replay_items(cfg, tokenizer)
    identity = teacher_identity(cfg, tokenizer, model=cfg.model.path, template=PLAIN) | {
        "completions": {"source": "samples of the teacher", "max_tokens": cfg.rollout.max_tokens,
                        "temperature": cfg.rollout.temperature, "seed": cfg.train.seed},
        "replay": described}
    if resumed and not (directory / "manifest.json").is_file() or resumed and not read_manifest(directory).get("complete"):
        raise ConfigError(f"{directory}: a resumed run needs the replay cache its start scored, and it is missing "
                          "or incomplete (the engines no longer hold the parent's weights)")
    sampling = lambda: Sampling(students, 0, cfg.rollout.max_tokens, cfg.rollout.temperature,  # noqa: E731
                                cfg.train.seed, adapter)
    fill_cache(directory, identity, items, lambda: students, cfg.loss.topk, vocab_size, max_model_len, sampling,
               score_adapter=adapter)
    return TeacherCache(directory)
