"""Held-out greedy accuracy per task, through the engines."""

import statistics
from collections import defaultdict

from rollout.pool import EnginePool
from trainer.config import Config
from trainer.data.prompts import EncodedPrompts
from trainer.data.records import Example


def evaluate(pool: EnginePool, examples: list[Example], encoded: EncodedPrompts, tokenizer, cfg: Config, answer_fn,
             version: int, adapter: str | None = None, shown_context: list[Example] = ()) -> dict[str, float]:
    """Greedy accuracy per task: `eval/<task>/accuracy` of `examples` with the student prompt, and
    `eval/<task>/teacher_accuracy` of `shown_context` with the teacher prompt, in one engine call
    (one round of decoding for both)."""
    views = [(example, False) for example in examples] + [(example, True) for example in shown_context]
    if not views:
        return {}
    rollouts = pool.generate([(encoded.teacher if shown else encoded.student)[e.id] for e, shown in views],
                             [e.id for e, _ in views], expected_version=version, n=1,
                             max_tokens=cfg.rollout.max_tokens, temperature=0.0, adapter=adapter)
    completions = tokenizer.batch_decode([r.completion_ids for r in rollouts], skip_special_tokens=True)
    scores = answer_fn([e.prompt for e, _ in views], completions, answer=[e.answer for e, _ in views])
    per_key = defaultdict(list)
    for (example, shown), score in zip(views, scores, strict=True):
        if score is not None:
            per_key[f"eval/{example.task}/{'teacher_accuracy' if shown else 'accuracy'}"].append(score)
    return {key: statistics.fmean(values) for key, values in per_key.items()}


def saved_model_accuracy(model_dir, eval_file, max_tokens: int = 8) -> float:
    """Greedy accuracy on `eval_file`, from the plain prompt, of a model saved in `model_dir` (e.g. a
    checkpoint's `quantized/` export), in a fresh vLLM engine actor of its own on the running Ray."""
    import ray
    from transformers import AutoTokenizer

    from rewards.answer import is_match
    from rollout.engine import RolloutEngine
    from trainer.cluster.engines import CPU_ENGINE_ENV
    from trainer.data.records import load_examples
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    examples, _ = load_examples(eval_file)
    engine = ray.remote(RolloutEngine).options(num_cpus=0, runtime_env={"env_vars": CPU_ENGINE_ENV}).remote(str(model_dir))
    try:
        prompts = [tokenizer(e.prompt, add_special_tokens=False)["input_ids"] for e in examples]
        rollouts = ray.get(engine.generate.remote(prompts, [e.id for e in examples], max_tokens=max_tokens,
                                                  temperature=0.0))
    finally:
        ray.kill(engine)
    texts = tokenizer.batch_decode([r.completion_ids for r in rollouts], skip_special_tokens=True)
    return sum(is_match(t, e.answer) for t, e in zip(texts, examples, strict=True)) / len(examples)
