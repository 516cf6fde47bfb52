"""After a step, the new weights reach the engines: the student's (or its LoRA adapter) to the
student engines, an EMA teacher's to wherever it scores (colocated engines: each rank's own)."""

from rollout.pool import EnginePool
from trainer.config import Config
from trainer.config.implied import adapter_sync, colocated, own_teacher_scored_on_engines

STUDENT_ADAPTER, TEACHER_ADAPTER = "student", "teacher"


def engine_adapters(cfg: Config) -> tuple[str | None, str | None]:
    """The vLLM adapter names the student and the teacher are served with (None = the engine's own
    weights: the base under adapter sync, otherwise whatever was last synced)."""
    if not adapter_sync(cfg):
        return None, None
    return STUDENT_ADAPTER, {"initial": None, "ema": TEACHER_ADAPTER, "live": STUDENT_ADAPTER}[cfg.teacher.weights]


def sync_weights(cfg: Config, learners, transport, students: EnginePool, teacher_engines: EnginePool | None,
                 version: int, teacher_version: int) -> None:
    """After a step: the student's weights (or adapter) to its engines; an EMA teacher's to wherever it
    scores. Colocated engines take them from their own rank: only the versions go out from here."""
    if colocated(cfg):
        students.advance(version)
        if teacher_engines is not None and cfg.teacher.weights == "ema":
            teacher_engines.advance(teacher_version)
        return
    if adapter_sync(cfg):
        students.sync(transport, learners.export_adapter("student"), version, adapter=STUDENT_ADAPTER)
        if cfg.teacher.weights == "ema" and own_teacher_scored_on_engines(cfg):
            students.sync(transport, learners.export_adapter("teacher"), teacher_version, adapter=TEACHER_ADAPTER)
        return
    students.sync(transport, learners.export("student"), version)
    if teacher_engines is not None and cfg.teacher.weights == "ema":
        teacher_engines.sync(transport, learners.export("teacher"), teacher_version)
