"""The step loop: the whole on-policy self-distillation algorithm, top to bottom.

    sample (student engines) → reward → score (teacher) → train (learners) → sync weights → log

The driver holds no model: engines and learners are Ray actors (`trainer.cluster`). Every rollout
is stamped with the policy version that produced it, and the pool refuses stale ones.
"""

import json
import logging
import os
import time
from pathlib import Path

from transformers import AutoConfig, AutoTokenizer

import rewards
from rewards.answer import answer_match
from rollout.weights import ObjectStoreTransport
from trainer.cluster import LearnerGroup, build_engines, start_ray
from trainer.config import Config, dump_config
from trainer.data import DataReport, PromptSampler, fingerprint, load_examples
from trainer.errors import ConfigError
from trainer.health import SkippedSteps
from trainer.metrics import MetricsLogger, timed
from trainer.steps import (drop_overlong, encode_prompts, evaluate, reward_metrics, sample_records,
                           sample_rollouts, score_on_engines, teacher_prompt_ids)

logger = logging.getLogger(__name__)


def needs_teacher_engine(cfg: Config) -> bool:
    """A separate engine holds the teacher's weights when the engine scores with non-live weights."""
    return cfg.teacher.scorer == "engine" and cfg.teacher.weights in ("initial", "ema")


def save_checkpoint(learners: LearnerGroup, run_dir: Path, step: int, version: int, sampler: PromptSampler,
                    data_fingerprint: str) -> Path:
    """checkpoints/step_N/{hf/, state.json}; `latest` names the newest and is replaced atomically."""
    directory = run_dir / "checkpoints" / f"step_{step}"
    learners.save_pretrained(str(directory / "hf"))
    state = {"step": step, "policy_version": version, "sampler": sampler.state_dict(), "data_fingerprint": data_fingerprint}
    (directory / "state.json").write_text(json.dumps(state, indent=1))
    tmp = run_dir / "checkpoints" / "latest.tmp"
    tmp.write_text(directory.name)
    os.replace(tmp, run_dir / "checkpoints" / "latest")
    return directory


