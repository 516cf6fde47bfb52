"""The `selfdistill` command line.

  selfdistill train CONFIG [a.b=value ...]     run on-policy self-distillation (resumes the run if it exists)
  selfdistill adapt --from CKPT --data NEW     a new stage from a checkpoint, with forgetting measured
                    [--replay PRIOR[:FRACTION]]  replaying prior prompts with the checkpoint's distributions
  selfdistill score CONFIG --out DIR           the config's teacher's top-k scores of completions, on disk
  selfdistill config CONFIG [a.b=value ...]    validate a config and print it resolved
  selfdistill config --reference               every option, its type, default and meaning
  selfdistill report RUN_DIR [RUN_DIR ...]     plots and sample rollouts of one run, or several overlaid
  selfdistill toy prepare --out DIR            build the toy world (data, tokenizer, base model)
                    [--with-teacher]             and its stronger checkpoint, for teacher.model
  selfdistill toy realshape --out DIR          a real 32k tokenizer, a random Llama, chat prompts, long
                    [--size bench|test]          completions of varying length (benchmarks, tests)
"""

import argparse
import dataclasses
import logging
import os
import sys

from core.errors import SelfDistillError

logger = logging.getLogger("selfdistill")


def _config(args: argparse.Namespace) -> int:
    from trainer.config import dump_config, load_config, reference_markdown
    if args.reference:
        print(reference_markdown(), end="")
        return 0
    if args.config is None:
        raise SelfDistillError("selfdistill config: give a CONFIG file, or --reference")
    print(dump_config(load_config(args.config, args.overrides)), end="")
    return 0


def _train(args: argparse.Namespace) -> int:
    from trainer.config import load_config
    cfg = load_config(args.config, args.overrides)
    if cfg.stages:
        from trainer.lifecycle.continual import forgetting_markdown, run_stages
        summary = run_stages(cfg, args.resume, warm=args.warm)
        print("\n".join(format_summary(s) for s in summary["stages"]))
        if summary["forgetting"] is not None:
            print(forgetting_markdown(summary["forgetting"]), end="")
            print(f"forgetting table: {summary['run_dir']}/forgetting.md")
        if summary["stopped_by"]:
            print(f"stopped by {summary['stopped_by']} in stage {len(summary['stages'])} of {len(cfg.stages)}: "
                  f"rerun the same command to resume")
        return 0
    from trainer.loop import train
    print(format_summary(train(cfg, args.resume, warm=args.warm)))
    return 0


def _adapt(args: argparse.Namespace) -> int:
    from trainer.lifecycle.continual import adapt, forgetting_markdown, replay_overrides
    overrides = replay_overrides(args.replay or []) + list(args.overrides)
    summary = adapt(args.from_, args.data, args.eval, args.eval_prior, args.config, overrides, args.resume,
                    warm=args.warm)
    print(format_summary(summary))
    print(forgetting_markdown(summary["forgetting"]), end="")
    return 0


def _score(args: argparse.Namespace) -> int:
    from trainer.cache.scoring import score_dataset
    from trainer.cache.store import TeacherCache
    from trainer.config import load_config
    manifest = score_dataset(load_config(args.config, args.overrides), args.out, args.completions, args.shard_size)
    cache = TeacherCache(args.out)
    full = 2 * manifest["vocab_size"]
    print(f"teacher cache: {len(cache)} completions, {sum(s['tokens'] for s in manifest['shards'])} tokens, "
          f"k={cache.k}, {cache.bytes_per_token():.1f} bytes per token ({cache.bytes_per_token() / full:.2%} of bf16 "
          f"full distributions, {full} bytes) in {args.out}")
    return 0


