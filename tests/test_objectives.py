"""The per-mode batch logic of trainer/step/batch.py, with the toy tokenizer and no engines."""

import math

import pytest
from transformers import AutoTokenizer

from conftest import ROOT
from core.errors import ConfigError
from rewards import resolve
from rollout.batch import Rollout
from trainer.config import load_config
from trainer.data.prompts import encode_prompts
from trainer.data.records import Example
from trainer.step.batch import RewardTable, prepare_batch, score_rewards, sibling_contexts
from trainer.step.rollouts import drop_shortest, sft_target_ids


def rollout(example_id, ids):
    return Rollout(example_id=example_id, prompt_ids=[1], completion_ids=list(ids), logprobs=[0.0] * len(ids),
                   policy_version=0, finish_reason="stop")


def example(i, a, b):
    return Example(id=f"e{i}", prompt=f"Q:{a}+{b}=", context=f"W:{a}+{b}:{a + b}", answer=str(a + b), task="addition",
                   where=f"x.jsonl:{i}")


@pytest.fixture(scope="module")
def tokenizer(toy_world):
    return AutoTokenizer.from_pretrained(toy_world / "model")


def encode(tokenizer, texts):
    return [tokenizer(t, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id] for t in texts]


def test_sft_target_is_the_students_completion_with_eos(tokenizer):
    e = example(0, 47, 85)
    ids = sft_target_ids(e, tokenizer, "answer")
    assert ids[-1] == tokenizer.eos_token_id and tokenizer.decode(ids[:-1]) == "132"
    assert tokenizer.decode(sft_target_ids(e, tokenizer, "context")[:-1]) == "W:47+85:132"


def test_drop_shortest_drops_the_shortest_fraction_in_order():
    rollouts = [rollout("a", range(n)) for n in (5, 1, 3, 2, 8, 2, 7, 4, 6, 9)]
    kept, metrics = drop_shortest(rollouts, 0.3)  # drops lengths 1, 2, 2 (ties by order)
    assert kept == [0, 2, 4, 6, 7, 8, 9]  # lengths 5, 3, 8, 7, 4, 6, 9
    assert metrics == {"ssd/dropped_fraction": 0.3, "ssd/kept_len_min": 3.0}
    assert drop_shortest(rollouts, 0.0)[0] == list(range(10))


def test_sibling_contexts_come_from_successful_other_samples():
    nan = math.nan
    # group 1: samples 1 and 3 succeed; group 2: only sample 4 succeeds; group 3: nothing scored
    table = RewardTable(values={}, total=[0.0, 1.0, 0.0, 1.0, 1.0, 0.0, 0.0, 0.0, nan, nan, nan, nan],
                        feedback=["wrong 1", None, "wrong 3", None] + [None] * 8)
    texts = [f"t{i}" for i in range(12)]
    contexts = sibling_contexts([None] * 12, table, 4, texts, "{solution}|{feedback}", success_reward=1.0)
    # each sample takes the next successful sibling after it, never itself; feedback is its own
    assert contexts[:4] == ["t1|wrong 1", "t3|", "t3|wrong 3", "t1|"]
    assert contexts[4] is None  # the only success of its group: no *other* successful sibling
    assert contexts[5:8] == ["t4|"] * 3
    assert contexts[8:] == [None] * 4


def test_rewards_follow_trls_convention_with_feedback_and_extra_columns(tokenizer):
    examples = [example(0, 47, 85), example(1, 10, 10)]
    rollouts = [rollout("e0", encode(tokenizer, ["132"])[0]), rollout("e0", encode(tokenizer, ["131"])[0]),
                rollout("e1", encode(tokenizer, ["20"])[0])]
    seen = {}

    def spy(prompts, completions, completion_ids, solution, answer, **columns):
        seen.update(prompts=prompts, completions=completions, solution=solution, columns=sorted(columns))
        return [None, 0.5, 1]

    table = score_rewards({"answer_match": resolve(["answer_match"])["answer_match"], "spy": spy},
                          examples, rollouts, tokenizer)
    assert table.values == {"answer_match": [1.0, 0.0, 1.0], "spy": [None, 0.5, 1.0]}
    assert table.total == [1.0, 0.5, 2.0]
    assert table.feedback == [None, "The previous answer 131 is wrong.", None]
    assert seen["completions"] == ["132", "131", "20"] and seen["solution"] == ["132", "132", "20"]
    assert seen["columns"] == ["context", "feedback", "id", "task"]
    assert table.metrics() == {"reward/answer_match": pytest.approx(2 / 3), "reward/spy": 0.75,
                               "reward/mean": pytest.approx((2 / 3 + 0.75) / 2)}


