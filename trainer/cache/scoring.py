"""Filling a teacher cache through the engines: the completions (given, or sampled), the teacher's
top-k scores of them, written shard by shard (`trainer.cache.store`).

Used by `selfdistill score` (a config's teacher on a dataset's completions) and by a run's replay
cache (`trainer.cache.replay`: the parent model on prior prompts). A shard already on disk is kept,
so an interrupted scoring resumes where it stopped; every sample is seeded by its record's position,
so a redone shard draws the same completions.
"""

import logging
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from core.errors import ConfigError, DataError
from rollout.pool import EnginePool
from trainer.cache.store import (FORMAT_VERSION, CachedRecord, identity_differences, read_manifest, shard_name,
                                 write_manifest, write_shard)
from trainer.step.rollouts import rollout_seed

logger = logging.getLogger(__name__)


@dataclass
class ScoreItem:
    """One completion to score, and where its prompts come from."""

    example_id: str
    task: str
    where: str
    """`file:line` of its record, for errors."""
    student_prompt: list[int]
    """The prompt stored with it: what the student trains on."""
    teacher_prompt: list[int]
    """What the teacher reads before the completion."""
    completion: list[int] | None = None
    """The completion; None: sampled from `sample_prompt` by the sampling engines."""
    sample_prompt: list[int] | None = None


@dataclass
class Sampling:
    """How completions are sampled, where they are (the `rollout` section's settings)."""

    pool: EnginePool
    version: int
    max_tokens: int
    temperature: float
    seed: int
    adapter: str | None = None

    def describe(self) -> dict:
        return {"max_tokens": self.max_tokens, "temperature": self.temperature, "seed": self.seed}