def format_summary(summary: dict) -> str:
    if summary.get("stopped_by"):
        return (f"selfdistill: stopped by {summary['stopped_by']} after step {summary['steps']}; "
                f"checkpoint {summary['checkpoint']}; the same command resumes it")
    lines = [f"selfdistill: {summary['steps']} steps in {summary['seconds']:.0f} s"]
    for key, start in summary["start"].items():
        if key.endswith("/teacher_accuracy"):
            end = summary["end"].get(key)  # the student shown the context: the teacher it carries on
            lines.append(f"  {key.split('/')[1]:<12} teacher accuracy (privileged context): {start:.1%}"
                         + (f" at step 0 -> {end:.1%} (the student's own) at step {summary['steps']}"
                            if end is not None and summary["steps"] else ""))
        else:
            end = summary["end"].get(key, float("nan"))
            lines.append(f"  {key.split('/')[1]:<12} student accuracy: {start:.1%} at step 0 -> {end:.1%} at step {summary['steps']}")
    for split, report in summary.get("data", {}).items():
        if report["skipped"]:
            lines.append(f"  {split} data: {report['skipped']} invalid record(s) skipped, {report['kept']} kept "
                         f"(reasons in summary.json)")
    health = summary.get("health", {})
    if any(health.values()):
        lines.append(f"  health: {health['skipped_steps']} step(s) skipped (non-finite loss or gradient), "
                     f"{health['engine_restarts']} engine restart(s)")
    lines.append(f"  run directory: {summary['run_dir']} (model: {summary['checkpoint']})")
    return "\n".join(lines)


def _report(args: argparse.Namespace) -> int:
    from trainer.monitoring.report import FIGURES, write_report
    out = write_report(args.run_dirs, args.out)
    print(f"report: {out}/ ({', '.join(FIGURES)}, samples.html)")
    return 0


def _toy_prepare(args: argparse.Namespace) -> int:
    from toyworld.base import PretrainSettings
    from toyworld.prepare import prepare, summary
    settings = PretrainSettings(seed=args.seed)
    if args.steps is not None:
        settings = dataclasses.replace(settings, steps=args.steps)
    results = prepare(args.out, settings, force=args.force, promises=args.steps is None)  # a reduced build promises nothing
    print(summary(results))
    print(f"toy world ready in {args.out} (accuracies in {args.out}/prepare.json)")
    if args.with_teacher:
        from toyworld.teacher import build_strong_teacher
        teacher = build_strong_teacher(args.out, force=args.force)
        print(summary(teacher))
        print(f"stronger checkpoint ready in {args.out}/teacher/model (for teacher.model)")
    return 0


