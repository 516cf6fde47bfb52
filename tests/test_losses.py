"""Tests for trainer/learner/losses.py: closed forms, cross-checks against TRL and torch, masking, chunking,
top-k tails and the sampled-token estimator. All CPU, tiny shapes, well under a few seconds."""

import ast
import importlib.util
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch.testing import assert_close

from trainer.learner.losses import (
    KINDS,
    chunked_token_divergence,
    completion_mask,
    masked_mean,
    sampled_token_pg,
    token_divergence,
    topk_divergence,
    topk_mass,
)

P_S = [0.5, 0.5]
P_T = [0.9, 0.1]


def _lp(probs: list[float]) -> torch.Tensor:
    """[1, V] fp32 log-probs of one position."""
    return torch.tensor([probs], dtype=torch.float64).log().float()


def _logits(T: int, V: int, seed: int, scale: float = 2.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(T, V, generator=g) * scale


def _grad(loss: torch.Tensor, leaf: torch.Tensor) -> torch.Tensor:
    (g,) = torch.autograd.grad(loss, leaf, retain_graph=True)  # tests reuse graphs
    return g


# ---------------------------------------------------------------- closed forms on tiny distributions


def test_reverse_kl_closed_form():
    # KL(student‖teacher) = Σ p_S log(p_S / p_T)
    expected = 0.5 * math.log(0.5 / 0.9) + 0.5 * math.log(0.5 / 0.1)
    got = token_divergence(_lp(P_S), _lp(P_T), kind="reverse_kl")
    assert_close(got, torch.tensor([expected]))


def test_forward_kl_closed_form():
    # KL(teacher‖student) = Σ p_T log(p_T / p_S)
    expected = 0.9 * math.log(0.9 / 0.5) + 0.1 * math.log(0.1 / 0.5)
    got = token_divergence(_lp(P_S), _lp(P_T), kind="forward_kl")
    assert_close(got, torch.tensor([expected]))


def test_directions_differ_on_an_asymmetric_case():
    # A swapped direction would pass one closed-form test with the other's number: make sure they differ.
    reverse = token_divergence(_lp(P_S), _lp(P_T), kind="reverse_kl")
    forward = token_divergence(_lp(P_S), _lp(P_T), kind="forward_kl")
    assert abs(reverse.item() - forward.item()) > 0.1
    # And reverse(S, T) is forward with the roles swapped.
    assert_close(reverse, token_divergence(_lp(P_T), _lp(P_S), kind="forward_kl"))


@pytest.mark.parametrize("beta", [0.5, 0.2])
def test_jsd_closed_form_v2(beta):
    # M = β p_T + (1−β) p_S; JSD = β KL(p_T‖M) + (1−β) KL(p_S‖M)
    m0 = beta * 0.9 + (1 - beta) * 0.5
    m1 = beta * 0.1 + (1 - beta) * 0.5
    expected = beta * (0.9 * math.log(0.9 / m0) + 0.1 * math.log(0.1 / m1)) + (1 - beta) * (
        0.5 * math.log(0.5 / m0) + 0.5 * math.log(0.5 / m1)
    )
    got = token_divergence(_lp(P_S), _lp(P_T), kind="jsd", beta=beta)
    assert_close(got, torch.tensor([expected]))


def test_jsd_closed_form_v3_and_beta_is_not_mirrored():
    p_s, p_t, beta = [0.2, 0.3, 0.5], [0.7, 0.2, 0.1], 0.3
    m = [beta * t + (1 - beta) * s for s, t in zip(p_s, p_t)]
    expected = beta * (0.7 * math.log(0.7 / m[0]) + 0.2 * math.log(0.2 / m[1]) + 0.1 * math.log(0.1 / m[2])) + (
        1 - beta
    ) * (0.2 * math.log(0.2 / m[0]) + 0.3 * math.log(0.3 / m[1]) + 0.5 * math.log(0.5 / m[2]))
    got = token_divergence(_lp(p_s), _lp(p_t), kind="jsd", beta=beta)
    assert_close(got, torch.tensor([expected]))
    mirrored = token_divergence(_lp(p_s), _lp(p_t), kind="jsd", beta=1 - beta)
    assert abs(mirrored.item() - expected) > 1e-3


def test_invalid_kind_and_beta_raise():
    lp = _lp(P_S)
    with pytest.raises(ValueError, match="kind"):
        token_divergence(lp, lp, kind="kl")
    with pytest.raises(ValueError, match="kind"):
        topk_divergence(lp, lp, kind="tvd")
    with pytest.raises(ValueError, match="beta"):
        token_divergence(lp, lp, kind="jsd", beta=1.0)
    assert KINDS == ("reverse_kl", "forward_kl", "jsd")


# ---------------------------------------------------------------- cross-checks against torch and TRL


def _trl_generalized_jsd_loss():
    """`GKDTrainer.generalized_jsd_loss` from the installed TRL, without importing its module.

    In trl 1.16 GKDTrainer lives in trl.experimental.gkd.gkd_trainer (not trl.trainer.gkd_trainer), and
    importing it pulls in transformers' Trainer: ~10 s on a 2-core box. The staticmethod only needs torch
    and F, so compile its source straight from the installed file (no copy of it lives in this repo).
    """
    trl_dir = Path(importlib.util.find_spec("trl").origin).parent
    path = trl_dir / "experimental" / "gkd" / "gkd_trainer.py"
    tree = ast.parse(path.read_text())
    cls = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "GKDTrainer")
    fn = next(n for n in cls.body if isinstance(n, ast.FunctionDef) and n.name == "generalized_jsd_loss")
    fn.decorator_list = []  # drop @staticmethod: we call it as a plain function
    namespace = {"torch": torch, "F": F}
    exec(compile(ast.Module(body=[fn], type_ignores=[]), str(path), "exec"), namespace)
    return namespace["generalized_jsd_loss"]


