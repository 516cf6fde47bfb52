"""Continual learning on the toy world: learn task A, adapt to task B, measure what A kept.

    python bench/continual.py                  # ~10-20 minutes on a 2-core CPU
    python bench/continual.py --steps-b 60     # shorter

1. Stage A: the toy base model learns addition by self-distillation (the demo recipe, forward KL).
2. From A's final checkpoint, three adaptations to subtraction, everything else equal:
   (a) SFT: cross-entropy on the demonstrations (`loss.mode=sft`);
   (b) self-distillation with the SDFT settings: EMA teacher α = 0.01, forward KL;
   (c) self-distillation with reverse KL and the frozen initial teacher (our default).
   Each is evaluated on both tasks every `--eval-every` steps.

Matching: the methods learn B at different speeds, so drops are compared at the same new-task
accuracy. The target is the lowest of the three methods' best subtraction accuracies (every method
reaches it); for each method we take the first evaluation at which subtraction accuracy reaches the
target, and its addition drop there: A's final addition accuracy minus that evaluation's.
ratio = (the smaller self-distillation drop) / (SFT drop). A drop can be negative (A improved); a
ratio with an SFT drop at or below zero is reported as nan.

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
from trainer.continual import adapt  # noqa: E402
from trainer.loop import train  # noqa: E402
from trainer.metrics import read_metrics  # noqa: E402

METHODS = {
    "sft": ["loss.mode=sft"],
    "sd_forward": ["loss.divergence=forward_kl", "teacher.weights=ema", "teacher.ema_alpha=0.01"],
    "sd_reverse": ["loss.divergence=reverse_kl", "teacher.weights=initial"],
}


def eval_subset(source: Path, out: Path, count: int) -> Path:
    out.write_text("".join(source.read_text().splitlines(True)[:count]))
    return out


def curve(run_dir: Path) -> list[tuple[int, float, float]]:
    """(step, new-task accuracy, prior-task accuracy) at every evaluation."""
    return [(row["step"], row["eval/subtraction/accuracy"], row["eval/addition/accuracy"])
            for row in read_metrics(run_dir) if "eval/subtraction/accuracy" in row]


def matched_drops(curves: dict[str, list[tuple[int, float, float]]], prior_start: float) -> tuple[float, dict]:
    target = min(max(new for _, new, _ in points) for points in curves.values())
    drops = {}
    for name, points in curves.items():
        step, new, prior = next(p for p in points if p[1] >= target)
        drops[name] = {"step": step, "new": new, "prior": prior, "drop": prior_start - prior}
    return target, drops


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--toy", default=str(ROOT / ".cache" / "toyworld"))
    parser.add_argument("--out", default=str(ROOT / "runs" / "bench-continual"))
    parser.add_argument("--steps-a", type=int, default=200)
    parser.add_argument("--steps-b", type=int, default=120)
    parser.add_argument("--eval-every", type=int, default=10)
    parser.add_argument("--eval-size", type=int, default=128)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    toy, out = Path(args.toy), Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    evals = {task: eval_subset(toy / "data" / task / "eval.jsonl", out / f"{task}-eval.jsonl", args.eval_size)
             for task in ("addition", "subtraction")}
    started = time.perf_counter()

    # Stage A (kept between invocations: a finished run is read back, not retrained)
    stage_a = load_config(ROOT / "configs" / "toy.yaml", [
        "name=A-addition", f"output_dir={out}", f"model.path={toy / 'model'}",
        f"data.train={toy / 'data' / 'addition' / 'train.jsonl'}",
        f"data.eval=[{evals['addition']}, {evals['subtraction']}]", "loss.divergence=forward_kl",
        f"train.steps={args.steps_a}", "train.eval_every=0", "train.save_every=0", "log.samples_every=0"])
    a = train(stage_a)
    prior_start = a["end"]["eval/addition/accuracy"]
    print(f"stage A (addition, {args.steps_a} steps): addition {a['start']['eval/addition/accuracy']:.1%} -> "
          f"{prior_start:.1%}, subtraction {a['start']['eval/subtraction/accuracy']:.1%} -> "
          f"{a['end']['eval/subtraction/accuracy']:.1%}", flush=True)

    curves = {}
    for name, overrides in METHODS.items():
        run = adapt(Path(a["checkpoint"]).parent, str(toy / "data" / "subtraction" / "train.jsonl"),
                    [str(evals["subtraction"])], [str(evals["addition"])], overrides=[
                        f"name=B-{name}", f"train.steps={args.steps_b}", f"train.eval_every={args.eval_every}",
                        "learner.warmup_steps=10", *overrides])
        curves[name] = curve(Path(run["run_dir"]))
        best = max(curves[name], key=lambda p: p[1])
        print(f"  {name:<11} best subtraction {best[1]:.1%} at step {best[0]}; addition at the end "
              f"{curves[name][-1][2]:.1%}  ({run['seconds']:.0f} s)", flush=True)

    target, drops = matched_drops(curves, prior_start)
    print(f"\nmatched at subtraction accuracy >= {target:.1%} (the lowest of the methods' best), "
          f"addition was {prior_start:.1%} after stage A")
    print(f"{'method':<12}{'step':>6}{'new task':>10}{'prior task':>12}{'prior drop':>12}")
    for name, d in drops.items():
        print(f"{name:<12}{d['step']:>6}{d['new']:>10.1%}{d['prior']:>12.1%}{100 * d['drop']:>10.1f}pt")
    sft = drops["sft"]["drop"]
    best_sd = min(drops["sd_forward"]["drop"], drops["sd_reverse"]["drop"])
    ratio = best_sd / sft if sft > 0 else float("nan")
    (out / "continual.json").write_text(json.dumps({"target": target, "prior_start": prior_start, "drops": drops,
                                                    "curves": curves, "ratio": ratio}, indent=1))
    print(f"({time.perf_counter() - started:.0f} s in all)")
    print(f"continual: sft_drop={sft:.4f} sd_forward_drop={drops['sd_forward']['drop']:.4f} "
          f"sd_reverse_drop={drops['sd_reverse']['drop']:.4f} ratio={ratio:.3f}")


if __name__ == "__main__":
    main()
