"""LoRA on the learner, in process (one gloo DeepSpeed rank, no Ray, no vLLM): the teacher with the
adapter disabled is the base model bit for bit, the teacher never runs with adapter dropout, an EMA
teacher averages the adapter only, and the checkpoints load with peft and transformers."""

import json
import socket

import pytest
import torch
from transformers import AutoModelForCausalLM

from conftest import ROOT
from rollout.batch import Rollout
from trainer.config import config_to_dict, load_config
from trainer.learner import adapters
from trainer.learner.forward import completion_logits
from trainer.learner.learner import Learner

pytestmark = pytest.mark.slow


def _port() -> int:
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def make_learner(toy_world, *overrides) -> Learner:
    cfg = load_config(ROOT / "configs" / "toy-lora.yaml", [
        f"model.path={toy_world / 'model'}", "data.train=unused.jsonl", "train.prompts_per_step=8",
        "learner.micro_batch=8", "learner.warmup_steps=0", "teacher.scorer=learner", "loss.estimator=full",
        "model.lora.r=8", *overrides])
    return Learner(config_to_dict(cfg), 0, 1, "127.0.0.1", _port())


def toy_learner(learner: Learner | None, toy_world, *overrides) -> Learner:
    """An in-process learner on configs/toy.yaml with the teacher on the learner, 8 sequences a step
    in micro-batches of 4, no warm-up, and `overrides`: `learner` reconfigured, or a new one."""
    cfg = config_to_dict(load_config(ROOT / "configs" / "toy.yaml", [
        f"model.path={toy_world / 'model'}", "data.train=unused.jsonl", "train.prompts_per_step=8",
        "learner.micro_batch=4", "learner.warmup_steps=0", "teacher.scorer=learner", *overrides]))
    if learner is None:
        return Learner(cfg, 0, 1, "127.0.0.1", _port())
    learner.configure(cfg)
    return learner


def batch(toy_world, count=8):
    """Real toy prompts with fixed 'completions' (the answers), and the teacher prompts."""
    from transformers import AutoTokenizer
    tokenizer = AutoTokenizer.from_pretrained(toy_world / "model")
    records = [json.loads(line) for line in (toy_world / "data" / "addition" / "train.jsonl").open()][:count]
    rollouts, teacher_prompts = [], []
    for r in records:
        prompt = tokenizer(r["prompt"])["input_ids"]
        completion = tokenizer(r["answer"])["input_ids"] + [tokenizer.eos_token_id]
        rollouts.append(Rollout(r["id"], prompt, completion, [0.0] * len(completion), 0, "stop"))
        teacher_prompts.append(tokenizer(r["context"] + "\n" + r["prompt"])["input_ids"])
    return rollouts, teacher_prompts


def test_lora_teacher_is_the_base_exactly_never_drops_out_and_checkpoints_load(toy_world, tmp_path):
    learner = make_learner(toy_world, "teacher.weights=initial", "model.lora.dropout=0.5", "learner.lr=1e-2")
    rollouts, teacher_prompts = batch(toy_world)
    completions = [r.completion_ids for r in rollouts]
    tokens = sum(len(r.completion_ids) for r in rollouts)
    learner.engine.eval()
    with torch.no_grad():
        untrained = learner._teacher_logits(None, teacher_prompts, completions)
    for _ in range(2):  # the adapter moves away from zero
        learner.train_step(rollouts, teacher_prompts, None, tokens)
    state = learner.state_bytes()
    assert 0 < state["trainable_parameters"] < state["parameters"] / 4 and state["teacher_copy"] == 0

    base = AutoModelForCausalLM.from_pretrained(toy_world / "model").eval()
    with torch.no_grad():
        expected = completion_logits(base, teacher_prompts, completions)
        teacher = learner._teacher_logits(None, teacher_prompts, completions)
        again = learner._teacher_logits(None, teacher_prompts, completions)
        student_eval = completion_logits(learner.engine.module, teacher_prompts, completions)
        with learner._student_dropout():
            dropped = [completion_logits(learner.engine.module, teacher_prompts, completions) for _ in range(2)]
    # the base, bit for bit, however far the adapter moved: no second copy, no merge round-off
    assert torch.equal(teacher, untrained)
    # and the base model itself: the same weights in DeepSpeed's buffers can take other kernels than a
    # plain model's (on AVX-512, 6e-6 apart), so this one holds to float32 round-off
    assert (teacher - expected).abs().max() < 1e-4
    assert torch.equal(teacher, again)  # deterministic: no dropout in the teacher
    assert (student_eval - expected).abs().max() > 1e-3  # the adapter did move the student
    # the student's training forward really has dropout on (so the teacher check above can fail)
    assert (dropped[0] - dropped[1]).abs().max() > 1e-4
    assert not any(m.training for m in learner.engine.module.modules())  # dropout is off again

    # checkpoints: the adapter in peft's format, the merged weights in transformers' format
    learner.save_adapter(str(tmp_path / "adapter"))
    learner.save_pretrained(str(tmp_path / "hf"))
    assert (tmp_path / "adapter" / "adapter_config.json").is_file()
    from peft import PeftModel
    with torch.no_grad():
        peft_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(toy_world / "model"),
                                               tmp_path / "adapter").eval()
        merged = AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
        from_peft = completion_logits(peft_model, teacher_prompts, completions)
        from_merged = completion_logits(merged, teacher_prompts, completions)
    assert (from_peft - student_eval).abs().max() < 1e-5
    assert (from_merged - student_eval).abs().max() < 1e-4
    assert not any("lora" in name for name in merged.state_dict())


def test_lora_ema_teacher_averages_the_adapter_only(toy_world):
    learner = make_learner(toy_world, "teacher.weights=ema", "teacher.ema_alpha=0.5", "learner.lr=1e-2",
                           "model.lora.dropout=0.5")
    module = learner.engine.module
    frozen_before = {n: p.detach().clone() for n, p in module.named_parameters() if not p.requires_grad
                     and "lora_" not in n}
    rollouts, teacher_prompts = batch(toy_world)
    tokens = sum(len(r.completion_ids) for r in rollouts)
    ema_before = [p.detach().clone() for p in adapters.adapter_parameters(module, adapters.EMA)]
    learner.train_step(rollouts, teacher_prompts, None, tokens)
    student = adapters.adapter_parameters(module, adapters.STUDENT)
    ema_after = adapters.adapter_parameters(module, adapters.EMA)
    assert len(student) == len(ema_after) > 0
    moved = max((s - b).abs().max().item() for s, b in zip(student, ema_before))
    assert moved > 1e-4
    error = max((a - (0.5 * b + 0.5 * s)).abs().max().item() for a, b, s in zip(ema_after, ema_before, student))
    assert error < 1e-7
    assert all(not p.requires_grad for p in ema_after)
    assert all(torch.equal(p, frozen_before[n]) for n, p in module.named_parameters() if n in frozen_before)
    # the EMA teacher scores without dropout, and its export is the base plus the EMA adapter
    completions = [r.completion_ids for r in rollouts]
    with torch.no_grad():
        first = learner._teacher_logits(None, teacher_prompts, completions)
        second = learner._teacher_logits(None, teacher_prompts, completions)
    assert torch.equal(first, second)
    payload = learner.export_adapter("teacher")
    assert payload.nbytes == sum(p.numel() * 4 for p in ema_after)
    merged = learner.export_weights("teacher")
    model = AutoModelForCausalLM.from_pretrained(toy_world / "model").eval()
    model.load_state_dict(merged)
    with torch.no_grad():
        assert (completion_logits(model, teacher_prompts, completions) - first).abs().max() < 1e-4
