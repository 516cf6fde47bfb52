"""The teacher cache: its shards and manifest, filling it through a real vLLM engine (resumable),
training from it to fp16 precision of live scores, and refusing a cache made for another run."""

import json

import pytest
import torch

from conftest import ROOT
from core.errors import ConfigError, DataError
from rollout.batch import Rollout, TeacherScores
from rollout.pool import EnginePool
from trainer.cache.fidelity import reconstruction_kl
from trainer.cache.identity import RUN_KEYS, teacher_identity
from trainer.cache.scoring import ScoreItem, fill_cache
from trainer.cache.store import (CachedRecord, TeacherCache, check_identity, id_dtype, shard_name, write_manifest,
                                 write_shard)
from trainer.config import load_config
from trainer.learner import objectives

# ----------------------------------------------------------------------------------------------
# Shards and manifest
# ----------------------------------------------------------------------------------------------


def record(i: int, k: int, vocab: int) -> CachedRecord:
    generator = torch.Generator().manual_seed(i)
    length = 2 + i % 3
    logits = torch.randn(length, vocab, generator=generator) * 3
    logprobs = logits.log_softmax(-1)
    top = logprobs.topk(k, dim=-1)
    completion = torch.randint(vocab, (length,), generator=generator)
    return CachedRecord(f"r{i}", "add" if i % 2 else "sub", [vocab - 1, i % vocab], completion.tolist(),
                        TeacherScores(logprobs.gather(1, completion[:, None])[:, 0].tolist(), top.indices.tolist(),
                                      top.values.tolist()))


@pytest.mark.parametrize("vocab,dtype", [(24, torch.uint8), (32768, torch.uint16), (131072, torch.int32)])
def test_shards_read_back_every_field_in_the_narrowest_types(tmp_path, vocab, dtype):
    from safetensors import safe_open
    k = 5
    records = [record(i, k, vocab) for i in range(7)]
    sizes = [write_shard(tmp_path / shard_name(0), records[:4], vocab, k),
             write_shard(tmp_path / shard_name(1), records[4:], vocab, k)]
    write_manifest(tmp_path, {"format": 1, "identity": {"k": k}, "complete": True,
                              "shards": [{"file": shard_name(0), "records": 4, "tokens": 1, "bytes": sizes[0]},
                                         {"file": shard_name(1), "records": 3, "tokens": 1, "bytes": sizes[1]}]})
    assert id_dtype(vocab) == dtype
    with safe_open(str(tmp_path / shard_name(0)), framework="pt") as f:
        assert f.get_tensor("topk_ids").dtype == dtype and f.get_tensor("completion_ids").dtype == dtype
        assert f.get_tensor("topk_logprobs").dtype == torch.float16
        tail = f.get_tensor("tail_logprobs").float()
        top = f.get_tensor("topk_logprobs").float()
        assert torch.allclose(torch.logaddexp(tail, torch.logsumexp(top, -1)), torch.zeros_like(tail), atol=2e-3)
    cache = TeacherCache(tmp_path)
    assert len(cache) == 7
    for i in (0, 3, 4, 6):  # both shards
        got, want = cache[i], records[i]
        assert (got.example_id, got.task, got.prompt_ids, got.completion_ids) == \
               (want.example_id, want.task, want.prompt_ids, want.completion_ids)
        assert got.scores.topk_ids == want.scores.topk_ids
        assert torch.allclose(torch.tensor(got.scores.topk_logprobs), torch.tensor(want.scores.topk_logprobs),
                              rtol=1e-3, atol=1e-3)  # fp16
        assert torch.allclose(torch.tensor(got.scores.token_logprobs), torch.tensor(want.scores.token_logprobs),
                              rtol=1e-3, atol=1e-3)
    with pytest.raises(IndexError):
        cache[7]


def test_an_incomplete_or_damaged_cache_is_refused_naming_the_file(tmp_path):
    with pytest.raises(ConfigError, match="no teacher cache here"):
        TeacherCache(tmp_path)
    write_manifest(tmp_path, {"format": 1, "identity": {"k": 2}, "complete": False, "shards": []})
    with pytest.raises(DataError, match=r"manifest\.json: the cache is incomplete"):
        TeacherCache(tmp_path)
    write_manifest(tmp_path, {"format": 1, "identity": {"k": 2}, "complete": True,
                              "shards": [{"file": shard_name(0), "records": 1, "tokens": 2, "bytes": 1}]})
    with pytest.raises(DataError, match=r"shard-00000\.safetensors: a shard named in .*manifest\.json is missing"):
        TeacherCache(tmp_path)[0]
    (tmp_path / "manifest.json").write_text('{"format": 1,\n "identity": ')
    with pytest.raises(DataError, match=r"manifest\.json: line 2: not JSON"):
        TeacherCache(tmp_path)


