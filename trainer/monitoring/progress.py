"""The driver's progress display: step, ETA, reward, KL and the latest evaluation accuracy.

On a terminal it is one bar redrawn in place (tqdm). Anywhere else (`ray job logs`, a file, CI) a
redrawn bar turns into carriage-return spam, so it is one plain log line every few steps instead:

    12:01:07 trainer.monitoring.progress: step 40/400 (10%) | 0.84 s/step | ETA 5m02s | reward 0.438 | kl 0.0912 | eval addition 31.6%
"""

import logging
import sys
import time

logger = logging.getLogger(__name__)

PLAIN_LINES_PER_RUN = 20
"""A plain (non-terminal) progress log prints about this many lines over a whole run."""


def format_duration(seconds: float) -> str:
    seconds = max(0, round(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{secs:02d}s"


def progress_fields(step: int, total: int, seconds_per_step: float | None, metrics: dict[str, float],
                    accuracy: dict[str, float]) -> list[str]:
    """The parts of one progress line; `accuracy` maps a task to its latest eval accuracy."""
    fields = []
    if seconds_per_step is not None:
        fields += [f"{seconds_per_step:.3g} s/step", f"ETA {format_duration(seconds_per_step * (total - step))}"]
    for key, label in (("reward/mean", "reward"), ("distill/kl", "kl")):
        if key in metrics:
            fields.append(f"{label} {metrics[key]:.3g}")
    fields += [f"eval {task} {value:.1%}" for task, value in accuracy.items()]
    return fields


class Progress:
    """Fed every logged step by `MetricsLogger`; the clock for the ETA starts after step 0 (the
    first evaluation), so start-up and that evaluation do not distort it."""

    def __init__(self, total: int, stream=None):
        self.total, self.stream = total, stream or sys.stderr
        self.every = max(1, total // PLAIN_LINES_PER_RUN)
        self.accuracy: dict[str, float] = {}
        self.started: float | None = None
        self.first_step = 0
        self.bar = None
        if self.stream.isatty():
            from tqdm import tqdm
            self.bar = tqdm(total=total, file=self.stream, desc="train", unit="step", dynamic_ncols=True)

    def log(self, step: int, metrics: dict[str, float]):
        evaluated = False
        for key, value in metrics.items():
            if key.startswith("eval/") and key.endswith("/accuracy") and not key.endswith("teacher_accuracy"):
                self.accuracy[key.split("/")[1]] = value
                evaluated = True
        if self.started is None:
            self.started, self.first_step = time.perf_counter(), step
            seconds_per_step = None
        else:
            seconds_per_step = (time.perf_counter() - self.started) / max(1, step - self.first_step)
        fields = progress_fields(step, self.total, seconds_per_step, metrics, self.accuracy)
        if self.bar is not None:
            self.bar.set_postfix_str(" | ".join(fields[2:] if seconds_per_step else fields), refresh=False)
            self.bar.update(step - self.bar.n)
        elif step % self.every == 0 or step == self.total or evaluated:
            logger.info("step %d/%d (%d%%) | %s", step, self.total, 100 * step // self.total, " | ".join(fields))

    def close(self):
        if self.bar is not None:
            self.bar.close()