def fill_cache(directory: str | Path, identity: dict, items: list[ScoreItem], score_pool: Callable[[], EnginePool],
               k: int, vocab_size: int, max_model_len: int, sampling: Callable[[], Sampling] | None = None,
               shard_size: int = 256, score_adapter: str | None = None, about: dict | None = None,
               progress: bool = True) -> dict:
    """Scores `items` into `directory` and returns its manifest. `score_pool` and `sampling` are
    called only when a shard is missing (a finished cache starts no engine). A directory holding
    another cache (another identity) is refused, naming what differs. `about`: more for the
    manifest (e.g. the teacher's path), not part of the identity."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    count = -(-len(items) // shard_size)
    manifest = {"format": FORMAT_VERSION, "identity": identity, "records": len(items), "shard_size": shard_size,
                "vocab_size": vocab_size, **(about or {}), "shards": [], "complete": False}
    if (directory / "manifest.json").is_file():
        found = read_manifest(directory)
        problems = identity_differences(found["identity"], identity) + \
            [f"{key}: the cache has {found.get(key)}, the run {manifest[key]}" for key in ("records", "shard_size")
             if found.get(key) != manifest[key]]
        if problems:
            raise ConfigError(f"{directory}: holds another teacher cache; what differs:\n  " + "\n  ".join(problems)
                              + "\n(score into another directory, or delete this one)")
        manifest["shards"] = [s for s in found["shards"] if (directory / s["file"]).is_file()]
    done = {s["file"] for s in manifest["shards"]}
    write_manifest(directory, manifest)
    pools: dict[str, object] = {}
    for index in _progress(range(count), progress, f"scoring {len(items)} completions into {directory}"):
        name = shard_name(index)
        if name in done:
            continue
        part = items[index * shard_size:(index + 1) * shard_size]
        completions = _completions(part, index * shard_size, pools, sampling)
        for item, completion in zip(part, completions, strict=True):
            if not completion:
                raise DataError(f"{item.where}: empty completion: nothing to score")
            if len(item.teacher_prompt) + len(completion) > max_model_len:
                raise DataError(f"{item.where}: the teacher prompt ({len(item.teacher_prompt)} tokens) and its completion "
                                f"({len(completion)}) do not fit model.max_model_len={max_model_len}")
        if "score" not in pools:
            pools["score"] = score_pool()
        scores = pools["score"].score([i.teacher_prompt + c for i, c in zip(part, completions, strict=True)],
                                      [len(i.teacher_prompt) for i in part], k, adapter=score_adapter)
        records = [CachedRecord(i.example_id, i.task, i.student_prompt, c, s)
                   for i, c, s in zip(part, completions, scores, strict=True)]
        size = write_shard(directory / name, records, vocab_size, k)
        manifest["shards"].append({"file": name, "records": len(records), "tokens": sum(map(len, completions)),
                                   "bytes": size})
        manifest["shards"].sort(key=lambda s: s["file"])
        write_manifest(directory, manifest)
    manifest["complete"] = True
    write_manifest(directory, manifest)
    return manifest


def _completions(part: list[ScoreItem], offset: int, pools: dict, sampling: Callable[[], Sampling] | None) -> list[list[int]]:
    wanted = [i for i, item in enumerate(part) if item.completion is None]
    completions = [item.completion for item in part]
    if wanted:
        if sampling is None:
            raise ValueError("items without a completion need a sampling engine")
        if "sample" not in pools:
            pools["sample"] = sampling()
        s = pools["sample"]
        rollouts = s.pool.generate([part[i].sample_prompt for i in wanted], [part[i].example_id for i in wanted],
                                   expected_version=s.version,
                                   seeds=[rollout_seed(s.seed, 0, offset + i) for i in wanted],
                                   max_tokens=s.max_tokens, temperature=s.temperature, adapter=s.adapter)
        for i, rollout in zip(wanted, rollouts, strict=True):
            completions[i] = rollout.completion_ids
    return completions


def _progress(values, enabled: bool, description: str):
    if not enabled:
        return values
    from tqdm import tqdm
    return tqdm(values, desc=description, unit="shard", file=sys.stderr, disable=None)


# ----------------------------------------------------------------------------------------------
# selfdistill score
# ----------------------------------------------------------------------------------------------

COMPLETION_SOURCES = "demonstrations | column:NAME | samples | samples:MODEL_DIR"


def dataset_items(cfg, examples, encoded, tokenizer, completions: str) -> tuple[list[ScoreItem], dict]:
    """One item per record of the training data: its plain prompt (stored, for the student), its
    teacher prompt, and the completion `completions` names: the demonstration (`loss.sft_target`'s
    column + EOS), a column's text + EOS, or a sample (`samples`: of `model.path`; `samples:DIR`: of
    the model in DIR), drawn with the `rollout` section's settings."""
    from trainer.step.rollouts import sft_target_ids
    source, _, argument = completions.partition(":")
    if source not in ("demonstrations", "column", "samples") or (source == "column") != bool(argument) \
            or (source == "demonstrations" and argument):
        raise ConfigError(f"--completions {completions!r}: expected {COMPLETION_SOURCES}")
    items = []
    for e in examples:
        completion = None
        if source == "demonstrations":
            completion = sft_target_ids(e, tokenizer, cfg.loss.sft_target)
        elif source == "column":
            text = {"answer": e.answer, "context": e.context, "prompt": e.prompt}.get(argument, e.extra.get(argument))
            if not isinstance(text, str):
                raise DataError(f"{e.where}: field {argument!r}: --completions column:{argument} needs text, "
                                f"got {type(text).__name__}")
            completion = tokenizer(text, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        items.append(ScoreItem(e.id, e.task, e.where, encoded.student[e.id], encoded.teacher[e.id], completion,
                               encoded.student[e.id]))
    described = {"source": completions}
    if source == "samples":
        from trainer.cache.store import model_fingerprint
        described |= {"model": model_fingerprint(argument or cfg.model.path), "max_tokens": cfg.rollout.max_tokens,
                      "temperature": cfg.rollout.temperature, "seed": cfg.train.seed}
    return items, described


def score_dataset(cfg, out: str | Path, completions: str, shard_size: int = 256) -> dict:
    """`selfdistill score`: the config's teacher (`teacher.model`, else the student's starting
    weights, with `teacher.template` and the record's context) scores completions of `data.train`
    at k = `loss.topk` into `out`, on `rollout.engines` engines. Returns the manifest."""
    import dataclasses

    from transformers import AutoConfig

    from trainer.cache.identity import teacher_identity
    from trainer.cluster.engines import build_engines
    from trainer.cluster.placement import start_ray
    from trainer.config.implied import external_role
    from trainer.data.records import fingerprint
    from trainer.lifecycle.startup import load_inputs
    if cfg.loss.mode != "distill":
        raise ConfigError(f"loss.mode={cfg.loss.mode!r} has no teacher to score with (use distill)")
    if cfg.teachers:
        raise ConfigError("teachers: `selfdistill score` scores with one teacher, the `teacher` section's; "
                          "score each task's data with its own config")
    inputs = load_inputs(cfg)
    items, described = dataset_items(cfg, inputs.train_set, inputs.encoded_train, inputs.tokenizer, completions)
    teacher_model = cfg.teacher.model or cfg.model.path
    identity = teacher_identity(cfg, inputs.tokenizer) | {"dataset": {"path": str(cfg.data.train),
                                                                      "fingerprint": fingerprint(inputs.train_set)},
                                                          "completions": described}
    model = AutoConfig.from_pretrained(teacher_model)
    start_ray(cfg)
    pools = {}

    def engines(path: str) -> EnginePool:
        if path not in pools:
            if path == cfg.teacher.model:
                pools[path] = build_engines(cfg, cfg.rollout.engines, external_role(cfg, path))
            else:
                model_cfg = dataclasses.replace(cfg.model, path=path)
                pools[path] = build_engines(dataclasses.replace(cfg, model=model_cfg), cfg.rollout.engines, "student")
        return pools[path]

    sampled = completions.partition(":")[2] or cfg.model.path
    sampling = lambda: Sampling(engines(sampled), 0, cfg.rollout.max_tokens, cfg.rollout.temperature,  # noqa: E731
                                cfg.train.seed)
    try:
        manifest = fill_cache(out, identity, items, lambda: engines(teacher_model), cfg.loss.topk, model.vocab_size,
                              cfg.model.max_model_len or model.max_position_embeddings, sampling, shard_size,
                              about={"teacher_path": str(teacher_model)})
    finally:
        for pool in pools.values():
            pool.close()
    return manifest
