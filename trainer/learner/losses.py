"""Per-token distillation losses: pure tensor functions, no I/O, no state, no config objects.

Shapes: names end in their dims. `_T` is token positions (flattened over the batch), `_V` the
vocabulary, `_K` a top-k support. Every divergence returns one value per position, `loss_T`; the
caller reduces with `masked_mean`. Extra leading dims work wherever only the last dim is reduced.

Direction convention (p_S = student, p_T = teacher; every docstring below repeats which one it uses):
- reverse_kl = KL(student‖teacher) = Σ_v p_S(v) (log p_S(v) − log p_T(v))   (mode seeking)
- forward_kl = KL(teacher‖student) = Σ_v p_T(v) (log p_T(v) − log p_S(v))   (mass covering)
- jsd, β in (0,1): JSD_β = β·KL(p_T‖M) + (1−β)·KL(p_S‖M), with M = β·p_T + (1−β)·p_S.
  This is the GKD / TRL `GKDTrainer.generalized_jsd_loss` convention for 0 < β < 1 (TRL special-cases
  β = 0 as forward KL and β = 1 as reverse KL, which are not the limits of this formula: both go to 0,
  hence the open interval here).

Gradients flow only into the student: every function detaches the teacher itself.
"""

import math

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

KINDS = ("reverse_kl", "forward_kl", "jsd")


def _check_kind(kind: str, beta: float) -> None:
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    if kind == "jsd" and not 0.0 < beta < 1.0:
        raise ValueError(f"jsd needs beta in (0, 1), got {beta}")


def _finite(logp: torch.Tensor) -> torch.Tensor:
    """-inf → the most negative finite float: logsumexp over all -inf rows returns -inf whose backward
    is exp(-inf − -inf) = NaN; a finite stand-in keeps the value (exp of it is 0) and a zero gradient."""
    return logp.clamp(min=torch.finfo(logp.dtype).min)


def _xlogratio(logp: torch.Tensor, logq: torch.Tensor) -> torch.Tensor:
    """Per-entry p·(log p − log q), with 0·(anything) = 0 where p = 0 (logp = -inf or underflow).

    The `where` sits *before* the multiply: a NaN (−inf − −inf) or inf in the dropped branch would
    otherwise turn the backward of the multiply into 0·NaN = NaN.
    """
    p = logp.exp()
    diff = torch.where(p > 0, logp - logq, torch.zeros_like(logp))
    return p * diff


def _entry_terms(student_lp: torch.Tensor, teacher_lp: torch.Tensor, kind: str, beta: float) -> torch.Tensor:
    """Per-vocab-entry terms [..., V] whose sum over the last dim is the divergence `kind`."""
    if kind == "reverse_kl":  # KL(student‖teacher)
        return _xlogratio(student_lp, teacher_lp)
    if kind == "forward_kl":  # KL(teacher‖student)
        return _xlogratio(teacher_lp, student_lp)
    # jsd: log M by logsumexp of the two weighted log-probs, never log(β p_T + (1−β) p_S) directly,
    # which underflows for tiny probabilities.
    log_m = torch.logsumexp(
        torch.stack([_finite(teacher_lp) + math.log(beta), _finite(student_lp) + math.log1p(-beta)]), dim=0
    )
    return beta * _xlogratio(teacher_lp, log_m) + (1.0 - beta) * _xlogratio(student_lp, log_m)


