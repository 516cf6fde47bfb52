"""`selfdistill toy prepare --out DIR`: build the toy world from nothing.

DIR/
  data/<family>/{train,eval}.jsonl   seeded tasks, read by the trainer like any user data
  model/                             tokenizer + pretrained Qwen2 (save_pretrained format)
  prepare.json                       {family: {"teacher_accuracy": .., "student_accuracy": ..}}
  settings.json                      what was built, and how long it took; a rerun with the same
                                     settings reuses DIR instead of building again
"""

import dataclasses
import hashlib
import json
import logging
import shutil
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, Qwen2ForCausalLM

from core.errors import ToyWorldError
from toyworld.base import Mixture, PretrainSettings, format_accuracy, model_config, pretrain
from toyworld.tasks import FAMILIES, split_pairs, write_task_files
from toyworld.tokenizer import build_tokenizer
from trainer.data.records import load_examples

logger = logging.getLogger(__name__)

PREPARE_VERSION = 3  # bump when the recipe changes, so cached toy worlds are rebuilt

PRETRAIN_THREADS = 2
"""torch threads of the pretraining, whatever the machine has: a CPU's kernels split a matmul's sums
by thread, so another count takes another numerical path and gives another base model."""

# What builds the toy world: its code (and the answer check its accuracies use) and the packages
# whose kernels and defaults shape the model; a change to any of them rebuilds a cached toy world.
BUILD_SOURCES = [Path(__file__).parent / name for name in ("base.py", "tasks.py", "tokenizer.py", "prepare.py")] + [
    Path(__file__).parents[1] / "rewards" / "answer.py", Path(__file__).parents[1] / "trainer" / "data" / "records.py"]
BUILD_PACKAGES = ("torch", "transformers", "tokenizers")


TEACHER_AT_LEAST = 0.95
"""Every family: shown the worked solution, the base solves the problems (the papers' teacher)."""
STUDENT_AT_MOST = 0.30
"""Every family: from the question alone, the base solves only part of the problems (those of its
pretrained ones-digit pairs, about half of them): there is a skill to grow."""


def broken_promises(results: dict[str, dict[str, float]]) -> list[str]:
    """The accuracies of a build that break TEACHER_AT_LEAST or STUDENT_AT_MOST, in words."""
    broken = []
    for name, r in results.items():
        if r["teacher_accuracy"] < TEACHER_AT_LEAST:
            broken.append(f"{name}: teacher-format accuracy {r['teacher_accuracy']:.1%} < {TEACHER_AT_LEAST:.0%}")
        if r["student_accuracy"] > STUDENT_AT_MOST:
            broken.append(f"{name}: student-format accuracy {r['student_accuracy']:.1%} > {STUDENT_AT_MOST:.0%}")
    return broken


def build_fingerprint() -> dict:
    """The code and package versions a toy world was built with."""
    from importlib.metadata import version
    code = hashlib.sha256(b"".join(path.read_bytes() for path in BUILD_SOURCES)).hexdigest()[:16]
    return {"code": code, "packages": {name: version(name) for name in BUILD_PACKAGES}}


def _settings_record(settings: PretrainSettings, size: str) -> dict:
    return {"version": PREPARE_VERSION, "size": size, **dataclasses.asdict(settings), "built_by": build_fingerprint()}


def is_prepared(out: Path, settings: PretrainSettings, size: str = "toy") -> bool:
    try:
        recorded = json.loads((out / "settings.json").read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return False
    recorded.pop("seconds", None)
    return recorded == _settings_record(settings, size) and (out / "prepare.json").is_file()


def evaluate(model: Qwen2ForCausalLM, tokenizer, data_dir: Path) -> dict[str, dict[str, float]]:
    """Greedy accuracy on each family's held-out split, read back through the trainer's data loader."""
    results = {}
    for name in FAMILIES:
        examples, _ = load_examples(data_dir / name / "eval.jsonl")
        records = [dataclasses.asdict(e) for e in examples]
        results[name] = {"teacher_accuracy": format_accuracy(model, tokenizer, records, teacher=True),
                         "student_accuracy": format_accuracy(model, tokenizer, records, teacher=False)}
    return results


def prepare(out: str | Path, settings: PretrainSettings = PretrainSettings(), size: str = "toy",
            force: bool = False, promises: bool = True) -> dict[str, dict[str, float]]:
    """Builds (or reuses) the toy world in `out`; returns the per-family accuracies. With `promises`
    (the calibrated recipe; a reduced build turns it off), a base that breaks one raises
    ToyWorldError and the build is left unfinished, so the next call builds it again."""
    out = Path(out)
    if not force and is_prepared(out, settings, size):
        logger.info("%s is already prepared with these settings; reusing it", out)
        return json.loads((out / "prepare.json").read_text())
    started = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    (out / "prepare.json").unlink(missing_ok=True)  # written last: its presence marks a finished build
    torch.manual_seed(settings.seed)
    threads = torch.get_num_threads()
    torch.set_num_threads(PRETRAIN_THREADS)
    try:
        results = _build(out, settings, size)
    finally:
        torch.set_num_threads(threads)
    seconds = round(time.perf_counter() - started, 1)
    broken = broken_promises(results) if promises else []
    if broken:
        raise ToyWorldError(f"the toy world built in {out} breaks its promises ({'; '.join(broken)}); its files are "
                            "kept for a look, unfinished (no prepare.json). The base depends on the CPU's kernels: "
                            "please report the CPU and these numbers")
    (out / "settings.json").write_text(json.dumps({**_settings_record(settings, size), "seconds": seconds}, indent=1))
    (out / "prepare.json").write_text(json.dumps(results, indent=1))
    return results


def _build(out: Path, settings: PretrainSettings, size: str) -> dict[str, dict[str, float]]:
    tokenizer = build_tokenizer()
    write_task_files(out / "data", settings.seed)
    train_pairs = {name: split_pairs(family, settings.seed)[0] for name, family in FAMILIES.items()}
    model = Qwen2ForCausalLM(model_config(tokenizer, size))
    logger.info("pretraining a %.0fk-parameter Qwen2 for %d steps", model.num_parameters() / 1e3, settings.steps)
    pretrain(model, Mixture(tokenizer, train_pairs, settings), settings)

    return save_and_evaluate(model, tokenizer, out / "model", out / "data")


def save_and_evaluate(model, tokenizer, model_dir: Path, data_dir: Path) -> dict[str, dict[str, float]]:
    """Saves the model and tokenizer into `model_dir` (whole or not at all: staged, then renamed),
    then evaluates the files as saved, loaded the way users and vLLM load them."""
    staging = model_dir.with_name(model_dir.name + ".tmp")
    shutil.rmtree(staging, ignore_errors=True)
    model.save_pretrained(staging)
    tokenizer.save_pretrained(staging)
    shutil.rmtree(model_dir, ignore_errors=True)
    staging.rename(model_dir)
    return evaluate(AutoModelForCausalLM.from_pretrained(model_dir), AutoTokenizer.from_pretrained(model_dir), data_dir)


def summary(results: dict[str, dict[str, float]]) -> str:
    return "\n".join(f"{name:<12} teacher-format accuracy {r['teacher_accuracy']:6.1%}   "
                     f"student-format accuracy {r['student_accuracy']:6.1%}" for name, r in results.items())
