"""How one step's sequences are split: across the learner ranks, then into each rank's micro-batches.

Pure functions of the sequences' lengths (prompt + completion, the tokens a student forward
computes). By count (`learner.micro_batch`) or, with `learner.max_tokens_per_micro_batch`, by a
token budget: completions that vary tenfold in length make a count a poor measure of the work, so a
budget keeps every forward near the same size and the ranks near the same load.
"""

import heapq


def sequence_length(rollout) -> int:
    """The tokens of a rollout's student forward: its prompt and its completion."""
    return len(rollout.prompt_ids) + len(rollout.completion_ids)


def micro_batch_cost(lengths: list[int], packed: bool) -> int:
    """The tokens a forward of these sequences computes: the row back to back (`packed`), or as many
    rows as sequences, each as long as the longest (padded)."""
    if not lengths:
        return 0
    return sum(lengths) if packed else len(lengths) * max(lengths)


def balanced_rank_parts(lengths: list[int], ranks: int) -> list[list[int]]:
    """The sequences' indices in `ranks` parts of near-equal token totals: longest first, each to the
    part with the fewest tokens so far (LPT). Each part keeps the batch's order; a part may be empty
    when there are fewer sequences than ranks."""
    loads = [(0, rank) for rank in range(ranks)]  # a heap of (tokens so far, rank)
    parts: list[list[int]] = [[] for _ in range(ranks)]
    for index in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        tokens, rank = heapq.heappop(loads)
        parts[rank].append(index)
        heapq.heappush(loads, (tokens + lengths[index], rank))
    return [sorted(part) for part in parts]


def budget_micro_batches(lengths: list[int], budget: int, packed: bool) -> list[list[int]]:
    """The indices of one rank's sequences grouped so that each micro-batch computes at most `budget`
    tokens (`micro_batch_cost`): longest first, each into the first micro-batch it still fits
    (first-fit decreasing), so sequences of like length share a padded micro-batch. A sequence
    longer than the budget is refused here: the startup check names the config key before a run."""
    over = [n for n in lengths if n > budget]
    if over:
        raise ValueError(f"a sequence of {max(over)} tokens exceeds learner.max_tokens_per_micro_batch={budget}")
    groups: list[list[int]] = []
    group_lengths: list[list[int]] = []
    for index in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        for group, members in zip(groups, group_lengths, strict=True):
            if micro_batch_cost(members + [lengths[index]], packed) <= budget:
                group.append(index)
                members.append(lengths[index])
                break
        else:
            groups.append([index])
            group_lengths.append([lengths[index]])
    return groups


def count_micro_batches(count: int, micro_batch: int, steps: int) -> list[list[int]]:
    """`steps` micro-batches of `micro_batch` consecutive sequences; the ones past `count` are empty
    (a rank with a short share still joins every collective backward)."""
    return [list(range(start, min(start + micro_batch, count))) for start in range(0, steps * micro_batch, micro_batch)]
