"""How much the top-k + tail form loses (pure): the cache keeps a teacher's k most likely tokens
and the mass of the rest; spreading that mass evenly over the other V − k tokens reconstructs a
full distribution, and KL(full ‖ reconstructed) per token is what the form throws away."""

import torch


def reconstruction_kl(logprobs_TV: torch.Tensor, k: int) -> torch.Tensor:
    """KL(p ‖ p̂) per position, [T]: p̂ keeps p's top-k entries and spreads the rest of the mass
    uniformly over the other V − k tokens. The top-k terms vanish; each tail token i adds
    p_i·(log p_i − log(tail / (V − k)))."""
    logprobs_TV = logprobs_TV.double()
    vocab = logprobs_TV.shape[-1]
    if k >= vocab:
        return torch.zeros(logprobs_TV.shape[:-1], dtype=logprobs_TV.dtype)
    rest = logprobs_TV.sort(dim=-1, descending=True).values[:, k:]
    tail = torch.logsumexp(rest, dim=-1, keepdim=True)
    uniform = tail - torch.log(torch.tensor(float(vocab - k), dtype=logprobs_TV.dtype))
    return (rest.exp() * (rest - uniform)).sum(-1)
