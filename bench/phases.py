"""Where a step's time goes: each phase alone, the sum of the phases, and the whole step.

    python bench/phases.py                            # both sizes of bench/peer_trl.py
    python bench/phases.py --compare-async            # and the same run with train.async=true
    python bench/phases.py --sizes toy --steps 10     # a quick look
    python bench/phases.py --compare-colocate         # and engines inside the learner (rollout.colocate)
    python bench/phases.py --sizes toy --compare-colocate --colocate-backend vllm
    python bench/phases.py --sizes toy --compare-cache  # training from a teacher cache vs live scoring

At each size (bench/peer_trl.py's: the toy, about 4-token completions; the 20M `bench` model,
128-token completions; 64 prompts per step; selfdistill's side of that comparison, i.e. a student
engine, one ZeRO-2 learner and the full-vocabulary teacher on the learner):

1. **Phases alone.** `selfdistill train` runs `--warmup` + `--steps` on-policy steps. In such a step
   the phases run one after another with nothing else in flight, each timed by the loop: engine
   generation (`time/generate`), teacher scoring on an engine (`time/score`; with this config the
   teacher runs inside the learner step), the learner step (`time/train`) and the weight sync
   (`time/sync`). Their sum is the limit of a sequential step, where only the phases cost.
2. **The full step**, `time/step` of the same steps (start-up, evaluation and checkpoints are
   outside it): overhead_ratio = step_s / sum_of_phases_s is what the loop adds (rewards, batch
   preparation, logging). Means over the last `--steps`.
3. With `--compare-async`, `train.async=true` (one-step off-policy, `loss.is_cap=2`) against sync,
   completion tokens trained per second, with the cores split between the engine and the learner
   (`rollout.cpu_threads` = `learner.cpu_threads` = cores / 2) in both runs. That is how a GPU
   cluster is laid out, every actor on a device of its own, idle while the other phases run in a
   sync step; async fills that idle time. It is also printed against run 1, where a sync step gives
   every phase all the cores (the CPU default, `cpu_threads: null`): on a CPU whose phases are all
   compute-bound the overlap then has nothing idle to fill.

4. With `--compare-colocate`, `rollout.colocate=true` (the learner rank samples with the module it
   trains, transformers backend; with `--colocate-backend vllm`, an in-process vLLM engine the rank
   loads its weights into) against separate engines of the same backend (`rollout.backend=
   transformers` by default, the toy size's default), both with all the cores per phase: completion
   tokens trained per second and the weight sync's seconds per step (object store, against a
   version stamp or an in-process reload).

5. With `--compare-cache`, steps per second trained from a teacher cache alone (`teacher.cache`,
   `cache_fraction=1`: no sampling, no scoring, no teacher engine) against live teacher scoring of
   the student's own samples (vLLM engines, the teacher scoring top-k on an engine) on the same
   prompts; the cache is `selfdistill score` of the model's samples of those prompts, written first
   (its time is printed, not counted).

Last lines (the `bench` size's, whose 128-token completions are closer to a real model's; each
size's own numbers are printed above them):

    phases: step_s=… sum_of_phases_s=… overhead_ratio=…
    async: sync_tps=… async_tps=… ratio=…
    colocate: size=… separate_tps=… colocated_tps=… ratio=… separate_sync_s=… colocated_sync_s=…   (a line per size)
    cache: size=… live_steps_per_s=… cached_steps_per_s=… ratio=…   (a line per size)
"""

import argparse
import gc
import os
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


PHASES = ("generate", "score", "train", "sync")


