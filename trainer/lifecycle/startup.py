"""Everything a run needs before its first step, and after its last: the validated inputs (data,
prompts, tokenizer, rewards), the actors (engines, learners, the weight transport), the state a
resume restores, and the summary. `trainer.loop.train` calls these so that the step loop stays in
view.
"""

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

from transformers import AutoConfig, AutoTokenizer

import rewards
from core.errors import ConfigError
from rollout.pool import EnginePool
from rollout.weights import ObjectStoreTransport
from trainer.cache.identity import RUN_KEYS, teacher_identity
from trainer.cache.store import check_identity, read_manifest
from trainer.cluster.colocated import ColocatedPool
from trainer.cluster.engines import build_engines
from trainer.cluster.learners import LearnerGroup
from trainer.cluster.placement import has_gpus, placement_report, start_ray
from trainer.cluster.warm import WarmActors, engine_key, holds_own_weights, learner_key
from trainer.config import Config, config_to_dict
from trainer.config.implied import (colocated, external_models, external_role, needs_teacher_engine, quantized_student,
                                    scores_live, task_teacher)
from trainer.data.prompts import EncodedPrompts, drop_overlong, encode_prompts
from trainer.data.records import DataReport, Example, fingerprint, load_eval_sets, load_examples
from trainer.data.sampler import PromptSampler
from trainer.lifecycle.checkpoint import (data_summary, read_state, refuse_changed_config, resolve_resume,
                                          restore_sampler, summarize, truncate_logs)
from trainer.lifecycle.external_teacher import check_external_teacher
from trainer.step.sync import sync_weights

logger = logging.getLogger(__name__)


@dataclass
class Inputs:
    """The run's validated data, its prompts tokenized once, and its reward functions."""

    tokenizer: object
    train_set: list[Example]
    eval_set: list[Example]
    encoded_train: EncodedPrompts
    encoded_eval: EncodedPrompts
    train_report: DataReport
    eval_report: DataReport | None
    data_fingerprint: str
    reward_fns: dict


def load_inputs(cfg: Config) -> Inputs:
    """Reads and validates the data (every problem names its file, line and field), tokenizes the
    student and teacher prompts, drops or refuses the ones that leave no room for a completion, and
    resolves the reward functions."""
    tokenizer = AutoTokenizer.from_pretrained(cfg.model.tokenizer or cfg.model.path)
    for model in external_models(cfg):
        check_external_teacher(cfg, model, tokenizer)
    if cfg.teacher.cache is not None:  # refused before any actor starts when it was made for another run
        check_identity(cfg.teacher.cache, read_manifest(cfg.teacher.cache), teacher_identity(cfg, tokenizer), RUN_KEYS,
                       "teacher.cache")
    train_set, train_report = load_examples(cfg.data.train, cfg.data.columns, cfg.data.on_invalid)
    eval_set, eval_report = load_eval_sets(cfg.data.eval, cfg.data.columns, cfg.data.on_invalid)
    refuse_unknown_tasks(cfg, train_set + eval_set, cfg.data.train)
    template = lambda task: task_teacher(cfg, task).template  # noqa: E731
    encoded_train = encode_prompts(train_set, tokenizer, template)
    encoded_eval = encode_prompts(eval_set, tokenizer, template)
    max_model_len = cfg.model.max_model_len or AutoConfig.from_pretrained(cfg.model.path).max_position_embeddings
    train_set = drop_overlong(train_set, encoded_train, max_model_len, cfg.rollout.max_tokens, cfg.data.on_invalid,
                              train_report, cfg.learner.max_tokens_per_micro_batch)
    if eval_set:
        eval_set = drop_overlong(eval_set, encoded_eval, max_model_len, cfg.rollout.max_tokens, cfg.data.on_invalid,
                                 eval_report)
    return Inputs(tokenizer, train_set, eval_set, encoded_train, encoded_eval, train_report, eval_report,
                  fingerprint(train_set), rewards.resolve(cfg.rewards))


