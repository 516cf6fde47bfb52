"""What crosses process boundaries: plain dataclasses of lists, no model objects.

Logprob semantics (the same everywhere in the project):
- `Rollout.logprobs[t]` is log π(y_t | prefix) of the *sampling* distribution the engine drew from:
  logits divided by `rollout.temperature`, then top-k / top-p truncation, then log-softmax
  (vLLM's `processed_logprobs`). It is the behaviour policy for importance weights, and it equals
  the learner's `log_softmax(logits / temperature)` when no truncation is on.
- `TeacherScores` hold the teacher's *untempered* log-probabilities (vLLM prompt logprobs are
  computed from the raw logits), of the student's sampled tokens and of its top-k tokens.
"""

from dataclasses import dataclass, field


@dataclass
class Rollout:
    """One sampled completion of one prompt."""

    example_id: str
    prompt_ids: list[int]
    completion_ids: list[int]
    logprobs: list[float]
    """Sampling-distribution logprob of each completion token (see the module docstring)."""
    policy_version: int
    """Version of the student weights that produced it (number of syncs so far)."""
    finish_reason: str
    """'stop' (end of sequence) or 'length' (hit rollout.max_tokens)."""
    text: str = ""
    advantage: float = 0.0
    """Group-normalized reward advantage, for the RL term (`loss.mode=grpo` or `loss.rl_coef`)."""
    distill: bool = True
    """Whether the distillation term applies to it (false: `teacher.context=sibling` found no successful sibling)."""
    task: str = "default"
    """Its record's task (the `task` column): which teacher scores it, and its per-task curves."""
    cached: bool = False
    """A teacher-cache record (`trainer.cache`), not a sample of the student's: its targets are the
    cache's, it is trained by forward KL to them, and it has no sampling logprobs (`logprobs` are 0)."""


@dataclass
class TeacherScores:
    """The teacher's view of one completion, position by position."""

    token_logprobs: list[float]
    """log p_T(y_t) of each sampled completion token y_t."""
    topk_ids: list[list[int]] = field(default_factory=list)
    """[T][K] the teacher's K most likely token ids at each position (empty when K = 0)."""
    topk_logprobs: list[list[float]] = field(default_factory=list)
    """[T][K] their log-probabilities, untempered, not renormalized."""
