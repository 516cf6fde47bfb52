"""Exact resume, SIGTERM, atomic checkpoints, changed data, `adapt`, stage sequences and the
forgetting table. The end-to-end tests drive the real CLI: the SIGTERM test in a process of its own,
stopped as a scheduler stops it; the stage sequence and `adapt` in this process, on warm actors."""

import json
import logging
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from conftest import ROOT
from core.errors import ConfigError, DataError
from trainer import cli
from trainer.config import load_config
from trainer.lifecycle import continual
from trainer.lifecycle.checkpoint import find_checkpoint, refuse_changed_config, resolve_resume, truncate_logs
from trainer.lifecycle.continual import forgetting_markdown, forgetting_table
from trainer.loop import train
from trainer.monitoring.metrics import read_metrics

# ----------------------------------------------------------------------------------------------
# Pure parts
# ----------------------------------------------------------------------------------------------


def test_forgetting_table_finds_each_tasks_best_and_its_drop():
    rows = [("start", {"eval/a/accuracy": 0.2, "eval/b/accuracy": 0.4, "eval/a/teacher_accuracy": 1.0}),
            ("stage-a", {"eval/a/accuracy": 0.9, "eval/b/accuracy": 0.3}),
            ("stage-b", {"eval/a/accuracy": 0.7, "eval/b/accuracy": 0.8})]
    table = forgetting_table(rows)
    assert table["tasks"] == ["a", "b"]
    assert table["drop"]["a"] == {"best": 0.9, "best_at": "stage-a", "final": 0.7, "drop": pytest.approx(0.2)}
    assert table["drop"]["b"]["drop"] == 0.0 and table["drop"]["b"]["best_at"] == "stage-b"
    text = forgetting_markdown(table)
    assert "| stage-a | 90.0% | 30.0% |" in text and "20.0 pts" in text


def test_stage_config_errors_name_the_stage(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(textwrap.dedent("""\
        model: {path: m}
        stages:
          - {name: a, train: x.jsonl}
          - {name: a, train: y.jsonl}
          - {name: "b c"}
        """))
    with pytest.raises(ConfigError) as e:
        load_config(path)
    message = str(e.value)
    assert "stages.0.name: 'a' names more than one stage" in message
    assert "stages.2.train: is required" in message and "stages.2.name" in message
    assert f"{path}:3" in message  # located at the list item


def test_eval_accepts_one_set_or_a_list(tmp_path):
    one = load_config(None, ["model.path=m", "data.train=t.jsonl", "data.eval=e.jsonl"])
    assert one.data.eval == "e.jsonl"
    many = load_config(None, ["model.path=m", "data.train=t.jsonl", "data.eval=[a.jsonl, b.jsonl]"])
    assert many.data.eval == ["a.jsonl", "b.jsonl"]


def _fake_run(run_dir: Path, steps: list[int]):
    run_dir.mkdir(parents=True)
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps({"step": s, "x": s}) + "\n" for s in range(7)))
    for step in steps:
        (run_dir / "checkpoints" / f"step_{step}").mkdir(parents=True)
        (run_dir / "checkpoints" / f"step_{step}" / "state.json").write_text(json.dumps({"step": step}))
    if steps:
        (run_dir / "checkpoints" / "latest").write_text(f"step_{steps[-1]}")


def test_resume_modes(tmp_path):
    assert resolve_resume(tmp_path / "new", "auto") is None
    assert resolve_resume(tmp_path / "new", "never") is None
    _fake_run(tmp_path / "run", [2, 4])
    assert resolve_resume(tmp_path / "run", "auto") == tmp_path / "run" / "checkpoints" / "step_4"
    assert resolve_resume(tmp_path / "other", str(tmp_path / "run" / "checkpoints" / "step_2")).name == "step_2"
    with pytest.raises(ConfigError, match="already holds a run"):
        resolve_resume(tmp_path / "run", "never")
    with pytest.raises(ConfigError, match="not a checkpoint"):
        resolve_resume(tmp_path / "x", str(tmp_path / "nowhere"))
    # `latest` naming a checkpoint that was never completed: the newest complete one is used
    (tmp_path / "run" / "checkpoints" / "latest").write_text("step_6")
    assert find_checkpoint(tmp_path / "run").name == "step_4"


