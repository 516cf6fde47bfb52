"""Fault injection on the real stack: non-finite losses on DeepSpeed learners, rollout engines and
learners killed with SIGKILL mid-run, and no secret in anything a run writes."""

import json
import math
import os
import signal
import subprocess
import sys
import threading
import time

import psutil
import pytest
import ray
from transformers import AutoModelForCausalLM, AutoTokenizer

from rollout.batch import Rollout, TeacherScores
from trainer import loop
from trainer.cluster import LearnerGroup
from trainer.data import PromptSampler, load_examples
from trainer.errors import DivergedError, LearnerDiedError
from trainer.health import SkippedSteps
from trainer.metrics import read_metrics

from conftest import ROOT
from test_backbone import toy_config

pytestmark = pytest.mark.slow
ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # workers cannot import test modules


def _learner_state(learner):
    """Runs inside a learner actor (via __ray_call__): its weights, its AdamW state (DeepSpeed's ZeRO
    wrapper holds the client optimizer over the fp32 partitions), those partitions and the lr."""
    import torch
    inner = learner.optimizer.optimizer
    return {"params": {n: p.detach().clone() for n, p in learner.engine.module.named_parameters()},
            "adam": [{k: v.clone() if torch.is_tensor(v) else v for k, v in s.items()} for s in inner.state.values()],
            "fp32": [t.detach().clone() for t in learner.optimizer.single_partition_of_fp32_groups],
            "lr": learner.scheduler.get_last_lr()[0]}


def _same(a, b) -> bool:
    import torch
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, list):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return torch.equal(a, b) if torch.is_tensor(a) else a == b


def test_non_finite_teacher_scores_skip_the_step_on_every_rank(toy_world, small_eval, tmp_path, local_ray):
    """NaN or Inf teacher logprobs in one rank's share: both ranks skip the optimizer step, and the
    weights, AdamW moments, fp32 master partitions and lr stay bit-identical; K in a row stop the run."""
    cfg = toy_config(toy_world, small_eval, tmp_path, "learner.num=2", "learner.zero_stage=2", "learner.micro_batch=2",
                     "train.prompts_per_step=8", "learner.warmup_steps=4", "teacher.scorer=engine",
                     "teacher.weights=initial", "loss.estimator=topk", "loss.topk=4")
    tokenizer = AutoTokenizer.from_pretrained(cfg.model.path)
    examples = [json.loads(line) for line in open(cfg.data.train)][:8]
    rollouts, teacher_prompts, vocab = [], [], len(tokenizer)
    for e in examples:
        completion = tokenizer(e["answer"], add_special_tokens=False)["input_ids"]
        rollouts.append(Rollout(example_id=e["id"], prompt_ids=tokenizer(e["prompt"])["input_ids"],
                                completion_ids=completion, logprobs=[-1.0] * len(completion), policy_version=0,
                                finish_reason="stop"))
        teacher_prompts.append(tokenizer(e["context"] + "\n" + e["prompt"])["input_ids"])
    total = sum(len(r.completion_ids) for r in rollouts)

    def scores(poison: float | None = None, at: int = 0) -> list[TeacherScores]:
        """The teacher puts 0.7 on the sampled token and 0.1 on three others; `poison` replaces one
        top-k logprob of rollout `at` (rollouts 0-3 go to rank 0, 4-7 to rank 1)."""
        out = []
        for i, r in enumerate(rollouts):
            ids = [[t, *[(t + j) % vocab for j in (1, 2, 3)]] for t in r.completion_ids]
            lps = [[math.log(0.7)] + [math.log(0.1)] * 3 for _ in r.completion_ids]
            if poison is not None and i == at:
                lps[0][1] = poison
            out.append(TeacherScores(token_logprobs=[math.log(0.7)] * len(ids), topk_ids=ids, topk_logprobs=lps))
        return out

    group = LearnerGroup(cfg)
    guard = SkippedSteps(limit=3)

    def step(number, teacher_scores):
        metrics = group.train_step(rollouts, teacher_prompts, teacher_scores, total)  # checks the ranks agree
        guard.update(number, bool(metrics["learner/skipped"]))
        return metrics, ray.get([a.__ray_call__.remote(_learner_state) for a in group.actors])

    initial = ray.get([a.__ray_call__.remote(_learner_state) for a in group.actors])
    metrics, applied = step(1, scores())
    assert metrics["learner/skipped"] == 0 and math.isfinite(metrics["distill/loss"])
    assert not _same(initial[0]["params"], applied[0]["params"])  # a good step moves the weights ...
    assert all(s["step"].item() == 1 for s in applied[1]["adam"]) and applied[0]["lr"] > initial[0]["lr"]  # ... and Adam

    for number, (poison, at) in enumerate([(float("nan"), 6), (float("inf"), 1)], start=2):
        metrics, after = step(number, scores(poison, at))
        assert metrics["learner/skipped"] == 1, (poison, at)
        for rank in (0, 1):
            assert _same(after[rank], applied[rank]), (poison, rank)  # weights, Adam, fp32 partitions, lr
    assert (guard.total, guard.in_a_row) == (2, 2)

    metrics, later = step(4, scores())  # training goes on from the untouched state
    assert metrics["learner/skipped"] == 0 and not _same(later[0]["params"], applied[0]["params"])
    assert all(s["step"].item() == 2 for s in later[0]["adam"]) and guard.in_a_row == 0

    step(5, scores(float("nan"), 0))
    step(6, scores(float("-inf"), 7))
    with pytest.raises(DivergedError, match=r"step 7: 3 steps in a row had a non-finite loss or gradient "
                                            r"\(train.max_skipped_steps=3\)"):
        step(7, scores(float("nan"), 3))
    assert guard.total == 5
    for actor in group.actors:
        ray.kill(actor)