def token_divergence(
    student_logprobs_TV: torch.Tensor,
    teacher_logprobs_TV: torch.Tensor,
    *,
    kind: str,
    beta: float = 0.5,
    clip_tau: float | None = None,
) -> torch.Tensor:
    """Full-vocabulary divergence per position.

    Args:
        student_logprobs_TV, teacher_logprobs_TV: [T, V] log-softmaxed log-probs (fp32). -inf entries
            (e.g. a top-k-masked teacher) are fine: 0·log 0 counts as 0, and no NaN appears in the
            value or gradient. A divergence that is truly infinite (reverse KL where p_S > 0 = p_T) is inf.
        kind: "reverse_kl" = KL(student‖teacher), "forward_kl" = KL(teacher‖student), or
            "jsd" = β·KL(p_T‖M) + (1−β)·KL(p_S‖M), M = β·p_T + (1−β)·p_S.
        beta: the JSD β in (0, 1); ignored by the KLs.
        clip_tau: the OPSD per-entry clip: each vocab entry's term is clamped to at most tau before the
            sum over V, so a few entries where the teacher is confidently different cannot dominate the
            gradient. The result is then ≤ V·tau.

    Returns:
        loss_T: [T] divergence per position (input dtype); gradients reach the student only.
    """
    _check_kind(kind, beta)
    terms_TV = _entry_terms(student_logprobs_TV, teacher_logprobs_TV.detach(), kind, beta)
    if clip_tau is not None:
        terms_TV = torch.clamp(terms_TV, max=clip_tau)
    return terms_TV.sum(dim=-1)


def chunked_token_divergence(
    student_logits_TV: torch.Tensor,
    teacher_logits_TV: torch.Tensor,
    *,
    kind: str,
    temperature: float = 1.0,
    beta: float = 0.5,
    clip_tau: float | None = None,
    chunk_size: int = 1024,
) -> torch.Tensor:
    """`token_divergence` from raw logits, `chunk_size` positions at a time.

    Args:
        student_logits_TV, teacher_logits_TV: [T, V] (or [..., T, V], flattened) raw logits, any dtype.
            Each chunk is cast to fp32, divided by `temperature` and log-softmaxed.
        kind, beta, clip_tau: as in `token_divergence` (reverse_kl = KL(student‖teacher),
            forward_kl = KL(teacher‖student), jsd = β·KL(p_T‖M) + (1−β)·KL(p_S‖M)).
        chunk_size: positions per chunk.

    Returns:
        loss_T: fp32 divergence per position, shape of the logits without the last dim. Values and
        gradients equal the unchunked computation.

    Each chunk runs under activation checkpointing when the student needs a gradient: autograd would
    otherwise keep every chunk's fp32 [chunk, V] intermediates alive until backward, which adds up to
    the whole-sequence fp32 copies that chunking is meant to avoid. The backward recomputes one chunk
    at a time instead.
    """
    _check_kind(kind, beta)
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    lead_shape, vocab = student_logits_TV.shape[:-1], student_logits_TV.shape[-1]
    student_TV = student_logits_TV.reshape(-1, vocab)
    teacher_TV = teacher_logits_TV.detach().reshape(-1, vocab)

    def chunk_loss(student_chunk: torch.Tensor, teacher_chunk: torch.Tensor) -> torch.Tensor:
        student_lp = F.log_softmax(student_chunk.float() / temperature, dim=-1)
        teacher_lp = F.log_softmax(teacher_chunk.float() / temperature, dim=-1)
        return token_divergence(student_lp, teacher_lp, kind=kind, beta=beta, clip_tau=clip_tau)

    use_checkpoint = torch.is_grad_enabled() and student_TV.requires_grad
    losses = []
    for start in range(0, student_TV.shape[0], chunk_size):
        s, t = student_TV[start : start + chunk_size], teacher_TV[start : start + chunk_size]
        losses.append(checkpoint(chunk_loss, s, t, use_reentrant=False) if use_checkpoint else chunk_loss(s, t))
    if not losses:  # T = 0: an empty loss, not a torch.cat error
        return student_TV.new_zeros(lead_shape, dtype=torch.float32)
    return torch.cat(losses).reshape(lead_shape)


