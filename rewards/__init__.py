"""Reward functions in TRL's GRPO convention: f(prompts, completions, **columns) -> list[float | None]."""

from rewards.answer import answer_match

BUILTIN = {"answer_match": answer_match}


def resolve(names: list[str]) -> dict:
    """Reward functions by config name: a built-in name, or `package.module:function`."""
    import importlib

    from trainer.errors import ConfigError
    functions = {}
    for name in names:
        if name in BUILTIN:
            functions[name] = BUILTIN[name]
            continue
        module, sep, attribute = name.partition(":")
        if not sep:
            raise ConfigError(f"rewards: unknown reward {name!r}; built-in: {', '.join(BUILTIN)}, "
                              "or give 'package.module:function'")
        try:
            functions[attribute] = getattr(importlib.import_module(module), attribute)
        except (ImportError, AttributeError) as e:
            raise ConfigError(f"rewards: cannot import {name!r}: {e}") from None
    return functions
