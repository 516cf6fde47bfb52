from rewards import BUILTIN
from rewards.answer import answer_match, is_match


def test_exact_and_numeric_matches():
    assert is_match(" 132\n", "132") and is_match("12.0", "12") and is_match("1,000", "1000")
    assert not is_match("133", "132") and not is_match("", "132") and not is_match("abc", "132")


def test_trl_convention_with_chat_completions_and_missing_answers():
    completions = ["132", [{"role": "assistant", "content": "7"}], "5"]
    assert answer_match(["p"] * 3, completions, answer=["132", "8", None]) == [1.0, 0.0, None]
    assert answer_match(["p"], ["1"]) == [None]
    assert BUILTIN["answer_match"] is answer_match
