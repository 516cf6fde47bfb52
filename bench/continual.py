"""Continual learning on the toy world: two stages, subtraction (A) then addition (B). Does the model
keep its teacher from one stage to the next, and what does A keep while B is learned?

    python bench/continual.py                     # ~20 minutes on a 2-core CPU
    python bench/continual.py --steps 100         # shorter (weaker stages)
    python bench/continual.py --set train.seed=1 --out runs/bench-continual-1   # another seed

Every run is the toy recipe (`configs/toy.yaml`: reverse KL, the frozen start as teacher, cosine
lr) for `--steps` steps, evaluated every `--eval-every` steps on 128 held-out problems of each task,
from the plain prompt (`accuracy`) and shown the worked solution (`teacher_accuracy`: the teacher the
model carries into its next stage).

**Stage A**, from the toy base, on subtraction, twice:
   A-replay  with replay (`replay.fraction` = `--replay-a`, default 0.25): addition's prompts as the
             base answers them, and both tasks' prompts in the teacher's format, with the base's
             distributions;
   A-plain   without.
**Stage B**, on addition:
   from A-replay:  sft (`loss.mode=sft`), sd_forward (SDFT's settings: EMA teacher α = 0.01,
                   forward KL), sd_reverse (our default), sd_replay (our default + replay of
                   subtraction's prompts and both tasks' teacher format, with A-replay's distributions, at
                   `--replay-b`, default 0.5: stage B has a learned task to keep, where stage A had
                   only the base's addition; at 0.25 the drop was 0.63x SFT's at one seed of three);
   from A-plain:   sd_plain (our default: the teacher A-plain carries) and sd_base_teacher (the base
                   kept as a frozen `teacher.model`, shown the worked solution).

**A teacher that lasts** (two-stage targets, for each way of keeping the teacher: replay = A-replay
then sd_replay; none = A-plain then sd_plain; base = A-plain then sd_base_teacher): after each stage,
every task's teacher accuracy (the model shown the worked solution; for `base`, the frozen base
itself, which teaches every stage) is ≥ 90 % of the base's, and stage B raises addition by at least
as much as stage A raised subtraction. Printed as `teacher: way=… stage_a_gain=… stage_b_gain=…
teacher_min=… holds=yes|no`.

**Forgetting**, among the runs from A-replay: the methods learn B at different speeds, so drops are
compared at the same new-task accuracy. The target is the lowest of the methods' best B accuracies
(every method reaches it); for each method we take the first evaluation at which B accuracy reaches
the target, and its A drop there: A's accuracy at the stage's start minus that evaluation's.
ratio = (the smallest self-distillation drop) / (SFT drop), its method named. A drop can be
negative (A improved). The comparison means nothing when a method never rose above its start on B
or when SFT lost nothing on A: the script then says which, and exits with status 1.

Last lines:
    teacher: way=… …                            (a line per way)
    continual: sft_drop=… sd_forward_drop=… sd_reverse_drop=… sd_replay_drop=… best=… ratio=…
"""

import argparse
import json
import logging
import math
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from trainer.cluster.warm import WarmActors  # noqa: E402
from trainer.config import load_config  # noqa: E402
from trainer.loop import train  # noqa: E402
from trainer.monitoring.metrics import read_metrics  # noqa: E402

TEACHER_KEEPS = 0.9
"""After each stage every task's teacher accuracy is at least this share of the base's."""


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