def test_a_cache_made_for_another_run_is_refused_naming_what_differs(toy_world, tmp_path):
    from transformers import AutoTokenizer
    tokenizer = AutoTokenizer.from_pretrained(toy_world / "model")
    cfg = load_config(ROOT / "configs" / "toy.yaml", [f"model.path={toy_world / 'model'}"])
    made = teacher_identity(cfg, tokenizer)
    manifest = {"identity": made | {"dataset": {"fingerprint": "x"}}}
    check_identity(tmp_path, manifest, teacher_identity(cfg, tokenizer), RUN_KEYS, "teacher.cache")  # the same run
    other = load_config(ROOT / "configs" / "toy.yaml", [f"model.path={toy_world / 'model'}", "loss.topk=10",
                                                        "teacher.template={prompt} {context}"])
    with pytest.raises(ConfigError) as error:
        check_identity(tmp_path, manifest, teacher_identity(other, tokenizer), RUN_KEYS, "teacher.cache")
    message = str(error.value)
    assert "k: the cache has 20, the run 10" in message and "template: the cache has" in message
    assert "tokenizer" not in message and "teacher_model" not in message
    teacher = load_config(ROOT / "configs" / "toy.yaml", [f"model.path={toy_world / 'model'}",
                                                          f"teacher.model={toy_world / 'model'}"])
    assert teacher_identity(teacher, tokenizer)["teacher_model"] == made["teacher_model"]  # the files, not the path


def test_cache_settings_that_cannot_work_are_refused_when_the_config_loads(toy_world):
    def problems(*overrides):
        with pytest.raises(ConfigError) as error:
            load_config(ROOT / "configs" / "toy.yaml", list(overrides))
        return str(error.value)
    assert "replay.fraction" in problems("teacher.cache=/x", "replay.fraction=0.25")
    assert "loss.estimator" in problems("teacher.cache=/x", "loss.estimator=full", "teacher.scorer=learner")
    assert "rounds to no cached prompt" in problems("teacher.cache=/x", "teacher.cache_fraction=0.001")
    assert "nothing to replay" in problems("replay.fraction=0.25", "replay.teacher_format=false")
    assert "uses no teacher" in problems("teacher.cache=/x", "loss.mode=sft")


def test_reconstruction_kl_is_zero_when_the_top_k_is_everything_and_grows_as_k_shrinks():
    logprobs = (torch.randn(50, 40, generator=torch.Generator().manual_seed(0)) * 2).log_softmax(-1)
    kls = [reconstruction_kl(logprobs, k).mean().item() for k in (5, 10, 20, 39, 40)]
    assert kls == sorted(kls, reverse=True) and kls[0] > 0.05
    assert kls[-1] == pytest.approx(0.0, abs=1e-6)


# ----------------------------------------------------------------------------------------------
# Filling a cache through an engine, and training from it
# ----------------------------------------------------------------------------------------------

