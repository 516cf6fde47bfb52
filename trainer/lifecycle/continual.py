"""Continual adaptation: `adapt` from a checkpoint to new data, stage sequences, the lineage of
every model, and the forgetting table.

Every stage (and every `adapt`) is an ordinary run of `trainer.loop.train` that starts from the
previous model's `hf/` export, with a fresh optimizer and a teacher whose `initial` weights are the
loaded ones. It evaluates on the eval sets of every stage, so each row of the forgetting table is
one model measured on every task.
"""

import json
import logging
from pathlib import Path

from core.errors import ConfigError
from trainer.cache.replay import replay_sets
from trainer.cluster.warm import WarmActors
from trainer.config import Config, config_from_dict, config_to_dict, dump_config, load_config
from trainer.data.records import fingerprint, load_examples
from trainer.lifecycle.checkpoint import find_checkpoint, read_state
from trainer.loop import train

logger = logging.getLogger(__name__)


def eval_list(paths: str | list[str] | None) -> list[str]:
    return [] if not paths else [paths] if isinstance(paths, str) else list(paths)


# ----------------------------------------------------------------------------------------------
# Lineage
# ----------------------------------------------------------------------------------------------

def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint directory (`step_N/` with `hf/`), or a run directory (its latest checkpoint)."""
    path = Path(path)
    if (path / "hf" / "config.json").is_file():
        return path
    found = find_checkpoint(path) if path.is_dir() else None
    if found is None:
        raise ConfigError(f"--from {path}: not a checkpoint (a step_N/ directory with hf/) nor a run directory with one "
                          "(a LoRA run writes hf/ with model.lora.save_merged=true)")
    return found


def lineage(checkpoint: Path, cfg: Config) -> dict:
    """Where a model comes from: the checkpoint, the data it was trained on, and its own ancestors."""
    run_dir = checkpoint.parent.parent
    parent_lineage = run_dir / "lineage.json"
    state = read_state(checkpoint) if (checkpoint / "state.json").is_file() else {}
    train_set, _ = load_examples(cfg.data.train, cfg.data.columns, cfg.data.on_invalid)
    return {
        "from": {"checkpoint": str(checkpoint.resolve()), "run_dir": str(run_dir.resolve()), "step": state.get("step"),
                 "data": state.get("data"), "data_fingerprint": state.get("data_fingerprint")},
        "data": {"train": str(cfg.data.train), "fingerprint": fingerprint(train_set), "eval": eval_list(cfg.data.eval)},
        "ancestors": json.loads(parent_lineage.read_text()) if parent_lineage.is_file() else None,
        "replay": replay_record(cfg),
    }


def replay_record(cfg: Config) -> dict | None:
    """What a run replays (None: nothing), for its lineage and the forgetting table."""
    if cfg.replay.fraction <= 0:
        return None
    return {"data": replay_sets(cfg), "fraction": cfg.replay.fraction, "teacher_format": cfg.replay.teacher_format,
            "prompts_per_set": cfg.replay.prompts, "cache": str(Path(cfg.output_dir) / cfg.name / "replay")}


def replay_overrides(specs: list[str], default_fraction: float = 0.25) -> list[str]:
    """`adapt --replay PRIOR[:FRACTION]` (repeatable) as config overrides of the `replay` section."""
    if not specs:
        return []
    paths, fractions = [], set()
    for spec in specs:
        path, _, fraction = spec.rpartition(":")
        try:  # a path may hold ':' itself; only a number after the last one is a share
            fractions.add(float(fraction))
        except ValueError:
            path = spec
            fractions.add(default_fraction)
        paths.append(path)
    if len(fractions) > 1:
        raise ConfigError(f"--replay: one share for all prior sets, got {sorted(fractions)}")
    return [f"replay.data=[{', '.join(json.dumps(p) for p in paths)}]", f"replay.fraction={fractions.pop()}"]


def write_lineage(cfg: Config, checkpoint: Path) -> dict:
    record = lineage(checkpoint, cfg)
    if record["data"]["fingerprint"] == record["from"]["data_fingerprint"]:
        logger.warning("adapting on the same data %s was trained on", checkpoint)
    run_dir = Path(cfg.output_dir) / cfg.name
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "lineage.json").write_text(json.dumps(record, indent=1))
    return record


# ----------------------------------------------------------------------------------------------
# adapt
# ----------------------------------------------------------------------------------------------

def adapt_config(checkpoint: str | Path, data: str, eval_sets: list[str] | None = None,
                 eval_prior: list[str] | None = None, config: str | None = None,
                 overrides: list[str] = ()) -> tuple[Config, Path]:
    """The config of a new stage from a checkpoint: the parent run's config (or `config`) with the
    checkpoint's weights as model and teacher start, `data` to train on, and evaluation on the new
    eval sets plus the prior ones (by default the parent run's), so forgetting is measured."""
    checkpoint = resolve_checkpoint(checkpoint)
    base = Path(config) if config else checkpoint.parent.parent / "config.yaml"
    if not base.is_file():
        raise ConfigError(f"{base}: no config to adapt from; give --config")
    parent = load_config(base)
    prior = eval_prior if eval_prior is not None else eval_list(parent.data.eval)
    evals = list(dict.fromkeys([*(eval_sets or []), *prior]))
    derived = [f"name={parent.name}-{Path(data).stem}", f"model.path={checkpoint / 'hf'}", "model.tokenizer=null",
               f"data.train={data}", f"data.eval=[{', '.join(json.dumps(e) for e in evals)}]" if evals else "data.eval=null"]
    return load_config(base, [*derived, *overrides]), checkpoint


def adapt(checkpoint: str | Path, data: str, eval_sets: list[str] | None = None, eval_prior: list[str] | None = None,
          config: str | None = None, overrides: list[str] = (), resume: str = "auto",
          warm: WarmActors | None = None) -> dict:
    """`warm`: the driver's idle actors, as for `train`."""
    cfg, checkpoint = adapt_config(checkpoint, data, eval_sets, eval_prior, config, overrides)
    write_lineage(cfg, checkpoint)
    summary = train(cfg, resume, warm=warm)
    run_dir = Path(summary["run_dir"])
    table = forgetting_table([(f"from {checkpoint.parent.parent.name}/{checkpoint.name}", summary["start"]),
                              (cfg.name, summary["end"])], replay={cfg.name: replay_record(cfg)})
    write_forgetting(run_dir, table)
    return summary | {"forgetting": table}


# ----------------------------------------------------------------------------------------------
# stages
# ----------------------------------------------------------------------------------------------

def stage_config(cfg: Config, index: int, model_path: str, tokenizer: str | None) -> Config:
    stage = cfg.stages[index]
    data = config_to_dict(cfg)
    data.update(name=stage.name, output_dir=str(Path(cfg.output_dir) / cfg.name / "stages"), stages=[])
    data["model"].update(path=model_path, tokenizer=tokenizer)
    evals = eval_list(cfg.data.eval) + [s.eval for s in cfg.stages if s.eval]
    data["data"].update(train=stage.train, eval=list(dict.fromkeys(evals)) or None)
    data["train"]["steps"] = stage.steps
    if stage.replay:  # every earlier stage's prompts (and the replay section's) but this stage's own, at its share
        earlier = [s.train for s in cfg.stages[:index]] + replay_sets(cfg)
        data["replay"].update(data=[p for p in dict.fromkeys(earlier) if p != stage.train] or None,
                              fraction=stage.replay)
    return config_from_dict(data)


def run_stages(cfg: Config, resume: str = "auto", warm: WarmActors | None = None) -> dict:
    """Runs `cfg.stages` in order, each from the previous stage's final checkpoint, and writes the
    forgetting table after every stage. With `resume=auto` finished stages are read back, not rerun.
    A stage stopped by SIGTERM stops the sequence (`stopped_by` in the summary; the forgetting table
    has the stages that finished, None before the first). Each stage takes over the previous stage's
    engines and learners: from `warm`, the driver's idle actors, which are left there afterwards, or
    else from a pool of its own, closed at the end."""
    if resume not in ("auto", "never"):
        raise ConfigError(f"--resume {resume}: a stage sequence resumes with 'auto' (or starts with 'never')")
    run_dir = Path(cfg.output_dir) / cfg.name
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(dump_config(cfg))
    model_path, tokenizer, rows, summaries, replays = cfg.model.path, cfg.model.tokenizer, [], [], {}
    stopped_by = None
    own_pool = warm is None
    warm = WarmActors() if own_pool else warm
    try:
        for index, stage in enumerate(cfg.stages):
            stage_cfg = stage_config(cfg, index, model_path, tokenizer)
            if index:
                write_lineage(stage_cfg, Path(model_path).parent)
            logger.info("stage %d/%d: %s (%d steps on %s)", index + 1, len(cfg.stages), stage.name, stage.steps,
                        stage.train)
            summary = train(stage_cfg, resume, warm=warm)
            summaries.append(summary)
            if summary["stopped_by"]:
                # Preempted mid-stage: the next stage must start from this stage's final weights, not
                # from the checkpoint the stop left, so the sequence stops too; a rerun resumes here.
                stopped_by = summary["stopped_by"]
                logger.warning("stage %s stopped by %s after step %d of %d: the sequence stops here; rerun it to "
                               "resume", stage.name, stopped_by, summary["steps"], stage.steps)
                break
            if not rows:
                rows.append(("start", summary["start"]))
            rows.append((stage.name, summary["end"]))
            replays[stage.name] = replay_record(stage_cfg)
            write_forgetting(run_dir, forgetting_table(rows, replays))
            model_path, tokenizer = summary["checkpoint"], None
    finally:
        if own_pool:
            warm.close()
    table = forgetting_table(rows, replays) if rows else None
    summary = {"run_dir": str(run_dir), "checkpoint": model_path, "stages": summaries, "forgetting": table,
               "stopped_by": stopped_by}
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=1))
    return summary


