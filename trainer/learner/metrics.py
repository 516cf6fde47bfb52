"""A learner step's statistics: summed over its tokens by the objectives, averaged here per token,
and merged over the ranks weighted by their tokens. Per-task statistics (`distill/<task>/<name>`,
with a teacher per task, and `distill/cache/loss`, the cached records') are averaged over their
task's tokens (`tokens/<task>`) instead, and the health statistics, which compare the engines'
sampling with the learner's, over the sampled tokens (`tokens/sampled`) when a step also trains on
cached records.
"""

_PER_TASK_NAMES = ("loss", "kl")


def task_of(key: str) -> str | None:
    """The task of a per-task statistic `distill/<task>/<name>` (a task name may hold '/'), else None."""
    head, _, name = key.rpartition("/")
    if not key.startswith("distill/") or name not in _PER_TASK_NAMES or head == "distill":
        return None
    return head.removeprefix("distill/")


def count_of(key: str, counts: dict[str, float]) -> str:
    """The token count a statistic is averaged over (see the module docstring)."""
    task = task_of(key)
    if task is not None:
        return f"tokens/{task}"
    return "tokens/sampled" if key.startswith("health/") and "tokens/sampled" in counts else "tokens"


def token_means(sums: dict[str, float]) -> dict[str, float]:
    """Per-token means of one rank's token sums; keeps the counts (`tokens`, `tokens/<task>`) for the merge."""
    counts = {key: value for key, value in sums.items() if key == "tokens" or key.startswith("tokens/")}
    means = {key: value / max(counts.get(count_of(key, counts), 0.0), 1.0)
             for key, value in sums.items() if key not in counts}
    return means | {"tokens": max(counts.get("tokens", 0.0), 1.0)} | {k: v for k, v in counts.items() if k != "tokens"}


def merge_rank_metrics(per_rank: list[dict[str, float]]) -> dict[str, float]:
    """Token-weighted mean of the ranks' per-token metrics (per-task ones weighted by their task's
    tokens); rank 0's for the rest (lr, grad norm). The per-task counts are dropped."""
    keys = {key for m in per_rank for key in m}
    merged = {key: value for key, value in per_rank[0].items() if not key.startswith("tokens/")}
    for key in keys:
        task = task_of(key)
        if task is None and not key.startswith(("distill/", "health/", "rl/", "sft/")):
            continue
        weights = [m.get(count_of(key, m), 0.0) if key in m else 0.0 for m in per_rank]
        merged[key] = sum(m.get(key, 0.0) * w for m, w in zip(per_rank, weights)) / (sum(weights) or 1.0)
    merged["tokens"] = sum(m.get("tokens", 0.0) for m in per_rank)
    return merged