def test_jsd_matches_trl_generalized_jsd_loss():
    trl_jsd = _trl_generalized_jsd_loss()
    student, teacher = _logits(5, 7, seed=0), _logits(5, 7, seed=1)
    s_lp, t_lp = student.log_softmax(-1), teacher.log_softmax(-1)
    for beta in (0.1, 0.5, 0.8):
        # TRL: generalized_jsd_loss(student_logits, teacher_logits, beta=β), mixture
        # M = (1−β)·p_S + β·p_T and β·KL(T‖M) + (1−β)·KL(S‖M): the same β convention as ours, not mirrored.
        # reduction="none" is per vocab entry [B, T, V]; sum the vocab to get per-token values.
        theirs = trl_jsd(student[None], teacher[None], beta=beta, reduction="none").sum(-1)[0]
        assert_close(token_divergence(s_lp, t_lp, kind="jsd", beta=beta), theirs)
        if beta != 0.5:  # JSD_0.5 is symmetric; elsewhere a mirrored β would not match
            mirrored = token_divergence(s_lp, t_lp, kind="jsd", beta=1 - beta)
            assert not torch.allclose(mirrored, theirs, atol=1e-4)
    # TRL special-cases the endpoints: β=0 → KL(teacher‖student), β=1 → KL(student‖teacher).
    assert_close(trl_jsd(student[None], teacher[None], beta=0, reduction="none").sum(-1)[0],
                 token_divergence(s_lp, t_lp, kind="forward_kl"))
    assert_close(trl_jsd(student[None], teacher[None], beta=1, reduction="none").sum(-1)[0],
                 token_divergence(s_lp, t_lp, kind="reverse_kl"))


def test_kls_match_torch_kl_div():
    s_lp, t_lp = _logits(4, 6, seed=2).log_softmax(-1), _logits(4, 6, seed=3).log_softmax(-1)
    # F.kl_div(input=log q, target=log p, log_target=True) = KL(p‖q): the target is the first argument of KL.
    forward = F.kl_div(s_lp, t_lp, reduction="none", log_target=True).sum(-1)  # KL(teacher‖student)
    reverse = F.kl_div(t_lp, s_lp, reduction="none", log_target=True).sum(-1)  # KL(student‖teacher)
    assert_close(token_divergence(s_lp, t_lp, kind="forward_kl"), forward)
    assert_close(token_divergence(s_lp, t_lp, kind="reverse_kl"), reverse)


# ---------------------------------------------------------------- fixed points, -inf, teacher detach


