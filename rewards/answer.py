"""Answer matching: exact text or equal numbers for plain answers (such as the toy world's), after
extracting a final answer from common formats; TRL's `accuracy_reward` (math-verify) for math,
which handles \\boxed{}, LaTeX and equivalent forms."""

import functools
import re

BOXED = re.compile(r"\\boxed\{((?:[^{}]|\{[^{}]*\})*)\}")
MARKED = re.compile(r"(?:####|(?:final answer|answer)\s*(?:is)?\s*[:=]?)\s*(.+)", re.IGNORECASE)
NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?|-?\.\d+")


def completion_text(completion) -> str:
    """TRL's convention: a completion is a string, or a list of chat messages whose last one is the answer."""
    if isinstance(completion, list):
        return completion[-1]["content"] if completion else ""
    return completion


def _as_number(text: str) -> float | None:
    try:
        return float(text.replace(",", ""))
    except ValueError:
        return None


def final_answer(text: str) -> str | None:
    """The final answer stated in `text`: the last \\boxed{...}, else what follows the last '####' or
    'answer is' / 'Answer:', else the last number; None when there is none. Trailing periods and
    $ signs are dropped."""
    for pattern in (BOXED, MARKED):
        found = pattern.findall(text)
        if found:
            return found[-1].strip().strip("$").rstrip(".").strip()
    numbers = NUMBER.findall(text)
    return numbers[-1] if numbers else None


def _same(got: str, want: str) -> bool:
    if got == want:
        return True
    a, b = _as_number(got), _as_number(want)
    return a is not None and b is not None and a == b


def is_match(completion: str, answer: str) -> bool:
    """True when the completion, or the final answer extracted from it, equals the answer as text or
    as a number ("12.0" == "12", "1,000" == "1000")."""
    got, want = completion.strip(), answer.strip()
    if _same(got, want):
        return True
    extracted = final_answer(got)
    return extracted is not None and _same(extracted, want)


@functools.cache
def load_math_verify():
    """TRL's accuracy_reward, or None without math-verify. Its import takes about a second (sympy):
    `rewards.resolve` calls this before a run starts, so no training step pays for it."""
    from trl.import_utils import is_math_verify_available
    if not is_math_verify_available():
        return None
    from trl.rewards import accuracy_reward
    return accuracy_reward


def _math_verify(texts: list[str], answers: list[str]) -> list[float | None]:
    """TRL's accuracy_reward (math-verify); None where math-verify is not installed or the gold
    answer does not parse."""
    accuracy_reward = load_math_verify()
    if accuracy_reward is None:
        return [None] * len(texts)
    return accuracy_reward([[{"role": "assistant", "content": t}] for t in texts], answers)


def answer_match(prompts, completions, answer=None, feedback=None, **columns) -> list[float | None]:
    """1.0 for a matching answer, 0.0 otherwise; None (skip) where a record has no answer.

    Plain matching first; what it rejects goes to math-verify, which accepts equivalent forms
    (\\boxed{\\frac{1}{2}} for 0.5). With the `feedback` side channel, a wrong answer gets a note
    naming what was extracted."""
    answers = answer if answer is not None else [None] * len(completions)
    texts = [completion_text(c) for c in completions]
    scores = [None if want is None else float(is_match(text, want)) for text, want in zip(texts, answers, strict=True)]
    # Two plain numbers that differ are different to math-verify too; it costs ~1 ms an answer,
    # which on a tiny model's step is more than the rest of the driver's work.
    retry = [i for i, s in enumerate(scores)
             if s == 0.0 and not (NUMBER.fullmatch(texts[i].strip()) and NUMBER.fullmatch(answers[i].strip()))]
    if retry:
        for i, verified in zip(retry, _math_verify([texts[i] for i in retry], [answers[i] for i in retry])):
            if verified:
                scores[i] = 1.0
    if feedback is not None:
        for i, score in enumerate(scores):
            if score == 0.0:
                got = final_answer(texts[i])
                feedback[i] = "The previous answer had no final answer." if got is None else \
                    f"The previous answer {got} is wrong."
    return scores