def items_of(tokenizer, count: int = 10) -> list[ScoreItem]:
    items = []
    for i in range(count):
        a, b = 10 + 7 * i, 21 + 3 * i
        student = tokenizer(f"Q:{a}+{b}=", add_special_tokens=False)["input_ids"]
        teacher = tokenizer(f"W:{a}+{b}:{a + b}\nQ:{a}+{b}=", add_special_tokens=False)["input_ids"]
        completion = tokenizer(str(a + b), add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        items.append(ScoreItem(f"e{i}", "addition", f"data.jsonl:{i + 1}", student, teacher, completion))
    return items


@pytest.mark.slow
def test_a_filled_cache_resumes_and_trains_to_the_live_scores_loss(toy_world, vllm_engine, tmp_path):
    """Scores from the cache give the step's loss that the same engine's live scores give, to fp16
    precision; an interrupted scoring redoes only its missing shard, and the same records."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from trainer.learner.forward import completion_logits
    tokenizer = AutoTokenizer.from_pretrained(toy_world / "model")
    items = items_of(tokenizer)
    pool, calls = EnginePool("teacher", [vllm_engine]), []

    def score_pool():
        calls.append(1)
        return pool
    identity = {"teacher_model": "m", "tokenizer": "t", "template": "{context}\n{prompt}", "k": 20}
    fill_cache(tmp_path, identity, items, score_pool, 20, 24, 64, shard_size=4, progress=False)
    first = [TeacherCache(tmp_path)[i] for i in range(4, 8)]  # shard 1
    kept = (tmp_path / shard_name(0)).stat().st_mtime_ns
    (tmp_path / shard_name(1)).unlink()
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    write_manifest(tmp_path, manifest | {"complete": False})
    fill_cache(tmp_path, identity, items, score_pool, 20, 24, 64, shard_size=4, progress=False)
    assert len(calls) == 2 and (tmp_path / shard_name(0)).stat().st_mtime_ns == kept  # only the missing shard
    again = [TeacherCache(tmp_path)[i] for i in range(4, 8)]
    # The same records, not the same bytes: the engine's prefix cache now holds these prompts, so
    # a rescore may differ in fp16's last bit, which can also swap tied top-k ids.
    assert [r.completion_ids for r in again] == [r.completion_ids for r in first]
    for before, after in zip(first, again):
        assert after.scores.token_logprobs == pytest.approx(before.scores.token_logprobs, abs=2e-3)
        for old_top, new_top in zip(before.scores.topk_logprobs, after.scores.topk_logprobs):
            assert new_top == pytest.approx(old_top, abs=2e-3)
    fill_cache(tmp_path, identity, items, score_pool, 20, 24, 64, shard_size=4, progress=False)
    assert len(calls) == 2  # complete: no engine
    with pytest.raises(ConfigError, match=r"holds another teacher cache; what differs:\n  k: the cache has 20, the run 10"):
        fill_cache(tmp_path, identity | {"k": 10}, items, score_pool, 10, 24, 64, shard_size=4, progress=False)

    cache = TeacherCache(tmp_path)
    live = pool.score([i.teacher_prompt + i.completion for i in items], [len(i.teacher_prompt) for i in items], 20)
    cfg = load_config(ROOT / "configs" / "toy.yaml", [f"model.path={toy_world / 'model'}", "loss.divergence=forward_kl"])
    model = AutoModelForCausalLM.from_pretrained(toy_world / "model")

    def step_loss(rows: list[Rollout], scores: list[TeacherScores]) -> float:
        batch = objectives.micro_batch(rows, 0, torch.device("cpu"))
        logits = completion_logits(model, batch.prompts, batch.completions, False)
        loss, _ = objectives.distill(logits, batch, cfg, objectives.targets_from_scores(scores, batch, 24))
        return loss.item()

    def rollouts(cached: bool) -> list[Rollout]:
        return [Rollout(i.example_id, i.student_prompt, i.completion, [0.0] * len(i.completion), 0, "stop",
                        cached=cached) for i in items]
    stored = [cache[i].scores for i in range(len(items))]
    assert [cache[i].completion_ids for i in range(len(items))] == [i.completion for i in items]
    live_loss, cached_loss = step_loss(rollouts(False), live), step_loss(rollouts(True), stored)
    assert cached_loss == pytest.approx(live_loss, rel=2e-3)  # fp16 logprobs: about 3 significant digits
    assert live_loss > 1.0  # the base does not know these sums: a loss worth comparing


@pytest.mark.slow
def test_score_then_train_from_the_cache_alone_without_a_teacher_engine(toy_world, small_eval, tmp_path, warm_actors):
    """`selfdistill score` of the demonstrations, then a run trained from the cache alone
    (`teacher.cache_fraction=1`): no teacher engine, nothing sampled, the cached loss falls; a run
    whose teacher differs from the cache's is refused before anything starts."""
    from trainer.cache.scoring import score_dataset
    from trainer.loop import train
    from trainer.monitoring.metrics import read_metrics
    data = tmp_path / "train64.jsonl"
    data.write_text("".join((toy_world / "data" / "addition" / "train.jsonl").read_text().splitlines(True)[:64]))
    common = [f"model.path={toy_world / 'model'}", f"data.train={data}", f"data.eval={small_eval}",
              f"output_dir={tmp_path}", "train.prompts_per_step=16", "learner.micro_batch=16", "learner.warmup_steps=0",
              "train.save_every=0", "log.samples_every=0"]
    manifest = score_dataset(load_config(ROOT / "configs" / "toy.yaml", common), tmp_path / "cache", "demonstrations",
                             shard_size=32)
    assert manifest["complete"] and manifest["records"] == 64 and len(manifest["shards"]) == 2
    assert manifest["identity"]["completions"] == {"source": "demonstrations"}
    from transformers import AutoTokenizer
    tokenizer = AutoTokenizer.from_pretrained(toy_world / "model")
    first = json.loads(data.read_text().splitlines()[0])
    assert TeacherCache(tmp_path / "cache")[0].completion_ids == \
        tokenizer(first["answer"], add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]

    cfg = load_config(ROOT / "configs" / "toy.yaml", [*common, "name=from-cache", f"teacher.cache={tmp_path / 'cache'}",
                                                      "teacher.cache_fraction=1.0", "train.steps=6",
                                                      "train.eval_every=3"])
    summary = train(cfg, warm=warm_actors)
    placement = json.loads((tmp_path / "from-cache" / "placement.json").read_text())
    assert placement["teacher_engines"] == [], placement
    metrics = read_metrics(tmp_path / "from-cache")
    steps = [m for m in metrics if m["step"] > 0]
    assert all("rollout/len_mean" not in m and m["distill/cache/loss"] == pytest.approx(m["distill/loss"])
               for m in steps)
    assert steps[-1]["distill/cache/loss"] < steps[0]["distill/cache/loss"]
    assert "eval/addition/teacher_accuracy" in metrics[-1] and summary["steps"] == 6

    with pytest.raises(ConfigError, match=r"teacher.cache .*what differs:\n  k: the cache has 20, the run 10"):
        train(load_config(ROOT / "configs" / "toy.yaml", [*common, "name=other-k", f"teacher.cache={tmp_path / 'cache'}",
                                                          "loss.topk=10"]))
