"""Reward functions in TRL's GRPO convention: f(prompts, completions, **columns) -> list[float | None].

The trainer calls each one with `prompts`, `completions` (strings, or chat messages for chat prompts),
`completion_ids`, every dataset column (`answer`, also as `solution` as TRL's math rewards expect it,
`context`, `task`, `id`, and the record's other fields), and `feedback`: a list of None, one per
completion, that a reward may fill with text for the SDPO teacher context. TRL's rewards ignore it
through their **kwargs, so they plug in unchanged by dotted path (`trl.rewards:think_format_reward`).
"""

from rewards.answer import answer_match, load_math_verify
from rewards.code import code_tests
from rewards.format import format_reward

BUILTIN = {"answer_match": answer_match, "format": format_reward, "code_tests": code_tests}


def reward_name(name: str) -> str:
    """The curve name of a configured reward: `reward/<this>`."""
    return name if name in BUILTIN else name.partition(":")[2]


def resolve(names: list[str]) -> dict:
    """Reward functions by config name: a built-in name, or `package.module:function`."""
    import importlib

    from core.errors import ConfigError
    functions = {}
    for name in names:
        if name in BUILTIN:
            functions[name] = BUILTIN[name]
            if name == "answer_match":
                load_math_verify()
            continue
        module, sep, attribute = name.partition(":")
        if not sep or not module or not attribute:
            raise ConfigError(f"rewards: unknown reward {name!r}; built-in: {', '.join(BUILTIN)}, "
                              "or give 'package.module:function'")
        try:
            function = getattr(importlib.import_module(module), attribute)
        except (ImportError, AttributeError) as e:
            raise ConfigError(f"rewards: cannot import {name!r}: {e}") from None
        if not callable(function):
            raise ConfigError(f"rewards: {name!r} is not callable")
        if attribute in functions:
            raise ConfigError(f"rewards: two rewards are named {attribute!r}; their curves would collide")
        functions[attribute] = function
    return functions
