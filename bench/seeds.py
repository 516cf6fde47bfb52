"""The demo recipe over several seeds: does every seed reach the goal, and how far does it dip first?

    python bench/seeds.py                                     # configs/toy.yaml, seeds 0 1 2
    python bench/seeds.py --seeds 0 1 2 3 4 loss.divergence=forward_kl

Each seed is one run of the real trainer (`trainer.loop.train`, vLLM engines and DeepSpeed learners
on a local Ray), one after the other in this process, with the engines and learners handed from run
to run (`trainer.cluster.warm`). `train.seed` moves the data order, the sampling and the learners'
initial RNG; the toy world (the base model) is the same for every seed. Prints each seed's held-out
curve, then one line:

    seeds: median=… min=… worst_dip=…

median and min are over the seeds' final held-out accuracies (the first task of `data.eval`);
worst_dip is the largest fall below step 0's accuracy, over every evaluation of every seed (0 = no
evaluation ever fell below the start). Runs go to `runs/seeds/<time>/seed-<s>/`.

    python bench/seeds.py --base-seeds --seeds 0 1 2 3        # the toy world's pretraining seed instead

With `--base-seeds` the seed is the toy world's instead (`PretrainSettings.seed`: its splits, its
pretraining batches and initial weights), and every run keeps `train.seed` as configured: each seed
builds its own toy world in `.cache/toyworld-seed-<s>/` (seed 0: `.cache/toyworld`; cached; its promises
are not enforced, its accuracies are printed) and trains on its model and its addition split. This
is how to judge a change to the toy world or a recipe that must not depend on the exact base: a
CPU's kernels change the base as a pretraining seed does.
"""

import argparse
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))


def accuracy_curve(metrics: list[dict]) -> list[tuple[int, float]]:
    """(step, held-out accuracy) at every evaluation of the first task evaluated."""
    keys = [k for k in metrics[0] if k.startswith("eval/") and k.endswith("/accuracy")]
    if not keys:
        raise SystemExit("seeds: the runs evaluate nothing (set data.eval): there is no curve to compare")
    return [(m["step"], m[keys[0]]) for m in metrics if keys[0] in m]


def summarize(curves: list[list[tuple[int, float]]]) -> dict[str, float]:
    """median and min of the final accuracies; worst_dip = max over curves of (start − lowest), ≥ 0."""
    finals = [curve[-1][1] for curve in curves]
    dips = [max(0.0, curve[0][1] - min(accuracy for _, accuracy in curve)) for curve in curves]
    return {"median": statistics.median(finals), "min": min(finals), "worst_dip": max(dips)}


def base_overrides(seed: int) -> list[str]:
    """Builds (or reuses) the toy world of pretraining seed `seed`; the overrides that train on it."""
    from toyworld.base import PretrainSettings
    from toyworld.prepare import prepare, summary
    default = seed == PretrainSettings().seed  # the toy world every other command uses
    world = ROOT / ".cache" / ("toyworld" if default else f"toyworld-seed-{seed}")
    print(f"base {seed}:", summary(prepare(world, PretrainSettings(seed=seed), promises=False)).replace("\n", "; "),
          flush=True)
    data = world / "data" / "addition"
    return [f"model.path={world / 'model'}", f"data.train={data / 'train.jsonl'}", f"data.eval={data / 'eval.jsonl'}"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=str(ROOT / "configs" / "toy.yaml"))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--out", default=str(ROOT / "runs" / "seeds" / time.strftime("%Y%m%d-%H%M%S")))
    parser.add_argument("--base-seeds", action="store_true",
                        help="the seeds are the toy world's pretraining seeds, each base built and trained on once")
    parser.add_argument("overrides", nargs="*", help="config overrides (a.b=value) for every seed's run")
    args = parser.parse_args()

    from efficiency import start_ray
    from trainer.cluster.warm import WarmActors
    from trainer.config import load_config
    from trainer.loop import train
    from trainer.monitoring.metrics import read_metrics
    start_ray()
    warm, curves = WarmActors(), []
    try:
        for seed in args.seeds:
            varied = base_overrides(seed) if args.base_seeds else [f"train.seed={seed}"]
            cfg = load_config(args.config, [*args.overrides, *varied, f"name=seed-{seed}",
                                            f"output_dir={args.out}", "train.save_every=0"])
            started = time.perf_counter()
            if (stopped_by := train(cfg, warm=warm)["stopped_by"]) is not None:  # a partial curve is no result
                raise SystemExit(f"seeds: seed {seed} was stopped by {stopped_by}; the same command resumes it")
            curves.append(accuracy_curve(read_metrics(Path(args.out) / cfg.name)))
            print(f"seed {seed} ({time.perf_counter() - started:.0f} s): "
                  + " ".join(f"{step}:{accuracy:.1%}" for step, accuracy in curves[-1]), flush=True)
    finally:
        warm.close()
    result = summarize(curves)
    print(f"seeds: median={result['median']:.4f} min={result['min']:.4f} worst_dip={result['worst_dip']:.4f}")


if __name__ == "__main__":
    main()
