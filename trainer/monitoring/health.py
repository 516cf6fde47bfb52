"""Run health: counts optimizer steps skipped for a non-finite loss or gradient, and stops a run
that keeps producing them (a diverged run only wastes its allocation)."""

import logging

from core.errors import DivergedError

logger = logging.getLogger(__name__)


class SkippedSteps:
    """`health/skipped_steps` (the run's total) and the stop after `limit` skips in a row."""

    def __init__(self, limit: int):
        self.limit, self.total, self.in_a_row = limit, 0, 0

    def update(self, step: int, skipped: bool) -> dict[str, float]:
        if not skipped:
            self.in_a_row = 0
            return {"health/skipped_steps": float(self.total)}
        self.total += 1
        self.in_a_row += 1
        logger.warning("step %d skipped: non-finite loss or gradient; weights and optimizer state unchanged "
                       "(%d in a row, the run stops at train.max_skipped_steps=%d)", step, self.in_a_row, self.limit)
        if self.in_a_row >= self.limit:
            raise DivergedError(f"step {step}: {self.in_a_row} steps in a row had a non-finite loss or gradient "
                                f"(train.max_skipped_steps={self.limit}); the run has diverged: lower learner.lr, "
                                f"check the data and the teacher's scores, or resume from the last checkpoint")
        return {"health/skipped_steps": float(self.total)}
