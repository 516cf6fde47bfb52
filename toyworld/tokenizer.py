"""The toy world's character-level tokenizer.

It is a `Qwen2Tokenizer` (byte-level BPE) whose vocabulary is one token per character and whose
merge list is empty, so every character is its own token. It has to be a Qwen2Tokenizer: for a
`qwen2` model, transformers' AutoTokenizer (and so vLLM) always rebuilds the tokenizer with Qwen2's
pre-tokenizer and byte-level decoder, whatever class tokenizer_config.json names. A plain
character-level `tokenizers` model therefore loaded with its newlines silently dropped.
"""

from tokenizers import pre_tokenizers
from transformers import Qwen2Tokenizer

PAD, EOS, UNK = "<pad>", "<eos>", "<unk>"
CHARACTERS = "0123456789+-*=:,;QW \n"

# Plain-text prompts are used as they are; chat prompts join the non-assistant turns with newlines,
# and an assistant turn ends with <eos>. The generation prompt adds nothing, so a one-message chat
# renders exactly like the same plain-text prompt.
CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'assistant' -%}{{ message['content'] }}{{ eos_token }}"
    "{%- else -%}{{ message['content'] }}{%- if not loop.last -%}{{ '\n' }}{%- endif -%}{%- endif -%}"
    "{%- endfor -%}"
)


def _byte_level(char: str) -> str:
    """The byte-level BPE symbol of a character (' ' is 'Ġ', '\\n' is 'Ċ'; digits are themselves)."""
    return pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False).pre_tokenize_str(char)[0][0]


def build_tokenizer() -> Qwen2Tokenizer:
    """One token per character of CHARACTERS, after <pad>, <eos> and <unk>; ids are stable across builds."""
    vocab = {token: i for i, token in enumerate([PAD, EOS, UNK, *(_byte_level(c) for c in CHARACTERS)])}
    tokenizer = Qwen2Tokenizer(vocab=vocab, merges=[], unk_token=UNK, eos_token=EOS, pad_token=PAD,
                               padding_side="left", model_max_length=128)
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer
