"""One function per `loss.mode`: a micro-batch's loss, given the student's completion logits.

    distill        the per-token divergence to the teacher's targets (+ rl_coef × the GRPO term)
    cross_entropy  sft and ssd: plain cross-entropy on the given completions (no teacher, no rewards)
    grpo           the group-normalized policy gradient alone

Each returns the *sum* of the per-token losses over the micro-batch's loss positions and
token-summed statistics for logging; the learner divides by the whole batch's token count. The
math is in `trainer.learner.losses`; here it is wired to the rollouts. Log-probabilities are
gathered for a few tokens per position against a chunked fp32 logsumexp, so no [T, V] fp32
log-softmax is ever held (only the `full` estimator reads every vocabulary entry, chunk by chunk).

Shapes: `_T` the micro-batch's completion tokens flattened, `_V` the vocabulary, `_K` the top-k.
"""

import itertools
from dataclasses import dataclass

import torch

from rollout.batch import Rollout, TeacherScores
from trainer.config import Config
from trainer.learner import losses


@dataclass(frozen=True)
class MicroBatch:
    """A micro-batch's rollouts and its completion tokens, flattened over the batch."""

    rollouts: list[Rollout]
    tokens_T1: torch.Tensor
    mask_T: torch.Tensor
    """The loss positions (the first `loss.mask_first_tokens` of each completion left out), bool."""

    @property
    def prompts(self) -> list[list[int]]:
        return [r.prompt_ids for r in self.rollouts]

    @property
    def completions(self) -> list[list[int]]:
        return [r.completion_ids for r in self.rollouts]

    def per_token(self, values: list[list]) -> torch.Tensor:
        """A value per completion token, flattened like `tokens_T1` (e.g. the engine's logprobs)."""
        return torch.tensor([v for row in values for v in row], device=self.tokens_T1.device)

    def per_rollout(self, values: list) -> torch.Tensor:
        """A value per rollout, repeated over its completion tokens."""
        return torch.tensor([v for v, r in zip(values, self.rollouts, strict=True) for _ in r.completion_ids],
                            device=self.tokens_T1.device)


@dataclass(frozen=True)
class SampledLogprobs:
    """The sampled tokens' log-probabilities, [T] each."""

    student_lse_T: torch.Tensor
    """logsumexp of the untempered student logits (with gradient)."""
    student_T: torch.Tensor
    """log p_S(y_t), untempered, with gradient: what the divergences compare."""
    rollout_T: torch.Tensor
    """The learner's log-prob of y_t under the sampling distribution (logits / T), detached."""
    engine_T: torch.Tensor
    """The engine's log-prob of y_t, as it sampled it."""


@dataclass(frozen=True)
class TeacherTargets:
    """The teacher's view of the student's tokens."""

    token_T: torch.Tensor
    """log p_T(y_t) of each sampled token."""
    topk_ids_TK: torch.Tensor
    topk_TK: torch.Tensor
    """log p_T of the teacher's top-k tokens at each position."""
    logits_TV: torch.Tensor | None = None
    """The full-vocabulary logits, when the teacher scored on the learner (`full` reads them)."""


def micro_batch(rollouts: list[Rollout], skip_first: int, device: torch.device) -> MicroBatch:
    completions = [r.completion_ids for r in rollouts]
    tokens_T1 = torch.tensor([t for c in completions for t in c], device=device)[:, None]
    mask = losses.completion_mask([len(c) for c in completions], max(len(c) for c in completions), skip_first=skip_first)
    mask_T = torch.cat([mask[i, :len(c)] for i, c in enumerate(completions)]).to(device).bool()
    return MicroBatch(rollouts, tokens_T1, mask_T)


def masked_sum(values_T: torch.Tensor, mask_T: torch.Tensor) -> torch.Tensor:
    return torch.where(mask_T, values_T, 0.0).sum()  # `where`, not a product: a masked inf stays out


