"""Token-budget micro-batches (`learner.max_tokens_per_micro_batch`): the plans keep every sequence
once and every forward within the budget, the ranks share the batch by tokens, and a step gives the
same losses and gradient norm as by count: in process on one rank (padded, packed, every mode, LoRA),
and on two DeepSpeed ranks in a real Ray cluster whose micro-batch counts differ (ZeRO-2 and ZeRO-3,
with a live teacher on the learner's own weights)."""

import dataclasses
import random

import pytest

from conftest import ROOT
from core.errors import DataError
from test_lora_learner import batch, toy_learner
from trainer.config import load_config
from trainer.learner.batching import balanced_rank_parts, budget_micro_batches, micro_batch_cost


def _lengths(seed: int, count: int) -> list[int]:
    rng = random.Random(seed)
    return [int(rng.lognormvariate(4, 1)) + 1 for _ in range(count)]  # long-tailed, as completions are


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("packed", [False, True])
def test_budget_micro_batches_keep_every_sequence_once_within_the_budget(seed, packed):
    lengths = _lengths(seed, 64)
    budget = max(lengths) + seed * 50
    plan = budget_micro_batches(lengths, budget, packed)
    assert sorted(i for group in plan for i in group) == list(range(len(lengths)))
    costs = [micro_batch_cost([lengths[i] for i in group], packed) for group in plan]
    assert max(costs) <= budget
    # first-fit decreasing: no two micro-batches could have been one
    assert all(micro_batch_cost([lengths[i] for i in a + b], packed) > budget for a in plan for b in plan if a is not b)
    with pytest.raises(ValueError, match=f"a sequence of {max(lengths)} tokens exceeds "
                                         f"learner.max_tokens_per_micro_batch={max(lengths) - 1}"):
        budget_micro_batches(lengths, max(lengths) - 1, packed)


@pytest.mark.parametrize("ranks", [2, 3, 8])
def test_rank_parts_are_balanced_by_tokens_where_count_shards_are_not(ranks):
    lengths = _lengths(ranks, 96)
    parts = balanced_rank_parts(lengths, ranks)
    assert sorted(i for part in parts for i in part) == list(range(len(lengths)))
    assert all(part == sorted(part) for part in parts)
    loads = [sum(lengths[i] for i in part) for part in parts]
    # the longest-first bound: no part exceeds the mean by more than one sequence
    assert max(loads) - sum(loads) / ranks <= max(lengths)
    by_count = [sum(lengths[i::ranks]) for i in range(ranks)]
    assert max(loads) - min(loads) <= max(by_count) - min(by_count)
    assert balanced_rank_parts([5], 3) == [[0], [], []]


def _ragged(toy_world):
    """Toy rollouts whose completions are 1 to 12 tokens long (their ids need not be answers)."""
    rollouts, teacher_prompts = batch(toy_world)
    rollouts = [dataclasses.replace(r, completion_ids=(r.completion_ids * 6)[:n], logprobs=[0.0] * n,
                                    advantage=(-1.0) ** i * 0.5)
                for i, (r, n) in enumerate(zip(rollouts, (12, 1, 3, 9, 2, 6, 1, 11), strict=True))]
    return rollouts, teacher_prompts, sum(len(r.completion_ids) for r in rollouts)


CASES = {
    "distill-topk": [], "distill-full-packed": ["loss.estimator=full", "learner.packing=true"],
    "grpo": ["loss.mode=grpo", "rollout.n=2", "train.prompts_per_step=4"], "sft-packed": ["loss.mode=sft", "learner.packing=true"],
    "lora-distill-full": ["model.lora.r=8", "loss.estimator=full"],
}


def _compared(by_count: dict, by_budget: dict, name: str):
    keys = [k for k in by_count if k.endswith("loss") or k == "learner/grad_norm"]
    assert len(keys) >= 2, (name, sorted(by_count))
    for key in keys:
        assert by_budget[key] == pytest.approx(by_count[key], rel=1e-5, abs=1e-6), (name, key)


@pytest.mark.slow
def test_a_budget_step_gives_the_count_step_losses_and_gradients(toy_world):
    rollouts, teacher_prompts, tokens = _ragged(toy_world)
    learner = None
    for name, overrides in CASES.items():
        steps = {}
        for budget in (None, 24):  # prompts are 8 tokens: 1 to 3 sequences a micro-batch
            learner = toy_learner(learner, toy_world, *overrides,
                                  f"learner.max_tokens_per_micro_batch={'null' if budget is None else budget}")
            steps[budget] = learner.train_step(rollouts, teacher_prompts, None, tokens)
        _compared(steps[None], steps[24], name)
        assert steps[None]["learner/micro_batches"] == 2 and steps[24]["learner/micro_batches"] > 2


@pytest.mark.slow
@pytest.mark.parametrize("overrides", [
    pytest.param(["learner.zero_stage=2"], id="zero2"),
    pytest.param(["learner.zero_stage=3", "teacher.weights=live", "loss.estimator=full"], id="zero3-live-teacher"),
])
def test_two_ranks_with_unequal_micro_batch_counts_step_as_by_count(toy_world, local_ray, overrides):
    from trainer.cluster.learners import LearnerGroup
    rollouts, teacher_prompts, tokens = _ragged(toy_world)
    common = [f"model.path={toy_world / 'model'}", "data.train=unused.jsonl", "train.prompts_per_step=8",
              "learner.micro_batch=4", "learner.warmup_steps=0", "teacher.scorer=learner", "learner.num=2", *overrides]
    by_count = load_config(ROOT / "configs" / "toy.yaml", common)
    by_budget = load_config(ROOT / "configs" / "toy.yaml", [*common, "learner.max_tokens_per_micro_batch=20"])
    group = LearnerGroup(by_budget)
    try:
        lengths = [len(r.prompt_ids) + len(r.completion_ids) for r in rollouts]
        counts = [len(budget_micro_batches([lengths[i] for i in part], 20, False))
                  for part in balanced_rank_parts(lengths, 2)]
        assert counts[0] != counts[1], counts  # the case that needs the stand-in micro-batches
        budget_step = group.train_step(rollouts, teacher_prompts, None, tokens)
        assert budget_step["learner/micro_batches"] == max(counts)
        assert budget_step["learner/rank_token_imbalance"] < 1.1
        group.reconfigure(by_count)
        _compared(group.train_step(rollouts, teacher_prompts, None, tokens), budget_step, "two ranks")
    finally:
        group.close()


def test_a_prompt_that_does_not_fit_the_budget_is_named_before_the_run(tmp_path):
    from trainer.data.prompts import EncodedPrompts, drop_overlong
    from trainer.data.records import DataReport, load_examples
    data = tmp_path / "train.jsonl"
    data.write_text('{"prompt": "short", "context": "c", "answer": "a"}\n{"prompt": "long", "context": "c", "answer": "a"}\n')
    examples, report = load_examples(data)
    encoded = EncodedPrompts(student={examples[0].id: [1] * 4, examples[1].id: [1] * 9},
                             teacher={e.id: [1] * 5 for e in examples})
    with pytest.raises(DataError, match=rf"{data}:2: field 'prompt': the student prompt is 9 tokens; with "
                                        r"rollout.max_tokens=8 it does not fit learner.max_tokens_per_micro_batch=16"):
        drop_overlong(examples, encoded, 100, 8, "error", report, micro_batch_tokens=16)
    kept = drop_overlong(examples, encoded, 100, 8, "skip", DataReport(str(data)), micro_batch_tokens=16)
    assert [e.id for e in kept] == [examples[0].id]
