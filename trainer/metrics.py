"""Metric sinks and phase timers. Phases return metric dicts; the loop logs them once per step."""

import json
import logging
import math
import time
from contextlib import contextmanager
from pathlib import Path

from trainer.config import LogConfig

logger = logging.getLogger(__name__)


@contextmanager
def timed(metrics: dict[str, float], phase: str):
    """Adds `time/<phase>` (seconds) to `metrics`."""
    started = time.perf_counter()
    yield
    metrics[f"time/{phase}"] = time.perf_counter() - started


class MetricsLogger:
    """Writes `metrics.jsonl` (one line per step) and, when enabled, TensorBoard event files."""

    def __init__(self, run_dir: Path, cfg: LogConfig, purge_step: int | None = None):
        """`purge_step`: a resumed run's first step; TensorBoard drops the events the run logged from
        there on before it was interrupted, as `metrics.jsonl` does (`trainer.checkpoint.truncate_logs`)."""
        self.path = run_dir / "metrics.jsonl"
        self.tb = None
        if cfg.tensorboard:
            from torch.utils.tensorboard import SummaryWriter
            self.tb = SummaryWriter(str(run_dir / "tb"), purge_step=purge_step)

    def log(self, step: int, metrics: dict[str, float]):
        clean = {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float)) and math.isfinite(v)}
        with self.path.open("a") as f:
            f.write(json.dumps({"step": step, **clean}) + "\n")
        if self.tb is not None:
            for key, value in clean.items():
                self.tb.add_scalar(key, value, step)

    def close(self):
        if self.tb is not None:
            self.tb.close()


def read_metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]