def test_auto_resume_without_checkpoint_starts_over_and_keeps_the_old_logs(tmp_path):
    _fake_run(tmp_path / "run", [])
    assert resolve_resume(tmp_path / "run", "auto") is None
    assert not (tmp_path / "run" / "metrics.jsonl").exists()
    (aside,) = (tmp_path / "run").glob("attempt-*")
    assert len((aside / "metrics.jsonl").read_text().splitlines()) == 7


def test_a_resume_refuses_a_changed_config_but_takes_more_steps_and_new_data(tmp_path):
    from trainer.config import config_to_dict, dump_config
    base = load_config(ROOT / "configs" / "toy.yaml")
    (tmp_path / "config.yaml").write_text(dump_config(base))
    resumable = load_config(ROOT / "configs" / "toy.yaml", ["train.steps=800", "data.train=other.jsonl",
                                                            "log.samples_every=5", "ray.placement=spread"])
    refuse_changed_config(tmp_path, config_to_dict(resumable))  # no error
    changed = load_config(ROOT / "configs" / "toy.yaml", ["train.steps=800", "loss.divergence=forward_kl",
                                                          "learner.lr=5e-4"])
    with pytest.raises(ConfigError) as e:
        refuse_changed_config(tmp_path, config_to_dict(changed))
    message = str(e.value)
    assert message.startswith(f"{tmp_path / 'config.yaml'}: the run in {tmp_path} was started with another config")
    assert "learner.lr: 0.001 -> 0.0005" in message and "loss.divergence: 'reverse_kl' -> 'forward_kl'" in message
    assert "train.steps" not in message.split("(")[1].split(")")[0]  # listed as changeable, not as changed
    assert "name=" in message and "--resume never" in message and "selfdistill adapt" in message
    # an option the stored config does not know yet (added since the run started) is not compared
    stored = config_to_dict(base)
    del stored["loss"]["clip_tau"]
    import yaml
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(stored))
    refuse_changed_config(tmp_path, config_to_dict(base))


def test_truncate_logs_drops_the_steps_a_resume_redoes(tmp_path):
    _fake_run(tmp_path / "run", [])
    truncate_logs(tmp_path / "run", 4)
    assert [row["step"] for row in read_metrics(tmp_path / "run")] == [0, 1, 2, 3, 4]


KILLED_MID_SAVE = """
import os, signal, sys
from pathlib import Path
from trainer.lifecycle.checkpoint import save_checkpoint

class DiesWhileSaving:
    # Writes part of a checkpoint, then the process is killed outright, as by the OOM killer or a node loss.
    def save(self, directory):
        Path(directory, "engine").mkdir(parents=True)
        Path(directory, "engine", "mp_rank_00_model_states.pt").write_bytes(b"half")
        os.kill(os.getpid(), signal.SIGKILL)

save_checkpoint(DiesWhileSaving(), Path(sys.argv[1]), {"step": 5})
"""


def test_killed_while_writing_a_checkpoint_leaves_the_previous_one_valid(tmp_path):
    _fake_run(tmp_path / "run", [2, 4])
    done = subprocess.run([sys.executable, "-c", KILLED_MID_SAVE, str(tmp_path / "run")], cwd=ROOT,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert done.returncode == -signal.SIGKILL
    assert (tmp_path / "run" / "checkpoints" / "step_5.partial").is_dir()
    assert not (tmp_path / "run" / "checkpoints" / "step_5").exists()
    assert (tmp_path / "run" / "checkpoints" / "latest").read_text() == "step_4"
    assert resolve_resume(tmp_path / "run", "auto").name == "step_4"


# ----------------------------------------------------------------------------------------------
# End to end: the real CLI, engines, learners and Ray
# ----------------------------------------------------------------------------------------------

def _overrides(toy_world, small_eval, tmp_path, *extra):
    return [f"model.path={toy_world / 'model'}", f"data.train={toy_world / 'data' / 'addition' / 'train.jsonl'}",
            f"data.eval={small_eval}", f"output_dir={tmp_path}", "train.prompts_per_step=16",
            "learner.micro_batch=8", "train.eval_every=0", "log.samples_every=2", *extra]


@pytest.fixture
def ray_address(local_ray) -> str:
    """The CLI processes join the test's Ray, as a `ray job submit` entrypoint joins its cluster."""
    return local_ray.get_runtime_context().gcs_address


def _cli(*args, log: Path, ray_address: str) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "RAY_USAGE_STATS_ENABLED": "0", "RAY_ADDRESS": ray_address}
    return subprocess.Popen([sys.executable, "-m", "trainer.cli", *args], cwd=ROOT, env=env,
                            stdout=log.open("w"), stderr=subprocess.STDOUT)


