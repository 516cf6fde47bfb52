"""Reward functions in TRL's GRPO convention: f(prompts, completions, **columns) -> list[float | None]."""

from rewards.answer import answer_match

BUILTIN = {"answer_match": answer_match}
