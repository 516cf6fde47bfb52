"""Where a step's time goes: each phase alone, the sum of the phases, and the whole step.

    python bench/phases.py                            # both sizes of bench/peer_trl.py
    python bench/phases.py --compare-async            # and the same run with train.async=true
    python bench/phases.py --sizes toy --steps 10     # a quick look

At each size (bench/peer_trl.py's: the toy, about 4-token completions; the 20M `bench` model,
128-token completions; 64 prompts per step; selfdistill's side of that comparison, i.e. a student
vLLM engine, one ZeRO-2 learner and the full-vocabulary teacher on the learner):

1. **Phases alone.** The loop's actors are built as `selfdistill train` builds them, then each
   phase runs by itself, `--repeats` times, nothing else in flight: engine generation of the step's
   prompts; teacher scoring (on the learner, inside its step, with this config; a teacher engine's
   scoring call otherwise); the learner step; the weight sync to the engine. The medians are summed:
   the limit of a sequential step, where only the phases themselves cost.
2. **The full step.** `selfdistill train` runs `--warmup` + `--steps` steps of the same config; the
   mean `time/step` of the last `--steps` (start-up, evaluation and checkpoints are outside it).
   overhead_ratio = step_s / sum_of_phases_s: what the loop adds (rewards, batching, logging).
3. With `--compare-async`, the same run with `train.async=true` (one-step off-policy, `loss.is_cap=2`):
   its completion tokens trained per second against the sync run's.

Last lines (the `phases:` and `async:` lines are the `bench` size's, where generation dominates as it
does for real models; each size's own numbers are printed above them):

    phases: step_s=… sum_of_phases_s=… overhead_ratio=…
    async: sync_tps=… async_tps=… ratio=…
"""

import argparse
import gc
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from efficiency import start_ray  # noqa: E402
from peer_trl import SIZES, selfdistill_overrides  # noqa: E402


def config(size: str, name: str, out: Path, steps: int, *extra: str):
    from trainer.config import load_config
    return load_config(ROOT / "configs" / "toy.yaml", [*selfdistill_overrides(size, name, out, steps), *extra])


def phases_alone(cfg, repeats: int) -> dict[str, list[float]]:
    """Seconds of each phase, run alone `repeats` times on the loop's own kind of actors."""
    from transformers import AutoTokenizer

    from rollout.weights import ObjectStoreTransport
    from trainer.cluster import LearnerGroup, build_engines
    from trainer.data import PromptSampler, load_examples
    from trainer.loop import needs_teacher_engine
    from trainer.steps import encode_prompts, sample_rollouts, score_on_engines, sync_weights
    tokenizer = AutoTokenizer.from_pretrained(cfg.model.path)
    examples, _ = load_examples(cfg.data.train, cfg.data.columns, cfg.data.on_invalid)
    encoded = encode_prompts(examples, tokenizer, cfg.teacher.template)
    sampler = PromptSampler(len(examples), cfg.train.seed)
    students = build_engines(cfg, cfg.rollout.engines, "student")
    teacher = build_engines(cfg, 1, "teacher") if needs_teacher_engine(cfg) else None
    learners = LearnerGroup(cfg)
    transport = ObjectStoreTransport(cfg.rollout.sync_timeout_s)
    seconds: dict[str, list[float]] = {"generate": [], "score": [], "train": [], "sync": []}

    def clock(phase, fn):
        started = time.perf_counter()
        result = fn()
        seconds[phase].append(time.perf_counter() - started)
        return result

    try:
        for version in range(repeats + 1):  # the first round warms every phase up and is not counted
            batch = [examples[i] for i in sampler.next_indices(cfg.train.prompts_per_step)]
            rollouts = clock("generate", lambda: sample_rollouts(students, batch, encoded, cfg, version, version + 1))
            teacher_prompts = [encoded.teacher[r.example_id] for r in rollouts]
            scores = None
            if teacher is not None:
                scores = clock("score", lambda: score_on_engines(teacher, rollouts, teacher_prompts, cfg.loss.topk))
            tokens = sum(len(r.completion_ids) for r in rollouts)
            clock("train", lambda: learners.train_step(rollouts, teacher_prompts, scores, tokens))
            clock("sync", lambda: sync_weights(cfg, learners, transport, students, teacher, version + 1, 0))
            if version == 0:
                seconds = {phase: [] for phase in seconds}
    finally:
        for group in (students, teacher, learners):
            if group is not None:
                group.close()
    return {phase: values for phase, values in seconds.items() if values}


def full_steps(cfg, warmup: int) -> tuple[float, float]:
    """(mean seconds per step, completion tokens trained per second) over the steps after `warmup`."""
    from trainer.loop import train
    from trainer.metrics import read_metrics
    train(cfg)
    gc.collect()  # drop the run's actor handles, so that Ray ends its engines and learners
    steps = [m for m in read_metrics(Path(cfg.output_dir) / cfg.name) if m["step"] > warmup]
    seconds = sum(m["time/step"] for m in steps)
    return seconds / len(steps), sum(m["throughput/tokens_per_s"] * m["time/step"] for m in steps) / seconds


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", nargs="+", default=["toy", "bench"], choices=list(SIZES))
    parser.add_argument("--repeats", type=int, default=None, help="phases alone (default: 10 toy, 3 bench)")
    parser.add_argument("--steps", type=int, default=None, help="full steps measured (default: 20 toy, 4 bench)")
    parser.add_argument("--warmup", type=int, default=2, help="full steps run first and not counted")
    parser.add_argument("--compare-async", action="store_true")
    parser.add_argument("--out", default=str(ROOT / "runs" / "phases"))
    args = parser.parse_args()
    out = Path(args.out) / time.strftime("%Y%m%d-%H%M%S")
    start_ray()
    results = {}
    for size in args.sizes:
        repeats = args.repeats or (10 if size == "toy" else 3)
        steps = args.steps or (20 if size == "toy" else 4)
        cfg = config(size, f"{size}-sync", out, args.warmup + steps)
        alone = phases_alone(cfg, repeats)
        medians = {phase: statistics.median(values) for phase, values in alone.items()}
        step_s, sync_tps = full_steps(cfg, args.warmup)
        result = {"step_s": step_s, "sum_s": sum(medians.values()), "sync_tps": sync_tps}
        print(f"[{size}] phases alone (median of {repeats}): "
              + " ".join(f"{phase}={s:.3f}s" for phase, s in medians.items()), flush=True)
        print(f"[{size}] full step (mean of {steps}): {step_s:.3f}s; sum of phases {result['sum_s']:.3f}s; "
              f"overhead_ratio {step_s / result['sum_s']:.3f}; {sync_tps:.0f} tokens/s", flush=True)
        if args.compare_async:
            async_cfg = config(size, f"{size}-async", out, args.warmup + steps, "train.async=true", "loss.is_cap=2")
            _, result["async_tps"] = full_steps(async_cfg, args.warmup)
            print(f"[{size}] async: {result['async_tps']:.0f} tokens/s vs sync {sync_tps:.0f}: "
                  f"ratio {result['async_tps'] / sync_tps:.3f}", flush=True)
        results[size] = result
    last = results[args.sizes[-1]]
    print(f"phases: step_s={last['step_s']:.4f} sum_of_phases_s={last['sum_s']:.4f} "
          f"overhead_ratio={last['step_s'] / last['sum_s']:.3f}")
    if args.compare_async:
        print(f"async: sync_tps={last['sync_tps']:.1f} async_tps={last['async_tps']:.1f} "
              f"ratio={last['async_tps'] / last['sync_tps']:.3f}")


if __name__ == "__main__":
    main()