@pytest.mark.parametrize("kind", KINDS)
def test_zero_loss_and_gradient_when_teacher_equals_student(kind):
    logits = _logits(3, 8, seed=4).requires_grad_()
    lp = logits.log_softmax(-1)
    full = token_divergence(lp, lp.detach(), kind=kind, beta=0.3)
    assert_close(full, torch.zeros(3), atol=1e-6, rtol=0)
    assert_close(_grad(full.sum(), logits), torch.zeros(3, 8), atol=1e-6, rtol=0)

    top = lp.topk(4, dim=-1).indices
    lp_k = lp.gather(-1, top)
    for tail in (True, False):
        loss = topk_divergence(lp_k, lp_k.detach(), kind=kind, beta=0.3, tail=tail)
        assert_close(loss, torch.zeros(3), atol=1e-6, rtol=0)
        assert_close(_grad(loss.sum(), logits), torch.zeros(3, 8), atol=1e-6, rtol=0)


def test_teacher_gets_no_gradient():
    student = _logits(2, 5, seed=5).requires_grad_()
    teacher = _logits(2, 5, seed=6).requires_grad_()
    for kind in KINDS:
        loss = token_divergence(student.log_softmax(-1), teacher.log_softmax(-1), kind=kind).sum()
        assert loss.grad_fn is not None
        g_s, g_t = torch.autograd.grad(loss, [student, teacher], allow_unused=True)
        assert g_t is None and g_s.abs().sum() > 0


def test_minus_inf_logprobs_give_no_nan():
    student = _logits(3, 6, seed=7).requires_grad_()
    teacher = _logits(3, 6, seed=8)
    # Teacher masked to its top-2 (renormalized): forward KL and JSD stay finite.
    top2 = teacher.topk(2, dim=-1).indices
    masked = torch.full_like(teacher, float("-inf")).scatter(-1, top2, teacher.gather(-1, top2))
    t_lp = masked.log_softmax(-1)
    for kind in ("forward_kl", "jsd"):
        loss = token_divergence(student.log_softmax(-1), t_lp, kind=kind).sum()
        assert torch.isfinite(loss) and torch.isfinite(_grad(loss, student)).all()
    # Student with zero-probability entries: reverse KL and JSD stay finite (0·log 0 = 0).
    s_masked = student.masked_fill(torch.arange(6) >= 4, float("-inf"))
    for kind in ("reverse_kl", "jsd"):
        loss = token_divergence(s_masked.log_softmax(-1), teacher.log_softmax(-1), kind=kind).sum()
        assert torch.isfinite(loss) and torch.isfinite(_grad(loss, student)).all()
    # Both zero on the same entries: every kind is finite.
    both_t = teacher.masked_fill(torch.arange(6) >= 4, float("-inf")).log_softmax(-1)
    for kind in KINDS:
        loss = token_divergence(s_masked.log_softmax(-1), both_t, kind=kind).sum()
        assert torch.isfinite(loss) and torch.isfinite(_grad(loss, student)).all()


# ---------------------------------------------------------------- masking


def test_masked_positions_contribute_nothing():
    mask = torch.tensor([1.0, 0.0, 1.0, 0.0, 1.0])
    teacher = _logits(5, 6, seed=9).log_softmax(-1)
    base = _logits(5, 6, seed=10)
    altered = base.clone()
    altered[mask == 0] = _logits(2, 6, seed=11) * 10  # only masked positions change

    def mean_and_grad(logits):
        leaf = logits.clone().requires_grad_()
        loss = masked_mean(token_divergence(leaf.log_softmax(-1), teacher, kind="reverse_kl"), mask)
        return loss, _grad(loss, leaf)

    loss_a, grad_a = mean_and_grad(base)
    loss_b, grad_b = mean_and_grad(altered)
    assert_close(loss_a, loss_b)
    assert_close(grad_a, grad_b)
    assert (grad_a[mask == 0] == 0).all()
    # Non-finite values at masked positions are selected away, not multiplied by 0.
    values = torch.tensor([1.0, float("inf"), 3.0, float("nan"), 5.0])
    assert_close(masked_mean(values, mask.bool()), torch.tensor(3.0))


