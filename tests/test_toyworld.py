import json
import re
import subprocess
import sys

import pytest
import ray
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from conftest import ROOT
from toyworld.base import PretrainSettings, greedy_completions, model_config
from toyworld.prepare import broken_promises, build_fingerprint, is_prepared, prepare
from toyworld.tasks import FAMILIES, TEACHER_TEMPLATE, split_pairs, write_task_files
from toyworld.tokenizer import CHARACTERS, build_tokenizer
from trainer.data.records import load_examples


def check_worked_solution(example: dict):
    """Every column step is true arithmetic, and the worked solution ends in the answer."""
    head, _, body = example["context"].rpartition(":")
    *steps, final = body.split(",")
    assert final == example["answer"] == str(eval(head[2:]))
    for step in steps:
        lhs, rhs = step.split("=")
        assert eval(lhs) == int(rhs), step


@pytest.mark.parametrize("name", list(FAMILIES))
def test_every_worked_solution_is_correct(name):
    family = FAMILIES[name]
    for a, b in family.pairs(0, 100):
        check_worked_solution(family.example(a, b))


def test_carries_and_borrows_are_detected():
    assert FAMILIES["addition"].interacts(47, 85) and FAMILIES["addition"].interacts(90, 90)
    assert not FAMILIES["addition"].interacts(21, 13)
    assert FAMILIES["subtraction"].interacts(85, 47) and not FAMILIES["subtraction"].interacts(85, 43)


def test_task_files_are_seeded_and_splits_disjoint(tmp_path):
    a = write_task_files(tmp_path / "a", seed=3)
    b = write_task_files(tmp_path / "b", seed=3)
    c = write_task_files(tmp_path / "c", seed=4)
    for name in FAMILIES:
        for split in ("train", "eval"):
            assert a[name][split].read_bytes() == b[name][split].read_bytes()
            assert a[name][split].read_bytes() != c[name][split].read_bytes()
        train, _ = load_examples(a[name]["train"])
        held_out, _ = load_examples(a[name]["eval"])
        assert not {e.prompt for e in train} & {e.prompt for e in held_out}
        assert len(held_out) == round(0.1 * (len(train) + len(held_out)))
    assert len(split_pairs(FAMILIES["addition"], 0)[0]) == 7290


def test_tokenizer_round_trips_and_reloads(tmp_path):
    tokenizer = build_tokenizer()
    text = "W:47+85:7+5=12,4+8+1=13,132\nQ:47+85="
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert len(ids) == len(text) and tokenizer.decode(ids) == text
    assert len(tokenizer) == len(CHARACTERS) + 3
    tokenizer.save_pretrained(tmp_path)
    model_config(tokenizer).save_pretrained(tmp_path)  # AutoTokenizer picks its class by the model type
    loaded = AutoTokenizer.from_pretrained(tmp_path)
    assert loaded(text, add_special_tokens=False)["input_ids"] == ids
    assert loaded.decode(ids + [loaded.eos_token_id], skip_special_tokens=True) == text
    assert loaded.eos_token == "<eos>" and loaded.pad_token == "<pad>"
    chat = loaded.apply_chat_template([{"role": "user", "content": "Q:1+2="}], tokenize=False, add_generation_prompt=True)
    assert chat == "Q:1+2="


def test_reduced_prepare_is_deterministic_whatever_the_threads_and_cached_by_its_code(tmp_path):
    settings = PretrainSettings(steps=15)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        results = prepare(tmp_path / "a", settings, promises=False)
        torch.set_num_threads(3)
        prepare(tmp_path / "b", settings, promises=False)
    finally:
        torch.set_num_threads(threads)
    assert torch.get_num_threads() == threads  # the pretraining's own count does not leak
    for path in ["model/model.safetensors", "model/tokenizer.json", "data/addition/train.jsonl",
                 "data/subtraction/eval.jsonl", "prepare.json"]:
        assert (tmp_path / "a" / path).read_bytes() == (tmp_path / "b" / path).read_bytes(), path
    assert set(results) == set(FAMILIES)
    assert json.loads((tmp_path / "a" / "prepare.json").read_text()) == results
    for accuracy in results.values():
        assert set(accuracy) == {"teacher_accuracy", "student_accuracy"}
    weights = tmp_path / "a" / "model" / "model.safetensors"
    stamp = weights.stat().st_mtime_ns
    assert prepare(tmp_path / "a", settings, promises=False) == results and weights.stat().st_mtime_ns == stamp
    # built by other code or other package versions: a stale cache, rebuilt
    recorded = json.loads((tmp_path / "a" / "settings.json").read_text())
    assert recorded["built_by"] == build_fingerprint()
    for stale in ({"code": "0" * 16}, {"packages": {**recorded["built_by"]["packages"], "torch": "2.0.0"}}):
        (tmp_path / "a" / "settings.json").write_text(json.dumps(recorded | {"built_by": recorded["built_by"] | stale}))
        assert not is_prepared(tmp_path / "a", settings)
    assert (tmp_path / "a" / "model" / "model.safetensors").read_bytes() == (tmp_path / "b" / "model" / "model.safetensors").read_bytes()