def run(cfg, warmup: int) -> dict[str, float]:
    """Mean seconds per step of each phase and of the step, and completion tokens trained per
    second, over the steps after `warmup`."""
    from trainer.loop import train
    from trainer.monitoring.metrics import read_metrics
    train(cfg)
    gc.collect()  # drop the run's actor handles, so that Ray ends its engines and learners
    steps = [m for m in read_metrics(Path(cfg.output_dir) / cfg.name) if m["step"] > warmup]
    seconds = sum(m["time/step"] for m in steps)
    means = {phase: statistics.mean(m[f"time/{phase}"] for m in steps) for phase in PHASES}
    return means | {"step": seconds / len(steps),
                    "tps": sum(m["throughput/tokens_per_s"] * m["time/step"] for m in steps) / seconds}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", nargs="+", default=["toy", "bench"], choices=list(SIZES))
    parser.add_argument("--steps", type=int, default=None, help="steps measured (default: 20 toy, 2 bench)")
    parser.add_argument("--warmup", type=int, default=None, help="steps run first and not counted (default: 2 toy, 1 bench)")
    parser.add_argument("--compare-async", action="store_true")
    parser.add_argument("--compare-colocate", action="store_true")
    parser.add_argument("--compare-cache", action="store_true")
    parser.add_argument("--colocate-backend", choices=["transformers", "vllm"], default="transformers",
                        help="the engines' backend on both sides of --compare-colocate")
    parser.add_argument("--out", default=str(ROOT / "runs" / "phases"))
    args = parser.parse_args()
    started = time.perf_counter()
    out = Path(args.out) / time.strftime("%Y%m%d-%H%M%S")
    start_ray()
    half = max(1, (os.cpu_count() or 2) // 2)  # --compare-async: one engine and one learner, half the cores each
    results = {}
    for size in args.sizes:
        steps = args.steps or (20 if size == "toy" else 2)
        warmup = args.warmup if args.warmup is not None else (2 if size == "toy" else 1)
        sync = run(config(size, f"{size}-sync", out, warmup + steps), warmup)
        sync["sum"] = sum(sync[phase] for phase in PHASES)
        print(f"[{size}] phases (mean of {steps} sync steps): "
              + " ".join(f"{phase}={sync[phase]:.3f}s" for phase in PHASES), flush=True)
        print(f"[{size}] step {sync['step']:.3f}s; sum of phases {sync['sum']:.3f}s; overhead_ratio "
              f"{sync['step'] / sync['sum']:.3f}; {sync['tps']:.0f} tokens/s", flush=True)
        if args.compare_async:
            split = [f"rollout.cpu_threads={half}", f"learner.cpu_threads={half}"]
            split_sync = run(config(size, f"{size}-sync-split", out, warmup + steps, *split), warmup)
            asynchronous = run(config(size, f"{size}-async", out, warmup + steps, *split, "train.async=true",
                                      "loss.is_cap=2"), warmup)
            sync["split_tps"], sync["async_tps"] = split_sync["tps"], asynchronous["tps"]
            print(f"[{size}] cores split, {half} thread(s) per actor: sync step {split_sync['step']:.3f}s "
                  f"{split_sync['tps']:.0f} tokens/s; async step {asynchronous['step']:.3f}s {asynchronous['tps']:.0f} "
                  f"tokens/s (generation waited {asynchronous['generate']:.3f}s a step): ratio "
                  f"{asynchronous['tps'] / split_sync['tps']:.3f}; against sync with all cores per phase: "
                  f"{asynchronous['tps'] / sync['tps']:.3f}", flush=True)
        if args.compare_colocate:
            same_backend = [f"rollout.backend={args.colocate_backend}"]
            separate = sync if SIZES[size].backend == args.colocate_backend else \
                run(config(size, f"{size}-separate", out, warmup + steps, *same_backend), warmup)
            colocated = run(config(size, f"{size}-colocated", out, warmup + steps, *same_backend,
                                   "rollout.colocate=true"), warmup)
            sync["colocate"] = (separate, colocated)
            print(f"[{size}] {args.colocate_backend} engines, separate: step {separate['step']:.3f}s sync {separate['sync']:.4f}s "
                  f"{separate['tps']:.0f} tokens/s; colocated: step {colocated['step']:.3f}s sync "
                  f"{colocated['sync']:.4f}s {colocated['tps']:.0f} tokens/s: ratio "
                  f"{colocated['tps'] / separate['tps']:.3f}", flush=True)
        if args.compare_cache:
            sync["cache"] = compare_cache(size, out, warmup, steps)
            live, cached, scoring_s = sync["cache"]
            print(f"[{size}] live teacher: step {live['step']:.3f}s ({1 / live['step']:.2f} steps/s); from the cache: "
                  f"step {cached['step']:.3f}s ({1 / cached['step']:.2f} steps/s): ratio {live['step'] / cached['step']:.3f} "
                  f"(writing the cache took {scoring_s:.0f} s)", flush=True)
        results[size] = sync
    print(f"wall time {time.perf_counter() - started:.0f} s; runs in {out}")
    last = results[args.sizes[-1]]
    print(f"phases: step_s={last['step']:.4f} sum_of_phases_s={last['sum']:.4f} "
          f"overhead_ratio={last['step'] / last['sum']:.3f}")
    if args.compare_async:
        print(f"async: sync_tps={last['split_tps']:.1f} async_tps={last['async_tps']:.1f} "
              f"ratio={last['async_tps'] / last['split_tps']:.3f}")
    if args.compare_colocate:
        for size in args.sizes:
            separate, colocated = results[size]["colocate"]
            print(f"colocate: size={size} separate_tps={separate['tps']:.1f} colocated_tps={colocated['tps']:.1f} "
                  f"ratio={colocated['tps'] / separate['tps']:.3f} separate_sync_s={separate['sync']:.4f} "
                  f"colocated_sync_s={colocated['sync']:.4f}")
    if args.compare_cache:
        for size in args.sizes:
            live, cached, _ = results[size]["cache"]
            print(f"cache: size={size} live_steps_per_s={1 / live['step']:.3f} cached_steps_per_s={1 / cached['step']:.3f} "
                  f"ratio={live['step'] / cached['step']:.3f}")


def compare_cache(size: str, out: Path, warmup: int, steps: int) -> tuple[dict, dict, float]:
    """Live scoring and training from a cache of the same prompts, and the seconds the cache took
    to write. Both score top-k on engines (a cache holds no full distribution)."""
    from trainer.cache.scoring import score_dataset
    engines = ["rollout.backend=vllm", "teacher.scorer=engine", "loss.estimator=topk", "loss.topk=20"]
    live = run(config(size, f"{size}-live", out, warmup + steps, *engines), warmup)
    cfg = config(size, f"{size}-score", out, 1, *engines)
    prompts = out / f"{size}-prompts.jsonl"
    lines = Path(cfg.data.train).read_text().splitlines(True)
    prompts.write_text("".join(lines[:cfg.train.prompts_per_step * (warmup + steps)]))
    cache = out / f"{size}-cache"
    began = time.perf_counter()
    score_dataset(config(size, f"{size}-score", out, 1, *engines, f"data.train={prompts}"), cache, "samples")
    scoring_s = time.perf_counter() - began
    cached = run(config(size, f"{size}-cached", out, warmup + steps, *engines, f"data.train={prompts}",
                        f"teacher.cache={cache}", "teacher.cache_fraction=1.0"), warmup)
    return live, cached, scoring_s


if __name__ == "__main__":
    main()