def test_all_masked_is_finite_zero():
    values = torch.tensor([2.0, 3.0, float("inf")], requires_grad=True)
    loss = masked_mean(values, torch.zeros(3))
    assert loss.item() == 0.0
    assert_close(_grad(loss, values), torch.zeros(3))


def test_completion_mask_with_skip_first():
    expected = torch.tensor(
        [
            [0, 0, 0, 1, 1, 0],  # length 5: positions 3, 4
            [0, 0, 0, 0, 0, 0],  # length 2: all inside the skipped prefix
            [0, 0, 0, 0, 0, 0],  # length 0
            [0, 0, 0, 1, 1, 1],  # length 7 > max_len: cut at max_len
        ],
        dtype=torch.float32,
    )
    assert_close(completion_mask([5, 2, 0, 7], 6, skip_first=3), expected)
    assert_close(completion_mask(torch.tensor([5, 2, 0, 7]), 6, skip_first=3), expected)
    assert_close(completion_mask([2, 4], 4), torch.tensor([[1.0, 1, 0, 0], [1, 1, 1, 1]]))


# ---------------------------------------------------------------- chunking and temperature


@pytest.mark.parametrize("kind", KINDS)
def test_chunked_equals_unchunked(kind):
    T, V, tau = 7, 11, 0.7
    student, teacher = _logits(T, V, seed=12), _logits(T, V, seed=13)
    leaf_a = student.clone().requires_grad_()
    leaf_b = student.clone().requires_grad_()
    # chunk_size 3 does not divide T = 7: chunks of 3, 3, 1.
    chunked = chunked_token_divergence(leaf_a, teacher, kind=kind, temperature=tau, beta=0.3, chunk_size=3)
    manual = token_divergence((leaf_b / tau).log_softmax(-1), (teacher / tau).log_softmax(-1), kind=kind, beta=0.3)
    assert chunked.shape == (T,)
    assert_close(chunked, manual)
    weights = torch.linspace(0.5, 2.0, T)  # a non-uniform reduction, so per-position grads are checked
    assert_close(_grad((chunked * weights).sum(), leaf_a), _grad((manual * weights).sum(), leaf_b))


def test_chunked_temperature_is_applied_and_clip_passes_through():
    student, teacher = _logits(5, 9, seed=14), _logits(5, 9, seed=15)
    at_1 = chunked_token_divergence(student, teacher, kind="forward_kl", chunk_size=2)
    at_2 = chunked_token_divergence(student, teacher, kind="forward_kl", temperature=2.0, chunk_size=2)
    assert_close(at_2, token_divergence((student / 2).log_softmax(-1), (teacher / 2).log_softmax(-1), kind="forward_kl"))
    assert not torch.allclose(at_1, at_2)
    clipped = chunked_token_divergence(student, teacher, kind="forward_kl", clip_tau=0.05, chunk_size=2)
    assert_close(
        clipped,
        token_divergence(student.log_softmax(-1), teacher.log_softmax(-1), kind="forward_kl", clip_tau=0.05),
    )


def test_chunked_bf16_logits_and_leading_dims():
    student = _logits(6, 10, seed=16).to(torch.bfloat16).reshape(2, 3, 10)
    teacher = _logits(6, 10, seed=17).to(torch.bfloat16).reshape(2, 3, 10)
    leaf = student.clone().requires_grad_()
    loss = chunked_token_divergence(leaf, teacher, kind="jsd", chunk_size=4)
    assert loss.shape == (2, 3) and loss.dtype == torch.float32
    # The log-softmax runs in fp32 on the bf16 logits' exact values.
    manual = token_divergence(student.float().log_softmax(-1), teacher.float().log_softmax(-1), kind="jsd")
    assert_close(loss, manual)
    grad = _grad(loss.sum(), leaf)
    assert grad.dtype == torch.bfloat16 and torch.isfinite(grad.float()).all()


# ---------------------------------------------------------------- top-k support


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("tail", [True, False])
def test_topk_with_whole_vocab_equals_full(kind, tail):
    T, V = 4, 9
    student, teacher = _logits(T, V, seed=18).requires_grad_(), _logits(T, V, seed=19)
    s_lp, t_lp = student.log_softmax(-1), teacher.log_softmax(-1)
    support = t_lp.argsort(dim=-1, descending=True)  # K = V, in the teacher's top-k order
    top = topk_divergence(s_lp.gather(-1, support), t_lp.gather(-1, support), kind=kind, beta=0.3, tail=tail)
    full = token_divergence(s_lp, t_lp, kind=kind, beta=0.3)
    assert_close(top, full, atol=1e-5, rtol=1e-5)
    assert_close(_grad(top.sum(), student), _grad(full.sum(), student), atol=1e-5, rtol=1e-5)