def refuse_unknown_tasks(cfg: Config, examples: list[Example], path) -> None:
    """A `teachers` mapping that names a task the data (training and held-out sets: with stages, the
    held-out sets of every stage) does not have is a typo, not a teacher to keep for later: refused,
    naming the tasks the data has."""
    found = sorted({e.task for e in examples})
    unknown = sorted(set(cfg.teachers) - set(found))
    if unknown:
        raise ConfigError(f"teachers: {', '.join(map(repr, unknown))} is no task of {path} or the held-out data (column "
                          f"{cfg.data.columns.task!r}); its tasks: {', '.join(map(repr, found))}")


@dataclass
class Actors:
    """The run's Ray actors: engines by role, the learner ranks, and the transport between them."""

    students: EnginePool
    """Sample the student's rollouts and evaluate it; with `ssd`, one engine that only evaluates."""
    frozen: EnginePool | None
    """SSD: the frozen starting model that samples the training completions."""
    teachers: EnginePool | None
    """A separate engine of the student's own teacher weights, when the engine scores weights other than the student's."""
    learners: LearnerGroup
    transport: ObjectStoreTransport
    external: dict[str, EnginePool] = field(default_factory=dict)
    """An engine of each other checkpoint that teaches on an engine (`teacher.model`, `teachers`), by path."""
    warm: WarmActors | None = None
    """Where the actors go after the run, for the driver's next run; None = they are freed."""
    keys: list[tuple] = field(default_factory=list)
    """Each separate pool's and the learner group's `trainer.cluster.warm` key, in `close()`'s order."""

    def scoring(self, model: str | None) -> EnginePool:
        """The engines a teacher scores (and is evaluated) on: those of its checkpoint `model`, or
        for the student's own teacher weights (None) their engine or the students' (live, or served
        as an adapter)."""
        if model is not None:
            return self.external[model]
        return self.teachers or self.students

    def engine_pools(self) -> list[EnginePool]:
        return [pool for pool in (self.students, self.frozen, self.teachers, *self.external.values()) if pool is not None]

    def drain_restarts(self) -> list[dict]:
        """The engines that died and were restarted since the last call."""
        return [restart for pool in self.engine_pools() for restart in pool.drain_restarts()]

    def close(self):
        # colocated pools are the learner ranks: the learner group keeps or frees them
        groups = [*(p for p in self.engine_pools() if not isinstance(p, ColocatedPool)), self.learners]
        if self.warm is not None:
            self.warm.keep(list(zip(self.keys, groups, strict=True)))
            return
        for group in groups:
            group.close()