def train(cfg: Config) -> dict:
    """Runs the config to the end; returns the summary (also written to the run directory)."""
    started = time.perf_counter()
    run_dir = Path(cfg.output_dir) / cfg.name
    if (run_dir / "metrics.jsonl").exists():
        raise ConfigError(f"{run_dir} already holds a run; give another name=... or delete the directory")
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(dump_config(cfg))
    tokenizer = AutoTokenizer.from_pretrained(cfg.model.tokenizer or cfg.model.path)
    train_set, train_report = load_examples(cfg.data.train, cfg.data.columns, cfg.data.on_invalid)
    eval_set, eval_report = load_examples(cfg.data.eval, cfg.data.columns, cfg.data.on_invalid) if cfg.data.eval \
        else ([], None)
    encoded_train = encode_prompts(train_set, tokenizer, cfg.teacher.template)
    encoded_eval = encode_prompts(eval_set, tokenizer, cfg.teacher.template)
    max_model_len = cfg.model.max_model_len or AutoConfig.from_pretrained(cfg.model.path).max_position_embeddings
    train_set = drop_overlong(train_set, encoded_train, max_model_len, cfg.rollout.max_tokens, cfg.data.on_invalid,
                              train_report)
    if eval_set:
        eval_set = drop_overlong(eval_set, encoded_eval, max_model_len, cfg.rollout.max_tokens, cfg.data.on_invalid,
                                 eval_report)
    sampler = PromptSampler(len(train_set), cfg.train.seed)
    data_fingerprint = fingerprint(train_set)
    reward_fns = rewards.resolve(cfg.rewards)

    start_ray(cfg)
    students = build_engines(cfg, cfg.rollout.engines, "student")
    teacher_engines = build_engines(cfg, 1, "teacher") if needs_teacher_engine(cfg) else None
    learners = LearnerGroup(cfg)
    transport = ObjectStoreTransport(cfg.rollout.sync_timeout_s)
    sink = MetricsLogger(run_dir, cfg.log)
    version, teacher_version = 0, 0
    skipped_steps, engine_restarts = SkippedSteps(cfg.train.max_skipped_steps), 0
    scoring_pool = teacher_engines or students

    first = evaluate(students, eval_set, encoded_eval, tokenizer, cfg, answer_match, version)
    first |= evaluate(scoring_pool, eval_set, encoded_eval, tokenizer, cfg, answer_match, version, teacher=True)
    sink.log(0, first)
    logger.info("step 0: %s", _brief(first))
    last = first
    for step in range(1, cfg.train.steps + 1):
        metrics: dict[str, float] = {}
        with timed(metrics, "step"):
            examples = [train_set[i] for i in sampler.next_indices(cfg.train.prompts_per_step)]
            with timed(metrics, "generate"):
                rollouts = sample_rollouts(students, examples, encoded_train, cfg, version)
            metrics |= reward_metrics(reward_fns, examples, rollouts, tokenizer)
            with timed(metrics, "score"):
                teacher_prompts = teacher_prompt_ids(rollouts, encoded_train)
                scores = None
                if cfg.teacher.scorer == "engine":
                    scores = score_on_engines(scoring_pool, rollouts, teacher_prompts, cfg.loss.topk)
            with timed(metrics, "train"):
                total_tokens = sum(max(0, len(r.completion_ids) - cfg.loss.mask_first_tokens) for r in rollouts)
                metrics |= learners.train_step(rollouts, teacher_prompts, scores, total_tokens)
            metrics |= skipped_steps.update(step, bool(metrics.pop("learner/skipped")))
            with timed(metrics, "sync"):
                version += 1
                students.sync(transport, learners.export("student"), version)
                if teacher_engines is not None and cfg.teacher.weights == "ema":
                    teacher_version += 1
                    teacher_engines.sync(transport, learners.export("teacher"), teacher_version)
            restarts = students.drain_restarts() + (teacher_engines.drain_restarts() if teacher_engines else [])
            engine_restarts += len(restarts)
            metrics["health/engine_restarts"] = float(engine_restarts)
            log_rollout_ids(run_dir, step, version - 1, rollouts, restarts)
        metrics["throughput/tokens_per_s"] = metrics.pop("tokens") / metrics["time/step"]
        if step == cfg.train.steps or (cfg.train.eval_every and step % cfg.train.eval_every == 0):
            metrics |= evaluate(students, eval_set, encoded_eval, tokenizer, cfg, answer_match, version)
            last = metrics
            logger.info("step %d/%d: %s", step, cfg.train.steps, _brief(metrics))
        if cfg.train.save_every and step % cfg.train.save_every == 0 and step != cfg.train.steps:
            save_checkpoint(learners, run_dir, step, version, sampler, data_fingerprint)
        sink.log(step, metrics)
        if cfg.log.samples_every and step % cfg.log.samples_every == 0:
            with (run_dir / "samples.jsonl").open("a") as f:
                f.writelines(json.dumps(r) + "\n" for r in sample_records(step, examples, rollouts, scores, tokenizer))

    final = save_checkpoint(learners, run_dir, cfg.train.steps, version, sampler, data_fingerprint)
    sink.close()
    summary = {"run_dir": str(run_dir), "checkpoint": str(final / "hf"), "steps": cfg.train.steps,
               "seconds": round(time.perf_counter() - started, 1),
               "start": {k: v for k, v in first.items() if k.startswith("eval/")},
               "end": {k: v for k, v in last.items() if k.startswith("eval/")}}
    summary["health"] = {"skipped_steps": skipped_steps.total, "engine_restarts": engine_restarts}
    summary["data"] = {"train": data_summary(train_report)} | ({"eval": data_summary(eval_report)} if eval_report else {})
    for report in (train_report, eval_report):
        if report is not None and report.skipped:
            logger.warning("%s: %d invalid record(s) skipped (data.on_invalid=skip), %d kept; first: %s",
                           report.path, len(report.skipped), report.kept, report.skipped[0])
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=1))
    return summary


def log_rollout_ids(run_dir: Path, step: int, version: int, rollouts: list, restarts: list[dict]):
    """`rollouts.jsonl`: the example id of every rollout trained on in the step, in order, the policy
    version that sampled them, and the engines that died and were restarted meanwhile. One short line
    per step; it is what proves that no prompt was lost or trained on twice."""
    record = {"step": step, "version": version, "example_ids": [r.example_id for r in rollouts], "restarts": restarts}
    with (run_dir / "rollouts.jsonl").open("a") as f:
        f.write(json.dumps(record) + "\n")


def data_summary(report: DataReport) -> dict:
    return {"path": report.path, "kept": report.kept, "skipped": len(report.skipped), "first_skipped": report.skipped[:5]}


def _brief(metrics: dict[str, float]) -> str:
    keys = [k for k in metrics if k.startswith("eval/")] + ["reward/mean", "distill/loss", "distill/kl"]
    return " ".join(f"{k}={metrics[k]:.4g}" for k in keys if k in metrics)
