"""The padding-free learner (`learner.packing`): every micro-batch's sequences in one row give the
padded path's logits, losses and gradient norms, for every `loss.mode`, every estimator and LoRA
(in process: one gloo DeepSpeed rank, no Ray, no vLLM)."""

import dataclasses

import pytest
import torch
from transformers import AutoModelForCausalLM

from conftest import ROOT
from core.errors import ConfigError
from test_lora_learner import batch, toy_learner
from trainer.config import config_to_dict, load_config
from trainer.learner import adapters
from trainer.learner.forward import WithKwargs, completion_logits

pytestmark = pytest.mark.slow


def _ragged(generator: torch.Generator) -> tuple[list[list[int]], list[list[int]]]:
    """Prompts and completions of lengths that vary within the batch, so the padded path pads."""
    prompts = [torch.randint(3, 20, (n,), generator=generator).tolist() for n in (5, 12, 7, 2)]
    completions = [torch.randint(3, 20, (n,), generator=generator).tolist() for n in (3, 1, 9, 4)]
    return prompts, completions


def test_packed_logits_are_the_padded_ones_with_and_without_an_adapter(toy_world):
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(toy_world / "model").eval()
    prompts, completions = _ragged(torch.Generator().manual_seed(0))
    padded = completion_logits(model, prompts, completions)
    assert padded.shape[0] == sum(map(len, completions))
    packed = completion_logits(model, prompts, completions, packed=True)
    assert (packed - padded).abs().max() < 1e-5
    gradients = []
    for logits in (padded, packed):  # and the same gradient for every weight
        model.zero_grad()
        (logits.log_softmax(-1)[:, 3] - logits.logsumexp(-1)).sum().backward()
        gradients.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    assert (gradients[0] - gradients[1]).abs().max() < 1e-5 * gradients[0].abs().max()
    padded = padded.detach()
    cfg = load_config(ROOT / "configs" / "toy-lora.yaml", [f"model.path={toy_world / 'model'}", "data.train=x.jsonl"])
    peft_model = adapters.wrap(AutoModelForCausalLM.from_pretrained(toy_world / "model"), cfg.model.lora, ema=True).eval()
    with torch.no_grad():  # a non-zero adapter, so that the LoRA path changes the logits
        for p in adapters.adapter_parameters(peft_model, adapters.STUDENT):
            p.normal_(0, 0.1)
    for name in (adapters.STUDENT, adapters.EMA):
        routed = WithKwargs(lambda **kw: peft_model(**kw, adapter_names=[name] * kw["input_ids"].shape[0]), peft_model)
        expected = completion_logits(routed, prompts, completions)
        assert (completion_logits(routed, prompts, completions, packed=True) - expected).abs().max() < 1e-5
    assert (completion_logits(peft_model, prompts, completions) - padded).abs().max() > 1e-3  # the adapter acts


CASES = {
    "distill-full": ["loss.estimator=full"],
    "distill-topk-jsd": ["loss.estimator=topk", "loss.divergence=jsd"],
    "distill-sampled": ["loss.estimator=sampled"], "distill-topk-forward": ["loss.divergence=forward_kl"],
    "distill-ema-rl": ["teacher.weights=ema", "loss.rl_coef=0.5", "rollout.n=2", "train.prompts_per_step=4", "loss.is_cap=2"],
    "sft": ["loss.mode=sft"],
    "grpo": ["loss.mode=grpo", "rollout.n=2", "train.prompts_per_step=4"],
    "lora-distill-full": ["model.lora.r=8", "loss.estimator=full"],
    "eager-attention": ["model.attn_implementation=eager"],
}


def test_packed_learner_steps_give_the_padded_losses_and_gradients(toy_world):
    rollouts, teacher_prompts = batch(toy_world)
    # ragged completions (the answers have 2 or 3 digits) and advantages for the RL terms
    rollouts = [dataclasses.replace(r, completion_ids=r.completion_ids[:1 + i % 3], logprobs=r.logprobs[:1 + i % 3],
                                    advantage=(-1.0) ** i * 0.5) for i, r in enumerate(rollouts)]
    tokens = sum(len(r.completion_ids) for r in rollouts)
    learner = None
    for name, overrides in CASES.items():
        steps = {}
        for packing in (False, True):
            learner = toy_learner(learner, toy_world, f"learner.packing={str(packing).lower()}", *overrides)
            steps[packing] = learner.train_step(rollouts, teacher_prompts, None, tokens)
        padded, packed = steps[False], steps[True]
        compared = [k for k in padded if k.endswith("loss") or k == "learner/grad_norm"]
        assert len(compared) >= 2, (name, sorted(padded))
        for key in compared:
            assert packed[key] == pytest.approx(padded[key], rel=1e-5, abs=1e-6), (name, key)
    flash = load_config(ROOT / "configs" / "toy.yaml", [f"model.path={toy_world / 'model'}", "data.train=unused.jsonl",
                                                       "model.attn_implementation=flash_attention_2"])
    with pytest.raises(ConfigError, match="model.attn_implementation: 'flash_attention_2' can't run on learner rank 0 "):
        learner.configure(config_to_dict(flash))
