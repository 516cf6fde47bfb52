"""Continual learning on the toy world: a model that knows task A adapts to task B; what did A keep?

    python bench/continual.py                  # ~4-7 minutes on a 2-core CPU
    python bench/continual.py --steps-b 60     # shorter
    python bench/continual.py --set train.seed=1 --out runs/bench-continual-1   # another seed

Stage A is the toy base model, pretrained on both families, which solves a little more of
subtraction (A) than of addition (B): 18.8 % vs 14.8 % of 128 held-out problems. (`--steps-a N`
first self-distills the base on A for N steps. On an earlier base we measured that this destroys
the teacher: after 200 steps on addition the model with the worked solution in its prompt solved
1.6 % of additions and 13 % of subtractions, down from 100 %, so self-distillation on B had no
teacher left; see the README.)

From A, three adaptations to B, everything else equal:
   (a) SFT: cross-entropy on the demonstrations (`loss.mode=sft`);
   (b) self-distillation with the SDFT settings: EMA teacher α = 0.01, forward KL;
   (c) self-distillation with reverse KL and the frozen initial teacher (our default).
Each is evaluated on both tasks every `--eval-every` steps.

Matching: the methods learn B at different speeds, so drops are compared at the same new-task
accuracy. The target is the lowest of the three methods' best B accuracies (every method reaches
it); for each method we take the first evaluation at which B accuracy reaches the target, and its
A drop there: A's accuracy at the start minus that evaluation's.
ratio = (the smaller self-distillation drop) / (SFT drop). A drop can be negative (A improved).
The comparison means nothing when a method never rose above its start on B (the matched point is
then step 0, where nobody forgot anything) or when SFT lost nothing on A (there is no forgetting to
compare against): the script then says which, and exits with status 1 instead of printing a ratio.

The last line is `continual: sft_drop=… sd_forward_drop=… sd_reverse_drop=… ratio=…`.
"""

import argparse
import json
import logging
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from trainer.config import load_config  # noqa: E402
from trainer.loop import train  # noqa: E402
from trainer.monitoring.metrics import read_metrics  # noqa: E402

METHODS = {
    "sft": ["loss.mode=sft"],
    "sd_forward": ["loss.divergence=forward_kl", "teacher.weights=ema", "teacher.ema_alpha=0.01"],
    "sd_reverse": ["loss.divergence=reverse_kl", "teacher.weights=initial"],
}


def eval_subset(source: Path, out: Path, count: int) -> Path:
    out.write_text("".join(source.read_text().splitlines(True)[:count]))
    return out


def curve(run_dir: Path, new: str, prior: str) -> list[tuple[int, float, float]]:
    """(step, new-task accuracy, prior-task accuracy) at every evaluation."""
    return [(row["step"], row[f"eval/{new}/accuracy"], row[f"eval/{prior}/accuracy"])
            for row in read_metrics(run_dir) if f"eval/{new}/accuracy" in row]


def matched_drops(curves: dict[str, list[tuple[int, float, float]]], prior_start: float) -> tuple[float, dict]:
    target = min(max(new for _, new, _ in points) for points in curves.values())
    drops = {}
    for name, points in curves.items():
        step, new, prior = next(p for p in points if p[1] >= target)
        drops[name] = {"step": step, "new": new, "prior": prior, "drop": prior_start - prior}
    return target, drops


