"""Student and teacher prompts, rendered with the tokenizer's chat template.

The student sees the plain prompt. The teacher sees the same prompt with the privileged context
worked in by `teacher.template` (fields `{prompt}` and `{context}`). For a chat prompt the template
rewrites the content of the last user message, so system prompts and earlier turns stay as they are.
Both are followed by the *same* completion token ids, so teacher and student score identical tokens.
"""

from transformers import PreTrainedTokenizerBase

from core.types import Messages


def _is_chat(prompt: str | Messages) -> bool:
    return isinstance(prompt, list)


def teacher_prompt(prompt: str | Messages, context: str, template: str) -> str | Messages:
    """The teacher's prompt, in the same form (text or chat) as the student's."""
    if not _is_chat(prompt):
        return template.format(prompt=prompt, context=context)
    last_user = max(i for i, m in enumerate(prompt) if m["role"] == "user")
    messages = [dict(m) for m in prompt]
    messages[last_user]["content"] = template.format(prompt=messages[last_user]["content"], context=context)
    return messages


def encode_prompt(prompt: str | Messages, tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """Token ids of a prompt, ready for generation. Chat prompts go through the chat template (which
    writes its own special tokens); text prompts get the tokenizer's usual special tokens (e.g. BOS)."""
    if _is_chat(prompt):
        text = tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
        return tokenizer(text, add_special_tokens=False)["input_ids"]
    return tokenizer(prompt)["input_ids"]
