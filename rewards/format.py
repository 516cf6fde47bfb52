"""A cheap shaped reward: does the completion state a final answer in a recognizable form, within a
length budget? `make_format_reward` builds other regex and length rules."""

import re

from rewards.answer import completion_text, final_answer


def make_format_reward(pattern: str | None = None, *, max_chars: int | None = None, name: str = "format"):
    """A TRL-convention reward: 1.0 when the completion matches `pattern` (re.search, DOTALL; None =
    a final answer can be extracted, see `rewards.answer.final_answer`) and is at most `max_chars`
    long, else 0.0. Put `my_format = make_format_reward(r"...")` in a module and name it in config."""
    regex = re.compile(pattern, re.DOTALL) if pattern is not None else None

    def reward(prompts, completions, **columns) -> list[float]:
        out = []
        for completion in completions:
            text = completion_text(completion)
            shaped = regex.search(text) is not None if regex is not None else final_answer(text) is not None
            out.append(float(shaped and (max_chars is None or len(text) <= max_chars)))
        return out
    reward.__name__ = name
    return reward


format_reward = make_format_reward()
"""Built-in `format`: 1.0 when a final answer (\\boxed{}, '####', 'Answer:' or a number) can be read."""
