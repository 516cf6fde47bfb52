"""Answer matching for plain answers such as the toy world's: exact text, or equal numbers."""


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


def is_match(completion: str, answer: str) -> bool:
    """True when the stripped completion equals the answer, as text or as a number ("12.0" == "12")."""
    got, want = completion.strip(), answer.strip()
    if got == want:
        return True
    a, b = _as_number(got), _as_number(want)
    return a is not None and b is not None and a == b


def answer_match(prompts, completions, answer=None, **columns) -> list[float | None]:
    """Reward 1.0 for a matching answer, 0.0 otherwise; None (skip) where a record has no answer."""
    answers = answer if answer is not None else [None] * len(completions)
    return [None if want is None else float(is_match(completion_text(c), want))
            for c, want in zip(completions, answers, strict=True)]
