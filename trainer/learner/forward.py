"""The model forward every loss reads: logits that predict each completion token, for a batch of
prompt + completion sequences."""

import torch


def completion_logits(model, prompts: list[list[int]], completions: list[list[int]], packed: bool = False) -> torch.Tensor:
    """Logits that predict each completion token, flattened over the batch: [T_total, V], padded
    (below) or `packed` (`packed_completion_logits`); both give the same logits to float rounding.

    Padded: prompts are left-padded and completions right-padded, so every completion starts in the same
    column and `logits_to_keep` sends only the completion columns through the LM head (the [B, L, V]
    logits of whole sequences are never built). Position ids skip the left padding, as the engine
    sees no padding at all. The model's own forward runs, so models that post-process their
    logits (soft-capping, scaling) are scored as they generate. No KV cache: nothing decodes after
    this forward, and a cache would hold every layer's keys and values until it ends (under
    `no_grad`, the teacher's, memory that nothing else keeps).
    """
    if packed:
        return packed_completion_logits(model, prompts, completions)
    width_p, width_c = max(len(p) for p in prompts), max(len(c) for c in completions)
    device = next(model.parameters()).device
    input_ids = torch.zeros((len(prompts), width_p + width_c), dtype=torch.long, device=device)
    attention_mask = torch.zeros_like(input_ids)
    for row, (p, c) in enumerate(zip(prompts, completions, strict=True)):
        start = width_p - len(p)
        input_ids[row, start:width_p + len(c)] = torch.tensor(p + c, device=device)
        attention_mask[row, start:width_p + len(c)] = 1
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    # columns width_p - 1 ... width_p + width_c - 2 predict the completion tokens
    logits = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                   logits_to_keep=width_c + 1, use_cache=False).logits[:, :-1]
    return torch.cat([logits[row, :len(c)] for row, c in enumerate(completions)])


def packed_completion_logits(model, prompts: list[list[int]], completions: list[list[int]]) -> torch.Tensor:
    """`completion_logits` without padding: every prompt + completion back to back in one row,
    position ids restarting at each sequence and no attention mask. transformers then keeps each
    sequence's attention to itself (a block-diagonal causal mask under SDPA and eager, the
    variable-length kernels under flash-attention), so the cost follows the real tokens, not the
    longest sequence times the batch. Only the positions that predict a completion token go
    through the LM head (`logits_to_keep` as indices). No KV cache: with one, transformers does not
    look for packed sequences and would let them attend to each other."""
    device = next(model.parameters()).device
    ids, positions, keep = [], [], []
    for p, c in zip(prompts, completions, strict=True):
        start = len(ids) + len(p) - 1  # the prompt's last token predicts the first completion token
        keep += range(start, start + len(c))
        ids += p + c
        positions += range(len(p) + len(c))
    logits = model(input_ids=torch.tensor([ids], device=device), position_ids=torch.tensor([positions], device=device),
                   logits_to_keep=torch.tensor(keep, device=device), use_cache=False).logits
    return logits[0]


def aligned_vocabulary(teacher_logits_TV: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """An external teacher's logits over the student's `vocab_size` entries. Checkpoints of one
    family that share a tokenizer may pad their embeddings to different sizes (Qwen2.5 0.5B: 151936
    rows, 7B: 152064); the rows past the tokenizer are never produced, so a larger teacher's extra
    columns are dropped (the startup check refuses a smaller one)."""
    if teacher_logits_TV.shape[-1] < vocab_size:
        raise ValueError(f"the teacher's logits have {teacher_logits_TV.shape[-1]} entries, fewer than the "
                         f"student's {vocab_size}")
    return teacher_logits_TV[..., :vocab_size]


class WithKwargs:
    """A model whose forward adds fixed keyword arguments (here peft's per-row `adapter_names`);
    `completion_logits` reads its parameters for the device."""

    def __init__(self, forward, model):
        self._forward, self._model = forward, model

    def __call__(self, **kwargs):
        return self._forward(**kwargs)

    def parameters(self):
        return self._model.parameters()