def _finish(process: subprocess.Popen, log: Path, timeout: float = 1800) -> str:
    assert process.wait(timeout=timeout) == 0, log.read_text()[-4000:]
    return log.read_text()


def _losses(run_dir: Path) -> dict[int, dict]:
    keys = ("distill/loss", "distill/kl", "learner/grad_norm", "reward/mean")
    return {row["step"]: {k: row[k] for k in keys} for row in read_metrics(run_dir) if row["step"] > 0}


def test_a_stage_stopped_by_sigterm_stops_the_sequence(toy_world, tmp_path, monkeypatch, capsys):
    """A preempted stage must not hand the checkpoint its stop left to the next stage, which would
    then start from half-trained weights (and refuse the resume, its model.path changed): the
    sequence stops, says so and how to resume, and records no row for the unfinished stage. The
    stage's own stop and resume are the SIGTERM test's; here `train` returns a stopped summary."""
    started = []

    def preempted(cfg, resume, warm=None):
        started.append(cfg.name)
        return {"run_dir": str(tmp_path / "seq" / "stages" / cfg.name), "checkpoint": str(tmp_path / "step_1" / "hf"),
                "steps": 1, "stopped_by": "SIGTERM", "seconds": 1.0, "start": {}, "end": {}}

    monkeypatch.setattr(continual, "train", preempted)
    data = toy_world / "data"
    config = tmp_path / "stages.yaml"
    config.write_text(textwrap.dedent(f"""\
        name: seq
        output_dir: {tmp_path}
        model: {{path: {toy_world / 'model'}}}
        stages:
          - {{name: add, train: {data / 'addition' / 'train.jsonl'}, steps: 3}}
          - {{name: sub, train: {data / 'subtraction' / 'train.jsonl'}, steps: 3}}
        """))
    assert cli.main(["train", str(config)]) == 0
    assert started == ["add"]
    out = capsys.readouterr().out
    assert "stopped by SIGTERM after step 1" in out and "stopped by SIGTERM in stage 1 of 2" in out
    assert json.loads((tmp_path / "seq" / "summary.json").read_text())["stopped_by"] == "SIGTERM"
    assert not (tmp_path / "seq" / "forgetting.json").exists()


