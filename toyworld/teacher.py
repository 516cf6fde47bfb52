"""The toy world's stronger checkpoint, for teachers beyond the student's own weights
(`teacher.model`): the base model trained further until it answers from the question alone,
carries and borrows included. An external teacher with the plain prompt (classic on-policy
distillation) then has something to teach the base student.

DIR/teacher/
  model/           the checkpoint (save_pretrained, with the toy tokenizer)
  prepare.json     {family: {"teacher_accuracy": .., "student_accuracy": ..}}, written last
  settings.json    what it was built from and how; a rerun with the same record reuses it

It continues from DIR/model with the base's pretraining loop, on a mixture of the student format on
every training problem (carries included) and the teacher format, so it keeps both skills.
"""

import dataclasses
import hashlib
import json
import logging
import random
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from core.errors import ToyWorldError
from toyworld.base import PretrainSettings, collate, encode, pretrain, student_segments, teacher_segments
from toyworld.tasks import FAMILIES, split_pairs

logger = logging.getLogger(__name__)

STUDENT_FORMAT_AT_LEAST = {"addition": 0.90}
"""From the question alone the checkpoint solves the family the recipes train: it knows what the
base student doesn't."""


@dataclasses.dataclass(frozen=True)
class TeacherSettings:
    steps: int = 600
    batch: int = 64
    lr: float = 1e-3
    warmup: int = 20
    student_fraction: float = 0.75
    """Share of each batch in the student format (every training problem); the rest in the teacher format."""
    seed: int = 1


class StrongMixture:
    """Batches of the families' training problems (never their eval splits), mostly in the student format."""

    def __init__(self, tokenizer, train_pairs: dict[str, list[tuple[int, int]]], settings: TeacherSettings):
        self.tokenizer, self.settings, self.train = tokenizer, settings, train_pairs
        self.rng = random.Random(settings.seed)

    def batch(self) -> dict[str, torch.Tensor]:
        sequences = []
        for _ in range(self.settings.batch):
            family = FAMILIES[self.rng.choice(sorted(self.train))]
            pair = self.rng.choice(self.train[family.name])
            segments = student_segments if self.rng.random() < self.settings.student_fraction else teacher_segments
            sequences.append(encode(self.tokenizer, segments(family, *pair)))
        return collate(sequences, self.tokenizer.pad_token_id)


def _record(base_dir: Path, settings: TeacherSettings) -> dict:
    """What the checkpoint is built from: the base's own record and this module's code and settings."""
    base = json.loads((base_dir / "settings.json").read_text())
    base.pop("seconds", None)
    code = hashlib.sha256(Path(__file__).read_bytes()).hexdigest()[:16]
    return {"base": base, "code": code, **dataclasses.asdict(settings)}


def is_built(base_dir: Path, settings: TeacherSettings) -> bool:
    out = base_dir / "teacher"
    try:
        recorded = json.loads((out / "settings.json").read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return False
    recorded.pop("seconds", None)
    return recorded == _record(base_dir, settings) and (out / "prepare.json").is_file()


def broken_promises(results: dict[str, dict[str, float]]) -> list[str]:
    return [f"{name}: student-format accuracy {results[name]['student_accuracy']:.1%} < {floor:.0%}"
            for name, floor in STUDENT_FORMAT_AT_LEAST.items() if results[name]["student_accuracy"] < floor]


def build_strong_teacher(base_dir: str | Path, settings: TeacherSettings = TeacherSettings(),
                         force: bool = False) -> dict[str, dict[str, float]]:
    """Builds (or reuses) `base_dir/teacher/` from the toy world in `base_dir` (built first by
    `toyworld.prepare.prepare`); returns its per-family accuracies. A checkpoint that breaks
    STUDENT_FORMAT_AT_LEAST raises ToyWorldError and is left unfinished (no prepare.json)."""
    from toyworld.prepare import PRETRAIN_THREADS, save_and_evaluate  # as the base's build
    base_dir = Path(base_dir)
    out = base_dir / "teacher"
    if not (base_dir / "prepare.json").is_file():
        raise ToyWorldError(f"{base_dir} holds no finished toy world: run `selfdistill toy prepare --out {base_dir}` first")
    if not force and is_built(base_dir, settings):
        logger.info("%s is already built with these settings; reusing it", out)
        return json.loads((out / "prepare.json").read_text())
    started = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    (out / "prepare.json").unlink(missing_ok=True)
    threads = torch.get_num_threads()
    torch.set_num_threads(PRETRAIN_THREADS)
    try:
        torch.manual_seed(settings.seed)
        tokenizer = AutoTokenizer.from_pretrained(base_dir / "model")
        model = AutoModelForCausalLM.from_pretrained(base_dir / "model")
        train_pairs = {name: split_pairs(family, _base_seed(base_dir))[0] for name, family in FAMILIES.items()}
        schedule = PretrainSettings(steps=settings.steps, batch=settings.batch, lr=settings.lr, warmup=settings.warmup)
        logger.info("training the stronger toy checkpoint for %d steps", settings.steps)
        pretrain(model, StrongMixture(tokenizer, train_pairs, settings), schedule)
        results = save_and_evaluate(model, tokenizer, out / "model", base_dir / "data")
    finally:
        torch.set_num_threads(threads)
    broken = broken_promises(results)
    if broken:
        raise ToyWorldError(f"the stronger toy checkpoint in {out} breaks its promise ({'; '.join(broken)}); its "
                            "files are kept for a look, unfinished (no prepare.json)")
    seconds = round(time.perf_counter() - started, 1)
    (out / "settings.json").write_text(json.dumps({**_record(base_dir, settings), "seconds": seconds}, indent=1))
    (out / "prepare.json").write_text(json.dumps(results, indent=1))
    return results


def _base_seed(base_dir: Path) -> int:
    """The seed the base's splits were drawn with: the stronger checkpoint trains on the same split."""
    return json.loads((base_dir / "settings.json").read_text())["seed"]