def chunked_logsumexp(logits_TV: torch.Tensor, *, temperature: float = 1.0, chunk_size: int = 1024) -> torch.Tensor:
    """lse_T [T] = log Σ_v exp(logits_TV / temperature), in fp32, `chunk_size` positions at a time.

    With `gather_logprobs` this gives log-probs of a few tokens per position without a [T, V] fp32
    log-softmax. Chunks run under activation checkpointing when the logits need a gradient, for the
    same reason as in `chunked_token_divergence`.
    """
    def chunk_lse(chunk: torch.Tensor) -> torch.Tensor:
        return torch.logsumexp(chunk.float() / temperature, dim=-1)

    use_checkpoint = torch.is_grad_enabled() and logits_TV.requires_grad
    parts = [checkpoint(chunk_lse, c, use_reentrant=False) if use_checkpoint else chunk_lse(c)
             for c in logits_TV.split(chunk_size)]
    return torch.cat(parts) if parts else logits_TV.new_zeros(0, dtype=torch.float32)


@torch.no_grad()
def chunked_entropy(logits_TV: torch.Tensor, *, chunk_size: int = 1024) -> torch.Tensor:
    """H_T [T] = −Σ_v p(v) log p(v) of softmax(logits_TV), in fp32, `chunk_size` positions at a time
    (a monitoring quantity: no gradient, no [T, V] fp32 copy of the whole micro-batch)."""
    def chunk_entropy(chunk: torch.Tensor) -> torch.Tensor:
        logp = torch.log_softmax(chunk.float(), dim=-1)
        return -(logp.exp() * logp).sum(-1)

    parts = [chunk_entropy(c) for c in logits_TV.detach().split(chunk_size)]
    return torch.cat(parts) if parts else logits_TV.new_zeros(0, dtype=torch.float32)


def gather_logprobs(logits_TV: torch.Tensor, ids_TK: torch.Tensor, lse_T: torch.Tensor, *,
                    temperature: float = 1.0) -> torch.Tensor:
    """[T, K] fp32 log-probs of the token ids `ids_TK` (e.g. [T, 1] sampled tokens or a top-k), given
    the `chunked_logsumexp` of the same logits at the same temperature."""
    return logits_TV.gather(-1, ids_TK).float() / temperature - lse_T.unsqueeze(-1)