def _toy_realshape(args: argparse.Namespace) -> int:
    from toyworld.realshape import RealShapeSettings, build
    out = build(args.out, RealShapeSettings(size=args.size), force=args.force)
    print(f"real-shape {args.size} model ready in {out}/model, chat prompts in {out}/data/train.jsonl")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="selfdistill", description="On-policy self-distillation for language models.")
    commands = parser.add_subparsers(dest="command", required=True)

    config = commands.add_parser("config", help="validate a config and print it resolved")
    config.add_argument("config", nargs="?", help="YAML config file")
    config.add_argument("overrides", nargs="*", help="dotted overrides, e.g. loss.divergence=forward_kl")
    config.add_argument("--reference", action="store_true", help="print every option as a Markdown table")
    config.set_defaults(run=_config)

    train = commands.add_parser("train", help="run on-policy self-distillation")
    train.add_argument("config", help="YAML config file")
    train.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.steps=50")
    train.add_argument("--resume", default="auto", metavar="auto|never|PATH",
                       help="auto (default): continue the run directory's latest checkpoint if there is one; "
                            "never: refuse an existing run; PATH: a checkpoint or run directory to continue from")
    train.set_defaults(run=_train)

    adapt = commands.add_parser("adapt", help="train a checkpoint on new data, measuring what it keeps")
    adapt.add_argument("--from", dest="from_", required=True, metavar="CHECKPOINT",
                       help="a checkpoint (runs/NAME/checkpoints/step_N) or a run directory (its latest)")
    adapt.add_argument("--data", required=True, help="the new training prompts")
    adapt.add_argument("--eval", action="append", help="held-out prompts of the new data (repeatable)")
    adapt.add_argument("--eval-prior", action="append",
                       help="held-out prompts of earlier tasks (repeatable; default: the parent run's data.eval)")
    adapt.add_argument("--config", help="config to start from (default: the parent run's config.yaml)")
    adapt.add_argument("--resume", default="auto", metavar="auto|never|PATH", help="as for train")
    adapt.add_argument("--replay", action="append", metavar="PRIOR[:FRACTION]",
                       help="replay prompts of an earlier task with the checkpoint's own distributions, as this "
                            "share of each step (repeatable; default share 0.25; see README, Replay)")
    adapt.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.steps=100 name=stage2")
    adapt.set_defaults(run=_adapt)

    score = commands.add_parser("score", help="write a teacher cache: the teacher's top-k of completions, on disk")
    score.add_argument("config", help="YAML config: its teacher, data.train, loss.topk and rollout settings")
    score.add_argument("overrides", nargs="*", help="dotted overrides, e.g. loss.topk=50")
    score.add_argument("--out", required=True, help="cache directory (an interrupted scoring resumes there)")
    score.add_argument("--completions", default="demonstrations", metavar="SOURCE",
                       help="what is scored: demonstrations (loss.sft_target's column), column:NAME (a column's "
                            "text), samples (of model.path) or samples:MODEL_DIR (default: demonstrations)")
    score.add_argument("--shard-size", type=int, default=256, help="completions per shard (default 256)")
    score.set_defaults(run=_score)

    report = commands.add_parser("report", help="plots and sample rollouts of one run, or several overlaid")
    report.add_argument("run_dirs", nargs="+", help="run directories (runs/<name>)")
    report.add_argument("--out", default=None,
                        help="report directory (default: RUN_DIR/report for one run, report-compare/ for several)")
    report.set_defaults(run=_report)

    toy = commands.add_parser("toy", help="the embedded toy world").add_subparsers(dest="toy_command", required=True)
    prep = toy.add_parser("prepare", help="write seeded tasks and pretrain the tiny base model")
    prep.add_argument("--out", required=True, help="output directory")
    prep.add_argument("--steps", type=int, default=None, help="pretraining steps (default: the calibrated recipe's)")
    prep.add_argument("--seed", type=int, default=0, help="seed of the tasks and the pretraining")
    prep.add_argument("--force", action="store_true", help="rebuild even when DIR holds a build with the same settings")
    prep.add_argument("--with-teacher", action="store_true",
                      help="also train the stronger checkpoint DIR/teacher/model, which answers from the question "
                           "alone, for teacher.model (about 2.5 more minutes on 2 cores, cached likewise)")
    prep.set_defaults(run=_toy_prepare)
    shape = toy.add_parser("realshape", help="a real tokenizer, a random Llama and chat prompts whose completions "
                                             "vary in length, for benchmarks (random weights: no learning figures)")
    shape.add_argument("--out", required=True, help="output directory")
    shape.add_argument("--size", choices=["bench", "test"], default="bench", help="37M or 9.8M parameters")
    shape.add_argument("--force", action="store_true", help="rebuild even when DIR holds a build with the same settings")
    shape.set_defaults(run=_toy_realshape)
    return parser


def plain_logs_when_not_a_terminal():
    """In `ray job logs` or a file, the actors' lines that Ray forwards to the driver come without
    ANSI colour codes: no coloured prefixes, and no deduplication (whose "[repeated Nx]" note is
    always coloured). Ray reads these when it is imported, so this runs first."""
    if not sys.stderr.isatty():
        os.environ.setdefault("RAY_COLOR_PREFIX", "0")
        os.environ.setdefault("RAY_DEDUP_LOGS", "0")


def main(argv: list[str] | None = None, warm=None) -> int:
    """`warm`: a `trainer.cluster.warm.WarmActors` of a driver that runs several commands in one
    process: `train` and `adapt` take over its idle actors and leave theirs there."""
    plain_logs_when_not_a_terminal()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    args = build_parser().parse_args(argv)
    args.warm = warm
    try:
        return args.run(args)
    except SelfDistillError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
