"""The step loop: the whole on-policy self-distillation algorithm, top to bottom.

    sample (student engines) → reward → score (teacher) → train (learners) → sync weights → log

The driver holds no model: engines and learners are Ray actors (`trainer.cluster`). Every rollout
is stamped with the policy version that produced it, and the pool refuses stale ones. A run resumes
from its latest checkpoint exactly (`trainer.checkpoint`), and SIGTERM stops it after the current
step with a checkpoint (`trainer.preemption`).
"""

import json
import logging
import time
from pathlib import Path

from transformers import AutoConfig, AutoTokenizer

import rewards
from rewards.answer import answer_match
from rollout.weights import ObjectStoreTransport
from trainer.checkpoint import (data_summary, log_rollout_ids, read_state, resolve_resume, restore_sampler,
                                save_checkpoint, summarize, truncate_logs)
from trainer.cluster import LearnerGroup, build_engines, needs_teacher_engine, placement_report, start_ray
from trainer.config import Config, dump_config
from trainer.data import PromptSampler, fingerprint, load_eval_sets, load_examples
from trainer.health import SkippedSteps
from trainer.metrics import MetricsLogger, timed
from trainer.objectives import collect_rollouts, prepare_batch, uses_teacher
from trainer.preemption import StopRequests
from trainer.rollout_feed import MAX_POLICY_LAG, RolloutFeed
from trainer.steps import (drop_overlong, encode_prompts, engine_adapters, evaluate, sample_records,
                           score_on_engines, sync_weights)

logger = logging.getLogger(__name__)