# ----------------------------------------------------------------------------------------------
# The forgetting table (pure)
# ----------------------------------------------------------------------------------------------

def forgetting_table(rows: list[tuple[str, dict[str, float]]], replay: dict[str, dict | None] | None = None) -> dict:
    """Accuracy per (row, task) from `eval/<task>/accuracy` metrics, and per task its best row and
    the drop from that best to the last row; with the privileged context (`teacher_accuracy`) where
    it was measured; and what each row's run replayed (`replay`, by row name)."""
    accuracy = {name: {key.split("/")[1]: value for key, value in metrics.items()
                       if key.startswith("eval/") and key.endswith("/accuracy")}
                for name, metrics in rows}
    tasks = sorted({task for row in accuracy.values() for task in row})
    final = rows[-1][0]
    drop = {}
    for task in tasks:
        measured = [(name, row[task]) for name, row in accuracy.items() if task in row]
        best_at, best = max(measured, key=lambda item: item[1])
        last = accuracy[final].get(task)
        drop[task] = {"best": best, "best_at": best_at, "final": last,
                      "drop": None if last is None else best - last}
    teacher = {name: {key.split("/")[1]: value for key, value in metrics.items()
                      if key.startswith("eval/") and key.endswith("/teacher_accuracy")} for name, metrics in rows}
    return {"rows": [name for name, _ in rows], "tasks": tasks, "accuracy": accuracy, "drop": drop,
            "teacher_accuracy": teacher, "replay": {name: r for name, r in (replay or {}).items() if r}}


