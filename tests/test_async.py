"""train.async (one-step off-policy): the lag bound, the rollout feed's order and sampler state, the
truncated importance weights, their use in the learner, and a run on the real stack."""

import itertools

import pytest
import torch
from torch.testing import assert_close

from conftest import ROOT
from core.errors import ConfigError, StaleRolloutError
from rollout.batch import Rollout
from trainer.config import load_config
from trainer.data.sampler import PromptSampler
from trainer.learner.losses import importance_weights, prefix_importance_weights
from trainer.step.feed import RolloutFeed, check_policy_lag

# ------------------------------------------------------------------------------------------------
# Pure parts
# ------------------------------------------------------------------------------------------------

def test_policy_lag_is_bounded():
    assert check_policy_lag({4}, 4, max_lag=0) == 0
    assert check_policy_lag({3, 4}, 4, max_lag=1) == 1
    with pytest.raises(StaleRolloutError, match=r"versions \[2\] at learner version 4"):
        check_policy_lag({2}, 4, max_lag=1)
    with pytest.raises(StaleRolloutError):
        check_policy_lag({3}, 4, max_lag=0)  # on-policy training refuses any lag
    with pytest.raises(StaleRolloutError):
        check_policy_lag({5}, 4, max_lag=1)  # from a version the learners have not reached


def test_importance_weights_truncate_the_ratio():
    logp, behaviour = torch.log(torch.tensor([0.5, 0.2, 0.9])), torch.log(torch.tensor([0.25, 0.4, 0.3]))
    assert_close(importance_weights(logp, behaviour), torch.tensor([2.0, 0.5, 3.0]))
    assert_close(importance_weights(logp, behaviour, cap=2.5), torch.tensor([2.0, 0.5, 2.5]))
    assert not importance_weights(logp.requires_grad_(), behaviour).requires_grad


def test_prefix_weights_are_the_product_before_each_position():
    ratios = torch.tensor([2.0, 0.5, 3.0, 1.5, 4.0])
    logp, behaviour = ratios.log(), torch.zeros(5)
    got = prefix_importance_weights(logp, behaviour, [3, 2])  # sequences [2, .5, 3] and [1.5, 4]
    assert_close(got, torch.tensor([1.0, 2.0, 1.0, 1.0, 1.5]))
    assert_close(prefix_importance_weights(logp, behaviour, [5], cap=2.0), torch.tensor([1.0, 2.0, 1.0, 2.0, 2.0]))


def test_prefix_weights_correct_an_off_policy_expectation_exactly():
    """A loss at position 3 that depends on the prefix (y1, y2), drawn from μ: Σ μ(prefix)·w·D equals
    the expectation under π, by enumeration of every prefix."""
    torch.manual_seed(0)
    pi, mu = torch.softmax(torch.randn(2, 4), -1), torch.softmax(torch.randn(2, 4), -1)  # per position, 4 tokens
    loss = torch.randn(4, 4)  # D(y1, y2)
    off_policy = on_policy = 0.0
    for y1, y2 in itertools.product(range(4), repeat=2):
        logp = torch.stack([pi[0, y1], pi[1, y2], torch.tensor(0.5)]).log()
        behaviour = torch.stack([mu[0, y1], mu[1, y2], torch.tensor(0.25)]).log()
        weight = prefix_importance_weights(logp, behaviour, [3])[2]  # ignores the token at position 3 itself
        off_policy += mu[0, y1] * mu[1, y2] * weight * loss[y1, y2]
        on_policy += pi[0, y1] * pi[1, y2] * loss[y1, y2]
    assert_close(off_policy, on_policy)


def test_async_needs_the_importance_cap_and_round_trips_as_train_async():
    overrides = ["model.path=m", "data.train=t.jsonl", "train.async=true"]
    with pytest.raises(ConfigError, match="loss.is_cap: train.async"):
        load_config(ROOT / "configs" / "toy.yaml", overrides)
    with pytest.raises(ConfigError, match="train.async: loss.mode='sft' samples nothing"):
        load_config(ROOT / "configs" / "toy.yaml", [*overrides, "loss.mode=sft"])
    cfg = load_config(ROOT / "configs" / "toy.yaml", [*overrides, "loss.is_cap=2"])
    from trainer.config import config_from_dict, dump_config
    assert cfg.train.async_ and "async: true" in dump_config(cfg)
    assert config_from_dict(__import__("yaml").safe_load(dump_config(cfg))) == cfg


class Engines:
    """Stands in for the engine pool behind the feed's `sample` callable: it records what was asked and
    returns rollouts stamped with the version it was asked for, as the pool's version check guarantees."""

    def __init__(self):
        self.calls = []

    def __call__(self, examples, version, step):
        self.calls.append((step, version, [e for e in examples]))
        return [Rollout(str(e), [1], [2], [-0.1], version, "stop") for e in examples]


def test_feed_prefetches_the_next_step_at_the_current_version():
    dataset = list(range(10))
    engines, sampler = Engines(), PromptSampler(len(dataset), seed=0)
    feed = RolloutFeed(sampler, 4, engines, ahead=True, max_lag=1)
    reference = PromptSampler(len(dataset), seed=0)  # the same draws, without the feed
    version = 0
    for step in range(1, 5):
        examples, rollouts, metrics = feed.take(dataset, step, version)
        assert examples == [dataset[i] for i in reference.next_indices(4)]  # the data order of a sync run
        assert metrics["async/policy_lag"] == (0 if step == 1 else 1)
        before_prefetch = sampler.state_dict()
        if step < 4:
            feed.prefetch(dataset, step + 1, version)
            assert feed.sampler_state() == before_prefetch  # a checkpoint now resumes at step+1's draw
        feed.wait()
        version += 1  # the learners' step, then the sync
    assert [(step, v) for step, v, _ in engines.calls] == [(1, 0), (2, 0), (3, 1), (4, 2)]
    feed.close()


