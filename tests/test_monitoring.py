"""Metric sinks read back from disk (metrics.jsonl, TensorBoard, W&B offline), the progress line,
and the report's plots checked against the metrics file they were drawn from."""

import io
import json
import logging
import struct
import time

import pytest

from conftest import ROOT
from trainer.config import load_config
from trainer.monitoring.metrics import MetricsLogger, read_metrics
from trainer.monitoring.progress import Progress, format_duration, progress_fields
from trainer.monitoring.report import (
    FIGURES,
    eval_figure,
    load_run,
    loss_figure,
    reward_figure,
    smooth,
    time_figure,
    write_report,
)

STEP_METRICS = [
    {"eval/addition/accuracy": 0.25, "eval/addition/teacher_accuracy": 1.0},
    {"reward/mean": 0.5, "distill/kl": 0.3, "distill/loss": 0.2, "time/generate": 0.4, "time/score": 0.2,
     "time/train": 0.3, "time/sync": 0.1, "time/step": 1.05, "throughput/tokens_per_s": 120.0},
    {"reward/mean": 0.75, "distill/kl": 0.2, "distill/loss": 0.1, "time/generate": 0.5, "time/score": 0.2,
     "time/train": 0.3, "time/sync": 0.1, "time/step": 1.15, "throughput/tokens_per_s": 110.0,
     "eval/addition/accuracy": 0.5, "not_a_number": float("nan")},
]


def config(tmp_path, *overrides):
    return load_config(ROOT / "configs" / "toy.yaml", [f"output_dir={tmp_path}", "train.steps=2", *overrides])


def log_steps(run_dir, cfg):
    run_dir.mkdir(parents=True, exist_ok=True)
    sink = MetricsLogger(run_dir, cfg)
    for step, metrics in enumerate(STEP_METRICS):
        sink.log(step, metrics)
    sink.close()
    return read_metrics(run_dir)