def test_topk_tail_sees_mass_moved_off_the_support():
    # Student = teacher on a top-4 support holding 80% of the mass; then shrink the student's support mass.
    t_support = torch.tensor([[0.4, 0.2, 0.1, 0.1]]).log()
    for kind in KINDS:
        losses_tail, losses_renorm = [], []
        for shrink in (1.0, 0.5, 0.1):  # the student keeps this fraction of the teacher's support mass
            s_support = t_support + math.log(shrink)
            losses_tail.append(topk_divergence(s_support, t_support, kind=kind, tail=True).item())
            losses_renorm.append(topk_divergence(s_support, t_support, kind=kind, tail=False).item())
        # Renormalized: blind to the shrink (same shape on the support → 0 every time).
        assert max(abs(x) for x in losses_renorm) < 1e-6, (kind, losses_renorm)
        # Tail bucket: 0 when matched, then strictly growing as mass leaves the support.
        assert abs(losses_tail[0]) < 1e-6 and 0 < losses_tail[1] < losses_tail[2], (kind, losses_tail)
    # Reverse KL at shrink 0.5 by hand: student support [0.2, 0.1, 0.05, 0.05] + tail 0.6,
    # teacher support [0.4, 0.2, 0.1, 0.1] + tail 0.2.
    expected = (
        0.2 * math.log(0.2 / 0.4)
        + 0.1 * math.log(0.1 / 0.2)
        + 0.05 * math.log(0.05 / 0.1)
        + 0.05 * math.log(0.05 / 0.1)
        + 0.6 * math.log(0.6 / 0.2)
    )
    got = topk_divergence(t_support + math.log(0.5), t_support, kind="reverse_kl")
    assert_close(got, torch.tensor([expected]))


def test_topk_tail_finite_when_support_mass_is_one():
    # The off-support token has ~0 probability: Σ_k p(k) rounds to 1 and the tail must stay finite.
    student = torch.tensor([[2.0, 1.0, 0.5, -1e4]], requires_grad=True)
    teacher = torch.tensor([[1.0, 2.0, 0.0, -1e4]])
    s_lp, t_lp = student.log_softmax(-1)[:, :3], teacher.log_softmax(-1)[:, :3]
    assert_close(topk_mass(t_lp), torch.tensor([1.0]))
    for kind in KINDS:
        loss = topk_divergence(s_lp, t_lp, kind=kind)
        full = token_divergence(student.log_softmax(-1), teacher.log_softmax(-1), kind=kind)
        assert_close(loss, full, atol=1e-5, rtol=1e-5)
        assert torch.isfinite(_grad(loss.sum(), student)).all()


def test_topk_tail_gradient_reaches_student_off_support_mass():
    # With a real tail the student's support log-probs get a gradient through the tail bucket too:
    # compare with the full-vocab divergence where the off-support tokens are merged into one token.
    student = torch.tensor([[1.0, 0.5, 0.0, -0.5, -1.0]], requires_grad=True)
    teacher = torch.tensor([[0.0, 1.0, 0.5, -2.0, -2.0]])
    s_lp, t_lp = student.log_softmax(-1), teacher.log_softmax(-1)
    top = topk_divergence(s_lp[:, :3], t_lp[:, :3], kind="reverse_kl")
    merged_s = torch.cat([s_lp[:, :3], s_lp[:, 3:].logsumexp(-1, keepdim=True)], -1)
    merged_t = torch.cat([t_lp[:, :3], t_lp[:, 3:].logsumexp(-1, keepdim=True)], -1)
    merged = token_divergence(merged_s, merged_t, kind="reverse_kl")
    assert_close(top, merged)
    assert_close(_grad(top.sum(), student), _grad(merged.sum(), student))