def test_feed_refuses_rollouts_two_versions_old():
    engines = Engines()
    feed = RolloutFeed(PromptSampler(10, seed=0), 2, engines, ahead=True, max_lag=1)
    feed.take(list(range(10)), 1, 0)
    feed.prefetch(list(range(10)), 2, 0)
    with pytest.raises(StaleRolloutError):
        feed.take(list(range(10)), 2, 2)  # e.g. a step's sync skipped the prefetch's wait
    feed.close()


def test_sync_feed_samples_on_demand_with_no_lag():
    engines = Engines()
    feed = RolloutFeed(PromptSampler(10, seed=0), 2, engines, ahead=False, max_lag=1)
    feed.prefetch(list(range(10)), 2, 0)  # nothing: sync mode samples when the step asks
    assert engines.calls == []
    _, _, metrics = feed.take(list(range(10)), 1, 3)
    assert metrics["async/policy_lag"] == 0 and engines.calls[0][:2] == (1, 3)
    feed.close()


# ------------------------------------------------------------------------------------------------
# The learner applies them (one gloo DeepSpeed rank in process)
# ------------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_learner_reweights_positions_by_their_prefix_weight(toy_world):
    """The same batch three times, with the engine's logprob of each completion's first token set so
    that π/μ = 1, 1.5 and 3 there (the others exact). The first position is masked, so every counted
    position's prefix weight is 1, 1.5 and min(3, is_cap=2): distill/loss scales by exactly that."""
    from test_lora_learner import _port, batch
    from transformers import AutoModelForCausalLM

    from test_backbone import learner_logprobs
    from trainer.config import config_to_dict
    from trainer.learner.learner import Learner
    cfg = load_config(ROOT / "configs" / "toy.yaml", [
        f"model.path={toy_world / 'model'}", "data.train=unused.jsonl", "train.prompts_per_step=8", "learner.micro_batch=8",
        "learner.warmup_steps=0", "learner.lr=1e-12", "teacher.scorer=learner", "teacher.weights=initial",
        "loss.estimator=topk", "loss.is_cap=2", "loss.mask_first_tokens=1"])
    learner = Learner(config_to_dict(cfg), 0, 1, "127.0.0.1", _port())
    rollouts, teacher_prompts = batch(toy_world)
    exact = learner_logprobs(AutoModelForCausalLM.from_pretrained(toy_world / "model"), rollouts, 1.0).tolist()
    tokens = sum(len(r.completion_ids) - 1 for r in rollouts)
    losses, weights = [], []
    for ratio in (1.0, 1.5, 3.0):
        start, shifted = 0, []
        for r in rollouts:
            logprobs = exact[start:start + len(r.completion_ids)]
            start += len(r.completion_ids)
            logprobs[0] -= torch.tensor(ratio).log().item()  # μ(y_1) = π(y_1) / ratio
            shifted.append(Rollout(r.example_id, r.prompt_ids, r.completion_ids, logprobs, 0, "stop"))
        metrics = learner.train_step(shifted, teacher_prompts, None, tokens)
        losses.append(metrics["distill/loss"])
        weights.append(metrics["health/is_weight"])
    assert losses[0] > 0
    assert losses[1] / losses[0] == pytest.approx(1.5, rel=1e-4)
    assert losses[2] / losses[0] == pytest.approx(2.0, rel=1e-4)
    assert weights[0] == pytest.approx(1.0, abs=1e-4)  # the counted positions' own tokens are exact


# ------------------------------------------------------------------------------------------------
# The real stack
# ------------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_async_run_trains_one_version_late_and_resumes(toy_world, small_eval, tmp_path, warm_actors):
    from test_backbone import toy_config
    from trainer.loop import train
    from trainer.monitoring.metrics import read_metrics
    cfg = toy_config(toy_world, small_eval, tmp_path, "train.steps=4", "train.async=true", "loss.is_cap=2",
                     "train.save_every=2", "rollout.engines=2")
    train(cfg, warm=warm_actors)
    metrics = read_metrics(tmp_path / cfg.name)
    assert [m["step"] for m in metrics] == [0, 1, 2, 3, 4]
    assert [m["async/policy_lag"] for m in metrics[1:]] == [0, 1, 1, 1]
    # one version late, the engines' logprobs are no longer the learner's: the weights see it
    assert metrics[1]["health/engine_trainer_logprob_gap"] < 1e-4
    assert all(m["health/engine_trainer_logprob_gap"] > 1e-4 for m in metrics[2:])
    assert all(0 < m["health/is_weight"] < 2 and 0 <= m["health/is_capped_fraction"] <= 1 for m in metrics[1:])
    assert all(m["time/generate"] < m["time/step"] for m in metrics[1:])
    # a rerun with more steps resumes from step 4 and draws step 5 on-policy
    train(toy_config(toy_world, small_eval, tmp_path, "train.steps=5", "train.async=true", "loss.is_cap=2",
                     "train.save_every=2", "rollout.engines=2"), warm=warm_actors)
    metrics = read_metrics(tmp_path / cfg.name)
    assert [m["step"] for m in metrics] == [0, 1, 2, 3, 4, 5] and metrics[5]["async/policy_lag"] == 0
