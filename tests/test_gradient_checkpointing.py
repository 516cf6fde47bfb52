"""`learner.gradient_checkpointing`: the student's decoder layers are recomputed in the backward
pass (the student's forward runs them twice a micro-step instead of once), and the step's losses and gradient norm are
those without it, padded or packed, with LoRA (in process: one gloo DeepSpeed rank)."""

import dataclasses

import pytest

from test_lora_learner import batch, toy_learner
from trainer.learner.learner import Learner

pytestmark = pytest.mark.slow

CASES = {
    "distill-full": ["loss.estimator=full"],
    "distill-topk-packed": ["learner.packing=true"],
    "lora-distill-full": ["model.lora.r=8", "loss.estimator=full"],
    "sft": ["loss.mode=sft"],
}


def _first_layer_calls(learner: Learner) -> list[int]:
    """A counter of the calls of the student's first decoder layer's MLP. Its `forward` is wrapped:
    torch's checkpoint recomputes without running module hooks."""
    mlp = next(m for m in learner.engine.module.modules() if type(m).__name__.endswith("DecoderLayer")).mlp
    calls, forward = [0], mlp.forward

    def counted(*args, **kwargs):
        calls[0] += 1
        return forward(*args, **kwargs)
    mlp.forward = counted
    return calls


def test_checkpointed_steps_recompute_the_layers_and_give_the_same_losses_and_gradients(toy_world):
    rollouts, teacher_prompts = batch(toy_world)
    rollouts = [dataclasses.replace(r, completion_ids=r.completion_ids[:1 + i % 3], logprobs=r.logprobs[:1 + i % 3])
                for i, r in enumerate(rollouts)]
    tokens = sum(len(r.completion_ids) for r in rollouts)
    learner = None
    for name, overrides in CASES.items():
        steps, calls = {}, {}
        for checkpointing in (False, True):
            learner = toy_learner(learner, toy_world, f"learner.gradient_checkpointing={str(checkpointing).lower()}",
                                  *overrides)
            counter = _first_layer_calls(learner)
            steps[checkpointing] = learner.train_step(rollouts, teacher_prompts, None, tokens)
            calls[checkpointing] = counter[0]
        # one recomputation per micro-batch (2 of 4); a LoRA teacher's forward (the same layers,
        # without gradient) is not checkpointed
        assert calls[False] >= 2 and calls[True] == calls[False] + 2, (name, calls)
        plain, checkpointed = steps[False], steps[True]
        compared = [k for k in plain if k.endswith("loss") or k == "learner/grad_norm"]
        assert len(compared) >= 2, (name, sorted(plain))
        for key in compared:
            assert checkpointed[key] == pytest.approx(plain[key], rel=1e-6, abs=1e-7), (name, key)
        assert all(not m.training for m in learner.engine.module.modules()), name  # eval mode again after the step
