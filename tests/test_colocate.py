"""Engines inside the learner ranks (`rollout.colocate`): a colocated run trains on exactly what a run
with separate engines of the same backend trains on (per-step losses and evaluations to 1e-6,
gradient norms and logprobs to 1e-5), on two DeepSpeed ranks in a real Ray cluster: transformers
engines with the student's own frozen teacher under ZeRO-2, in-process vLLM engines with an EMA
teacher under ZeRO-3 (every sync gathers the student's shards into each rank's engine, and loads the
EMA weights into its teacher engine); and what it can't combine with is refused when the config
loads."""

import json

import pytest

from core.errors import ConfigError
from test_backbone import toy_config
from trainer.loop import train
from trainer.monitoring.metrics import read_metrics

COMPARED = ("distill/loss", "distill/kl", "learner/grad_norm", "reward/mean", "eval/addition/accuracy")
TOLERANCE = {"learner/grad_norm": 1e-5}
"""Relative, where not 1e-6. The two layouts compute the same logprobs in other processes with other
thread counts, so they agree to rounding, not bit for bit (6e-6 relative at most on one base, checked
below), and a norm summed over every parameter's gradient carries that rounding further than the
losses do: 1.7e-6 apart on that base, equal on another."""


@pytest.mark.parametrize("override, key", [
    ("train.async=true", "train.async"),
    ("loss.mode=ssd", "loss.mode"),
    ("model.lora.r=4", "model.lora.r"),
    ("learner.zero_stage=3", "learner.zero_stage"),  # with transformers engines; vLLM's gather at the sync
])
def test_what_colocated_engines_do_not_combine_with_is_refused(toy_world, small_eval, tmp_path, override, key):
    overrides = ["rollout.colocate=true", "rollout.backend=transformers", override]
    if override == "train.async=true":
        overrides.append("loss.is_cap=2")
    with pytest.raises(ConfigError, match=rf"{key}.*does not combine with rollout.colocate=true"):
        toy_config(toy_world, small_eval, tmp_path, *overrides)


def test_sleep_mode_needs_colocated_vllm_and_a_gpu(toy_world, small_eval, tmp_path, warm_actors):
    with pytest.raises(ConfigError, match=r"rollout.sleep: needs rollout.colocate=true and rollout.backend=vllm"):
        toy_config(toy_world, small_eval, tmp_path, "rollout.sleep=true", "rollout.backend=vllm")
    cfg = toy_config(toy_world, small_eval, tmp_path, "rollout.sleep=true", "rollout.colocate=true",
                     "rollout.backend=vllm", "name=sleep")
    with pytest.raises(ConfigError, match=r"rollout.sleep: vLLM's sleep mode is CUDA-only and this cluster has no GPU"):
        train(cfg, resume="never", warm=warm_actors)  # this CPU cluster: refused before any actor starts


def _run(toy_world, small_eval, tmp_path, warm_actors, name, *overrides):
    cfg = toy_config(toy_world, small_eval, tmp_path, f"name={name}", "learner.num=2",
                     "train.steps=4", "train.eval_every=2", "learner.lr=1e-3", "learner.warmup_steps=0",
                     "log.samples_every=1", *overrides)
    train(cfg, resume="never", warm=warm_actors)
    return tmp_path / name, read_metrics(tmp_path / name)


@pytest.mark.parametrize("backend, teacher, zero", [("transformers", "initial", 2), ("vllm", "ema", 3)])
def test_a_colocated_run_trains_on_what_separate_engines_give(toy_world, small_eval, tmp_path, warm_actors, backend,
                                                              teacher, zero):
    extra = [f"rollout.backend={backend}", f"teacher.weights={teacher}", f"learner.zero_stage={zero}"]
    extra += ["teacher.ema_alpha=0.5"] if teacher == "ema" else []
    _, separate = _run(toy_world, small_eval, tmp_path, warm_actors, "separate", *extra)
    run_dir, colocated = _run(toy_world, small_eval, tmp_path, warm_actors, "colocated", "rollout.colocate=true",
                              *extra)
    assert [m["step"] for m in colocated] == [m["step"] for m in separate] == [0, 1, 2, 3, 4]
    for ours, theirs in zip(colocated, separate, strict=True):
        for key in COMPARED:
            assert (key in ours) == (key in theirs), (ours["step"], key)
            if key in ours:
                expected = pytest.approx(theirs[key], rel=TOLERANCE.get(key, 1e-6), abs=1e-9)
                assert ours[key] == expected, (ours["step"], key)
    # the student moved (so "equal" is not "nothing happened"), and the colocated engine sampled from
    # the module being trained: its logprobs are the learner's own
    losses = [m["distill/loss"] for m in colocated if "distill/loss" in m]
    assert losses[0] != losses[-1]
    assert max(m["health/engine_trainer_logprob_gap"] for m in colocated if m["step"] > 0) < 1e-5
    placement = json.loads((run_dir / "placement.json").read_text())
    assert len(placement["student_engines"]) == len(placement["learners"]) == 2
    # the samples themselves: the same completions, drawn with the same logprobs
    ours, theirs = (_samples(tmp_path / name) for name in ("colocated", "separate"))
    assert [s["completion"] for s in ours] == [s["completion"] for s in theirs] and len(ours) == 4 * 4
    for a, b in zip(ours, theirs, strict=True):
        assert a["student_logprobs"] == pytest.approx(b["student_logprobs"], rel=1e-5, abs=1e-5)
        assert a["teacher_logprobs"] == pytest.approx(b["teacher_logprobs"], rel=1e-5, abs=1e-5)


def _samples(run_dir):
    return [json.loads(line) for line in (run_dir / "samples.jsonl").read_text().splitlines()]