def train(cfg: Config, resume: str = "auto") -> dict:
    """Runs the config to its last step (or until SIGTERM); returns the summary, also written to the
    run directory. `resume`: `auto` (the run directory's latest checkpoint, if any), `never`, or a path."""
    started = time.perf_counter()
    run_dir = Path(cfg.output_dir) / cfg.name
    checkpoint = resolve_resume(run_dir, resume)
    state = read_state(checkpoint) if checkpoint else None
    if state and state["step"] >= cfg.train.steps:
        logger.info("%s is complete at step %d; nothing to do", run_dir, state["step"])
        return summarize(run_dir, checkpoint, state["step"], started)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(dump_config(cfg))
    tokenizer = AutoTokenizer.from_pretrained(cfg.model.tokenizer or cfg.model.path)
    train_set, train_report = load_examples(cfg.data.train, cfg.data.columns, cfg.data.on_invalid)
    eval_set, eval_report = load_eval_sets(cfg.data.eval, cfg.data.columns, cfg.data.on_invalid)
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
    # SSD samples the frozen starting model on `rollout.engines` engines; one student engine evaluates
    ssd = cfg.loss.mode == "ssd"
    students = build_engines(cfg, 1 if ssd else cfg.rollout.engines, "student")
    frozen = build_engines(cfg, cfg.rollout.engines, "frozen") if ssd else None
    teacher_engines = build_engines(cfg, 1, "teacher") if needs_teacher_engine(cfg) else None
    learners = LearnerGroup(cfg)
    (run_dir / "placement.json").write_text(json.dumps(placement_report(cfg, students, teacher_engines, learners), indent=1))
    transport = ObjectStoreTransport(cfg.rollout.sync_timeout_s)
    skipped_steps, engine_restarts = SkippedSteps(cfg.train.max_skipped_steps), 0
    scoring_pool = teacher_engines or students
    student_adapter, teacher_adapter = engine_adapters(cfg)
    version, teacher_version, done = 0, 0, 0
    feed = RolloutFeed(sampler, cfg.train.prompts_per_step,
                       lambda examples, at_version, step: collect_rollouts(cfg, students, frozen, examples, encoded_train,
                                                                           tokenizer, at_version, step, adapter=student_adapter),
                       ahead=cfg.train.async_, max_lag=None if ssd else MAX_POLICY_LAG)
    try:
        if checkpoint:
            done, version, teacher_version = state["step"], state["policy_version"], state["teacher_version"]
            learners.load(str(checkpoint))
            restore_sampler(sampler, state, data_fingerprint, run_dir, checkpoint)
            truncate_logs(run_dir, done)
            # before the first rollout
            sync_weights(cfg, learners, transport, students, teacher_engines, version, teacher_version)
        sink = MetricsLogger(run_dir, cfg, resumed_at=done if checkpoint else None)
        if not checkpoint:
            first = evaluate(students, eval_set, encoded_eval, tokenizer, cfg, answer_match, version,
                             adapter=student_adapter)
            first |= evaluate(scoring_pool, eval_set, encoded_eval, tokenizer, cfg, answer_match, version, teacher=True,
                              adapter=teacher_adapter)
            sink.log(0, first)
            logger.info("step 0: %s", _brief(first))

        def checkpoint_now(step: int) -> Path:
            driver_state = {"step": step, "policy_version": version, "teacher_version": teacher_version,
                            "sampler": feed.sampler_state(), "data_fingerprint": data_fingerprint,
                            "data": str(cfg.data.train)}
            return save_checkpoint(learners, run_dir, driver_state, cfg.train.keep_checkpoints)

        saved = checkpoint
        with StopRequests() as stop:
            for step in range(done + 1, cfg.train.steps + 1):
                metrics: dict[str, float] = {}
                with timed(metrics, "step"):
                    with timed(metrics, "generate"):  # async: only the wait for the prefetched step
                        examples, rollouts, lag = feed.take(train_set, step, version)
                    if step < cfg.train.steps:
                        feed.prefetch(train_set, step + 1, version)  # async only: overlaps scoring and training
                    metrics |= lag
                    batch = prepare_batch(cfg, reward_fns, examples, rollouts, encoded_train, tokenizer)
                    rollouts, teacher_prompts = batch.rollouts, batch.teacher_prompts
                    metrics |= batch.metrics
                    with timed(metrics, "score"):
                        scores = None
                        if uses_teacher(cfg) and cfg.teacher.scorer == "engine":
                            scores = score_on_engines(scoring_pool, rollouts, teacher_prompts, cfg.loss.topk,
                                                      adapter=teacher_adapter)
                    with timed(metrics, "train"):
                        total_tokens = sum(max(0, len(r.completion_ids) - cfg.loss.mask_first_tokens) for r in rollouts)
                        metrics |= learners.train_step(rollouts, teacher_prompts, scores, total_tokens)
                    metrics |= skipped_steps.update(step, bool(metrics.pop("learner/skipped")))
                    with timed(metrics, "generate_wait"):
                        feed.wait()  # async: the engines finish step+1 on the old weights first
                    with timed(metrics, "sync"):
                        version += 1
                        teacher_version += cfg.teacher.weights == "ema"
                        sync_weights(cfg, learners, transport, students, teacher_engines, version, teacher_version)
                    restarts = [r for pool in (students, frozen, teacher_engines) if pool for r in pool.drain_restarts()]
                    engine_restarts += len(restarts)
                    metrics["health/engine_restarts"] = float(engine_restarts)
                    log_rollout_ids(run_dir, step, version - 1, rollouts, restarts)
                done = step
                metrics["throughput/tokens_per_s"] = metrics.pop("tokens") / metrics["time/step"]
                if step == cfg.train.steps or (cfg.train.eval_every and step % cfg.train.eval_every == 0):
                    metrics |= evaluate(students, eval_set, encoded_eval, tokenizer, cfg, answer_match, version,
                                        adapter=student_adapter)
                    logger.info("step %d/%d: %s", step, cfg.train.steps, _brief(metrics))
                sink.log(step, metrics)
                if cfg.log.samples_every and step % cfg.log.samples_every == 0:
                    with (run_dir / "samples.jsonl").open("a") as f:
                        f.writelines(json.dumps(r) + "\n" for r in sample_records(step, examples, rollouts, scores, tokenizer,
                                                                                  batch.rewards))
                if stop.requested:
                    logger.warning("%s received: stopping after step %d with a checkpoint", stop.signal_name, step)
                    break
                if cfg.train.save_every and step % cfg.train.save_every == 0 and step != cfg.train.steps:
                    saved = checkpoint_now(step)
            if saved is None or read_state(saved)["step"] != done:
                saved = checkpoint_now(done)
        sink.close()
    finally:
        feed.close()
        for group in (students, frozen, teacher_engines, learners):
            if group is not None:
                group.close()
    summary = summarize(run_dir, saved, done, started, stopped_by=stop.signal_name)
    summary["health"] = {"skipped_steps": skipped_steps.total, "engine_restarts": engine_restarts}
    summary["data"] = {"train": data_summary(train_report)} | ({"eval": data_summary(eval_report)} if eval_set else {})
    for report in (train_report, eval_report):
        if report is not None and report.skipped:
            logger.warning("%s: %d invalid record(s) skipped (data.on_invalid=skip), %d kept; first: %s",
                           report.path, len(report.skipped), report.kept, report.skipped[0])
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=1))
    return summary


def _brief(metrics: dict[str, float]) -> str:
    keys = [k for k in metrics if k.startswith("eval/")] + ["reward/mean", "distill/loss", "distill/kl"]
    return " ".join(f"{k}={metrics[k]:.4g}" for k in keys if k in metrics)