def test_metrics_jsonl_and_tensorboard_hold_the_same_values(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    logged = log_steps(tmp_path / "run", config(tmp_path))
    assert [m["step"] for m in logged] == [0, 1, 2]
    assert "not_a_number" not in logged[2] and logged[2]["reward/mean"] == 0.75
    events = EventAccumulator(str(tmp_path / "run" / "tb"))
    events.Reload()
    keys = {k for m in logged for k in m if k != "step"}
    assert set(events.Tags()["scalars"]) == keys
    for key in keys:
        from_tb = {e.step: e.value for e in events.Scalars(key)}
        from_jsonl = {m["step"]: m[key] for m in logged if key in m}
        assert from_tb == pytest.approx(from_jsonl, rel=1e-6), key


def wandb_records(path):
    """The records of a W&B transaction log (`run-*.wandb`): a ':W&B' header, then LevelDB-log
    framed protobuf records (crc32, length, type; 32 KiB blocks)."""
    from wandb.proto import wandb_internal_pb2
    data, block, pos, pending = path.read_bytes(), 32768, 7, b""
    assert data[:4] == b":W&B"
    while pos + 7 <= len(data):
        if block - pos % block < 7:
            pos += block - pos % block
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        pending += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # a full record, or the last piece of one
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            yield record
            pending = b""


def test_wandb_offline_run_holds_the_logged_steps(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    logged = log_steps(tmp_path / "run", config(tmp_path, "log.wandb=true", "log.tensorboard=false", "name=wb"))
    (log_file,) = (tmp_path / "run" / "wandb").glob("offline-run-*/run-*.wandb")
    deadline = time.monotonic() + 60
    while not any(r.WhichOneof("record_type") == "exit" for r in wandb_records(log_file)):
        assert time.monotonic() < deadline, "the W&B log never got its exit record"
        time.sleep(0.5)  # the W&B service writes the log behind run.finish()
    history, run_name = {}, None
    for record in wandb_records(log_file):
        if record.WhichOneof("record_type") == "history":
            items = {item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in record.history.item}
            history[items["_step"]] = {k: v for k, v in items.items() if not k.startswith("_")}
        elif record.WhichOneof("record_type") == "run":
            run_name = record.run.display_name
    assert run_name == "wb"
    assert history == {m["step"]: {k: v for k, v in m.items() if k != "step"} for m in logged}


def test_wandb_without_the_package_is_a_clear_error(tmp_path, monkeypatch):
    import builtins
    real_import = builtins.__import__

    def no_wandb(name, *args, **kwargs):
        if name == "wandb":
            raise ImportError("No module named 'wandb'")
        return real_import(name, *args, **kwargs)
    monkeypatch.setattr(builtins, "__import__", no_wandb)
    with pytest.raises(Exception, match="log.wandb: true needs the wandb package"):
        MetricsLogger(tmp_path, config(tmp_path, "log.wandb=true", "log.tensorboard=false"))


def test_progress_is_plain_lines_when_not_a_terminal(caplog):
    caplog.set_level(logging.INFO, logger="trainer.monitoring.progress")
    stream = io.StringIO()  # not a terminal, like `ray job logs`
    progress = Progress(400, stream)
    progress.log(0, {"eval/addition/accuracy": 0.22, "eval/addition/teacher_accuracy": 1.0})
    for step in range(1, 401):
        progress.log(step, {"reward/mean": 0.5, "distill/kl": 0.125} | ({"eval/addition/accuracy": 0.9} if step == 400 else {}))
    progress.close()
    lines = [r.getMessage() for r in caplog.records]
    assert stream.getvalue() == ""  # no bar drawn
    assert 20 <= len(lines) <= 22, len(lines)  # about PLAIN_LINES_PER_RUN over the run, not one per step
    assert all("\r" not in line and "\x1b" not in line for line in lines)
    assert lines[0] == "step 0/400 (0%) | eval addition 22.0%"
    assert lines[1].startswith("step 20/400 (5%) | ") and "ETA " in lines[1] and "reward 0.5 | kl 0.125" in lines[1]
    assert lines[-1].startswith("step 400/400 (100%)") and lines[-1].endswith("eval addition 90.0%")


def test_progress_fields_and_durations():
    assert format_duration(62) == "1m02s" and format_duration(3 * 3600 + 125) == "3h02m"
    assert progress_fields(10, 110, 2.0, {"reward/mean": 0.25}, {"addition": 0.5}) == [
        "2 s/step", "ETA 3m20s", "reward 0.25", "eval addition 50.0%"]


def test_report_plots_the_values_of_metrics_jsonl_and_overlays_runs(tmp_path):
    first, second = tmp_path / "reverse", tmp_path / "forward"
    log_steps(first, config(tmp_path, "log.tensorboard=false"))
    log_steps(second, config(tmp_path, "log.tensorboard=false"))
    sample = {"step": 1, "id": "a", "prompt": "Q:1+2=", "answer": "3", "completion": "3", "reward": 1.0,
              "tokens": ["3", "<"], "student_logprobs": [-0.5, -0.1], "teacher_logprobs": [-0.1, -2.0]}
    (first / "samples.jsonl").write_text(json.dumps(sample) + "\n")
    runs = [load_run(first), load_run(second)]

    reward = reward_figure(runs).axes[0]
    lines = {line.get_label(): line for line in reward.get_lines()}
    assert list(lines) == ["reverse (raw)", "reverse (smoothed, EMA 0.9)", "forward (raw)", "forward (smoothed, EMA 0.9)"]
    assert list(lines["reverse (raw)"].get_ydata()) == [0.5, 0.75]
    assert list(lines["reverse (smoothed, EMA 0.9)"].get_ydata()) == pytest.approx(smooth([0.5, 0.75]))
    assert list(lines["reverse (raw)"].get_xdata()) == [1, 2]
    assert reward.get_xlabel() == "step" and reward.get_ylabel() and reward.get_title()

    accuracy = {line.get_label(): list(line.get_ydata()) for line in eval_figure(runs).axes[0].get_lines()}
    assert accuracy["reverse: addition, student"] == [0.25, 0.5]
    assert accuracy["forward: addition, teacher at step 0 (privileged context)"] == [1.0, 1.0]
    kl_ax, loss_ax = loss_figure(runs).axes
    assert list(kl_ax.get_lines()[0].get_ydata()) == [0.3, 0.2] and list(loss_ax.get_lines()[0].get_ydata()) == [0.2, 0.1]
    time_ax = time_figure(runs).axes[0]
    stacks = [collection.get_paths()[0].vertices for collection in time_ax.collections]
    assert len(stacks) == 4 and max(stacks[-1][:, 1]) == pytest.approx(1.1)  # generate + score + train + sync

    out = write_report([first, second], tmp_path / "report")
    for name in FIGURES:
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and (out / name).stat().st_size > 10_000
    page = (out / "samples.html").read_text()
    assert "teacher − student -1.900" in page and "Q:1+2=" in page  # the second token: -2.0 - (-0.1)
    assert "<h2>forward</h2>" in page and "No samples.jsonl" in page


def test_progress_is_a_bar_on_a_terminal():
    class Terminal(io.StringIO):
        def isatty(self):
            return True
    stream = Terminal()
    progress = Progress(10, stream)
    progress.log(0, {"eval/addition/accuracy": 0.2})
    for step in range(1, 11):
        progress.log(step, {"reward/mean": 0.5})
    progress.close()
    assert "\r" in stream.getvalue() and "10/10" in stream.getvalue() and "reward 0.5" in stream.getvalue()