def _log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 − exp(x)) for x < 0, accurate at both ends (Mächler 2012): expm1 near 0, log1p far out.
    Both branches are finite for x < 0, so the `where` passes no NaN into the gradient."""
    return torch.where(x > -math.log(2.0), torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


def _with_tail(logprobs_TK: torch.Tensor) -> torch.Tensor:
    """[T, K] full-vocab log-probs on a support → [T, K+1]: the K entries plus the off-support mass."""
    log_mass_T = torch.logsumexp(_finite(logprobs_TK), dim=-1)
    # Rounding can push the log-mass of a ~complete support to ≥ 0; capping it just below 0 keeps the tail
    # finite (mass ~eps on both sides, so it adds ~0 to the divergence) at the price of a zero gradient there.
    log_mass_T = log_mass_T.clamp(max=-torch.finfo(log_mass_T.dtype).eps)
    return torch.cat([logprobs_TK, _log1mexp(log_mass_T).unsqueeze(-1)], dim=-1)


def topk_divergence(
    student_logprobs_TK: torch.Tensor,
    teacher_logprobs_TK: torch.Tensor,
    *,
    kind: str,
    beta: float = 0.5,
    tail: bool = True,
    clip_tau: float | None = None,
) -> torch.Tensor:
    """Divergence restricted to a K-token support per position (typically the teacher's top-k).

    Args:
        student_logprobs_TK, teacher_logprobs_TK: [T, K] *full-vocabulary* log-probs gathered on the same
            K token ids (not renormalized).
        kind: "reverse_kl" = KL(student‖teacher), "forward_kl" = KL(teacher‖student), or
            "jsd" = β·KL(p_T‖M) + (1−β)·KL(p_S‖M), M = β·p_T + (1−β)·p_S; over the buckets below.
        tail: True: K+1 buckets, the K entries plus a tail bucket log(1 − Σ_k p(k)) holding each model's
            off-support mass. False: both renormalized over the K entries.
        beta, clip_tau: as in `token_divergence`.

    Returns:
        loss_T: [T] divergence per position; equals `token_divergence` when the support is the whole vocab.

    Why the tail: the plain partial sum Σ_k p_S(k) log(p_S(k)/p_T(k)) is gameable: a student that moves
    mass off the support shrinks every term (it can even go negative), so the loss rewards leaving the
    teacher's top-k. Renormalizing (tail=False) closes that exploit but is blind to it: shrinking the
    student's support mass uniformly leaves the loss unchanged. The tail bucket makes the shrink cost
    what it costs under the full-vocab divergence, coarsened to one bucket.
    """
    _check_kind(kind, beta)
    teacher_logprobs_TK = teacher_logprobs_TK.detach()
    if tail:
        student_lp, teacher_lp = _with_tail(student_logprobs_TK), _with_tail(teacher_logprobs_TK)
    else:
        student_lp = F.log_softmax(student_logprobs_TK, dim=-1)
        teacher_lp = F.log_softmax(teacher_logprobs_TK, dim=-1)
    return token_divergence(student_lp, teacher_lp, kind=kind, beta=beta, clip_tau=clip_tau)


def topk_mass(logprobs_TK: torch.Tensor) -> torch.Tensor:
    """[T, K] full-vocab log-probs on a support → mass_T [T] = Σ_k p(k), for logging the coverage."""
    return logprobs_TK.exp().sum(dim=-1)


def sampled_token_pg(
    student_logprob_T: torch.Tensor,
    teacher_logprob_T: torch.Tensor,
    *,
    old_logprob_T: torch.Tensor | None = None,
    is_cap: float | None = None,
) -> torch.Tensor:
    """Sampled-token estimator of reverse KL(student‖teacher) as a policy-gradient surrogate.

    Args:
        student_logprob_T: [T] log p_S(y_t) of the sampled tokens under the current student (with grad).
        teacher_logprob_T: [T] log p_T(y_t) of the same tokens (detached here).
        old_logprob_T: [T] the rollout engine's log-prob of the same tokens, or None when the tokens were
            sampled from the current student.
        is_cap: truncate the importance weight w = p_S(y)/p_old(y) at this value (truncated IS); None = no cap.

    Returns:
        loss_T: [T] surrogate −A·w·ratio with advantage A = stop_grad(log p_T(y) − log p_S(y)) and
        ratio = exp(log p_S − stop_grad(log p_S)), whose value is 1 and gradient ∇log p_S(y). The value
        is −A·w (not the KL); the gradient is what matters: −A·w·∇log p_S(y).

    Why this estimates the reverse-KL gradient:
        ∇ KL(S‖T) = Σ_y ∇p_S(y) (log p_S(y) − log p_T(y)) + Σ_y p_S(y) ∇log p_S(y)
                  = E_{y~S}[(log p_S(y) − log p_T(y)) ∇log p_S(y)]       (the second sum is ∇Σ p_S = 0)
                  = E_{y~S}[−A(y) ∇log p_S(y)],
        so minimizing the mean of this loss over y ~ p_S follows ∇KL(student‖teacher) in expectation.
        With y ~ p_old, the weight w = p_S(y)/p_old(y) restores the expectation under p_S (exactly when
        uncapped; the cap trades that bias for bounded variance).
    """
    advantage_T = teacher_logprob_T - student_logprob_T
    return policy_gradient(student_logprob_T, advantage_T, old_logprob_T=old_logprob_T, is_cap=is_cap)


def policy_gradient(
    logprob_T: torch.Tensor,
    advantage_T: torch.Tensor,
    *,
    old_logprob_T: torch.Tensor | None = None,
    is_cap: float | None = None,
) -> torch.Tensor:
    """REINFORCE surrogate per token: loss_T = −A·w·exp(log π − stop_grad(log π)).

    Args:
        logprob_T: [T] log π(y_t) of the sampled tokens under the current policy (with grad).
        advantage_T: [T] advantage of each token (detached here).
        old_logprob_T: [T] the behaviour policy's log-prob of the same tokens (the rollout engine's),
            or None when the tokens were sampled from the current policy.
        is_cap: truncate the importance weight w = π(y)/π_old(y) at this value; None = no cap.

    Returns:
        loss_T: [T], value −A·w, gradient −A·w·∇log π(y_t): minimizing its mean over sampled tokens
        ascends E[A·log π] (the policy gradient).
    """
    advantage_T = advantage_T.detach()
    ratio_T = torch.exp(logprob_T - logprob_T.detach())
    if old_logprob_T is not None:
        ratio_T = importance_weights(logprob_T, old_logprob_T, cap=is_cap) * ratio_T
    return -advantage_T * ratio_T


def importance_weights(logprob_T: torch.Tensor, behaviour_logprob_T: torch.Tensor, *,
                       cap: float | None = None) -> torch.Tensor:
    """Truncated importance weights w_t = min(π(y_t) / μ(y_t), cap) of tokens sampled from μ, detached.

    Args:
        logprob_T: [T] log π(y_t) under the policy being trained.
        behaviour_logprob_T: [T] log μ(y_t) under the policy that sampled y_t (the rollout engine's).
        cap: the truncation; None = the plain ratio.

    Returns:
        w_T [T]. Uncapped, E_{y~μ}[w(y) f(y)] = E_{y~π}[f(y)]; the cap bounds the variance at the cost
        of a bias towards μ where π ≫ μ. The token's own ratio: right for a loss that depends on the sampled
        y_t (the sampled estimator, the RL term); full and top-k losses take `prefix_importance_weights`.
    """
    weight_T = torch.exp(logprob_T.detach() - behaviour_logprob_T.detach())
    return weight_T if cap is None else weight_T.clamp(max=cap)


def prefix_importance_weights(logprob_T: torch.Tensor, behaviour_logprob_T: torch.Tensor, lengths: list[int], *,
                              cap: float | None = None) -> torch.Tensor:
    """Truncated importance weights of each position's prefix, for losses that take the expectation
    over the next token exactly (full and top-k divergences) at positions sampled by μ.

    Args:
        logprob_T, behaviour_logprob_T: [T] log π(y_t) and log μ(y_t) of the sampled tokens of several
            sequences laid end to end (detached here).
        lengths: each sequence's token count (they sum to T).
        cap: the truncation; None = the plain product.

    Returns:
        w_T [T] with w_t = min(Π_{s<t} π(y_s)/μ(y_s), cap) within each sequence (1 at its first position):
        the prefix y_<t was drawn from μ, and the loss at t depends on y_<t only.
    """
    log_ratio_T = logprob_T.detach() - behaviour_logprob_T.detach()
    weights = []
    for part in torch.split(log_ratio_T, lengths):
        exclusive = torch.cat([part.new_zeros(1), torch.cumsum(part, 0)[:-1]])
        weights.append(exclusive.exp())
    weight_T = torch.cat(weights) if weights else log_ratio_T
    return weight_T if cap is None else weight_T.clamp(max=cap)


def group_advantages(rewards_G: torch.Tensor, group_size: int, *, scale: bool = True,
                     eps: float = 1e-4) -> torch.Tensor:
    """GRPO's group-normalized advantages: A_i = (r_i − mean_g) / (std_g + eps).

    Args:
        rewards_G: [N·G] rewards, the G samples of each prompt contiguous (prompt by prompt). NaN marks
            a sample no reward function scored (TRL's None); it gets advantage 0 and is left out of its
            group's mean and std.
        group_size: G, samples per prompt (`rollout.n`).
        scale: divide by the group's standard deviation (Bessel-corrected, as TRL's GRPO does); False
            keeps the mean-centred rewards only (Dr. GRPO).
        eps: added to the standard deviation.

    Returns:
        advantage_G: [N·G] fp32. A group whose rewards are all equal (zero variance) gets all zeros:
        it carries no learning signal, which is the waste `zero_variance_fraction` measures.
    """
    if group_size < 1 or rewards_G.numel() % group_size:
        raise ValueError(f"{rewards_G.numel()} rewards do not split into groups of {group_size}")
    r = rewards_G.float().reshape(-1, group_size)
    valid = ~torch.isnan(r)
    count = valid.sum(-1, keepdim=True)
    mean = torch.where(valid, r, 0.0).sum(-1, keepdim=True) / count.clamp(min=1)
    centred = torch.where(valid, r - mean, 0.0)
    advantage = centred
    if scale:
        var = (centred ** 2).sum(-1, keepdim=True) / (count - 1).clamp(min=1)
        std = var.sqrt()
        advantage = torch.where(std > 0, centred / (std + eps), 0.0)  # a flat group: 0, not 0/0 when eps = 0
    return advantage.reshape(-1)


def zero_variance_fraction(rewards_G: torch.Tensor, group_size: int) -> float:
    """Fraction of groups whose scored rewards are all equal (or that hold fewer than two scored
    samples): their GRPO advantages are all zero. NaN = unscored, as in `group_advantages`."""
    r = rewards_G.float().reshape(-1, group_size)
    valid = ~torch.isnan(r)
    high = torch.where(valid, r, -math.inf).max(-1).values
    low = torch.where(valid, r, math.inf).min(-1).values
    flat = (valid.sum(-1) < 2) | (high == low)
    return flat.float().mean().item()


def token_cross_entropy(logits_TV: torch.Tensor, targets_T: torch.Tensor, *, chunk_size: int = 1024) -> torch.Tensor:
    """loss_T [T] = −log softmax(logits_TV)[target]: the SFT loss of each target token, in fp32.

    Untempered, from a chunked logsumexp, so no [T, V] fp32 log-softmax is held (see `chunked_logsumexp`).
    It trains both `loss.mode=sft` (demonstrations) and `loss.mode=ssd` (samples of the frozen model).
    """
    lse_T = chunked_logsumexp(logits_TV, chunk_size=chunk_size)
    return -gather_logprobs(logits_TV, targets_T.reshape(-1, 1), lse_T)[:, 0]


def cap_token_losses(loss_T: torch.Tensor, cap: float) -> torch.Tensor:
    """Each token's loss, scaled down to at most `cap` where it is larger: min(ℓ, cap) in value, and
    min(1, cap/ℓ)·∇ℓ in gradient (a per-token scale, detached). Unlike a clamp, a capped token still
    pulls, in the same direction; it just no longer outweighs the tokens the student nearly has
    right, whose small losses are what keep its existing skill in place."""
    scale_T = (cap / loss_T.detach().clamp(min=1e-12)).clamp(max=1.0)
    return loss_T * scale_T


def masked_mean(values_T: torch.Tensor, mask_T: torch.Tensor) -> torch.Tensor:
    """Scalar Σ values·mask / max(Σ mask, 1) over [T] (or any same-shape) tensors; mask float or bool.

    Masked positions contribute nothing even when they hold inf or NaN (selected away, not multiplied
    by 0), and an all-masked input is a finite 0 with a zero gradient instead of 0/0 = NaN.
    """
    mask_T = mask_T.to(values_T.dtype)
    kept_T = torch.where(mask_T != 0, values_T * mask_T, torch.zeros_like(values_T))
    return kept_T.sum() / mask_T.sum().clamp(min=1.0)


def completion_mask(lengths: list[int] | torch.Tensor, max_len: int, *, skip_first: int = 0) -> torch.Tensor:
    """Float mask [B, max_len]: 1 at positions skip_first ≤ t < length of each completion, else 0.

    `skip_first` drops the first tokens of every completion from the loss (SDFT masks the first 3).
    `lengths` may be a list or an integer tensor; the mask follows the tensor's device.
    """
    if skip_first < 0:
        raise ValueError(f"skip_first must be >= 0, got {skip_first}")
    lengths_B = torch.as_tensor(lengths, dtype=torch.long)
    positions = torch.arange(max_len, device=lengths_B.device)
    keep = (positions < lengths_B.unsqueeze(-1)) & (positions >= skip_first)
    return keep.float()
