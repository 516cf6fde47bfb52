"""Token efficiency of self-distillation against GRPO on the toy world.

Two runs of the real trainer (`selfdistill train`, one after the other, same machine, same seed):

- self-distillation with the toy recipe's settings (configs/toy.yaml: reverse KL, top-k teacher
  scored by a frozen-teacher engine, one rollout per prompt, lr 1e-3 with 50 warm-up steps, cosine);
- GRPO (`loss.mode=grpo`) with `--grpo-n` ≥ 4 rollouts per prompt and the same prompt budget:
  the same prompts per step and the same number of steps, so it generates n× the completions.
  Its learning rate is its own (`GRPO_SETTINGS`, below); everything else is the toy recipe's.

Both evaluate greedy held-out accuracy every `--eval-every` steps. The target is the best accuracy
GRPO reaches within the budget; each method's cost is the number of completion tokens it generated
before its first evaluation at or above the target. The last line is

    efficiency: sd_tokens=… grpo_tokens=… ratio=…

with ratio = grpo_tokens / sd_tokens (> 1: self-distillation needs fewer generated tokens). If
self-distillation never reaches the target, sd_tokens is reported as `>N` (its whole spend) and
the ratio as an upper bound `<…`. When either method never rose above its start, there is no
comparison: the script says which and exits with status 1. Generated tokens are what OPSD counts; the teacher's scoring
pass (a prompt-only forward, no sampling) is not included, and wall-clock seconds are printed
beside them for that reason.

    python bench/efficiency.py          # 150 steps of 64 prompts, eval every 10 on 200 problems
    python bench/efficiency.py --grpo-set learner.lr=2e-4   # GRPO at another learning rate
    python bench/efficiency.py --from runs/efficiency/<time>  # re-analyse finished runs

Overrides apply in this order, the last winning: the toy recipe, the method's tuned settings
(GRPO_SETTINGS for GRPO, none for self-distillation), `--set` (both runs), then `--sd-set` or
`--grpo-set` (that run alone).

GRPO's learning rate. A sweep of GRPO alone on the toy base (n = 4, 64 prompts a step, 150 steps,
10 warm-up steps, the toy recipe's cosine schedule, the first 200 held-out problems, start 12.0 %;
colocated transformers engines, which sample as the vLLM ones do); the best held-out accuracy of
the run and the step it was first reached, for train.seed 0 / 1 / 2:

    lr 5e-5    23.5 % (140)                                  seed 0 only
    lr 1e-4    29.0 % (120)   24.0 % (90)    26.0 % (130)    never below the start
    lr 2e-4    30.0 % (140)   25.0 % (120)   26.5 % (130)    first falls below it (8.5 % at step 10, seed 0)
    lr 5e-4     7.5 % (150)                                  collapses (2.5 % at step 40), seed 0 only

1e-4 and 2e-4 reach the same accuracy to within a problem or two of the 200 (medians 26.0 and
26.5 %); 1e-4 does so without first falling below its start, and is GRPO_SETTINGS. GRPO learns here
because the base student answers about half of the problems whose ones-digit pair it was pretrained
on (toyworld/tasks.py STUDENT_ONES_PAIRS), so groups of 4 samples there have reward variance;
tests/test_objectives_e2e.py checks that GRPO at these settings learns on those problems. On the
others its right answer is rare (77 % of the groups have zero reward variance in the README's
runs), which is why it climbs slowly and stops near 25-30 %.

The defaults keep the script under 6 minutes on an idle 2-core machine (about 100 s for
self-distillation, 100-135 s for GRPO, each with its start-up). 150 steps of 64 prompts (the toy
recipe's batch) cover GRPO's climb to its best (step 90-140 above) and self-distillation's warm-up;
self-distillation passed GRPO's best at step 100-120 in the README's runs. Evaluating 200 problems
every 10 steps costs a second or two each and places each first crossing to within 10 steps. The
toy recipe's 400 steps are not needed for this target (the cosine schedule is stretched over the
150 steps run).
"""

import argparse
import gc
import logging
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# GRPO's own settings, from the sweep in the module docstring; self-distillation keeps the toy recipe's
GRPO_SETTINGS = ("learner.lr=1e-4", "learner.warmup_steps=10")


def start_ray(attempts: int = 5):
    """One local Ray for both runs. On a loaded machine its start-up can exceed Ray's fixed 30 s
    wait for the raylet before anything ran; then it is simply started again."""
    import ray
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    for attempt in range(attempts):
        try:
            ray.init(address="local", include_dashboard=False, logging_level=30)
            return
        except Exception as e:  # Ray raises a bare Exception for this time-out
            if attempt == attempts - 1 or "timed out during startup" not in str(e):
                raise
            ray.shutdown()
            print(f"ray start-up timed out (attempt {attempt + 1}); starting again", flush=True)


def run(name: str, out: Path, args, extra: list[str]) -> tuple[list[dict], float]:
    """One training run of the real trainer, in this process (actors on the shared local Ray)."""
    from trainer.config import load_config
    from trainer.loop import train
    from trainer.monitoring.metrics import read_metrics
    toy = Path(args.toy)
    overrides = [f"name={name}", f"output_dir={out}", f"model.path={toy / 'model'}",
                 f"data.train={toy / 'data' / 'addition' / 'train.jsonl'}", f"data.eval={args.eval_file}",
                 f"train.steps={args.steps}", f"train.eval_every={args.eval_every}",
                 f"train.prompts_per_step={args.prompts_per_step}", "train.save_every=0", "log.samples_every=0",
                 "log.tensorboard=false", f"learner.micro_batch={args.micro_batch}", *extra]
    started = time.perf_counter()
    train(load_config(ROOT / "configs" / "toy.yaml", overrides))
    seconds = time.perf_counter() - started
    gc.collect()  # drop the run's actor handles, so that Ray ends its engines and learners
    return read_metrics(out / name), seconds


