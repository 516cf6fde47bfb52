"""The model forward every loss reads: logits that predict each completion token, for a batch of
prompt + completion sequences."""

import torch


def completion_logits(model, prompts: list[list[int]], completions: list[list[int]]) -> torch.Tensor:
    """Logits that predict each completion token, flattened over the batch: [T_total, V].

    Prompts are left-padded and completions right-padded, so every completion starts in the same
    column and `logits_to_keep` sends only the completion columns through the LM head (the [B, L, V]
    logits of whole sequences are never built). Position ids skip the left padding, as the engine
    sees no padding at all. The model's own forward runs, so models that post-process their
    logits (soft-capping, scaling) are scored as they generate.
    """
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
                   logits_to_keep=width_c + 1).logits[:, :-1]
    return torch.cat([logits[row, :len(c)] for row, c in enumerate(completions)])


class WithKwargs:
    """A model whose forward adds fixed keyword arguments (here peft's per-row `adapter_names`);
    `completion_logits` reads its parameters for the device."""

    def __init__(self, forward, model):
        self._forward, self._model = forward, model

    def __call__(self, **kwargs):
        return self._forward(**kwargs)

    def parameters(self):
        return self._model.parameters()
