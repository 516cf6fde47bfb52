"""Fault injection on the real stack: non-finite losses on DeepSpeed learners, rollout engines and
learners killed with SIGKILL mid-run, and no secret in anything a run writes."""

import json
import math
import os
import signal
import subprocess
import sys
import threading
import time

import psutil
import pytest
import ray
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from conftest import ROOT
from core.errors import DivergedError, LearnerDiedError
from rollout.batch import Rollout, TeacherScores
from test_backbone import toy_config
from trainer import loop
from trainer.cluster.learners import LearnerGroup
from trainer.data.records import load_examples
from trainer.data.sampler import PromptSampler
from trainer.lifecycle import startup
from trainer.monitoring.health import SkippedSteps
from trainer.monitoring.metrics import read_metrics

pytestmark = pytest.mark.slow
ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # workers cannot import test modules


def _learner_state(learner):
    """Runs inside a learner actor (via __ray_call__): its weights, its AdamW state (DeepSpeed's ZeRO
    wrapper holds the client optimizer over the fp32 partitions), those partitions and the lr."""
    import torch
    inner = learner.optimizer.optimizer
    return {"params": {n: p.detach().clone() for n, p in learner.engine.module.named_parameters()},
            "adam": [{k: v.clone() if torch.is_tensor(v) else v for k, v in s.items()} for s in inner.state.values()],
            "fp32": [t.detach().clone() for t in learner.optimizer.single_partition_of_fp32_groups],
            "lr": learner.scheduler.get_last_lr()[0]}


def _same(a, b) -> bool:
    import torch
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, list):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return torch.equal(a, b) if torch.is_tensor(a) else a == b


