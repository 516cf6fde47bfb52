"""The step loop: the whole on-policy self-distillation algorithm, top to bottom.

    sample (student engines) → reward → score (teacher) → train (learners) → sync weights → log

The driver holds no model: engines and learners are Ray actors (`trainer.cluster`), started with
the run's inputs by `trainer.lifecycle.startup`. Every rollout is stamped with the policy version
that produced it, and the pool refuses stale ones. A run resumes from its latest checkpoint exactly
(`trainer.lifecycle.checkpoint`), and SIGTERM stops it after the current step with a checkpoint
(`trainer.lifecycle.preemption`). The step functions are in `trainer.step`, the learner's loss in
`trainer.learner`.
"""

import json
import logging
import time
from pathlib import Path

from rewards.answer import answer_match
from rollout.batch import TeacherScores
from trainer.cache.feed import open_cache_feed
from trainer.cluster.warm import WarmActors
from trainer.config import Config, dump_config
from trainer.config.implied import on_policy_prompts, task_teacher, uses_teacher
from trainer.data.sampler import PromptSampler
from trainer.lifecycle.checkpoint import log_rollout_ids, read_state, save_checkpoint, summarize
from trainer.lifecycle.preemption import StopRequests
from trainer.lifecycle.startup import (Actors, Inputs, load_inputs, restore_run, resume_point, start_actors,
                                       write_summary)
from trainer.monitoring.health import SkippedSteps
from trainer.monitoring.metrics import MetricsLogger, timed
from trainer.monitoring.samples import sample_records
from trainer.step.batch import StepBatch, prepare_batch
from trainer.step.evaluation import evaluate
from trainer.step.feed import MAX_POLICY_LAG, RolloutFeed
from trainer.step.rollouts import collect_rollouts, score_by_teacher
from trainer.step.sync import engine_adapters, sync_weights

logger = logging.getLogger(__name__)