@pytest.mark.slow
def test_sigterm_then_resume_matches_an_uninterrupted_run(toy_world, small_eval, tmp_path, ray_address, warm_actors,
                                                          caplog):
    """2N steps in one go vs N steps, SIGTERM, resume, N steps: the same per-step losses. EMA
    teacher and two ZeRO-2 ranks, so that every kind of state has to come back. The interrupted
    run is a `selfdistill train` process with actors of its own, stopped as a scheduler stops it;
    the uninterrupted and the resumed run are in this process, on actors taken over from earlier
    runs (`warm_actors`). Equal losses before the stop also say that a taken-over actor holds
    exactly what a new one does; after it, that the checkpoint alone carries the run's state."""
    config = str(ROOT / "configs" / "toy.yaml")
    common = _overrides(toy_world, small_eval, tmp_path, "train.steps=8", "teacher.weights=ema",
                        "teacher.ema_alpha=0.1", "learner.num=2", "train.save_every=0")
    train(load_config(config, [*common, "name=whole"]), warm=warm_actors)

    cut = _cli("train", config, *common, "name=cut", log=tmp_path / "cut.log", ray_address=ray_address)
    metrics = tmp_path / "cut" / "metrics.jsonl"
    deadline = time.time() + 600
    while not (metrics.exists() and any(json.loads(line)["step"] >= 3 for line in metrics.read_text().splitlines())):
        assert cut.poll() is None and time.time() < deadline, (tmp_path / "cut.log").read_text()[-4000:]
        time.sleep(0.2)
    cut.send_signal(signal.SIGTERM)
    log = _finish(cut, tmp_path / "cut.log")
    stopped = json.loads((tmp_path / "cut" / "summary.json").read_text())
    assert stopped["stopped_by"] == "SIGTERM" and 3 <= stopped["steps"] < 8, log[-3000:]
    assert (tmp_path / "cut" / "checkpoints" / "latest").read_text() == f"step_{stopped['steps']}"

    with caplog.at_level(logging.INFO, logger="trainer.lifecycle.checkpoint"):
        train(load_config(config, [*common, "name=cut"]), warm=warm_actors)
    assert f"resumed from {tmp_path / 'cut' / 'checkpoints' / ('step_%d' % stopped['steps'])}" in caplog.text
    expected, got = _losses(tmp_path / "whole"), _losses(tmp_path / "cut")
    assert sorted(got) == list(range(1, 9))  # every step logged exactly once
    for step in range(1, 9):
        for key, value in expected[step].items():
            assert got[step][key] == pytest.approx(value, abs=1e-6), (step, key)
    assert json.loads((tmp_path / "cut" / "summary.json").read_text())["end"] == \
        json.loads((tmp_path / "whole" / "summary.json").read_text())["end"]

    # A resume on changed data: the sampler starts over on purpose, and says so.
    subset = tmp_path / "addition-subset.jsonl"
    subset.write_text("".join((toy_world / "data" / "addition" / "train.jsonl").read_text().splitlines(True)[:200]))
    with caplog.at_level(logging.WARNING, logger="trainer.lifecycle.checkpoint"):
        train(load_config(config, [*common, "name=cut", "train.steps=10", f"data.train={subset}"]), warm=warm_actors)
    assert "training data changed since" in caplog.text and "the sampler starts over" in caplog.text
    event = json.loads((tmp_path / "cut" / "resumes.jsonl").read_text().splitlines()[-1])
    assert event["sampler"] == "reset" and event["step"] == 8
    assert [row["step"] for row in read_metrics(tmp_path / "cut")][-2:] == [9, 10]

    # A rerun with other settings is refused, naming them, before anything starts; one whose data
    # does not exist says so, although the run is complete (it used to print "nothing to do")
    with pytest.raises(ConfigError, match=r"loss\.divergence: 'reverse_kl' -> 'forward_kl'"):
        train(load_config(config, [*common, "name=cut", "train.steps=10", f"data.train={subset}",
                                   "loss.divergence=forward_kl"]), warm=warm_actors)
    with pytest.raises(DataError, match=r"/some/other\.jsonl: file not found"):
        train(load_config(config, [*common, "name=cut", "train.steps=10", "data.train=/some/other.jsonl"]))


