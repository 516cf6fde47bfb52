"""Closed-form tests of the RL and cross-entropy terms in trainer/learner/losses.py."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch.testing import assert_close

from trainer.learner.losses import group_advantages, policy_gradient, token_cross_entropy, zero_variance_fraction


def test_group_advantages_closed_form():
    # group 1: rewards 1, 0, 0, 1 -> mean 0.5, Bessel std sqrt(1/3); group 2: all equal -> zeros
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0, 1.0])
    std = math.sqrt((4 * 0.25) / 3)
    expected = torch.tensor([0.5, -0.5, -0.5, 0.5]) / (std + 1e-4)
    got = group_advantages(rewards, 4)
    assert_close(got[:4], expected)
    assert_close(got[4:], torch.zeros(4))
    assert_close(group_advantages(rewards, 4, scale=False)[:4], torch.tensor([0.5, -0.5, -0.5, 0.5]))
    assert_close(group_advantages(torch.tensor([3.0, 1.0]), 2, eps=0.0), torch.tensor([1.0, -1.0]) / math.sqrt(2))


def test_group_advantages_skip_unscored_samples():
    nan = float("nan")
    got = group_advantages(torch.tensor([1.0, nan, 0.0, nan, nan, 2.0]), 3, eps=0.0)
    # group 1: scored 1 and 0 -> mean 0.5, std sqrt(0.5); the unscored sample gets 0
    assert_close(got[:3], torch.tensor([0.5, 0.0, -0.5]) / math.sqrt(0.5))
    assert_close(got[3:], torch.zeros(3))  # one scored sample: no baseline, no signal
    assert not torch.isnan(got).any()
    with pytest.raises(ValueError, match="groups of 4"):
        group_advantages(torch.zeros(6), 4)


def test_zero_variance_fraction():
    nan = float("nan")
    rewards = torch.tensor([1.0, 1.0, 0.0, 1.0, 0.0, 0.0, 1.0, nan])
    assert zero_variance_fraction(rewards, 2) == 0.75  # (1,1) flat, (0,1) not, (0,0) flat, (1,nan) one scored


def test_policy_gradient_value_and_gradient():
    logits = torch.tensor([[1.0, 2.0, 0.5], [0.0, 0.0, 0.0]], requires_grad=True)
    tokens = torch.tensor([1, 2])
    logp = torch.log_softmax(logits, -1).gather(1, tokens[:, None])[:, 0]
    advantage = torch.tensor([2.0, -1.0])
    loss = policy_gradient(logp, advantage)
    assert_close(loss, -advantage)  # the ratio's value is 1
    loss.sum().backward()
    p = torch.softmax(logits.detach(), -1)
    onehot = F.one_hot(tokens, 3).float()
    assert_close(logits.grad, -advantage[:, None] * (onehot - p))  # −A·∇log π
    # the importance weight π/π_old, capped
    old = logp.detach() - torch.tensor([math.log(4.0), math.log(0.5)])
    assert_close(policy_gradient(logp.detach(), advantage, old_logprob_T=old, is_cap=2.0), torch.tensor([-4.0, 0.5]))


def test_token_cross_entropy_equals_torch_and_is_chunk_invariant():
    torch.manual_seed(0)
    logits = torch.randn(7, 11, requires_grad=True)
    targets = torch.randint(0, 11, (7,))
    ours = token_cross_entropy(logits, targets, chunk_size=3)
    assert_close(ours, F.cross_entropy(logits, targets, reduction="none"))
    ours.sum().backward()
    grad = logits.grad.clone()
    logits.grad = None
    F.cross_entropy(logits, targets, reduction="sum").backward()
    assert_close(grad, logits.grad)
    # closed form: uniform logits over V give log V per token
    assert_close(token_cross_entropy(torch.zeros(2, 4), torch.tensor([0, 3])), torch.full((2,), math.log(4)))