def train(cfg: Config, resume: str = "auto", warm: WarmActors | None = None) -> dict:
    """Runs the config to its last step (or until SIGTERM); returns the summary, also written to the
    run directory. `resume`: `auto` (the run directory's latest checkpoint, if any), `never`, or a path.
    `warm`: the driver's idle actors, taken over where they fit and left there after the run."""
    started = time.perf_counter()
    run_dir = Path(cfg.output_dir) / cfg.name
    inputs = load_inputs(cfg)  # every input is validated first, whatever the run directory holds
    checkpoint, state = resume_point(cfg, run_dir, resume)
    if state and state["step"] >= cfg.train.steps:
        logger.info("%s is complete at step %d; nothing to do", run_dir, state["step"])
        return summarize(run_dir, checkpoint, state["step"], started)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(dump_config(cfg))
    sampler = PromptSampler(len(inputs.train_set), cfg.train.seed)
    actors = start_actors(cfg, run_dir, warm)
    student_adapter, teacher_adapter = engine_adapters(cfg)
    feed = RolloutFeed(sampler, on_policy_prompts(cfg),
                       lambda examples, at_version, step: collect_rollouts(
                           cfg, actors.students, actors.frozen, examples, inputs.encoded_train, inputs.tokenizer,
                           at_version, step, adapter=student_adapter),
                       ahead=cfg.train.async_, max_lag=None if cfg.loss.mode == "ssd" else MAX_POLICY_LAG)
    skipped_steps, engine_restarts = SkippedSteps(cfg.train.max_skipped_steps), 0
    done, version, teacher_version = 0, 0, 0
    try:  # a share of each step from a teacher cache or the replay cache (scored now, at the parent's weights)
        cached = open_cache_feed(cfg, run_dir, inputs.tokenizer, actors.students, student_adapter, bool(checkpoint))
        if checkpoint:
            done, version, teacher_version = restore_run(cfg, checkpoint, state, actors, sampler,
                                                         inputs.data_fingerprint, run_dir)
            if cached:
                cached.load_state_dict(state["cache_sampler"])
        sink = MetricsLogger(run_dir, cfg, resumed_at=done if checkpoint else None)
        if not checkpoint:
            sink.log(0, _evaluate_start(cfg, actors, inputs, version, student_adapter, teacher_adapter))

        def checkpoint_now(step: int) -> Path:
            driver_state = {"step": step, "policy_version": version, "teacher_version": teacher_version,
                            "sampler": feed.sampler_state(), "data_fingerprint": inputs.data_fingerprint,
                            "data": str(cfg.data.train), "cache_sampler": cached.state_dict() if cached else None}
            return save_checkpoint(actors.learners, run_dir, driver_state, cfg.train.keep_checkpoints)

        saved = checkpoint
        with StopRequests() as stop:
            for step in range(done + 1, cfg.train.steps + 1):
                metrics: dict[str, float] = {}
                with timed(metrics, "step"):
                    with timed(metrics, "generate"):  # async: only the wait for the prefetched step
                        examples, rollouts, lag = feed.take(inputs.train_set, step, version)
                    if step < cfg.train.steps:
                        feed.prefetch(inputs.train_set, step + 1, version)  # async only: overlaps scoring and training
                    metrics |= lag
                    batch = prepare_batch(cfg, inputs.reward_fns, examples, rollouts, inputs.encoded_train,
                                          inputs.tokenizer)
                    metrics |= batch.metrics
                    with timed(metrics, "score"):
                        scores = _engine_scores(cfg, actors, batch, teacher_adapter)
                    trained, trained_scores = cached.mixed(batch, scores, version) if cached else (batch, scores)
                    with timed(metrics, "train"):
                        metrics |= actors.learners.train_step(trained.rollouts, trained.teacher_prompts, trained_scores,
                                                              _loss_tokens(cfg, trained.rollouts))
                    metrics |= skipped_steps.update(step, bool(metrics.pop("learner/skipped")))
                    with timed(metrics, "generate_wait"):
                        feed.wait()  # async: the engines finish step+1 on the old weights first
                    with timed(metrics, "sync"):
                        version += 1
                        teacher_version += cfg.teacher.weights == "ema"
                        sync_weights(cfg, actors.learners, actors.transport, actors.students, actors.teachers,
                                     version, teacher_version)
                    restarts = actors.drain_restarts()
                    engine_restarts += len(restarts)
                    metrics["health/engine_restarts"] = float(engine_restarts)
                    log_rollout_ids(run_dir, step, version - 1, trained.rollouts, restarts)
                done = step
                metrics["throughput/tokens_per_s"] = metrics.pop("tokens") / metrics["time/step"]
                if step == cfg.train.steps or (cfg.train.eval_every and step % cfg.train.eval_every == 0):
                    metrics |= _evaluate(cfg, actors, inputs, version, student_adapter)
                    logger.info("step %d/%d: %s", step, cfg.train.steps, _brief(metrics))
                sink.log(step, metrics)
                if cfg.log.samples_every and step % cfg.log.samples_every == 0:
                    _append_samples(run_dir, sample_records(step, examples, batch.rollouts, scores, inputs.tokenizer,
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
        actors.close()
    health = {"skipped_steps": skipped_steps.total, "engine_restarts": engine_restarts}
    return write_summary(run_dir, saved, done, started, stop.signal_name, inputs, health)


def _evaluate(cfg: Config, actors: Actors, inputs: Inputs, version: int, adapter: str | None) -> dict[str, float]:
    """The student's held-out accuracy, and its accuracy shown the privileged context (for the tasks
    whose teacher is the student's own weights): the teacher it carries into its next adaptation,
    which a user sees decay while it happens."""
    own = [e for e in inputs.eval_set if task_teacher(cfg, e.task).model is None]
    return evaluate(actors.students, inputs.eval_set, inputs.encoded_eval, inputs.tokenizer, cfg, answer_match, version,
                    adapter=adapter, shown_context=own)


def _evaluate_start(cfg: Config, actors: Actors, inputs: Inputs, version: int, student_adapter: str | None,
                    teacher_adapter: str | None) -> dict[str, float]:
    """Step 0: the student's held-out accuracy, and the teacher's with the privileged context."""
    first = evaluate(actors.students, inputs.eval_set, inputs.encoded_eval, inputs.tokenizer, cfg, answer_match,
                     version, adapter=student_adapter)
    by_teacher: dict[str | None, list] = {}  # each task's teacher, on its engines (a learner-only checkpoint has none)
    for example in inputs.eval_set:
        model = task_teacher(cfg, example.task).model
        if model is None or model in actors.external:
            by_teacher.setdefault(model, []).append(example)
    for model, examples in by_teacher.items():
        first |= evaluate(actors.scoring(model), [], inputs.encoded_eval, inputs.tokenizer, cfg, answer_match,
                          version, adapter=teacher_adapter if model is None else None, shown_context=examples)
    logger.info("step 0: %s", _brief(first))
    return first


def _engine_scores(cfg: Config, actors: Actors, batch: StepBatch, adapter: str | None) -> list[TeacherScores | None] | None:
    """Each rollout's scores by its task's teacher, on that teacher's engines; None for a rollout a
    learner scores, and None for all when no engine scores (or there is no teacher)."""
    if not uses_teacher(cfg):
        return None
    return score_by_teacher(cfg, batch.rollouts, batch.teacher_prompts, actors.scoring, adapter)


def _loss_tokens(cfg: Config, rollouts) -> int:
    """The batch's loss tokens over all ranks: the learners' gradient is the per-token mean over them."""
    return sum(max(0, len(r.completion_ids) - cfg.loss.mask_first_tokens) for r in rollouts)


def _append_samples(run_dir: Path, records: list[dict]) -> None:
    with (run_dir / "samples.jsonl").open("a") as f:
        f.writelines(json.dumps(r) + "\n" for r in records)


def _brief(metrics: dict[str, float]) -> str:
    keys = [k for k in metrics if k.startswith("eval/")] + ["reward/mean", "distill/loss", "distill/kl"]
    return " ".join(f"{k}={metrics[k]:.4g}" for k in keys if k in metrics)