def test_topk_mass():
    lp = torch.tensor([[0.5, 0.25, 0.125], [0.1, 0.1, 0.1]]).log()
    assert_close(topk_mass(lp), torch.tensor([0.875, 0.3]))


# ---------------------------------------------------------------- clip_tau


def test_clip_tau_bounds_the_loss_and_is_inert_when_large():
    V = 8
    s_lp, t_lp = _logits(3, V, seed=20, scale=3.0).log_softmax(-1), _logits(3, V, seed=21, scale=3.0).log_softmax(-1)
    for kind in KINDS:
        plain = token_divergence(s_lp, t_lp, kind=kind)
        tau = 0.01
        clipped = token_divergence(s_lp, t_lp, kind=kind, clip_tau=tau)
        assert (clipped <= V * tau + 1e-6).all()
        assert (clipped < plain - 1e-4).all()  # the clip is active here, so this test can fail
        assert_close(token_divergence(s_lp, t_lp, kind=kind, clip_tau=1e6), plain)
        top = topk_divergence(s_lp[:, :4], t_lp[:, :4], kind=kind, clip_tau=tau)
        assert (top <= 5 * tau + 1e-6).all()


def test_clip_tau_closed_form():
    # reverse KL terms: 0.5·log(0.5/0.9) < 0 stays; 0.5·log(0.5/0.1) ≈ 0.80 is clamped to 0.1.
    expected = 0.5 * math.log(0.5 / 0.9) + 0.1
    got = token_divergence(_lp(P_S), _lp(P_T), kind="reverse_kl", clip_tau=0.1)
    assert_close(got, torch.tensor([expected]))


# ---------------------------------------------------------------- sampled-token estimator


def _pg_setup():
    student = torch.tensor([0.3, -1.0, 1.2, 0.1], requires_grad=True)  # V = 4, one position
    teacher = torch.tensor([1.0, 0.2, -0.5, 0.4]).log_softmax(-1)
    return student, teacher


def test_sampled_pg_exact_expectation_is_reverse_kl_gradient():
    student, t_lp = _pg_setup()
    s_lp = student.log_softmax(-1)
    target = _grad(token_divergence(s_lp[None], t_lp[None], kind="reverse_kl").sum(), student)
    # Enumerate every y (each as its own "position") weighted by p_S(y): the exact E_{y~S}, no noise.
    per_y = sampled_token_pg(s_lp, t_lp)
    exact = _grad((s_lp.exp().detach() * per_y).sum(), student)
    assert_close(exact, target, atol=1e-6, rtol=1e-5)
    # Sanity: the forward-KL gradient is different, so matching reverse KL is a real check.
    forward = _grad(token_divergence(s_lp[None], t_lp[None], kind="forward_kl").sum(), student)
    assert not torch.allclose(exact, forward, atol=1e-2)


def test_sampled_pg_monte_carlo_is_reverse_kl_gradient():
    student, t_lp = _pg_setup()
    s_lp = student.log_softmax(-1)
    target = _grad(token_divergence(s_lp[None], t_lp[None], kind="reverse_kl").sum(), student)
    g = torch.Generator().manual_seed(0)
    y = torch.multinomial(s_lp.exp().detach(), 20000, replacement=True, generator=g)
    mc = _grad(sampled_token_pg(s_lp[y], t_lp[y]).mean(), student)
    assert_close(mc, target, atol=0.02, rtol=0)


def test_sampled_pg_importance_weight_corrects_off_policy_exactly():
    student, t_lp = _pg_setup()
    s_lp = student.log_softmax(-1)
    target = _grad(token_divergence(s_lp[None], t_lp[None], kind="reverse_kl").sum(), student)
    old_lp = torch.tensor([0.0, 0.5, 0.2, -0.3]).log_softmax(-1)  # the rollout engine's (stale) policy
    per_y = sampled_token_pg(s_lp, t_lp, old_logprob_T=old_lp)
    exact = _grad((old_lp.exp() * per_y).sum(), student)  # E_{y~old}
    assert_close(exact, target, atol=1e-6, rtol=1e-5)