def test_prepare_cli_prints_and_writes_accuracies(tmp_path):
    result = subprocess.run([sys.executable, "-m", "trainer.cli", "toy", "prepare", "--out", str(tmp_path), "--steps", "5"],
                            capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert result.returncode == 0, result.stderr
    printed = dict(re.findall(r"^(\w+)\s+teacher-format accuracy\s+([\d.]+)%", result.stdout, re.M))
    written = json.loads((tmp_path / "prepare.json").read_text())
    assert printed.keys() == written.keys() == FAMILIES.keys()
    for name, value in printed.items():
        assert float(value) == pytest.approx(100 * written[name]["teacher_accuracy"], abs=0.06)


@pytest.mark.slow
def test_base_model_starts_where_the_papers_start(toy_world):
    """Teacher format >= 95 % and student format <= 30 % on the first family (addition), and a
    partial skill, not none: pretraining seeds 0 to 3 gave 8.3-13.3 % on one machine."""
    results = json.loads((toy_world / "prepare.json").read_text())
    assert results["addition"]["teacher_accuracy"] >= 0.95
    assert 0.05 <= results["addition"]["student_accuracy"] <= 0.30


@pytest.mark.slow
def test_transformers_and_vllm_load_the_base_model_and_agree_greedily(toy_world, vllm_engine):
    model_dir = toy_world / "model"
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    examples, _ = load_examples(toy_world / "data" / "addition" / "eval.jsonl")
    examples = examples[:100]
    prompts = [e.prompt for e in examples] + [TEACHER_TEMPLATE.format(prompt=e.prompt, context=e.context) for e in examples]
    hf = greedy_completions(model, tokenizer, prompts)
    rollouts = ray.get(vllm_engine.generate.remote([tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts],
                                                   [str(i) for i in range(len(prompts))], max_tokens=6, temperature=0.0))
    vllm = tokenizer.batch_decode([r.completion_ids for r in rollouts], skip_special_tokens=True)
    assert vllm == hf
    assert sum(c == e.answer for c, e in zip(hf[100:], examples)) >= 95  # the teacher half is right


def test_a_base_that_breaks_its_promises_is_named_per_family():
    kept = {"addition": {"teacher_accuracy": 1.0, "student_accuracy": 0.133},
            "subtraction": {"teacher_accuracy": 0.99, "student_accuracy": 0.163}}
    assert broken_promises(kept) == []
    broken = {"addition": {"teacher_accuracy": 0.9, "student_accuracy": 0.45},
              "subtraction": {"teacher_accuracy": 0.99, "student_accuracy": 0.31}}
    assert broken_promises(broken) == ["addition: teacher-format accuracy 90.0% < 95%",
                                       "addition: student-format accuracy 45.0% > 30%",
                                       "subtraction: student-format accuracy 31.0% > 30%"]


def test_a_stronger_checkpoint_that_breaks_its_promise_is_left_unfinished(tmp_path):
    """`toy prepare --with-teacher` continues the base until it answers from the question alone; a
    build that doesn't (here: 5 steps on a 5-step base) names the family and stays unfinished."""
    from core.errors import ToyWorldError
    from toyworld.teacher import TeacherSettings, build_strong_teacher, is_built
    with pytest.raises(ToyWorldError, match="holds no finished toy world"):
        build_strong_teacher(tmp_path)
    prepare(tmp_path, PretrainSettings(steps=5), promises=False)
    settings = TeacherSettings(steps=5)
    with pytest.raises(ToyWorldError, match=r"addition: student-format accuracy [\d.]+% < 90%"):
        build_strong_teacher(tmp_path, settings)
    assert (tmp_path / "teacher" / "model" / "model.safetensors").is_file()
    assert not (tmp_path / "teacher" / "prepare.json").exists() and not is_built(tmp_path, settings)