def start_actors(cfg: Config, run_dir: Path, warm: WarmActors | None = None) -> Actors:
    """Joins or starts Ray, starts every engine and learner rank (or, with `warm`, takes over the
    driver's idle ones that were built the same way), and writes `placement.json`. With
    `rollout.colocate` the student's engines, and its own teacher weights', are the learner ranks."""
    start_ray(cfg)
    if cfg.rollout.sleep and not has_gpus():
        raise ConfigError("rollout.sleep: vLLM's sleep mode is CUDA-only and this cluster has no GPU: "
                          "set rollout.sleep=false")
    # SSD samples the frozen starting model on `rollout.engines` engines; one student engine evaluates
    ssd = cfg.loss.mode == "ssd"
    externals = external_models(cfg, "engine") if scores_live(cfg) else []  # a cache alone needs no teacher engine
    in_learners = {"student", "teacher"} if colocated(cfg) else set()
    wanted = [("student", 1 if ssd else cfg.rollout.engines, True), ("frozen", cfg.rollout.engines, ssd),
              ("teacher", 1, needs_teacher_engine(cfg))] + [(external_role(cfg, m), 1, True) for m in externals]
    separate = [(role, count) for role, count, needed in wanted if needed and role not in in_learners]
    pools, taken_over, starting = {role: None for role, _, _ in wanted}, [], []
    for role, count in separate:  # new actors start side by side: their imports and loading overlap
        pools[role], old = warm.engines(cfg, count, role) if warm is not None else \
            (build_engines(cfg, count, role, wait=False), False)
        (taken_over if old else starting).append(pools[role])
    learners = warm.learners(cfg) if warm is not None else LearnerGroup(cfg, wait=False)
    for group in [*starting, learners]:
        group.wait_started()
    for role, _, needed in wanted:
        if needed and role in in_learners:
            pools[role] = ColocatedPool(role, learners.actors)
    transport = ObjectStoreTransport(cfg.rollout.sync_timeout_s)
    quantized = quantized_student(cfg)
    if taken_over or (quantized and pools["student"] in starting):
        # taken-over pools hold the last run's weights: give them this run's starting weights. A
        # quantized student is served its quantized weights from the start (fresh engines loaded
        # the full-precision checkpoint); its own teacher stays the full-precision start.
        served = learners.export("student")
        master = learners.export("master") if quantized else served
        for pool in taken_over:
            pool.start_over(transport, None if holds_own_weights(pool.name) else
                            master if pool is pools["teacher"] else served)
        if quantized and pools["student"] in starting:
            pools["student"].sync(transport, served, 0)
    teacher_pools = [pools[role] for role, _, needed in wanted[2:] if needed]
    placement = placement_report(cfg, pools["student"], teacher_pools, learners)
    (run_dir / "placement.json").write_text(json.dumps(placement, indent=1))
    keys = [engine_key(cfg, count, role) for role, count in separate] + [learner_key(cfg)] if warm is not None else []
    return Actors(pools["student"], pools["frozen"], pools["teacher"], learners, transport,
                  {m: pools[external_role(cfg, m)] for m in externals}, warm, keys)


def resume_point(cfg: Config, run_dir: Path, resume: str) -> tuple[Path | None, dict | None]:
    """The checkpoint a run continues from and its driver state; (None, None) for a new run. A run
    directory's own run resumes only under a config that a resume may change it to
    (`refuse_changed_config`): a rerun with other settings is an error, not a silent no-op."""
    checkpoint = resolve_resume(run_dir, resume)
    if checkpoint is None:
        return None, None
    if resume == "auto":
        refuse_changed_config(run_dir, config_to_dict(cfg))
    return checkpoint, read_state(checkpoint)


def restore_run(cfg: Config, checkpoint: Path, state: dict, actors: Actors, sampler: PromptSampler,
           data_fingerprint: str, run_dir: Path) -> tuple[int, int, int]:
    """Restores the learners and the sampler from `checkpoint`, drops the logs of the steps it will
    redo, and pushes the restored weights to every engine before the first rollout. Returns the
    step, the policy version and the teacher's version to continue from."""
    done, version, teacher_version = state["step"], state["policy_version"], state["teacher_version"]
    actors.learners.load(str(checkpoint))
    restore_sampler(sampler, state, data_fingerprint, run_dir, checkpoint)
    truncate_logs(run_dir, done)
    sync_weights(cfg, actors.learners, actors.transport, actors.students, actors.teachers, version, teacher_version)
    return done, version, teacher_version


def write_summary(run_dir: Path, checkpoint: Path | None, steps: int, started: float, stopped_by: str | None,
                  inputs: Inputs, health: dict) -> dict:
    """`summary.json`: start and end evaluation, health counters, and what the data loading kept."""
    summary = summarize(run_dir, checkpoint, steps, started, stopped_by=stopped_by)
    summary["health"] = health
    summary["data"] = {"train": data_summary(inputs.train_report)} | (
        {"eval": data_summary(inputs.eval_report)} if inputs.eval_set else {})
    for report in (inputs.train_report, inputs.eval_report):
        if report is not None and report.skipped:
            logger.warning("%s: %d invalid record(s) skipped (data.on_invalid=skip), %d kept; first: %s",
                           report.path, len(report.skipped), report.kept, report.skipped[0])
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=1))
    return summary
