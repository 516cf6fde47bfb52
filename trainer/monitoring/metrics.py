"""Metric sinks and phase timers. Phases return metric dicts; the loop logs them once per step,
and `MetricsLogger` hands them to every sink: `metrics.jsonl`, TensorBoard, Weights & Biases and
the progress display."""

import json
import logging
import math
import time
from contextlib import contextmanager
from pathlib import Path

from core.errors import ConfigError
from trainer.config import Config, config_to_dict
from trainer.monitoring.progress import Progress

logger = logging.getLogger(__name__)


@contextmanager
def timed(metrics: dict[str, float], phase: str):
    """Adds `time/<phase>` (seconds) to `metrics`."""
    started = time.perf_counter()
    yield
    metrics[f"time/{phase}"] = time.perf_counter() - started


class TensorBoardSink:
    def __init__(self, directory: Path, purge_step: int | None = None):
        from torch.utils.tensorboard import SummaryWriter
        self.writer = SummaryWriter(str(directory), purge_step=purge_step)

    def log(self, step: int, metrics: dict[str, float]):
        for key, value in metrics.items():
            self.writer.add_scalar(key, value, step)
        self.writer.flush()  # a run watched live, or stopped, still has its curves on disk

    def close(self):
        self.writer.close()


class WandbSink:
    """A Weights & Biases run named after the config's `name`, with the resolved config attached.
    Its local files go to `<run_dir>/wandb/`; `WANDB_MODE=offline` keeps it off the network."""

    def __init__(self, run_dir: Path, cfg: Config):
        try:
            import wandb
        except ImportError as e:
            raise ConfigError("log.wandb: true needs the wandb package (pip install wandb), "
                              "or set log.wandb=false") from e
        self.run = wandb.init(project=cfg.log.wandb_project, name=cfg.name, dir=str(run_dir),
                              config=config_to_dict(cfg))

    def log(self, step: int, metrics: dict[str, float]):
        self.run.log(metrics, step=step)

    def close(self):
        self.run.finish()


class MetricsLogger:
    """Writes `metrics.jsonl` (one line per step) and feeds the enabled sinks and the progress display."""

    def __init__(self, run_dir: Path, cfg: Config, resumed_at: int | None = None):
        """`resumed_at`: a resumed run's checkpoint step; what was logged after it is redone, so
        TensorBoard drops it (as `trainer.lifecycle.checkpoint.truncate_logs` does for the JSONL files)."""
        self.path = run_dir / "metrics.jsonl"
        self.sinks = []
        if cfg.log.tensorboard:
            self.sinks.append(TensorBoardSink(run_dir / "tb", purge_step=None if resumed_at is None else resumed_at + 1))
        if cfg.log.wandb:
            self.sinks.append(WandbSink(run_dir, cfg))
        self.sinks.append(Progress(cfg.train.steps))

    def log(self, step: int, metrics: dict[str, float]):
        clean = {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float)) and math.isfinite(v)}
        with self.path.open("a") as f:
            f.write(json.dumps({"step": step, **clean}) + "\n")
        for sink in self.sinks:
            sink.log(step, clean)

    def close(self):
        for sink in self.sinks:
            sink.close()


def read_metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]
