"""The real-shape family (`selfdistill toy realshape`, a reduced build): a real 32k tokenizer with a
chat template; a random Llama whose completions the model itself ends at EOS after varying lengths;
vLLM serves it (generation and `prompt_logprobs` agree with the learner's transformers forward);
and the learner trains on what vLLM sampled and scored, packed in token-budget micro-batches, with
the padded count-based step's losses and gradient norm."""

import json

import pytest
import torch

from conftest import ROOT
from toyworld.realshape import RealShapeSettings, build, length_histogram

pytestmark = pytest.mark.slow

SUITE = RealShapeSettings(size="test", max_completion=256, mean_completion=64, prompts=32, calibration_samples=4,
                          length_samples=16)
"""Shorter completions than the benchmarks' (up to 256 tokens, not 1,024), so the suite stays short."""


@pytest.fixture(scope="session")
def realshape():
    return build(ROOT / ".cache" / "realshape-suite", SUITE)


def test_the_tokenizer_is_real_and_renders_chat_prompts(realshape):
    from transformers import AutoTokenizer

    from rollout.prompts import encode_prompt, teacher_prompt
    tokenizer = AutoTokenizer.from_pretrained(realshape / "model")
    assert len(tokenizer) == 32_000 and tokenizer.eos_token == "</s>"
    record = json.loads((realshape / "data" / "train.jsonl").read_text().splitlines()[0])
    ids = encode_prompt(record["prompt"], tokenizer)
    text = tokenizer.decode(ids)
    assert text.startswith("<s>[INST] ") and text.endswith(" [/INST]") and ids.count(tokenizer.bos_token_id) == 1
    assert len(ids) > len(record["prompt"][0]["content"].split())  # words are real pieces, several tokens some
    teacher = tokenizer.decode(encode_prompt(teacher_prompt(record["prompt"], record["context"], "{context}\n\n{prompt}"),
                                             tokenizer))
    assert record["context"] in teacher and teacher.endswith(" [/INST]")
    lengths = json.loads((realshape / "lengths.json").read_text())["completion"]
    assert len(set(lengths)) > len(lengths) // 2 and min(lengths) < SUITE.max_completion, length_histogram(lengths)


def test_vllm_samples_and_scores_it_and_the_learner_trains_on_that_packed(realshape, local_ray):
    import ray
    from transformers import AutoTokenizer

    from rollout.engine import RolloutEngine
    from rollout.prompts import encode_prompt, teacher_prompt
    from test_lora_learner import toy_learner
    from test_token_budget import _compared
    from trainer.cluster.engines import CPU_ENGINE_ENV
    tokenizer = AutoTokenizer.from_pretrained(realshape / "model")
    records = [json.loads(line) for line in (realshape / "data" / "train.jsonl").read_text().splitlines()[:8]]
    prompts = [encode_prompt(r["prompt"], tokenizer) for r in records]
    teacher_prompts = [encode_prompt(teacher_prompt(r["prompt"], r["context"], "{context}\n\n{prompt}"), tokenizer)
                       for r in records]
    engine = ray.remote(RolloutEngine).options(num_cpus=0, runtime_env={"env_vars": CPU_ENGINE_ENV}).remote(
        str(realshape / "model"), max_logprobs=20)
    try:
        rollouts = ray.get(engine.generate.remote(prompts, [r["id"] for r in records], list(range(len(records))),
                                                  max_tokens=SUITE.max_completion))
        scores = ray.get(engine.score.remote([t + r.completion_ids for t, r in zip(teacher_prompts, rollouts)],
                                             [len(t) for t in teacher_prompts], 20))
    finally:
        ray.kill(engine)
    lengths = [len(r.completion_ids) for r in rollouts]
    assert len(set(lengths)) > 1 and any(r.finish_reason == "stop" for r in rollouts), lengths
    assert all(r.completion_ids[-1] == tokenizer.eos_token_id for r in rollouts if r.finish_reason == "stop")
    assert all(len(s.token_logprobs) == n for s, n in zip(scores, lengths, strict=True))

    # vLLM's sampling logprobs are the learner's transformers forward of the same tokens
    from transformers import AutoModelForCausalLM

    from trainer.learner.forward import completion_logits
    model = AutoModelForCausalLM.from_pretrained(realshape / "model").eval()
    with torch.no_grad():
        logits = completion_logits(model, [r.prompt_ids for r in rollouts], [r.completion_ids for r in rollouts],
                                   packed=True)
    learner_logprobs = logits.log_softmax(-1).gather(-1, torch.tensor(
        [t for r in rollouts for t in r.completion_ids])[:, None])[:, 0]
    engine_logprobs = torch.tensor([lp for r in rollouts for lp in r.logprobs])
    assert (learner_logprobs - engine_logprobs).abs().max() < 1e-3

    # one learner step on them: padded by count, then packed by token budget, alike
    tokens = sum(lengths)
    budget = max(len(p) for p in prompts) + SUITE.max_completion
    common = [f"model.path={realshape / 'model'}", "teacher.scorer=engine", "loss.estimator=topk", "learner.lr=1e-5"]
    learner = toy_learner(None, realshape, *common)
    by_count = learner.train_step(rollouts, teacher_prompts, scores, tokens)
    learner = toy_learner(learner, realshape, *common, "learner.packing=true",
                          f"learner.max_tokens_per_micro_batch={budget}")
    by_budget = learner.train_step(rollouts, teacher_prompts, scores, tokens)
    _compared(by_count, by_budget, "realshape")
    assert by_budget["distill/kl"] > 0