def forgetting_markdown(table: dict) -> str:
    tasks = table["tasks"]
    lines = ["| model | " + " | ".join(tasks) + " |", "|---|" + "---|" * len(tasks)]
    for name in table["rows"]:
        cells = [f"{table['accuracy'][name][t]:.1%}" if t in table["accuracy"][name] else "–" for t in tasks]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    drops = ["–" if d["drop"] is None else f"{100 * d['drop']:.1f} pts" for d in (table["drop"][t] for t in tasks)]
    lines.append("| **drop from best** | " + " | ".join(drops) + " |")
    teacher = table.get("teacher_accuracy", {})
    if any(teacher.values()):
        lines += ["", "Shown the privileged context (the teacher each model carries into its next adaptation):", "",
                  "| model | " + " | ".join(tasks) + " |", "|---|" + "---|" * len(tasks)]
        for name in table["rows"]:
            cells = [f"{teacher[name][t]:.1%}" if t in teacher.get(name, {}) else "–" for t in tasks]
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
    for name, replay in table.get("replay", {}).items():
        sets = ", ".join(replay["data"]) or "no prior set"
        lines.append(f"\n{name} replayed {replay['fraction']:.0%} of each step: {sets}"
                     + (", and the teacher's format" if replay["teacher_format"] else ""))
    return "\n".join(lines) + "\n"


def write_forgetting(run_dir: Path, table: dict):
    (run_dir / "forgetting.json").write_text(json.dumps(table, indent=1))
    (run_dir / "forgetting.md").write_text(
        "# Forgetting\n\nHeld-out accuracy of each model (rows, in training order) on every task (columns); "
        "the last row gives each task's drop from its best row to the final model.\n\n" + forgetting_markdown(table))
