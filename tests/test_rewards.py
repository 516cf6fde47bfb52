import pytest

from core.errors import ConfigError
from rewards import BUILTIN, resolve
from rewards.answer import answer_match, final_answer, is_match
from rewards.code import code_tests, extract_code
from rewards.format import format_reward, make_format_reward
from rewards.sandbox import Limits


def test_exact_and_numeric_matches():
    assert is_match(" 132\n", "132") and is_match("12.0", "12") and is_match("1,000", "1000")
    assert not is_match("133", "132") and not is_match("", "132") and not is_match("abc", "132")


@pytest.mark.parametrize("text, answer", [
    ("So 47+85=132", "132"), ("The answer is 132.", "132"), ("Answer: 1,320", "1320"), ("... #### 72", "72"),
    ("We get \\boxed{132}", "132"), ("Final answer: $-3.5$", "-3.5"),
])
def test_final_answer_extraction(text, answer):
    assert is_match(text, answer)


def test_final_answer_takes_the_last_statement():
    assert final_answer("first 12, then 13") == "13" and final_answer("no digits") is None
    assert final_answer("\\boxed{1} and then \\boxed{\\frac{1}{2}}") == "\\frac{1}{2}"


def test_math_answers_go_through_math_verify():
    completions = ["The result is $\\boxed{\\frac{1}{2}}$", "so \\boxed{0.5}", "\\boxed{\\frac{1}{3}}"]
    assert answer_match(["p"] * 3, completions, answer=["0.5", "\\frac{1}{2}", "\\frac{1}{2}"]) == [1.0, 1.0, 0.0]


def test_plain_numbers_are_settled_without_math_verify(monkeypatch):
    consulted = []
    monkeypatch.setattr("rewards.answer._math_verify", lambda texts, answers: consulted.extend(texts) or [None] * len(texts))
    assert answer_match(["p"] * 4, ["104", " -3.5\n", "1,000", "10^2+4"], answer=["105", "-3.4", "1001", "104"]) == [0.0] * 4
    assert consulted == ["10^2+4"]  # not a plain number: math-verify may read it as an expression


def test_trl_convention_with_chat_completions_and_missing_answers():
    completions = ["132", [{"role": "assistant", "content": "7"}], "5"]
    assert answer_match(["p"] * 3, completions, answer=["132", "8", None]) == [1.0, 0.0, None]
    assert answer_match(["p"], ["1"]) == [None]
    feedback = [None, None]
    answer_match(["p"] * 2, ["132", "it is 131"], answer=["132", "132"], feedback=feedback)
    assert feedback == [None, "The previous answer 131 is wrong."]
    assert BUILTIN["answer_match"] is answer_match


def test_format_rewards():
    assert format_reward(["p"] * 3, ["132", "\\boxed{x}", "no answer"]) == [1.0, 1.0, 0.0]
    think = make_format_reward(r"^<think>.*</think>", max_chars=20)
    assert think(["p"] * 3, ["<think>a</think>1", "<think>" + "a" * 30 + "</think>", "1"]) == [1.0, 0.0, 0.0]


def test_code_tests_scores_in_the_sandbox_with_feedback():
    completions = ["```python\ndef add(a, b):\n    return a + b\n```", "def add(a, b):\n    return a - b",
                   "```python\ndef add(a, b):\n    while True: pass\n```", "anything"]
    tests = ["assert add(2, 3) == 5"] * 3 + [None]
    feedback = [None] * 4
    scores = code_tests(["p"] * 4, completions, tests=tests, feedback=feedback,
                        limits=Limits(wall_s=120, cpu_s=1))
    assert scores == [1.0, 0.0, 0.0, None]
    assert feedback[0] is None and feedback[1].startswith("The tests failed: exit status 1: AssertionError")
    assert feedback[2] == "The tests failed: cpu time limit"
    assert code_tests(["p"], ["x"]) == [None]
    assert extract_code("text\n```py\nA\n```\nmore\n```python\nB\n```") == "B\n"


def test_resolve_builtin_and_dotted_paths_including_trls_own():
    functions = resolve(["answer_match", "format", "code_tests", "trl.rewards:think_format_reward"])
    assert list(functions) == ["answer_match", "format", "code_tests", "think_format_reward"]
    think = functions["think_format_reward"]
    assert think(completions=[[{"role": "assistant", "content": "<think>\nhm\n</think>\n1"}]], feedback=[None]) == [1.0]


@pytest.mark.parametrize("name, message", [
    ("answer_mtch", "unknown reward"), ("nosuch.module:fn", "cannot import"), ("rewards.answer:nosuch", "cannot import"),
    ("rewards.answer:BOXED", "not callable"),
])
def test_resolve_errors(name, message):
    with pytest.raises(ConfigError, match=message):
        resolve([name])
