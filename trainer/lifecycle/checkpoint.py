"""The run directory, atomic checkpoints, and what a resume restores.

    runs/<name>/config.yaml  metrics.jsonl  samples.jsonl  tb/  summary.json  resumes.jsonl
    runs/<name>/checkpoints/step_N/{hf/, engine/, state.json}   checkpoints/latest

`hf/` is a `save_pretrained` export (what `adapt`, vLLM and transformers load); `engine/` holds the
DeepSpeed model, optimizer and scheduler states, every rank's RNG and the EMA teacher; `state.json`
the driver's state (step, policy versions, sampler position, dataset fingerprint).

A checkpoint is written as `step_N.partial/` and renamed to `step_N/` only once every part is on
disk; `latest` is replaced after that. A run killed while saving thus leaves the previous checkpoint
complete and named by `latest`; the partial directory is cleared by the next save.
"""

import json
import logging
import os
import re
import shutil
import time
from pathlib import Path

import yaml

from core.errors import ConfigError
from trainer.data.records import DataReport
from trainer.data.sampler import PromptSampler
from trainer.monitoring.metrics import read_metrics

logger = logging.getLogger(__name__)

STEP_DIR = re.compile(r"step_(\d+)")


def _write_atomic(path: Path, text: str):
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def step_dirs(run_dir: Path) -> list[Path]:
    """Complete checkpoints (they have a state.json), oldest first."""
    root = run_dir / "checkpoints"
    found = [p for p in root.glob("step_*") if STEP_DIR.fullmatch(p.name) and (p / "state.json").is_file()]
    return sorted(found, key=lambda p: int(STEP_DIR.fullmatch(p.name).group(1)))


def save_checkpoint(learners, run_dir: Path, state: dict, keep: int = 0) -> Path:
    """Writes checkpoints/step_N atomically, points `latest` at it, and prunes to the newest `keep`."""
    root = run_dir / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step_{state['step']}"
    partial = root / f"{final.name}.partial"
    shutil.rmtree(partial, ignore_errors=True)  # left by a run killed while saving
    learners.save(str(partial))
    _write_atomic(partial / "state.json", json.dumps(state, indent=1))
    if final.exists():  # a step redone after resuming from an earlier checkpoint: the new one wins
        stale = root / f"{final.name}.stale"
        shutil.rmtree(stale, ignore_errors=True)
        os.replace(final, stale)
        os.replace(partial, final)
        shutil.rmtree(stale)
    else:
        os.replace(partial, final)
    _write_atomic(root / "latest", final.name)
    if keep:
        for old in step_dirs(run_dir)[:-keep]:
            if old != final:
                shutil.rmtree(old)
    return final


def find_checkpoint(run_dir: Path) -> Path | None:
    """The checkpoint `latest` names, or, if `latest` is missing or broken, the newest complete one."""
    latest = run_dir / "checkpoints" / "latest"
    if latest.is_file():
        named = run_dir / "checkpoints" / latest.read_text().strip()
        if (named / "state.json").is_file():
            return named
        logger.warning("%s names %s, which is not a complete checkpoint; using the newest complete one", latest, named)
    complete = step_dirs(run_dir)
    return complete[-1] if complete else None


def read_state(checkpoint: Path) -> dict:
    return json.loads((checkpoint / "state.json").read_text())


def resolve_resume(run_dir: Path, resume: str) -> Path | None:
    """The checkpoint to resume from: `auto` = this run directory's latest (none for a new run),
    `never` = none (and the run directory must not hold a run), else a checkpoint or run directory."""
    holds_run = (run_dir / "metrics.jsonl").exists() or bool(step_dirs(run_dir))
    if resume == "never":
        if holds_run:
            raise ConfigError(f"{run_dir} already holds a run; resume it with --resume auto, "
                              "or give another name=... or delete the directory")
        return None
    if resume == "auto":
        checkpoint = find_checkpoint(run_dir)
        if checkpoint is None and holds_run:
            # Killed before its first checkpoint: nothing to resume. Keep the old logs aside, start over.
            aside = run_dir / f"attempt-{time.strftime('%Y%m%d-%H%M%S')}"
            aside.mkdir()
            for name in ("metrics.jsonl", "samples.jsonl", "tb", "summary.json"):
                if (run_dir / name).exists():
                    os.replace(run_dir / name, aside / name)
            logger.warning("%s holds a run without a checkpoint; starting over (its logs are kept in %s)", run_dir, aside)
        return checkpoint
    path = Path(resume)
    checkpoint = path if (path / "state.json").is_file() else find_checkpoint(path)
    if checkpoint is None:
        raise ConfigError(f"--resume {resume}: not a checkpoint (step_N/ with state.json) nor a run directory with one")
    return checkpoint


RESUMABLE_CHANGES = ("train.steps", "data.train", "data.eval", "train.eval_every", "train.save_every",
                     "train.keep_checkpoints", "train.max_skipped_steps", "rollout.sync_timeout_s",
                     "rollout.max_restarts", "rollout.cpu_threads", "learner.cpu_threads", "log.", "ray.")
