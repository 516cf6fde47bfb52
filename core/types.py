"""Types that every layer shares (the trainer, the rollout engines, the rewards)."""

Messages = list[dict[str, str]]
"""A chat prompt: `{role, content}` messages, as transformers' chat templates take them."""

CHAT_ROLES = {"system", "user", "assistant", "tool", "developer"}
