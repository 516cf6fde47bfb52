"""`code_tests`: runs model-written code against the example's tests, only inside `rewards.sandbox`."""

import os
import re
from concurrent.futures import ThreadPoolExecutor

from rewards.answer import completion_text
from rewards.sandbox import Limits, run_python

FENCE = re.compile(r"```(?:python|py|python3)?[ \t]*\n(.*?)```", re.DOTALL)


def extract_code(text: str) -> str:
    """The last fenced code block (```python ... ```), or the whole text when there is none."""
    blocks = FENCE.findall(text)
    return blocks[-1] if blocks else text


def code_tests(prompts, completions, tests=None, feedback=None, limits: Limits = Limits(), **columns) -> list[float | None]:
    """1.0 when the completion's code followed by the record's `tests` column (Python that raises on a
    failure, e.g. asserts) exits with status 0 in the sandbox; 0.0 otherwise, with the sandbox's reason
    as feedback; None where a record has no tests. Runs up to 4 sandboxes at a time."""
    if tests is None:
        return [None] * len(completions)
    programs = [None if t is None else extract_code(completion_text(c)) + "\n\n" + t
                for c, t in zip(completions, tests, strict=True)]
    todo = [i for i, p in enumerate(programs) if p is not None]
    with ThreadPoolExecutor(max_workers=max(1, min(4, os.cpu_count() or 1))) as pool:
        results = dict(zip(todo, pool.map(lambda i: run_python(programs[i], limits=limits), todo)))
    scores = []
    for i in range(len(completions)):
        if i not in results:
            scores.append(None)
            continue
        result = results[i]
        scores.append(1.0 if result.ok else 0.0)
        if feedback is not None and not result.ok:
            feedback[i] = f"The tests failed: {result.reason}"
    return scores