def no_comparison(curves: dict[str, list[tuple[int, float, float]]], drops: dict) -> str | None:
    """Why the matched comparison means nothing, or None when it means something."""
    for name, points in curves.items():
        if max(new for _, new, _ in points) <= points[0][1]:
            return f"{name} never rose above its start on the new task ({points[0][1]:.1%})"
    if drops["sft"]["drop"] <= 0:
        return (f"SFT lost nothing on the prior task at the matched point (drop {100 * drops['sft']['drop']:.1f}pt): "
                "there is no forgetting to compare against")
    return None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--toy", default=str(ROOT / ".cache" / "toyworld"))
    parser.add_argument("--out", default=str(ROOT / "runs" / "bench-continual"))
    parser.add_argument("--task-a", default="subtraction")
    parser.add_argument("--task-b", default="addition")
    parser.add_argument("--steps-a", type=int, default=0, help="self-distill the base on A first (0 = the base is A)")
    parser.add_argument("--steps-b", type=int, default=150)
    parser.add_argument("--eval-every", type=int, default=10)
    parser.add_argument("--eval-size", type=int, default=128)
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                        help="config overrides of every run, applied last, e.g. train.seed=1 (with its own --out)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    toy, out = Path(args.toy), Path(args.out)
    task_a, task_b = args.task_a, args.task_b
    out.mkdir(parents=True, exist_ok=True)
    evals = {task: eval_subset(toy / "data" / task / "eval.jsonl", out / f"{task}-eval.jsonl", args.eval_size)
             for task in (task_a, task_b)}
    started = time.perf_counter()

    def config(name: str, model: Path, task: str, steps: int, *overrides: str):
        return load_config(ROOT / "configs" / "toy.yaml", [
            f"name={name}", f"output_dir={out}", f"model.path={model}", f"data.train={toy / 'data' / task / 'train.jsonl'}",
            f"data.eval=[{evals[task_b]}, {evals[task_a]}]", f"train.steps={steps}", "train.save_every=0",
            "log.samples_every=0", *overrides, *args.set])

    # Stage A: the base, or the base self-distilled on A (a finished run is read back, not retrained)
    model_a = toy / "model"
    if args.steps_a:
        model_a = Path(train(config(f"A-{task_a}", model_a, task_a, args.steps_a, "loss.divergence=forward_kl",
                                    "train.eval_every=0"))["checkpoint"])
    curves, start = {}, None
    for name, overrides in METHODS.items():
        run = train(config(f"B-{name}", model_a, task_b, args.steps_b, f"train.eval_every={args.eval_every}",
                           "learner.warmup_steps=10", *overrides))
        curves[name] = curve(Path(run["run_dir"]), task_b, task_a)
        if start is None:
            start = run["start"]
            print(f"model A: {task_a} {start[f'eval/{task_a}/accuracy']:.1%}, {task_b} {start[f'eval/{task_b}/accuracy']:.1%}; "
                  "with the privileged context: " + ", ".join(
                      f"{t} {start[f'eval/{t}/teacher_accuracy']:.1%}" for t in (task_a, task_b)), flush=True)
        best = max(curves[name], key=lambda p: p[1])
        print(f"  {name:<11} best {task_b} {best[1]:.1%} at step {best[0]}; {task_a} at the end "
              f"{curves[name][-1][2]:.1%}  ({run['seconds']:.0f} s)", flush=True)
    prior_start = start[f"eval/{task_a}/accuracy"]

    target, drops = matched_drops(curves, prior_start)
    print(f"\nmatched at {task_b} accuracy >= {target:.1%} (the lowest of the methods' best); "
          f"{task_a} was {prior_start:.1%} at the start")
    print(f"{'method':<12}{'step':>6}{'new task':>10}{'prior task':>12}{'prior drop':>12}")
    for name, d in drops.items():
        print(f"{name:<12}{d['step']:>6}{d['new']:>10.1%}{d['prior']:>12.1%}{100 * d['drop']:>10.1f}pt")
    sft = drops["sft"]["drop"]
    best_sd = min(drops["sd_forward"]["drop"], drops["sd_reverse"]["drop"])
    reason = no_comparison(curves, drops)
    ratio = None if reason else best_sd / sft
    (out / "continual.json").write_text(json.dumps({"target": target, "prior_start": prior_start, "drops": drops,
                                                    "curves": curves, "ratio": ratio, "no_comparison": reason}, indent=1))
    print(f"({time.perf_counter() - started:.0f} s in all)")
    if reason:
        raise SystemExit(f"continual: no comparison: {reason}")
    print(f"continual: sft_drop={sft:.4f} sd_forward_drop={drops['sd_forward']['drop']:.4f} "
          f"sd_reverse_drop={drops['sd_reverse']['drop']:.4f} ratio={ratio:.3f}")


if __name__ == "__main__":
    main()