@pytest.mark.slow
def test_two_stages_write_the_forgetting_table_and_adapt_continues_from_a_checkpoint(toy_world, tmp_path, warm_actors,
                                                                                    caplog, capsys):
    """The CLI's `train` of a stage sequence, then `adapt`, in this process on actors taken over from
    earlier runs (the SIGTERM test drives the CLI in a process of its own)."""
    evals = {}
    for task in ("addition", "subtraction"):
        lines = (toy_world / "data" / task / "eval.jsonl").read_text().splitlines(True)[:32]
        evals[task] = tmp_path / f"{task}-eval.jsonl"
        evals[task].write_text("".join(lines))
    config = tmp_path / "stages.yaml"
    config.write_text(textwrap.dedent(f"""\
        name: seq
        output_dir: {tmp_path}
        model: {{path: {toy_world / 'model'}}}
        teacher: {{template: "{{context}}\\n{{prompt}}"}}
        loss: {{estimator: topk, topk: 20}}
        rollout: {{max_tokens: 8}}
        learner: {{lr: 1.0e-3, micro_batch: 16}}
        train: {{prompts_per_step: 16, eval_every: 0}}
        replay: {{prompts: 16}}
        stages:
          - {{name: add, train: {toy_world / 'data' / 'addition' / 'train.jsonl'}, eval: {evals['addition']}, steps: 3}}
          - {{name: sub, train: {toy_world / 'data' / 'subtraction' / 'train.jsonl'}, eval: {evals['subtraction']}, steps: 3,
              replay: 0.25}}
        """))
    assert cli.main(["train", str(config)], warm=warm_actors) == 0
    log = capsys.readouterr().out
    table = json.loads((tmp_path / "seq" / "forgetting.json").read_text())
    assert table["rows"] == ["start", "add", "sub"] and table["tasks"] == ["addition", "subtraction"]
    start = read_metrics(tmp_path / "seq" / "stages" / "add")[0]
    assert table["accuracy"]["start"]["addition"] == start["eval/addition/accuracy"]
    end = read_metrics(tmp_path / "seq" / "stages" / "sub")[-1]
    assert table["accuracy"]["sub"] == {"addition": end["eval/addition/accuracy"],
                                        "subtraction": end["eval/subtraction/accuracy"]}
    assert "drop from best" in (tmp_path / "seq" / "forgetting.md").read_text() and "drop from best" in log
    lineage = json.loads((tmp_path / "seq" / "stages" / "sub" / "lineage.json").read_text())
    assert lineage["from"]["checkpoint"].endswith("stages/add/checkpoints/step_3")
    # stage 2 replayed stage 1's prompts (16, as the student sees them) and both stages' in the teacher's
    # format (16 each), scored by stage 1's final model when stage 2 started; 4 of each step's 16 prompts
    addition_train = str(toy_world / "data" / "addition" / "train.jsonl")
    assert lineage["replay"]["data"] == [addition_train] and lineage["replay"]["fraction"] == 0.25
    replay = json.loads((tmp_path / "seq" / "stages" / "sub" / "replay" / "manifest.json").read_text())
    assert replay["complete"] and replay["records"] == 48 and replay["identity"]["template"] == "{prompt}"
    sub_steps = [m for m in read_metrics(tmp_path / "seq" / "stages" / "sub") if m["step"] > 0]
    assert all(m["distill/cache/loss"] >= 0 for m in sub_steps) and "distill/cache/loss" not in \
        read_metrics(tmp_path / "seq" / "stages" / "add")[-1]
    assert table["replay"] == {"sub": lineage["replay"]} and "sub replayed 25% of each step" in \
        (tmp_path / "seq" / "forgetting.md").read_text()
    assert set(table["teacher_accuracy"]["sub"]) == {"addition", "subtraction"}  # the teacher each model carries
    # stage 2 started from stage 1's weights: its step-0 accuracy is stage 1's final one
    assert read_metrics(tmp_path / "seq" / "stages" / "sub")[0]["eval/addition/accuracy"] == \
        read_metrics(tmp_path / "seq" / "stages" / "add")[-1]["eval/addition/accuracy"]

    # Rerunning the finished sequence reads it back instead of training again (in this process: it
    # starts no actor, so a process of its own would only add its imports).
    with caplog.at_level(logging.INFO, logger="trainer.loop"):
        assert cli.main(["train", str(config)]) == 0
    assert caplog.text.count("nothing to do") == 2 and "drop from best" in capsys.readouterr().out

    # adapt from the first stage's final checkpoint to subtraction, with the addition set as the prior task
    assert cli.main(["adapt", "--from", str(tmp_path / "seq" / "stages" / "add"),
                     "--data", str(toy_world / "data" / "subtraction" / "train.jsonl"),
                     "--eval", str(evals["subtraction"]), "--eval-prior", str(evals["addition"]),
                     "--replay", f"{evals['addition']}:0.5", "train.steps=2", "name=adapted", "replay.prompts=8",
                     "replay.teacher_format=false"], warm=warm_actors) == 0
    log = capsys.readouterr().out
    run = tmp_path / "seq" / "stages" / "adapted"
    lineage = json.loads((run / "lineage.json").read_text())
    assert lineage["from"]["step"] == 3 and lineage["data"]["train"].endswith("subtraction/train.jsonl")
    assert lineage["data"]["fingerprint"] != lineage["from"]["data_fingerprint"]
    assert lineage["ancestors"] is None  # stage 1 started from the base model
    assert lineage["replay"]["data"] == [str(evals["addition"])] and lineage["replay"]["fraction"] == 0.5
    assert json.loads((run / "replay" / "manifest.json").read_text())["records"] == 8
    config_used = load_config(run / "config.yaml")
    assert config_used.model.path.endswith("stages/add/checkpoints/step_3/hf")
    assert read_metrics(run)[0]["eval/addition/accuracy"] == read_metrics(tmp_path / "seq" / "stages" / "add")[-1][
        "eval/addition/accuracy"]
    assert (run / "forgetting.md").is_file() and "drop from best" in log