def test_grpo_batch_gets_group_advantages(toy_world, tokenizer, tmp_path):
    cfg = load_config(ROOT / "configs" / "toy.yaml", [f"model.path={toy_world / 'model'}", "loss.mode=grpo",
                                                       "rollout.n=2", "rewards=[answer_match]"])
    examples = [example(0, 47, 85), example(1, 10, 10)]
    rollouts = [rollout("e0", c) for c in encode(tokenizer, ["132", "1"])] + \
               [rollout("e1", c) for c in encode(tokenizer, ["20", "20"])]
    batch = prepare_batch(cfg, resolve(cfg.rewards), examples, rollouts, encode_prompts(examples, tokenizer, "{context}\n{prompt}"),
                          tokenizer)
    advantages = [r.advantage for r in batch.rollouts]
    assert advantages[0] > 0 > advantages[1] and advantages[2:] == [0.0, 0.0]
    assert batch.metrics["rl/zero_variance_groups"] == 0.5


def test_sibling_batch_marks_samples_without_a_successful_sibling(toy_world, tokenizer):
    cfg = load_config(ROOT / "configs" / "toy.yaml", [f"model.path={toy_world / 'model'}", "teacher.context=sibling",
                                                       "teacher.sibling_template={solution}", "rollout.n=2"])
    examples = [example(0, 47, 85), example(1, 10, 10)]
    rollouts = [rollout("e0", c) for c in encode(tokenizer, ["132", "1"])] + \
               [rollout("e1", c) for c in encode(tokenizer, ["2", "3"])]
    encoded = encode_prompts(examples, tokenizer, cfg.teacher.template)
    batch = prepare_batch(cfg, resolve(cfg.rewards), examples, rollouts, encoded, tokenizer)
    assert [r.distill for r in batch.rollouts] == [False, True, False, False]
    assert batch.rewards == [{"answer_match": 1.0}, {"answer_match": 0.0}, {"answer_match": 0.0},
                             {"answer_match": 0.0}]  # what samples.jsonl shows, computed once
    assert tokenizer.decode(batch.teacher_prompts[1]) == "132\nQ:47+85="  # the successful sibling as context
    assert batch.metrics["teacher/no_sibling_fraction"] == 0.75


@pytest.mark.parametrize("overrides, message", [
    (["loss.mode=grpo"], "rollout.n: the RL term compares samples"),
    (["loss.rl_coef=0.1", "loss.mode=ssd", "rollout.n=2"], "loss.rl_coef: adds the RL term"),
    (["teacher.context=sibling", "rollout.n=2", "rewards=[]"], "rewards: teacher.context='sibling' needs"),
    (["teacher.context=sibling", "rollout.n=2", "loss.mode=grpo"], "teacher.context: 'sibling' builds"),
    (["teacher.sibling_template={feedback}"], "teacher.sibling_template: must use {solution}"),
    (["loss.mode=sft", "rollout.n=2"], "rollout.n: loss.mode='sft' trains on one"),
    (["loss.ssd_drop_shortest=1"], "out of range"),
])
def test_objective_config_errors(overrides, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace("{", r"\{").replace("}", r"\}")):
        load_config(ROOT / "configs" / "toy.yaml", overrides)


def test_targets_scored_in_parts_merge_back_in_row_order():
    """A batch of several teachers is scored by each on its rows; the merge equals scoring it whole."""
    import dataclasses

    import torch

    from trainer.learner.objectives import merge_targets, micro_batch, targets_from_logits
    rollouts = [Rollout(f"e{i}", [1, 2], list(range(3, 3 + n)), [0.0] * n, 0, "stop") for i, n in enumerate([3, 1, 4, 2])]
    logits = torch.randn(sum(len(r.completion_ids) for r in rollouts), 12, generator=torch.Generator().manual_seed(0))
    whole = targets_from_logits(logits, micro_batch(rollouts, 0, torch.device("cpu")), 5)
    starts = [0, 3, 4, 8, 10]
    parts = []
    for rows in ([1, 3], [0, 2]):
        part = micro_batch([rollouts[i] for i in rows], 0, torch.device("cpu"))
        part_logits = torch.cat([logits[starts[i]:starts[i + 1]] for i in rows])
        parts.append((rows, targets_from_logits(part_logits, part, 5)))
    merged = merge_targets(parts, [len(r.completion_ids) for r in rollouts])
    for name in ("token_T", "topk_ids_TK", "topk_TK", "logits_TV"):
        torch.testing.assert_close(getattr(merged, name), getattr(whole, name))
    engine_scored = (parts[1][0], dataclasses.replace(parts[1][1], logits_TV=None))
    without_logits = merge_targets([parts[0], engine_scored], [len(r.completion_ids) for r in rollouts])
    assert without_logits.logits_TV is None  # a part scored on an engine has no full-vocabulary logits