def test_non_finite_teacher_scores_skip_the_step_on_every_rank(toy_world, small_eval, tmp_path, local_ray):
    """NaN or Inf teacher logprobs in one rank's share: both ranks skip the optimizer step, and the
    weights, AdamW moments, fp32 master partitions and lr stay bit-identical; K in a row stop the run."""
    cfg = toy_config(toy_world, small_eval, tmp_path, "learner.num=2", "learner.zero_stage=2", "learner.micro_batch=2",
                     "train.prompts_per_step=8", "learner.warmup_steps=4", "teacher.scorer=engine",
                     "teacher.weights=initial", "loss.estimator=topk", "loss.topk=4")
    tokenizer = AutoTokenizer.from_pretrained(cfg.model.path)
    examples = [json.loads(line) for line in open(cfg.data.train)][:8]
    rollouts, teacher_prompts, vocab = [], [], len(tokenizer)
    for e in examples:
        completion = tokenizer(e["answer"], add_special_tokens=False)["input_ids"]
        rollouts.append(Rollout(example_id=e["id"], prompt_ids=tokenizer(e["prompt"])["input_ids"],
                                completion_ids=completion, logprobs=[-1.0] * len(completion), policy_version=0,
                                finish_reason="stop"))
        teacher_prompts.append(tokenizer(e["context"] + "\n" + e["prompt"])["input_ids"])
    total = sum(len(r.completion_ids) for r in rollouts)

    def scores(poison: float | None = None, at: int = 0) -> list[TeacherScores]:
        """The teacher puts 0.7 on the sampled token and 0.1 on three others; `poison` replaces one
        top-k logprob of rollout `at` (rollouts 0-3 go to rank 0, 4-7 to rank 1)."""
        out = []
        for i, r in enumerate(rollouts):
            ids = [[t, *[(t + j) % vocab for j in (1, 2, 3)]] for t in r.completion_ids]
            lps = [[math.log(0.7)] + [math.log(0.1)] * 3 for _ in r.completion_ids]
            if poison is not None and i == at:
                lps[0][1] = poison
            out.append(TeacherScores(token_logprobs=[math.log(0.7)] * len(ids), topk_ids=ids, topk_logprobs=lps))
        return out

    group = LearnerGroup(cfg)
    # on CPU the ranks share the node's cores (a sync step's phases take turns)
    threads = ray.get([a.__ray_call__.remote(lambda _: torch.get_num_threads()) for a in group.actors])
    assert threads == [max(1, len(os.sched_getaffinity(0)) // 2)] * 2
    guard = SkippedSteps(limit=3)

    def step(number, teacher_scores):
        metrics = group.train_step(rollouts, teacher_prompts, teacher_scores, total)  # checks the ranks agree
        guard.update(number, bool(metrics["learner/skipped"]))
        return metrics, ray.get([a.__ray_call__.remote(_learner_state) for a in group.actors])

    initial = ray.get([a.__ray_call__.remote(_learner_state) for a in group.actors])
    metrics, applied = step(1, scores())
    assert metrics["learner/skipped"] == 0 and math.isfinite(metrics["distill/loss"])
    assert not _same(initial[0]["params"], applied[0]["params"])  # a good step moves the weights ...
    assert all(s["step"].item() == 1 for s in applied[1]["adam"]) and applied[0]["lr"] > initial[0]["lr"]  # ... and Adam

    for number, (poison, at) in enumerate([(float("nan"), 6), (float("inf"), 1)], start=2):
        metrics, after = step(number, scores(poison, at))
        assert metrics["learner/skipped"] == 1, (poison, at)
        for rank in (0, 1):
            assert _same(after[rank], applied[rank]), (poison, rank)  # weights, Adam, fp32 partitions, lr
    assert (guard.total, guard.in_a_row) == (2, 2)

    metrics, later = step(4, scores())  # training goes on from the untouched state
    assert metrics["learner/skipped"] == 0 and not _same(later[0]["params"], applied[0]["params"])
    assert all(s["step"].item() == 2 for s in later[0]["adam"]) and guard.in_a_row == 0

    step(5, scores(float("nan"), 0))
    step(6, scores(float("-inf"), 7))
    with pytest.raises(DivergedError, match=r"step 7: 3 steps in a row had a non-finite loss or gradient "
                                            r"\(train.max_skipped_steps=3\)"):
        step(7, scores(float("nan"), 3))
    assert guard.total == 5
    for actor in group.actors:
        ray.kill(actor)


SECRETS = {"HF_TOKEN": "hf_fakeSecret0123456789", "WANDB_API_KEY": "fake-wandb-key-9876543210",
           "AWS_SECRET_ACCESS_KEY": "fakeAwsSecret/abcdefXYZ"}


def _descendants(process: psutil.Process, title: str) -> list[psutil.Process]:
    """Ray workers name themselves `ray::<Class>.<method>` while they run a method."""
    found = []
    for child in process.children(recursive=True):
        try:
            if child.cmdline()[:1] == [title]:
                found.append(child)
        except (psutil.Error, IndexError):
            pass
    return found


def _kill_engines_mid_generate(run: subprocess.Popen, run_dir, after_steps, killed: list):
    """After each step in `after_steps` is logged, SIGKILLs the first engine caught generating."""
    root = psutil.Process(run.pid)
    for after in after_steps:
        while run.poll() is None and (not (run_dir / "metrics.jsonl").exists()
                                      or len((run_dir / "metrics.jsonl").read_text().splitlines()) <= after):
            time.sleep(0.1)
        while run.poll() is None:
            victims = _descendants(root, "ray::RolloutEngine.generate")
            if victims:
                try:
                    environ = victims[0].environ()
                    os.kill(victims[0].pid, signal.SIGKILL)
                except (psutil.Error, ProcessLookupError):
                    continue
                killed.append({"after_step": after, "pid": victims[0].pid,
                               "saw_secret": environ.get("HF_TOKEN") == SECRETS["HF_TOKEN"]})
                break
            time.sleep(0.005)


def test_engines_killed_mid_step_are_restarted_with_current_weights_and_nothing_is_lost(toy_world, small_eval,
                                                                                         tmp_path):
    """Two SIGKILLs of rollout engines in the middle of generation, in one `selfdistill train` run
    with fake secrets in its environment: the run finishes, every step trained on exactly the prompts
    the sampler drew (rollouts.jsonl), each restarted engine sampled with the current weights (the
    engine/learner logprob gap stays ~1e-6), and no secret appears in anything the run wrote."""
    run_dir = tmp_path / "kills"
    # the toy training set plus five bad records after it, skipped under data.on_invalid=skip
    clean = (toy_world / "data" / "addition" / "train.jsonl").read_bytes()
    first = json.loads(clean.splitlines()[0])
    bad = [b'{"id": "broken", "prompt": ', b'{"id": "latin1", "prompt": "Q:1+1=\xe9", "context": "W"}',
           json.dumps({**first, "id": "long", "context": "W:" + "1" * 130}).encode(),  # > 128 positions
           json.dumps({**first, "id": "empty", "prompt": " "}).encode(), json.dumps(first).encode()]  # + a duplicate
    dirty = tmp_path / "train.jsonl"
    dirty.write_bytes(clean + b"\n".join(bad) + b"\n")
    overrides = [f"model.path={toy_world / 'model'}", f"data.train={dirty}", "data.on_invalid=skip",
                 f"data.eval={small_eval}", f"output_dir={tmp_path}", "name=kills", "train.steps=6",
                 "train.prompts_per_step=8", "rollout.n=2", "rollout.engines=2", "rollout.max_restarts=3",
                 "learner.num=1", "learner.micro_batch=16", "learner.warmup_steps=0", "teacher.weights=live",
                 "teacher.scorer=engine", "train.eval_every=0", "log.samples_every=1"]
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"} | SECRETS | {
        "PYTHONPATH": str(ROOT), "RAY_USAGE_STATS_ENABLED": "0"}
    run = subprocess.Popen([sys.executable, "-m", "trainer.cli", "train", str(ROOT / "configs" / "toy.yaml"), *overrides],
                           cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    killed: list[dict] = []
    killer = threading.Thread(target=_kill_engines_mid_generate, args=(run, run_dir, (1, 3), killed), daemon=True)
    killer.start()
    stdout, stderr = run.communicate(timeout=1500)
    killer.join(timeout=5)
    assert run.returncode == 0, stderr[-5000:]
    assert len(killed) == 2 and all(k["saw_secret"] for k in killed), killed  # the engines had the secrets

    # every step trained on exactly the prompts the sampler drew, each rollout.n=2 times, in order
    train_set, _ = load_examples(toy_world / "data" / "addition" / "train.jsonl")
    sampler = PromptSampler(len(train_set), seed=0)
    records = [json.loads(line) for line in (run_dir / "rollouts.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(1, 7))
    for record in records:
        drawn = [train_set[i].id for i in sampler.next_indices(8)]
        assert record["example_ids"] == [i for i in drawn for _ in range(2)], record["step"]
        assert record["version"] == record["step"] - 1

    restarts = [(r["step"], x) for r in records for x in r["restarts"]]
    assert len(restarts) == 2, restarts
    for (step, restart), kill in zip(restarts, killed):
        assert step > kill["after_step"] and restart["lost"] == "generate of 4 items" and restart["version"] == step - 1
        assert f"{restart['engine']} died during generate of 4 items" in stderr
    metrics = read_metrics(run_dir)
    assert metrics[-1]["health/engine_restarts"] == 2 and metrics[-1]["health/skipped_steps"] == 0
    # a restarted engine with the base weights would be ~1e-2 away from the learner after step 1
    assert all(m["health/engine_trainer_logprob_gap"] < 1e-4 for m in metrics[1:])
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["health"] == {"skipped_steps": 0, "engine_restarts": 2}
    data = summary["data"]["train"]
    assert (data["kept"], data["skipped"]) == (len(train_set), 5)
    lines = len(clean.splitlines())
    assert [reason.split(": ", 2)[:2] for reason in data["first_skipped"]] == [
        [f"{dirty}:{lines + 1}", "not valid JSON"], [f"{dirty}:{lines + 2}", "not valid UTF-8 (byte 0xe9 at column 35)"],
        [f"{dirty}:{lines + 4}", "field 'prompt'"], [f"{dirty}:{lines + 5}", "field 'id'"],
        [f"{dirty}:{lines + 3}", "field 'context'"]]  # the length check runs after loading
    assert f"train data: 5 invalid record(s) skipped, {len(train_set)} kept" in stdout
    assert "5 invalid record(s) skipped (data.on_invalid=skip)" in stderr

    written = [p for p in run_dir.rglob("*") if p.is_file()]
    assert any(p.name == "samples.jsonl" for p in written) and any(p.suffix == ".safetensors" for p in written)
    for secret in SECRETS.values():
        assert secret not in stdout and secret not in stderr
        for path in written:
            assert secret.encode() not in path.read_bytes(), path


def test_a_dead_learner_stops_the_run_naming_it_and_the_last_checkpoint_is_intact(
        toy_world, small_eval, tmp_path, local_ray, monkeypatch):
    groups = []

    class RecordedLearners(LearnerGroup):  # the same group; the test only needs its actor handles
        def __init__(self, cfg, wait=True):
            super().__init__(cfg, wait)
            groups.append(self)

    monkeypatch.setattr(startup, "LearnerGroup", RecordedLearners)
    cfg = toy_config(toy_world, small_eval, tmp_path, "learner.num=2", "train.steps=30", "train.save_every=1",
                     "train.prompts_per_step=8", "teacher.weights=live", "teacher.scorer=engine", "name=dies")
    run_dir = tmp_path / "dies"
    killed = []

    def kill_rank_1():
        while not (run_dir / "checkpoints" / "latest").exists() or \
                (run_dir / "checkpoints" / "latest").read_text() != "step_2":
            time.sleep(0.05)
        pid = ray.get(groups[0].actors[1].__ray_call__.remote(lambda learner: os.getpid()))
        os.kill(pid, signal.SIGKILL)
        killed.append(pid)

    threading.Thread(target=kill_rank_1, daemon=True).start()
    with pytest.raises(LearnerDiedError, match=r"^learner rank 1 died during \w+: "):
        loop.train(cfg)
    assert killed
    latest = run_dir / "checkpoints" / (run_dir / "checkpoints" / "latest").read_text()
    state = json.loads((latest / "state.json").read_text())
    assert state["step"] >= 2 and latest.name == f"step_{state['step']}"
    model = AutoModelForCausalLM.from_pretrained(latest / "hf")
    assert all(p.isfinite().all() for p in model.parameters())
    AutoTokenizer.from_pretrained(latest / "hf")
    for actor in groups[0].actors:
        ray.kill(actor)


def test_a_learner_starts_past_a_lock_that_a_killed_extension_build_left(toy_world, tmp_path):
    """DeepSpeed's CPU backend would JIT-build a shared-memory all-reduce under a per-user lock file at
    every start; a build killed midway leaves the lock, and every later start waited on it forever.
    A fresh process with such a lock in its extensions directory starts a learner and leaves it alone."""
    extensions = tmp_path / "torch_extensions"
    lock = extensions / "deepspeed_shm_comm" / "lock"
    lock.parent.mkdir(parents=True)
    lock.touch()
    start = (
        "import sys; sys.path.insert(0, 'tests')\n"
        "from test_lora_learner import _port\n"
        "from trainer.config import config_to_dict, load_config\n"
        "from trainer.learner.learner import Learner\n"
        f"cfg = load_config('configs/toy.yaml', ['model.path={toy_world / 'model'}', 'data.train=unused.jsonl'])\n"
        "Learner(config_to_dict(cfg), 0, 1, '127.0.0.1', _port())\n")
    done = subprocess.run([sys.executable, "-c", start], cwd=ROOT, env={**os.environ, "TORCH_EXTENSIONS_DIR": str(extensions)},
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert lock.exists() and sorted(p.name for p in lock.parent.iterdir()) == ["lock"]