def cross_entropy(student_logits_TV: torch.Tensor, batch: MicroBatch) -> tuple[torch.Tensor, dict[str, float]]:
    """Cross-entropy on the given completions (SFT's demonstrations, SSD's frozen samples)."""
    per_token = losses.token_cross_entropy(student_logits_TV, batch.tokens_T1[:, 0])
    with torch.no_grad():
        stats = {"tokens": batch.mask_T.sum().item(), "sft/loss": masked_sum(per_token, batch.mask_T).item()}
    return masked_sum(per_token, batch.mask_T), stats


def sampled_logprobs(student_logits_TV: torch.Tensor, batch: MicroBatch, temperature: float) -> SampledLogprobs:
    student_lse = losses.chunked_logsumexp(student_logits_TV)
    student_token_lp = losses.gather_logprobs(student_logits_TV, batch.tokens_T1, student_lse)[:, 0]
    with torch.no_grad():  # the sampling distribution, for the health gap and importance weights
        detached = student_logits_TV.detach()
        rollout_lse = losses.chunked_logsumexp(detached, temperature=temperature)
        rollout_token_lp = losses.gather_logprobs(detached, batch.tokens_T1, rollout_lse, temperature=temperature)[:, 0]
    engine_lp = batch.per_token([r.logprobs for r in batch.rollouts])
    return SampledLogprobs(student_lse, student_token_lp, rollout_token_lp, engine_lp)


def rl_term(cfg: Config, student_logits_TV: torch.Tensor, batch: MicroBatch, lp: SampledLogprobs) -> torch.Tensor | None:
    """GRPO's policy-gradient term per token (None when neither loss.mode=grpo nor loss.rl_coef asks
    for it), on the log-probs of the sampling distribution (logits / rollout.temperature), with the
    truncated importance weight against the engine's logprobs when loss.is_cap is set."""
    loss_cfg, temperature = cfg.loss, cfg.rollout.temperature
    if loss_cfg.mode != "grpo" and not loss_cfg.rl_coef:
        return None
    logprob_T = lp.student_T
    if temperature != 1.0:
        lse = losses.chunked_logsumexp(student_logits_TV, temperature=temperature)
        logprob_T = losses.gather_logprobs(student_logits_TV, batch.tokens_T1, lse, temperature=temperature)[:, 0]
    advantage_T = batch.per_rollout([r.advantage for r in batch.rollouts])
    return losses.policy_gradient(logprob_T, advantage_T, old_logprob_T=lp.engine_T if loss_cfg.is_cap else None,
                                  is_cap=loss_cfg.is_cap)


def health_sums(lp: SampledLogprobs, mask_T: torch.Tensor, is_cap: float | None) -> dict[str, float]:
    """Token sums of |learner − engine| logprob, and, when loss.is_cap is set, of the per-token
    importance weight π_learner/π_engine and of its capped share: how far the engines' policy is
    from the learner's."""
    sums = {"health/engine_trainer_logprob_gap": masked_sum((lp.rollout_T - lp.engine_T).abs(), mask_T).item()}
    if is_cap is not None:
        weights = losses.importance_weights(lp.rollout_T, lp.engine_T)
        sums |= {"health/is_weight": masked_sum(weights, mask_T).item(),
                 "health/is_capped_fraction": torch.where(mask_T, weights > is_cap, False).sum().item()}
    return sums


def grpo(student_logits_TV: torch.Tensor, batch: MicroBatch, cfg: Config) -> tuple[torch.Tensor, dict[str, float]]:
    """The policy gradient on the group advantages alone (a pure RL baseline)."""
    lp = sampled_logprobs(student_logits_TV, batch, cfg.rollout.temperature)
    rl_T = rl_term(cfg, student_logits_TV, batch, lp)
    with torch.no_grad():
        stats = {"tokens": batch.mask_T.sum().item(), "rl/pg_loss": masked_sum(rl_T, batch.mask_T).item()}
        stats |= health_sums(lp, batch.mask_T, cfg.loss.is_cap)
    return masked_sum(rl_T, batch.mask_T), stats


@torch.no_grad()
def targets_from_logits(teacher_logits_TV: torch.Tensor, batch: MicroBatch, topk: int) -> TeacherTargets:
    """Targets of a teacher that ran on the learner."""
    lse = losses.chunked_logsumexp(teacher_logits_TV)
    topk_ids = teacher_logits_TV.topk(topk, dim=-1).indices
    return TeacherTargets(losses.gather_logprobs(teacher_logits_TV, batch.tokens_T1, lse)[:, 0], topk_ids,
                          losses.gather_logprobs(teacher_logits_TV, topk_ids, lse), teacher_logits_TV)


