"""The toy world's task families: two-digit arithmetic whose digits interact through carries and
borrows. Every example has a question (the student's prompt), a privileged context (a worked
solution, column by column, as a demonstration or reference solution looks in the papers) and the
answer. Splits and files are a pure function of the seed.
"""

import json
import random
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

TEACHER_TEMPLATE = "{context}\n{prompt}"
"""The toy teacher prompt: the worked solution on the line before the same question."""

EVAL_FRACTION = 0.1

STUDENT_ONES_PAIRS = frozenset(random.Random("P").sample([(a0, b0) for a0 in range(10) for b0 in range(10)], 22))
"""The ones-digit pairs (a % 10, b % 10) of the problems the base student is pretrained on in the
student format: 22 of the 100, drawn once, with and without a carry or borrow. A problem is in the
student's partial skill by its ones column, not by whether its columns interact: so the skill the
student starts with (the whole column-and-carry computation, for some digit pairs) is part of the
skill it must grow (the same computation for the other pairs), and learning the rest adds to it
instead of rebuilding it. With "no carry" as the partial skill, both divergences first destroyed
it (the circuit has to be rebuilt to carry), and where the curve climbed back depended on the CPU."""


def _addition_steps(a: int, b: int) -> tuple[str, bool]:
    if a < 10 and b < 10:
        return f"{a}+{b}={a + b}", a + b >= 10
    (a1, a0), (b1, b0) = divmod(a, 10), divmod(b, 10)
    ones = a0 + b0
    carry = ones // 10
    tens = f"{a1}+{b1}+1={a1 + b1 + 1}" if carry else f"{a1}+{b1}={a1 + b1}"
    return f"{a0}+{b0}={ones},{tens}", bool(carry or a1 + b1 >= 10)


def _subtraction_steps(a: int, b: int) -> tuple[str, bool]:
    if a < 10 and b < 10:
        return f"{a}-{b}={a - b}", False
    (a1, a0), (b1, b0) = divmod(a, 10), divmod(b, 10)
    borrow = a0 < b0
    ones = f"{a0 + 10}-{b0}={a0 + 10 - b0}" if borrow else f"{a0}-{b0}={a0 - b0}"
    tens = f"{a1}-{b1}-1={a1 - b1 - 1}" if borrow else f"{a1}-{b1}={a1 - b1}"
    return f"{ones},{tens}", borrow


@dataclass(frozen=True)
class Family:
    """A task family: which operand pairs exist, the operator, its answer, and its worked steps.
    `steps` returns the column-by-column text and whether a carry or borrow crosses columns."""

    name: str
    op: str
    answer: Callable[[int, int], int]
    steps: Callable[[int, int], tuple[str, bool]]
    valid: Callable[[int, int], bool]

    def pairs(self, lo: int, hi: int) -> list[tuple[int, int]]:
        return [(a, b) for a in range(lo, hi) for b in range(lo, hi) if self.valid(a, b)]

    def example(self, a: int, b: int) -> dict:
        steps, _ = self.steps(a, b)
        question = f"{a}{self.op}{b}"
        return {
            "id": f"{self.name}-{a}-{b}",
            "prompt": f"Q:{question}=",
            "context": f"W:{question}:{steps},{self.answer(a, b)}",
            "answer": str(self.answer(a, b)),
            "task": self.name,
        }

    def student_pretrained(self, a: int, b: int) -> bool:
        """True when the base student saw problems like this one (its ones-digit pair) in the student format."""
        return (a % 10, b % 10) in STUDENT_ONES_PAIRS

    def interacts(self, a: int, b: int) -> bool:
        """True when a carry or borrow links the digits."""
        return self.steps(a, b)[1]


FAMILIES = {
    "addition": Family("addition", "+", lambda a, b: a + b, _addition_steps, lambda a, b: True),
    "subtraction": Family("subtraction", "-", lambda a, b: a - b, _subtraction_steps, lambda a, b: a >= b),
}


def in_student_skill(record: dict) -> bool:
    """True when the base student was pretrained on problems like this toy record (by its id)."""
    family, a, b = record["id"].rsplit("-", 2)
    return FAMILIES[family].student_pretrained(int(a), int(b))


def split_pairs(family: Family, seed: int) -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
    """Two-digit problems, shuffled by seed, as (train, eval) with EVAL_FRACTION held out."""
    pairs = family.pairs(10, 100)
    random.Random(f"{seed}:{family.name}").shuffle(pairs)
    n_eval = round(len(pairs) * EVAL_FRACTION)
    return pairs[n_eval:], pairs[:n_eval]


def write_jsonl(path: Path, records: list[dict]):
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as f:
        for record in records:
            f.write(json.dumps(record, ensure_ascii=False) + "\n")


def write_task_files(data_dir: Path, seed: int) -> dict[str, dict[str, Path]]:
    """Writes `<data_dir>/<family>/{train,eval}.jsonl` for every family; returns their paths."""
    paths = {}
    for name, family in FAMILIES.items():
        train, held_out = split_pairs(family, seed)
        paths[name] = {}
        for split, pairs in (("train", train), ("eval", held_out)):
            path = data_dir / name / f"{split}.jsonl"
            write_jsonl(path, [family.example(a, b) for a, b in pairs])
            paths[name][split] = path
    return paths
