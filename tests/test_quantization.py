"""Quantization-aware training of the student (`model.quantization`): the fake-quantized forward,
its straight-through gradient into full-precision masters, the served weights equal to what the
forward computes with, and the combinations that are refused."""

import pytest
import torch
from transformers import AutoModelForCausalLM

from conftest import ROOT
from core.errors import ConfigError
from trainer.config import load_config
from trainer.config.sections import QuantizationConfig
from trainer.learner import quantization

TOY = ROOT / "configs" / "toy.yaml"
PROMPTS = torch.tensor([[20, 17, 7, 10, 13, 11, 8, 16, 4, 6, 5], [20, 17, 12, 12, 13, 4, 3, 16, 4, 4, 5]])


def _toy(toy_world, scheme="int2", group_size=32):
    model = AutoModelForCausalLM.from_pretrained(toy_world / "model")
    return quantization.prepare(model, QuantizationConfig(scheme, group_size))


@pytest.mark.parametrize("scheme", ["int8", "int4", "int2"])
def test_the_served_weights_are_what_the_quantized_forward_computes_with(toy_world, scheme):
    fake = _toy(toy_world, scheme)
    served = quantization.quantized_state_dict(fake, fake.state_dict())
    plain = AutoModelForCausalLM.from_pretrained(toy_world / "model")
    plain.load_state_dict(served)
    with torch.no_grad():
        torch.testing.assert_close(plain(PROMPTS).logits, fake(PROMPTS).logits, rtol=1e-5, atol=1e-5)
        full = AutoModelForCausalLM.from_pretrained(toy_world / "model")(PROMPTS).logits
    assert (full - fake(PROMPTS).logits).abs().max() > 1e-3  # quantization changes the model
    weight = served["model.layers.0.mlp.down_proj.weight"]
    levels = {"int8": 256, "int4": 16, "int2": 4}[scheme]
    for group in weight.reshape(-1, 32)[:8]:  # symmetric integer levels times one scale per group of 32
        assert len(torch.unique(group)) <= levels
    assert torch.equal(served["lm_head.weight"], fake.state_dict()["lm_head.weight"])  # the LM head stays


def test_gradients_reach_full_precision_masters_straight_through(toy_world):
    fake = _toy(toy_world, "int2")
    layer = fake.model.layers[0].mlp.down_proj
    fake(PROMPTS, labels=PROMPTS).loss.backward()
    assert layer.weight.grad is not None and layer.weight.grad.abs().sum() > 0
    quantized = layer.weight_fake_quantizer(layer.weight)
    assert not torch.equal(layer.weight, quantized)  # the master is not on the integer grid


def test_a_group_size_that_does_not_divide_a_layer_is_refused_naming_it(toy_world):
    with pytest.raises(ConfigError, match=r"model.quantization.group_size: 48 does not divide the input size 128 of "
                                          r"model.layers.0.self_attn.q_proj"):
        _toy(toy_world, "int4", 48)


@pytest.mark.parametrize("overrides, message", [
    (["teacher.weights=ema"], "teacher.weights: with model.quantization the teacher is the full-precision start"),
    (["model.lora.r=8"], "model.lora.r: does not combine with model.quantization.scheme='int4': LoRA"),
    (["learner.zero_stage=3"], "learner.zero_stage: does not combine with model.quantization.scheme='int4': ZeRO-3"),
    (["loss.mode=ssd"], "loss.mode: does not combine with model.quantization.scheme='int4': SSD"),
    (["teacher.template={context}"], "teacher.template: must use {prompt} and may use {context}"),
])
def test_what_quantization_does_not_combine_with_is_refused(overrides, message):
    with pytest.raises(ConfigError, match=message.replace("{", r"\{").replace("(", r"\(")):
        load_config(TOY, ["model.quantization.scheme=int4", *overrides])


def test_the_full_precision_start_may_teach_from_the_plain_prompt():
    cfg = load_config(TOY, ["model.quantization.scheme=int4", "teacher.template={prompt}"])
    assert cfg.model.quantization == QuantizationConfig("int4", 32) and cfg.teacher.template == "{prompt}"


@pytest.mark.slow
def test_a_quantized_student_is_served_its_quantized_weights_and_checkpoints_both(toy_world, small_eval, tmp_path,
                                                                                warm_actors):
    """Three QAD steps on real engines and learners: the engines sample from exactly the weights
    the learner's fake-quantized forward uses (the logprob gap stays at float rounding), and the
    checkpoint holds the full-precision master (`hf/`) and the quantized export (`quantized/`) that
    is its quantization, which a fresh vLLM engine loads and answers with as the run's engines did."""
    from safetensors.torch import load_file

    from test_backbone import toy_config
    from trainer.loop import train
    from trainer.monitoring.metrics import read_metrics
    from trainer.step.evaluation import saved_model_accuracy
    cfg = toy_config(toy_world, small_eval, tmp_path, "train.steps=3", "model.quantization.scheme=int2",
                     "teacher.template={prompt}")
    train(cfg, warm=warm_actors)
    metrics = read_metrics(tmp_path / cfg.name)
    assert all(m["health/engine_trainer_logprob_gap"] < 1e-4 for m in metrics[1:]), metrics
    step = tmp_path / cfg.name / "checkpoints" / "step_3"
    master = AutoModelForCausalLM.from_pretrained(step / "hf")
    fake = quantization.prepare(master, QuantizationConfig("int2", 32))
    want = quantization.quantized_state_dict(fake, fake.state_dict())
    served = load_file(step / "quantized" / "model.safetensors")
    for name, tensor in served.items():
        torch.testing.assert_close(tensor, want[name], rtol=0, atol=1e-6, msg=name)
    assert not torch.equal(served["model.layers.0.mlp.down_proj.weight"],
                           load_file(step / "hf" / "model.safetensors")["model.layers.0.mlp.down_proj.weight"])
    # the export loads in a fresh vLLM engine and answers as the run's engines did at its last evaluation
    assert saved_model_accuracy(step / "quantized", small_eval) == metrics[-1]["eval/addition/accuracy"]