def targets_from_scores(scores: list[TeacherScores], batch: MicroBatch, vocab_size: int) -> TeacherTargets:
    """Targets of a teacher that an engine scored (sampled token + top-k, from vLLM `prompt_logprobs`)."""
    device = batch.tokens_T1.device
    topk_ids = torch.tensor([ids for s in scores for ids in s.topk_ids], device=device)
    if topk_ids.numel() and topk_ids.max().item() >= vocab_size:
        # an external teacher with a larger (padded) embedding ranked one of its padding rows in its top-k
        raise ValueError(f"the teacher engine's top-k holds token id {topk_ids.max().item()}, past the student's "
                         f"{vocab_size} vocabulary rows; teacher.scorer=learner drops such rows")
    return TeacherTargets(batch.per_token([s.token_logprobs for s in scores]), topk_ids,
                          torch.tensor([lps for s in scores for lps in s.topk_logprobs], device=device))


def merge_targets(parts: list[tuple[list[int], TeacherTargets]], lengths: list[int]) -> TeacherTargets:
    """The targets of a batch whose rows were scored in parts (the rows of each part, in order, and
    their targets), put back in the batch's row order; `lengths` are the rows' completion lengths.
    The full-vocabulary logits are kept only when every part has them."""
    starts = [0, *itertools.accumulate(lengths)]
    # where each token of the parts, concatenated, goes in the batch
    destination = torch.tensor([t for rows, _ in parts for row in rows for t in range(starts[row], starts[row + 1])],
                               device=parts[0][1].token_T.device)

    def merged(tensors: list[torch.Tensor]) -> torch.Tensor:
        joined = torch.cat(tensors)
        out = torch.empty_like(joined)
        out[destination] = joined
        return out

    targets = [t for _, t in parts]
    logits = None
    if all(t.logits_TV is not None for t in targets):
        logits = merged([t.logits_TV for t in targets])
    return TeacherTargets(merged([t.token_T for t in targets]), merged([t.topk_ids_TK for t in targets]),
                          merged([t.topk_TK for t in targets]), logits)


def divergence(cfg: Config, student_logits_TV: torch.Tensor, teacher: TeacherTargets, lp: SampledLogprobs,
               student_topk_TK: torch.Tensor | None) -> torch.Tensor:
    """The per-token divergence of the configured estimator, [T]."""
    loss_cfg = cfg.loss
    if loss_cfg.estimator == "full":
        return losses.chunked_token_divergence(student_logits_TV, teacher.logits_TV, kind=loss_cfg.divergence,
                                               beta=loss_cfg.jsd_beta, clip_tau=loss_cfg.clip_tau)
    if loss_cfg.estimator == "topk":
        return losses.topk_divergence(student_topk_TK, teacher.topk_TK, kind=loss_cfg.divergence,
                                      beta=loss_cfg.jsd_beta, tail=True, clip_tau=loss_cfg.clip_tau)
    # sampled: the importance weight compares the learner's and the engine's sampling distributions
    old = None
    if loss_cfg.is_cap is not None:
        old = lp.student_T.detach() - (lp.rollout_T - lp.engine_T)
    return losses.sampled_token_pg(lp.student_T, teacher.token_T, old_logprob_T=old, is_cap=loss_cfg.is_cap)


def cached_divergence(student_topk_TK: torch.Tensor, teacher: TeacherTargets) -> torch.Tensor:
    """The loss on cached records (`trainer.cache`), [T]: forward KL(teacher ‖ student) over the
    teacher's top-k plus the tail bucket, as in offline knowledge distillation, whatever
    `loss.divergence` is for sampled rollouts. A cached completion was not sampled by the student,
    so its positions follow the data's distribution, not the student's: the loss is a supervised
    one on that data, and no importance weight applies (reweighting to the student's policy would
    take the product of every earlier token's ratio, whose variance grows with the length). Reverse
    KL's case, that the student is trained on the states it visits itself, does not hold here;
    forward KL (cross-entropy to the teacher's soft targets) is the loss whose minimum on any
    data is the teacher's distribution, mass-covering included."""
    return losses.topk_divergence(student_topk_TK, teacher.topk_TK, kind="forward_kl", tail=True)


