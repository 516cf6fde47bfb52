"""TransformersEngine against plain transformers forwards (logprob semantics of `rollout.batch`) and
against vLLM's greedy completions; per-prompt seeds; weight loads; EOS and length handling."""

import json
import math

import pytest
import ray
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from rollout.hf_engine import TransformersEngine, truncate_logits
from toyworld.base import TEACHER_TEMPLATE


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """As the engine runs in its actor: on a shared machine a second thread only contends on these tiny matmuls."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def engine(toy_world):
    return TransformersEngine(str(toy_world / "model"), max_logprobs=20)


@pytest.fixture(scope="module")
def model(toy_world):
    return AutoModelForCausalLM.from_pretrained(toy_world / "model").eval()


@pytest.fixture(scope="module")
def examples(toy_world):
    return [json.loads(line) for line in open(toy_world / "data" / "addition" / "eval.jsonl")][:32]


@pytest.fixture(scope="module")
def prompts(toy_world, examples):
    tokenizer = AutoTokenizer.from_pretrained(toy_world / "model")
    return [tokenizer(e["prompt"])["input_ids"] for e in examples]


def forward_logprobs_TV(model, prompt: list[int], completion: list[int]) -> torch.Tensor:
    """[T, V] raw log-softmax at each completion position, from one unpadded forward."""
    with torch.no_grad():
        logits = model(torch.tensor([prompt + completion])).logits[0, len(prompt) - 1:-1]
    return logits.double().log_softmax(-1)


def ids(examples) -> list[str]:
    return [e["id"] for e in examples]


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_sampled_logprobs_equal_a_plain_forward(engine, model, examples, prompts, temperature):
    rollouts = engine.generate(prompts, ids(examples), list(range(len(prompts))), n=2, max_tokens=8,
                               temperature=temperature)
    assert len(rollouts) == 2 * len(prompts)
    for r in rollouts:
        with torch.no_grad():
            logits = model(torch.tensor([r.prompt_ids + r.completion_ids])).logits[0, len(r.prompt_ids) - 1:-1]
        reference = (logits.double() / temperature).log_softmax(-1).gather(1, torch.tensor(r.completion_ids)[:, None])[:, 0]
        torch.testing.assert_close(torch.tensor(r.logprobs, dtype=torch.double), reference, atol=1e-4, rtol=0)


@pytest.mark.parametrize("top_k", [-1, 3])
def test_sample_frequencies_follow_the_reported_distribution(engine, examples, prompts, top_k):
    """The exponential race samples the distribution whose logprobs it reports (4σ on 4000 draws)."""
    draws = engine.generate(prompts[:1], ids(examples[:1]), [0], n=4000, max_tokens=1, temperature=2.0, top_k=top_k)
    counts = torch.bincount(torch.tensor([r.completion_ids[0] for r in draws]), minlength=24).double()
    probs = torch.zeros(24, dtype=torch.double)
    for r in draws:
        probs[r.completion_ids[0]] = math.exp(r.logprobs[0])
    assert probs.sum() <= 1 + 1e-5 and (top_k == -1 or (counts > 0).sum() <= 3)
    sigma = (4000 * probs * (1 - probs)).sqrt()
    assert ((counts - 4000 * probs).abs() <= 4 * sigma + 1).all(), (counts, 4000 * probs)
    if top_k == 3:
        assert probs.sum() == pytest.approx(1, abs=1e-5)  # renormalized over the three kept tokens


def test_top_k_logprobs_are_renormalized_over_the_kept_tokens(engine, model, examples, prompts):
    rollouts = engine.generate(prompts, ids(examples), list(range(len(prompts))), n=2, max_tokens=8,
                               temperature=0.7, top_k=3)
    for r in rollouts:
        logits_TV = forward_logprobs_TV(model, r.prompt_ids, r.completion_ids) / 0.7
        kept_TV = logits_TV >= logits_TV.topk(3, dim=-1).values[:, -1:]
        assert kept_TV.gather(1, torch.tensor(r.completion_ids)[:, None]).all(), "sampled outside the top 3"
        reference_TV = logits_TV.masked_fill(~kept_TV, -math.inf).log_softmax(-1)
        reference = reference_TV.gather(1, torch.tensor(r.completion_ids)[:, None])[:, 0]
        torch.testing.assert_close(torch.tensor(r.logprobs, dtype=torch.double), reference, atol=1e-4, rtol=0)


def test_truncation_matches_vllms_order_top_k_then_top_p():
    logits = torch.tensor([[3.0, 2.0, 2.0, 1.0, 0.0]])
    assert truncate_logits(logits, top_k=2, top_p=1.0).isfinite().tolist() == [[True, True, True, False, False]]  # ties kept
    # top-p on what top-k left: probabilities of [3, 2, 2] are 0.576, 0.212, 0.212; p = 0.7 keeps the first two.
    assert truncate_logits(logits, top_k=3, top_p=0.7).isfinite().sum() == 2
    assert truncate_logits(logits, top_k=-1, top_p=0.01).isfinite().tolist() == [[True, False, False, False, False]]
    assert truncate_logits(logits, top_k=5, top_p=1.0).equal(logits)  # k >= V is off, as in vLLM


def test_a_seed_draws_the_same_samples_in_any_batch(engine, examples, prompts):
    seeds = [1000 + i for i in range(len(prompts))]
    alone = engine.generate(prompts[:8], ids(examples[:8]), seeds[:8], n=3, max_tokens=8)
    order = list(reversed(range(len(prompts))))  # other neighbours, other positions, other padding
    mixed = engine.generate([prompts[i] for i in order], [examples[i]["id"] for i in order], [seeds[i] for i in order],
                            n=3, max_tokens=8)
    by_id = {}
    for r in mixed:
        by_id.setdefault(r.example_id, []).append(r)
    for r, j in zip(alone, [j for i in range(8) for j in range(3)]):
        assert r.completion_ids == by_id[r.example_id][j].completion_ids
        assert r.logprobs == pytest.approx(by_id[r.example_id][j].logprobs, abs=1e-5)
    again = engine.generate(prompts[:8], ids(examples[:8]), seeds[:8], n=3, max_tokens=8)
    assert [r.completion_ids for r in again] == [r.completion_ids for r in alone]
    other = engine.generate(prompts[:8], ids(examples[:8]), [s + 1 for s in seeds[:8]], n=3, max_tokens=8)
    assert [r.completion_ids for r in other] != [r.completion_ids for r in alone]
    groups = [{tuple(r.completion_ids) for r in alone[3 * i:3 * i + 3]} for i in range(8)]
    assert any(len(g) > 1 for g in groups), "a prompt's n samples draw independent noise"


def test_score_equals_a_plain_forward_and_its_top_k(engine, model, examples, prompts):
    rollouts = engine.generate(prompts, ids(examples), list(range(len(prompts))), max_tokens=8)
    teacher = [p[:3] + p for p in prompts]  # other lengths than the student prompts
    sequences = [t + r.completion_ids for t, r in zip(teacher, rollouts)]
    scores = engine.score(sequences, [len(t) for t in teacher], topk=5)
    for t, r, s in zip(teacher, rollouts, scores, strict=True):
        reference_TV = forward_logprobs_TV(model, t, r.completion_ids)
        expected = reference_TV.gather(1, torch.tensor(r.completion_ids)[:, None])[:, 0]
        torch.testing.assert_close(torch.tensor(s.token_logprobs, dtype=torch.double), expected, atol=1e-5, rtol=0)
        top = reference_TV.topk(5, dim=-1)
        assert s.topk_ids == top.indices.tolist()
        torch.testing.assert_close(torch.tensor(s.topk_logprobs, dtype=torch.double), top.values, atol=1e-5, rtol=0)
    assert engine.score(sequences[:2], [len(t) for t in teacher[:2]], topk=0)[0].topk_ids == []


def test_load_weights_replaces_the_weights_in_place(toy_world, model, examples, prompts):
    engine = TransformersEngine(str(toy_world / "model"))  # its own: the shared one keeps the base
    other = AutoModelForCausalLM.from_pretrained(toy_world / "model").eval()
    torch.manual_seed(0)
    with torch.no_grad():
        for p in other.parameters():
            p.add_(0.05 * torch.randn_like(p))
    sequences = [p + [5, 6, 1] for p in prompts]
    before = engine.score(sequences, [len(p) for p in prompts], topk=0)
    assert engine.load_weights(other.state_dict(), 7) == 7 and engine.version() == 7 == engine.policy_version
    after = engine.score(sequences, [len(p) for p in prompts], topk=0)
    for p, s0, s1 in zip(prompts, before, after, strict=True):
        expected = forward_logprobs_TV(other, p, [5, 6, 1]).gather(1, torch.tensor([[5], [6], [1]]))[:, 0]
        torch.testing.assert_close(torch.tensor(s1.token_logprobs, dtype=torch.double), expected, atol=1e-5, rtol=0)
        assert s0.token_logprobs != pytest.approx(s1.token_logprobs, abs=1e-3)
    assert {r.policy_version for r in engine.generate(prompts[:2], ids(examples[:2]), max_tokens=2)} == {7}
    engine.load_weights(iter(model.state_dict().items()), 8)  # an iterable of pairs works too
    assert engine.score(sequences, [len(p) for p in prompts], topk=0) == before
    with pytest.raises(ValueError, match="does not have"):
        engine.load_weights({"not.a.weight": torch.zeros(1)}, 9)


def test_completions_stop_at_eos_or_at_the_length_budget(toy_world, engine, examples, prompts):
    eos = AutoTokenizer.from_pretrained(toy_world / "model").eos_token_id
    for r in engine.generate(prompts, ids(examples), n=2, max_tokens=8, temperature=1.0):
        assert eos not in r.completion_ids[:-1] and len(r.completion_ids) == len(r.logprobs) <= 8
        assert r.finish_reason == ("stop" if r.completion_ids[-1] == eos else "length")
        assert r.finish_reason == "stop" or len(r.completion_ids) == 8
    short = engine.generate(prompts, ids(examples), max_tokens=1, temperature=0.0)
    assert all(len(r.completion_ids) == 1 for r in short)
    assert [r.finish_reason for r in short] == ["stop" if r.completion_ids == [eos] else "length" for r in short]
    # min_tokens: the toy model ends its ~4-token answers at EOS; held off, they run to max_tokens
    long = engine.generate(prompts, ids(examples), max_tokens=8, min_tokens=8, temperature=1.0)
    assert all(len(r.completion_ids) == 8 and eos not in r.completion_ids for r in long)
    capped = TransformersEngine(str(toy_world / "model"), max_model_len=len(prompts[0]) + 2)
    assert [len(r.completion_ids) for r in capped.generate(prompts[:1], ids(examples[:1]), max_tokens=8, temperature=0.0)] == [2]


def test_greedy_logprobs_are_untempered_and_untruncated(engine, model, examples, prompts):
    for r in engine.generate(prompts[:8], ids(examples[:8]), max_tokens=8, temperature=0.0, top_k=2):
        reference_TV = forward_logprobs_TV(model, r.prompt_ids, r.completion_ids)
        assert r.completion_ids == reference_TV.argmax(-1).tolist()
        expected = reference_TV.gather(1, torch.tensor(r.completion_ids)[:, None])[:, 0]
        torch.testing.assert_close(torch.tensor(r.logprobs, dtype=torch.double), expected, atol=1e-4, rtol=0)


def test_adapters_are_refused_clearly(toy_world, engine, examples, prompts):
    with pytest.raises(ValueError, match="no LoRA adapters"):
        TransformersEngine(str(toy_world / "model"), max_lora_rank=16)
    with pytest.raises(NotImplementedError, match="model.lora.sync=merged"):
        engine.load_adapter(None, 1)
    with pytest.raises(NotImplementedError):
        engine.generate(prompts[:1], ids(examples[:1]), adapter="student")


@pytest.mark.slow
def test_greedy_completions_equal_vllms(toy_world, engine, examples, vllm_engine):
    tokenizer = AutoTokenizer.from_pretrained(toy_world / "model")
    texts = [e["prompt"] for e in examples] + [TEACHER_TEMPLATE.format(prompt=e["prompt"], context=e["context"])
                                               for e in examples]
    prompt_ids, example_ids = [tokenizer(t)["input_ids"] for t in texts], [str(i) for i in range(len(texts))]
    vllm = ray.get(vllm_engine.generate.remote(prompt_ids, example_ids, max_tokens=6, temperature=0.0))
    rollouts = engine.generate(prompt_ids, example_ids, max_tokens=6, temperature=0.0)
    assert [r.completion_ids for r in rollouts] == [r.completion_ids for r in vllm]


def test_cpu_threads_are_the_engines_torch_threads(toy_world):
    before = torch.get_num_threads()
    try:
        TransformersEngine(str(toy_world / "model"), cpu_threads=before + 1)
        assert torch.get_num_threads() == before + 1
    finally:
        torch.set_num_threads(before)