def two_stages(base: dict, stage_a: dict, stage_b: dict, task_a: str, task_b: str,
               teachers: tuple[dict, dict] | None = None) -> dict:
    """The two-stage targets from the base's, stage A's final and stage B's final evaluations.
    `teachers`: the evaluations that hold the teacher after each stage, when it is not the stage's
    own final model (a frozen `teacher.model`: its step-0 evaluation)."""
    tasks = (task_a, task_b)
    teacher = [min(stage[f"eval/{t}/teacher_accuracy"] / base[f"eval/{t}/teacher_accuracy"] for t in tasks)
               for stage in (teachers or (stage_a, stage_b))]
    gain_a = stage_a[f"eval/{task_a}/accuracy"] - base[f"eval/{task_a}/accuracy"]
    gain_b = stage_b[f"eval/{task_b}/accuracy"] - stage_a[f"eval/{task_b}/accuracy"]
    return {"stage_a_gain": gain_a, "stage_b_gain": gain_b, "teacher_min": min(teacher), "teacher_after": teacher,
            "holds": min(teacher) >= TEACHER_KEEPS and gain_b >= gain_a}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--toy", default=str(ROOT / ".cache" / "toyworld"))
    parser.add_argument("--out", default=str(ROOT / "runs" / "bench-continual"))
    parser.add_argument("--task-a", default="subtraction")
    parser.add_argument("--task-b", default="addition")
    parser.add_argument("--steps", type=int, default=200, help="steps of every stage")
    parser.add_argument("--replay-a", type=float, default=0.25, help="replay's share of each step in stage A")
    parser.add_argument("--replay-b", type=float, default=0.5, help="replay's share of each step in stage B")
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
    trains = {task: toy / "data" / task / "train.jsonl" for task in (task_a, task_b)}
    started, warm = time.perf_counter(), WarmActors()

    def run(name: str, model: Path, task: str, *overrides: str) -> dict:
        """A finished run is read back, not retrained (its summary)."""
        cfg = load_config(ROOT / "configs" / "toy.yaml", [
            f"name={name}", f"output_dir={out}", f"model.path={model}", f"data.train={trains[task]}",
            f"data.eval=[{evals[task_b]}, {evals[task_a]}]", f"train.steps={args.steps}",
            f"train.eval_every={args.eval_every}", "train.save_every=0", "log.samples_every=0", *overrides, *args.set])
        summary = train(cfg, warm=warm)
        if summary["stopped_by"] is not None:  # the next stage must not start from a partial one
            raise SystemExit(f"continual: {name} was stopped by {summary['stopped_by']} after step {summary['steps']}; "
                             "the same command resumes it")
        print(f"  {name:<16} {task_a} {summary['end'][f'eval/{task_a}/accuracy']:6.1%}  {task_b} "
              f"{summary['end'][f'eval/{task_b}/accuracy']:6.1%}   shown the solution: "
              + ", ".join(f"{t} {summary['end'].get(f'eval/{t}/teacher_accuracy', math.nan):.1%}" for t in (task_a, task_b))
              + f"  ({summary['seconds']:.0f} s)", flush=True)
        return summary

    def replay(prior: str, fraction: float) -> list[str]:
        return [f"replay.fraction={fraction}", f"replay.data=[{trains[prior]}]"]

    try:
        base = toy / "model"
        a_replay = run("A-replay", base, task_a, *replay(task_b, args.replay_a))
        print(f"base: {task_a} {a_replay['start'][f'eval/{task_a}/accuracy']:.1%}, {task_b} "
              f"{a_replay['start'][f'eval/{task_b}/accuracy']:.1%}; shown the solution: " + ", ".join(
                  f"{t} {a_replay['start'][f'eval/{t}/teacher_accuracy']:.1%}" for t in (task_a, task_b)), flush=True)
        a_plain = run("A-plain", base, task_a)
        from_replay = {"sft": ["loss.mode=sft"],
                       "sd_forward": ["loss.divergence=forward_kl", "teacher.weights=ema", "teacher.ema_alpha=0.01"],
                       "sd_reverse": [], "sd_replay": replay(task_a, args.replay_b)}
        b_runs = {name: run(f"B-{name}", Path(a_replay["checkpoint"]), task_b, *overrides)
                  for name, overrides in from_replay.items()}
        b_plain = run("B-sd_plain", Path(a_plain["checkpoint"]), task_b)
        b_base = run("B-sd_base_teacher", Path(a_plain["checkpoint"]), task_b, f"teacher.model={base}")
    finally:
        warm.close()

    start = a_replay["start"]
    ways = {"replay": two_stages(start, a_replay["end"], b_runs["sd_replay"]["end"], task_a, task_b),
            "none": two_stages(start, a_plain["end"], b_plain["end"], task_a, task_b),
            "base": two_stages(start, a_plain["end"], b_base["end"], task_a, task_b,
                               teachers=(b_base["start"], b_base["start"]))}  # the frozen base teaches both stages
    curves = {name: curve(Path(run["run_dir"]), task_b, task_a) for name, run in b_runs.items()}
    prior_start = b_runs["sft"]["start"][f"eval/{task_a}/accuracy"]
    target, drops = matched_drops(curves, prior_start)
    print(f"\nmatched at {task_b} accuracy >= {target:.1%} (the lowest of the methods' best); "
          f"{task_a} was {prior_start:.1%} at stage B's start")
    print(f"{'method':<12}{'step':>6}{'new task':>10}{'prior task':>12}{'prior drop':>12}")
    for name, d in drops.items():
        print(f"{name:<12}{d['step']:>6}{d['new']:>10.1%}{d['prior']:>12.1%}{100 * d['drop']:>10.1f}pt")
    sft = drops["sft"]["drop"]
    best = min((name for name in drops if name != "sft"), key=lambda name: drops[name]["drop"])
    reason = no_comparison(curves, drops)
    ratio = None if reason else drops[best]["drop"] / sft
    (out / "continual.json").write_text(json.dumps({"target": target, "prior_start": prior_start, "drops": drops,
                                                    "curves": curves, "best": best, "ratio": ratio, "teacher": ways,
                                                    "no_comparison": reason}, indent=1))
    print(f"({time.perf_counter() - started:.0f} s in all)")
    for way, result in ways.items():
        print(f"teacher: way={way} stage_a_gain={result['stage_a_gain']:.4f} stage_b_gain={result['stage_b_gain']:.4f} "
              f"teacher_min={result['teacher_min']:.3f} holds={'yes' if result['holds'] else 'no'}")
    if reason:
        raise SystemExit(f"continual: no comparison: {reason}")
    print("continual: " + " ".join(f"{name}_drop={d['drop']:.4f}" for name, d in drops.items())
          + f" best={best} ratio={ratio:.3f}")


if __name__ == "__main__":
    main()