def test_sampled_pg_on_policy_old_logprob_and_cap():
    student, t_lp = _pg_setup()
    s_lp = student.log_softmax(-1)
    base = sampled_token_pg(s_lp, t_lp)
    assert_close(base, -(t_lp - s_lp).detach())  # value: −A·1
    base_grad = _grad(base.sum(), student)
    # old == current student: w = 1, identical value and gradient.
    same = sampled_token_pg(s_lp, t_lp, old_logprob_T=s_lp.detach())
    assert_close(same, base)
    assert_close(_grad(same.sum(), student), base_grad)

    # old makes w = 3 at every position: uncapped the gradient triples, capped at 2 it doubles.
    old = s_lp.detach() - math.log(3.0)
    uncapped = sampled_token_pg(s_lp, t_lp, old_logprob_T=old)
    capped = sampled_token_pg(s_lp, t_lp, old_logprob_T=old, is_cap=2.0)
    assert_close(uncapped, 3 * base)
    assert_close(capped, 2 * base)
    # Per position so the scale is checked token by token (the sum of grads over y cancels out).
    for i in range(4):
        g_base = _grad(base[i], student)
        assert_close(_grad(uncapped[i], student), 3 * g_base)
        assert_close(_grad(capped[i], student), 2 * g_base)
    # A weight under the cap is left alone.
    low = sampled_token_pg(s_lp, t_lp, old_logprob_T=s_lp.detach() + math.log(2.0), is_cap=2.0)
    assert_close(low, 0.5 * base)
    # The teacher and old log-probs never receive gradient.
    t_leaf = t_lp.clone().requires_grad_()
    o_leaf = old.clone().requires_grad_()
    grads = torch.autograd.grad(
        sampled_token_pg(s_lp, t_leaf, old_logprob_T=o_leaf).sum(), [t_leaf, o_leaf], allow_unused=True
    )
    assert grads == (None, None)


def test_chunked_logsumexp_and_gather_equal_log_softmax():
    from trainer.learner.losses import chunked_logsumexp, gather_logprobs
    torch.manual_seed(0)
    logits = torch.randn(7, 11, dtype=torch.float64, requires_grad=True)
    ids = torch.randint(0, 11, (7, 3))
    for temperature in (1.0, 0.6):
        lse = chunked_logsumexp(logits, temperature=temperature, chunk_size=3)
        got = gather_logprobs(logits, ids, lse, temperature=temperature)
        want = torch.log_softmax(logits.float() / temperature, -1).gather(-1, ids)
        torch.testing.assert_close(got, want.float(), rtol=1e-5, atol=1e-6)
        (g_got,) = torch.autograd.grad(got.sum(), logits)
        (g_want,) = torch.autograd.grad(torch.log_softmax(logits / temperature, -1).gather(-1, ids).sum(), logits)
        torch.testing.assert_close(g_got, g_want, rtol=1e-5, atol=1e-6)


def test_chunked_entropy_equals_torch_categorical_entropy():
    from trainer.learner.losses import chunked_entropy
    logits = _logits(9, 13, seed=4, scale=3.0)
    logits[0, :] = 0.0  # uniform: log V
    logits[1, 0] = 1e4  # nearly one-hot: 0
    want = torch.distributions.Categorical(logits=logits).entropy()
    got = chunked_entropy(logits, chunk_size=4)
    assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert got[0].item() == pytest.approx(math.log(13), abs=1e-5) and got[1].item() == pytest.approx(0.0, abs=1e-5)


def test_token_cap_caps_the_value_and_scales_the_gradient_of_large_tokens_only():
    from trainer.learner.losses import cap_token_losses
    student = _logits(6, 5, seed=1, scale=4.0).requires_grad_(True)
    teacher = _logits(6, 5, seed=2, scale=4.0)
    per_token = token_divergence(torch.log_softmax(student, -1), torch.log_softmax(teacher, -1), kind="reverse_kl")
    cap = per_token.detach().median().item()
    capped = cap_token_losses(per_token, cap)
    large = per_token.detach() > cap
    assert large.any() and (~large).any()
    assert_close(capped.detach(), per_token.detach().clamp(max=cap))
    for t in range(6):  # each token's gradient keeps its direction, scaled by min(1, cap/ℓ)
        want = _grad(per_token[t], student) * min(1.0, cap / per_token[t].item())
        assert_close(_grad(capped[t], student), want)
    assert (_grad(capped[large].sum(), student) != 0).any()  # a clamp would have zeroed these