def accuracy_curve(metrics: list[dict], sequences_per_step: int) -> list[tuple[int, float, float]]:
    """(step, cumulative generated completion tokens, eval accuracy) at every evaluation."""
    curve, tokens = [], 0.0
    for m in metrics:
        tokens += m.get("rollout/len_mean", 0.0) * sequences_per_step
        if "eval/addition/accuracy" in m:
            curve.append((m["step"], tokens, m["eval/addition/accuracy"]))
    return curve


def tokens_to_reach(curve: list[tuple[int, float, float]], target: float) -> float | None:
    """Tokens generated up to the first evaluation after training began with accuracy ≥ target."""
    return next((tokens for step, tokens, accuracy in curve if step > 0 and accuracy >= target - 1e-9), None)


def no_comparison(sd_curve: list[tuple[int, float, float]], grpo_curve: list[tuple[int, float, float]]) -> str | None:
    """Why the token comparison means nothing (a method never rose above its start), or None."""
    for name, curve in (("GRPO", grpo_curve), ("self-distillation", sd_curve)):
        if max(accuracy for step, _, accuracy in curve if step > 0) <= curve[0][2]:
            return f"{name} never rose above its start ({curve[0][2]:.3f}) within {curve[-1][0]} steps"
    return None


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--toy", default=str(ROOT / ".cache" / "toyworld"))
    parser.add_argument("--out", default=str(ROOT / "runs" / "efficiency"))
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--eval-every", type=int, default=10)
    parser.add_argument("--prompts-per-step", type=int, default=64)
    parser.add_argument("--grpo-n", type=int, default=4)
    parser.add_argument("--micro-batch", type=int, default=64)
    parser.add_argument("--eval-size", type=int, default=200, help="held-out addition problems evaluated")
    parser.add_argument("--from", dest="source", help="analyse the runs already in this directory (sd/, grpo/)")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                        help="config overrides applied to both runs, e.g. train.seed=1")
    parser.add_argument("--sd-set", nargs="*", default=[], metavar="KEY=VALUE",
                        help="config overrides of the self-distillation run alone, applied after --set")
    parser.add_argument("--grpo-set", nargs="*", default=[], metavar="KEY=VALUE",
                        help=f"config overrides of the GRPO run alone, applied after its tuned settings "
                             f"({' '.join(GRPO_SETTINGS)}) and --set")
    args = parser.parse_args()
    if args.grpo_n < 4:
        parser.error("--grpo-n must be at least 4")
    sys.path.insert(0, str(ROOT))
    if args.source:
        from trainer.monitoring.metrics import read_metrics
        sd, grpo = read_metrics(Path(args.source) / "sd"), read_metrics(Path(args.source) / "grpo")
        sd_seconds = grpo_seconds = float("nan")
    else:
        out = Path(args.out) / time.strftime("%Y%m%d-%H%M%S")
        out.mkdir(parents=True)
        eval_lines = (Path(args.toy) / "data" / "addition" / "eval.jsonl").read_text().splitlines()[:args.eval_size]
        args.eval_file = out / "eval.jsonl"
        args.eval_file.write_text("\n".join(eval_lines) + "\n")
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
        start_ray()
        sd, sd_seconds = run("sd", out, args, [*args.set, *args.sd_set])
        grpo, grpo_seconds = run("grpo", out, args, ["loss.mode=grpo", f"rollout.n={args.grpo_n}", *GRPO_SETTINGS,
                                                     *args.set, *args.grpo_set])
    sd_curve = accuracy_curve(sd, args.prompts_per_step)
    grpo_curve = accuracy_curve(grpo, args.prompts_per_step * args.grpo_n)

    print(f"{'step':>5} {'sd tokens':>10} {'sd acc':>7} {'grpo tokens':>12} {'grpo acc':>9}")
    for (step, sd_tokens, sd_acc), (_, grpo_tokens, grpo_acc) in zip(sd_curve, grpo_curve):
        print(f"{step:>5} {sd_tokens:>10.0f} {sd_acc:>7.3f} {grpo_tokens:>12.0f} {grpo_acc:>9.3f}")
    print(f"wall clock: sd {sd_seconds:.0f} s, grpo {grpo_seconds:.0f} s (each including engine and learner start-up)")
    zero_variance = [m["rl/zero_variance_groups"] for m in grpo if "rl/zero_variance_groups" in m]
    if zero_variance:
        print(f"grpo: mean fraction of groups with zero reward variance {sum(zero_variance) / len(zero_variance):.3f}")

    target = max(accuracy for step, _, accuracy in grpo_curve if step > 0)
    grpo_tokens = tokens_to_reach(grpo_curve, target)
    sd_tokens = tokens_to_reach(sd_curve, target)
    print(f"target: GRPO's best held-out accuracy after step 0, {target:.3f} (both start at {grpo_curve[0][2]:.3f})")
    reason = no_comparison(sd_curve, grpo_curve)
    if reason:
        raise SystemExit(f"efficiency: no comparison: {reason}")
    if sd_tokens is None:
        spent = sd_curve[-1][1]
        print(f"efficiency: sd_tokens=>{spent:.0f} grpo_tokens={grpo_tokens:.0f} ratio=<{grpo_tokens / spent:.2f}")
    else:
        print(f"efficiency: sd_tokens={sd_tokens:.0f} grpo_tokens={grpo_tokens:.0f} ratio={grpo_tokens / sd_tokens:.2f}")


if __name__ == "__main__":
    main()
