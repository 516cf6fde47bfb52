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
