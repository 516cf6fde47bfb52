"""The cached share of each step: records drawn from a teacher cache, as rollouts with their
stored scores, beside the step's on-policy rollouts (`teacher.cache`, `replay`)."""

from pathlib import Path

from rollout.batch import Rollout, TeacherScores
from rollout.pool import EnginePool
from trainer.cache.identity import RUN_KEYS, teacher_identity
from trainer.cache.replay import replay_cache
from trainer.cache.store import TeacherCache, check_identity
from trainer.config import Config
from trainer.config.implied import cache_source, cached_prompts
from trainer.data.sampler import PromptSampler
from trainer.step.batch import StepBatch


class CacheFeed:
    """`take(version)` draws the next `count` records (a seeded, epoch-wise shuffle that resumes
    exactly: `state_dict`), as cached rollouts and their teacher scores."""

    def __init__(self, cache: TeacherCache, count: int, seed: int):
        self.cache, self.count = cache, count
        self.sampler = PromptSampler(len(cache), seed)

    def take(self, version: int) -> tuple[list[Rollout], list[TeacherScores]]:
        records = [self.cache[i] for i in self.sampler.next_indices(self.count)]
        rollouts = [Rollout(example_id=r.example_id, prompt_ids=r.prompt_ids, completion_ids=r.completion_ids,
                            logprobs=[0.0] * len(r.completion_ids), policy_version=version, finish_reason="cached",
                            task=r.task, cached=True) for r in records]
        return rollouts, [r.scores for r in records]

    def state_dict(self) -> dict:
        return self.sampler.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.sampler.load_state_dict(state)

    def mixed(self, batch: StepBatch, scores: list[TeacherScores | None] | None,
              version: int) -> tuple[StepBatch, list[TeacherScores | None]]:
        """The step's batch with the next cached records after its on-policy rollouts; their teacher
        prompts are placeholders (their scores came with them)."""
        rollouts, cached_scores = self.take(version)
        live = scores if scores is not None else [None] * len(batch.rollouts)
        return StepBatch(batch.rollouts + rollouts, batch.teacher_prompts + [r.prompt_ids for r in rollouts],
                         batch.metrics, batch.rewards + [{} for _ in rollouts]), live + cached_scores


def open_cache_feed(cfg: Config, run_dir: Path, tokenizer, students: EnginePool, adapter: str | None,
                    resumed: bool) -> CacheFeed | None:
    """The run's cached share (`trainer.config.implied.cache_source`), or None: a teacher cache,
    checked against the run's teacher, or the run's replay cache, scored now if the run starts."""
    source = cache_source(cfg)
    if source is None:
        return None
    if source == "teacher.cache":
        cache = TeacherCache(cfg.teacher.cache)
        check_identity(cfg.teacher.cache, cache.manifest, teacher_identity(cfg, tokenizer), RUN_KEYS, "teacher.cache")
    else:
        from transformers import AutoConfig
        model = AutoConfig.from_pretrained(cfg.model.path)
        cache = replay_cache(cfg, run_dir, tokenizer, students, adapter, model.vocab_size,
                             cfg.model.max_model_len or model.max_position_embeddings, resumed)
    return CacheFeed(cache, cached_prompts(cfg), cfg.train.seed)
