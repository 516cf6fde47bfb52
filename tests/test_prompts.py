from rollout.prompts import encode_prompt, teacher_prompt
from toyworld.tasks import TEACHER_TEMPLATE
from toyworld.tokenizer import build_tokenizer
from trainer.config import DEFAULT_TEACHER_TEMPLATE


def test_text_prompts_get_the_context_through_the_template():
    assert teacher_prompt("Q:1+2=", "W:1+2:1+2=3,3", TEACHER_TEMPLATE) == "W:1+2:1+2=3,3\nQ:1+2="
    text = teacher_prompt("What is 2+2?", "2+2=4", DEFAULT_TEACHER_TEMPLATE)
    assert text.startswith("What is 2+2?") and "2+2=4" in text


def test_chat_prompts_rewrite_only_the_last_user_turn():
    chat = [{"role": "system", "content": "S"}, {"role": "user", "content": "first"},
            {"role": "assistant", "content": "A"}, {"role": "user", "content": "Q:1+2="}]
    out = teacher_prompt(chat, "W", "{context}\n{prompt}")
    assert out[:3] == chat[:3] and out[3] == {"role": "user", "content": "W\nQ:1+2="}
    assert chat[3]["content"] == "Q:1+2="  # the student's prompt is not modified


def test_encoding_through_the_chat_template():
    tokenizer = build_tokenizer()
    plain = encode_prompt("Q:1+2=", tokenizer)
    assert encode_prompt([{"role": "user", "content": "Q:1+2="}], tokenizer) == plain
    assert tokenizer.decode(plain) == "Q:1+2="


def test_prompts_that_leave_no_room_for_the_completion_name_file_line_and_field(tmp_path):
    import json

    import pytest

    from core.errors import DataError
    from trainer.data.prompts import drop_overlong, encode_prompts
    from trainer.data.records import load_examples
    tokenizer = build_tokenizer()
    rows = [{"id": "short", "prompt": "Q:1+2=", "context": "W:3"},
            {"id": "long-q", "prompt": "Q:" + "1+" * 20 + "2=", "context": "W:3"},
            {"id": "long-c", "prompt": "Q:1+2=", "context": "W:" + "1" * 40}]
    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    examples, report = load_examples(path)
    encoded = encode_prompts(examples, tokenizer, TEACHER_TEMPLATE)
    student, teacher = len(encoded.student["short"]), len(encoded.teacher["short"])
    budget = max(student, teacher) + 8  # exactly room for the short record's prompts and 8 tokens
    with pytest.raises(DataError) as e:
        drop_overlong(examples, encoded, max_model_len=budget, max_tokens=8, on_invalid="error", report=report)
    assert str(e.value) == (f"{path}:2: field 'prompt': the student prompt is {len(encoded.student['long-q'])} tokens; "
                            f"with rollout.max_tokens=8 it does not fit model.max_model_len={budget}")
    kept = drop_overlong(examples, encoded, max_model_len=budget, max_tokens=8, on_invalid="skip", report=report)
    assert [e.id for e in kept] == ["short"] and report.kept == 1 and len(report.skipped) == 2
    assert report.skipped[1].startswith(f"{path}:3: field 'context': the teacher prompt is")
    with pytest.raises(DataError, match="no valid records"):
        drop_overlong(kept, encoded, max_model_len=budget - 1, max_tokens=8, on_invalid="skip", report=report)