"""Config keys (or sections, ending in `.`) a resume may change: how long to train and on which data
(a changed dataset restarts the sampler, see `restore_sampler`), what is evaluated, logged and
saved, and where the actors run. Any other change would make the rest of the run another run."""


def _flatten(data: dict, prefix: str = "") -> dict:
    flat = {}
    for key, value in data.items():
        path = f"{prefix}{key}"
        flat |= _flatten(value, path + ".") if isinstance(value, dict) else {path: value}
    return flat


def refuse_changed_config(run_dir: Path, config: dict) -> None:
    """Before `run_dir`'s run resumes: a ConfigError naming every key whose value differs from the
    run's `config.yaml` and that a resume may not change (`RESUMABLE_CHANGES`), with the ways out. A
    key the stored config lacks (an option added since the run started) is not compared."""
    stored_path = run_dir / "config.yaml"
    if not stored_path.is_file():
        return
    stored, new = _flatten(yaml.safe_load(stored_path.read_text()) or {}), _flatten(config)
    changed = [key for key in sorted(stored) if stored[key] != new.get(key)
               and not any(key == allowed or (allowed.endswith(".") and key.startswith(allowed))
                           for allowed in RESUMABLE_CHANGES)]
    if changed:
        listed = "; ".join(f"{key}: {stored.get(key)!r} -> {new.get(key)!r}" for key in changed)
        raise ConfigError(f"{stored_path}: the run in {run_dir} was started with another config ({listed}); "
                          f"a resume may change only {', '.join(RESUMABLE_CHANGES)}. To train with these "
                          f"settings, give the run another name=..., start over with --resume never after "
                          f"deleting the directory, or continue from its checkpoint with `selfdistill adapt`")


def truncate_logs(run_dir: Path, step: int):
    """Drops the log lines of steps after `step`: a resumed run redoes them, and each step is logged once."""
    for name in ("metrics.jsonl", "samples.jsonl", "rollouts.jsonl"):
        path = run_dir / name
        if not path.exists():
            continue
        lines = path.read_text().splitlines(keepends=True)
        kept = [line for line in lines if line.strip() and json.loads(line).get("step", 0) <= step]
        if len(kept) != len(lines):
            _write_atomic(path, "".join(kept))


def record_resume(run_dir: Path, event: dict):
    with (run_dir / "resumes.jsonl").open("a") as f:
        f.write(json.dumps({"time": time.strftime("%Y-%m-%dT%H:%M:%S"), **event}) + "\n")


def restore_sampler(sampler: PromptSampler, state: dict, data_fingerprint: str, run_dir: Path, checkpoint: Path):
    """Continues the sampler where the checkpoint left it; on a changed dataset its position means
    nothing, so it starts a new pass on purpose, and says so, instead of silently skipping samples."""
    same = state["data_fingerprint"] == data_fingerprint
    if same:
        sampler.load_state_dict(state["sampler"])
    else:
        logger.warning("training data changed since %s (fingerprint %s -> %s): the sampler starts over on the new "
                       "data", checkpoint, state["data_fingerprint"], data_fingerprint)
    record_resume(run_dir, {"from": str(checkpoint), "step": state["step"], "sampler": "restored" if same else "reset",
                            "data_fingerprint": data_fingerprint, "checkpoint_data_fingerprint": state["data_fingerprint"]})
    logger.info("resumed from %s at step %d (policy version %d)", checkpoint, state["step"], state["policy_version"])


def summarize(run_dir: Path, checkpoint: Path | None, steps: int, started: float, stopped_by: str | None = None) -> dict:
    """Start and end evaluation, read back from `metrics.jsonl` so that a resumed run reports the whole run."""
    rows = read_metrics(run_dir) if (run_dir / "metrics.jsonl").exists() else []
    evals = [{k: v for k, v in row.items() if k.startswith("eval/")} for row in rows]
    evals = [e for e in evals if e]
    model = None
    if checkpoint:  # a LoRA run without a merged export has only its adapter
        model = checkpoint / "hf" if (checkpoint / "hf").is_dir() else checkpoint / "adapter"
    return {"run_dir": str(run_dir), "checkpoint": str(model) if model else None, "steps": steps,
            "stopped_by": stopped_by, "seconds": round(time.perf_counter() - started, 1),
            "start": evals[0] if evals else {}, "end": evals[-1] if evals else {}}


def log_rollout_ids(run_dir: Path, step: int, version: int, rollouts: list, restarts: list[dict]):
    """`rollouts.jsonl`: the example id of every rollout trained on in the step, in order, the policy
    version that sampled them, and the engines that died and were restarted meanwhile. One short line
    per step; it is what proves that no prompt was lost or trained on twice."""
    record = {"step": step, "version": version, "example_ids": [r.example_id for r in rollouts], "restarts": restarts}
    with (run_dir / "rollouts.jsonl").open("a") as f:
        f.write(json.dumps(record) + "\n")


def data_summary(report: DataReport) -> dict:
    return {"path": report.path, "kept": report.kept, "skipped": len(report.skipped), "first_skipped": report.skipped[:5]}
