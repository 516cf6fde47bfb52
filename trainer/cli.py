"""The `selfdistill` command line.

  selfdistill train CONFIG [a.b=value ...]     run on-policy self-distillation
  selfdistill config CONFIG [a.b=value ...]    validate a config and print it resolved
  selfdistill config --reference               every option, its type, default and meaning
  selfdistill toy prepare --out DIR            build the toy world (data, tokenizer, base model)
"""

import argparse
import dataclasses
import logging
import sys

from trainer.errors import SelfDistillError

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
    from trainer.loop import train
    summary = train(load_config(args.config, args.overrides))
    print(format_summary(summary))
    return 0


def format_summary(summary: dict) -> str:
    lines = [f"selfdistill: {summary['steps']} steps in {summary['seconds']:.0f} s"]
    for key, start in summary["start"].items():
        if key.endswith("/teacher_accuracy"):
            lines.append(f"  {key.split('/')[1]:<12} teacher accuracy (privileged context): {start:.1%}")
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


def _toy_prepare(args: argparse.Namespace) -> int:
    from toyworld.base import PretrainSettings
    from toyworld.prepare import prepare, summary
    settings = PretrainSettings(seed=args.seed)
    if args.steps is not None:
        settings = dataclasses.replace(settings, steps=args.steps)
    results = prepare(args.out, settings, force=args.force)
    print(summary(results))
    print(f"toy world ready in {args.out} (accuracies in {args.out}/prepare.json)")
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
    train.set_defaults(run=_train)

    toy = commands.add_parser("toy", help="the embedded toy world").add_subparsers(dest="toy_command", required=True)
    prep = toy.add_parser("prepare", help="write seeded tasks and pretrain the tiny base model")
    prep.add_argument("--out", required=True, help="output directory")
    prep.add_argument("--steps", type=int, default=None, help="pretraining steps (default: the calibrated recipe's)")
    prep.add_argument("--seed", type=int, default=0, help="seed of the tasks and the pretraining")
    prep.add_argument("--force", action="store_true", help="rebuild even when DIR holds a build with the same settings")
    prep.set_defaults(run=_toy_prepare)
    return parser


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except SelfDistillError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