def distill(student_logits_TV: torch.Tensor, batch: MicroBatch, cfg: Config,
            teacher: TeacherTargets) -> tuple[torch.Tensor, dict[str, float]]:
    """Self-distillation: the per-token divergence to the teacher, plus `loss.rl_coef` × the GRPO term."""
    loss_cfg = cfg.loss
    lp = sampled_logprobs(student_logits_TV, batch, cfg.rollout.temperature)
    rl_T = rl_term(cfg, student_logits_TV, batch, lp)
    student_topk = (losses.gather_logprobs(student_logits_TV, teacher.topk_ids_TK, lp.student_lse_T)
                    if teacher.topk_ids_TK.numel() else None)
    per_token = divergence(cfg, student_logits_TV, teacher, lp, student_topk)
    cached_T = batch.per_rollout([r.cached for r in batch.rollouts]).bool()
    if cached_T.any():
        per_token = torch.where(cached_T, cached_divergence(student_topk, teacher), per_token)
    if loss_cfg.token_cap is not None:
        per_token = losses.cap_token_losses(per_token, loss_cfg.token_cap)
    if loss_cfg.is_cap is not None and loss_cfg.estimator != "sampled":
        # full and top-k take the expectation over y_t exactly, at prefixes the engine's policy drew:
        # the learner's policy may have moved since (train.async's lag, numerics), so each position
        # is reweighted by its prefix's truncated importance weight (the sampled estimator and the
        # RL term weight their own token instead). A cached record was drawn by no policy of the
        # student's: weight 1 (see `cached_divergence`).
        weights = losses.prefix_importance_weights(lp.rollout_T, lp.engine_T, [len(c) for c in batch.completions],
                                                   cap=loss_cfg.is_cap)
        per_token = torch.where(cached_T, 1.0, weights) * per_token
    # no distillation where the sibling context found no successful sibling; the RL term stays
    per_token = torch.where(batch.per_rollout([r.distill for r in batch.rollouts]), per_token, 0.0)
    loss_T = per_token if rl_T is None else per_token + loss_cfg.rl_coef * rl_T
    mask_T = batch.mask_T
    with torch.no_grad():
        stats = {
            "tokens": mask_T.sum().item(),
            "distill/loss": masked_sum(per_token, mask_T).item(),
            "distill/kl": masked_sum(lp.student_T - teacher.token_T, mask_T).item(),
            "distill/teacher_logprob": masked_sum(teacher.token_T, mask_T).item(),
            "distill/student_logprob": masked_sum(lp.student_T, mask_T).item(),
            "distill/student_entropy": masked_sum(losses.chunked_entropy(student_logits_TV), mask_T).item(),
        }
        sampled_T = mask_T & ~cached_T
        stats |= health_sums(lp, sampled_T, loss_cfg.is_cap)
        if cached_T.any():  # the engines' health is the sampled tokens'; the cached records' own loss curve
            stats |= {"tokens/sampled": sampled_T.sum().item(), "tokens/cache": (mask_T & cached_T).sum().item(),
                      "distill/cache/loss": masked_sum(per_token, mask_T & cached_T).item()}
        if cfg.teachers:  # a teacher per task: each task's own curves
            for task in sorted({r.task for r in batch.rollouts}):
                task_T = batch.per_rollout([r.task == task for r in batch.rollouts]).bool() & mask_T
                stats |= {f"tokens/{task}": task_T.sum().item(), f"distill/{task}/loss": masked_sum(per_token, task_T).item(),
                          f"distill/{task}/kl": masked_sum(lp.student_T - teacher.token_T, task_T).item()}
        if student_topk is not None:
            stats["distill/topk_mass"] = masked_sum(losses.topk_mass(student_topk), mask_T).item()
        if rl_T is not None:
            stats["rl/pg_loss"] = masked_sum(rl_T, mask_T).item()
    return masked_sum(loss_T, mask_T), stats
