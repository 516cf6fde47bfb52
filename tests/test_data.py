import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from core.errors import DataError
from trainer.config import ColumnsConfig
from trainer.data.records import fingerprint, load_examples
from trainer.data.sampler import PromptSampler

GOOD = {"id": "a", "prompt": "Q:1+2=", "context": "W:1+2:1+2=3,3", "answer": "3", "task": "addition"}


def write_lines(tmp_path, lines: list, name="d.jsonl"):
    path = tmp_path / name
    path.write_bytes(b"".join((l if isinstance(l, bytes) else json.dumps(l).encode()) + b"\n" for l in lines))
    return path


def test_reads_text_and_chat_prompts(tmp_path):
    chat = {**GOOD, "id": "b", "prompt": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "1+2?"}]}
    path = write_lines(tmp_path, [GOOD, b"", chat, {**GOOD, "id": 7, "answer": 3, "task": None}])
    examples, report = load_examples(path)
    assert [e.id for e in examples] == ["a", "b", "7"]
    assert examples[1].prompt[1] == {"role": "user", "content": "1+2?"}
    assert examples[2].answer == "3" and examples[2].task == "default"
    assert examples[0].where == f"{path}:1" and examples[2].where == f"{path}:4"
    assert report.kept == 3 and report.skipped == []


def test_records_without_ids_are_named_by_file_and_line(tmp_path):
    no_id = {k: v for k, v in GOOD.items() if k != "id"}
    examples, _ = load_examples(write_lines(tmp_path, [no_id, no_id]))
    assert [e.id for e in examples] == ["d.jsonl:1", "d.jsonl:2"]


@pytest.mark.parametrize("bad, message", [
    (b'{"prompt": "x", "context": ', "not valid JSON: Expecting value (column 28)"),
    (b'{"prompt": "\xff\xfe", "context": "c"}', "not valid UTF-8 (byte 0xff at column 13)"),
    (b'["a list"]', "expected a JSON object, got list"),
    ({"context": "c"}, "field 'prompt': missing"),
    ({"prompt": "p"}, "field 'context': missing"),
    ({"prompt": ["x"], "context": "c"}, "field 'prompt': message 0 is not {'role': str, 'content': str}"),
    ({"prompt": [{"role": "robot", "content": "x"}], "context": "c"}, "field 'prompt': message 0 has unknown role 'robot'"),
    ({"prompt": "p", "context": {"a": 1}}, "field 'context': expected a string, got dict"),
    ({"prompt": "p", "context": "   "}, "field 'context': empty string"),
    ({"prompt": "p", "context": "c", "answer": True}, "field 'answer': expected a string, got bool"),
    ({**GOOD}, "field 'id': duplicate id 'a' (first at"),
])
def test_bad_records_name_file_line_and_field(tmp_path, bad, message):
    path = write_lines(tmp_path, [GOOD, {**GOOD, "id": "ok"}, bad])
    with pytest.raises(DataError) as e:
        load_examples(path)
    assert str(e.value).startswith(f"{path}:3: {message}")


def test_skip_mode_counts_and_reports(tmp_path):
    path = write_lines(tmp_path, [GOOD, b"{oops", {"prompt": "p"}, {**GOOD, "id": "b"}])
    examples, report = load_examples(path, on_invalid="skip")
    assert [e.id for e in examples] == ["a", "b"]
    assert report.kept == 2 and len(report.skipped) == 2
    assert report.skipped[0].startswith(f"{path}:2: not valid JSON")
    assert report.skipped[1] == f"{path}:3: field 'context': missing"


def test_nothing_valid_is_an_error(tmp_path):
    with pytest.raises(DataError, match=r"no valid records \(1 skipped\)"):
        load_examples(write_lines(tmp_path, [{"prompt": "p"}]), on_invalid="skip")


def test_missing_file_and_unknown_format(tmp_path):
    with pytest.raises(DataError, match="nope.jsonl: file not found"):
        load_examples(tmp_path / "nope.jsonl")
    (tmp_path / "d.csv").write_text("a,b\n")
    with pytest.raises(DataError, match="unsupported format '.csv'"):
        load_examples(tmp_path / "d.csv")


def test_column_mapping(tmp_path):
    record = {"question": "Q:1+2=", "solution": "W", "final": "3", "uid": "x1"}
    columns = ColumnsConfig(prompt="question", context="solution", answer="final", task=None, id="uid")
    (example,), _ = load_examples(write_lines(tmp_path, [record]), columns)
    assert (example.id, example.prompt, example.context, example.answer, example.task) == ("x1", "Q:1+2=", "W", "3", "default")
    with pytest.raises(DataError, match="field 'solution': missing"):
        load_examples(write_lines(tmp_path, [{"question": "q"}], "e.jsonl"), columns)


def test_parquet_and_datasets_directory(tmp_path):
    import datasets
    rows = [GOOD, {**GOOD, "id": "b", "context": ""}]
    ds = datasets.Dataset.from_list(rows)
    ds.to_parquet(str(tmp_path / "d.parquet"))
    ds.save_to_disk(str(tmp_path / "saved"))
    for path in (tmp_path / "d.parquet", tmp_path / "saved"):
        with pytest.raises(DataError, match=rf"{path}: row 1: field 'context': empty string"):
            load_examples(path)
        examples, report = load_examples(path, on_invalid="skip")
        assert [e.id for e in examples] == ["a"] and len(report.skipped) == 1
    datasets.DatasetDict({"train": ds}).save_to_disk(str(tmp_path / "dict"))
    with pytest.raises(DataError, match=r"holds splits \['train'\]"):
        load_examples(tmp_path / "dict")


def test_fingerprint_is_content_not_location(tmp_path):
    a, _ = load_examples(write_lines(tmp_path, [GOOD], "one.jsonl"))
    b, _ = load_examples(write_lines(tmp_path, [b"", GOOD], "two.jsonl"))
    c, _ = load_examples(write_lines(tmp_path, [{**GOOD, "answer": "4"}], "three.jsonl"))
    assert fingerprint(a) == fingerprint(b) != fingerprint(c)


@settings(max_examples=60, deadline=None)
@given(n=st.integers(1, 40), seed=st.integers(0, 2**31), chunks=st.lists(st.integers(1, 50), min_size=1, max_size=8))
def test_sampler_covers_each_epoch_once_and_resumes_exactly(n, seed, chunks):
    sampler = PromptSampler(n, seed)
    drawn = []
    for size in chunks:
        drawn += sampler.next_indices(size)
    for epoch_start in range(0, len(drawn) - n + 1, n):
        assert sorted(drawn[epoch_start:epoch_start + n]) == list(range(n))
    state = sampler.state_dict()
    resumed = PromptSampler(n, seed=12345)
    resumed.load_state_dict(state)
    assert resumed.next_indices(2 * n) == sampler.next_indices(2 * n)


def test_sampler_is_seeded_and_refuses_a_different_dataset():
    assert PromptSampler(100, 1).next_indices(100) == PromptSampler(100, 1).next_indices(100)
    assert PromptSampler(100, 1).next_indices(100) != PromptSampler(100, 2).next_indices(100)
    with pytest.raises(DataError, match="sampler state is for 100 examples, this dataset has 99"):
        PromptSampler(99, 1).load_state_dict(PromptSampler(100, 1).state_dict())


@pytest.mark.parametrize("bad, message", [
    ({"prompt": "p\ud800", "context": "c"}, "field 'prompt': not valid Unicode (surrogates not allowed at character 2)"),
    ({"prompt": [{"role": "system", "content": "be brief"}], "context": "c"}, "field 'prompt': no 'user' message"),
    ({"prompt": [{"role": "user", "content": " "}], "context": "c"}, "field 'prompt': message 0: empty user content"),
    ({"prompt": "", "context": "c"}, "field 'prompt': empty string"),
    ({"prompt": "p", "context": "c", "id": ""}, "field 'id': empty string"),
    ({"prompt": 5, "context": "c", "id": [1]}, "field 'id': expected a string, got list"),
    (b"[" * 100_000, "not valid JSON: nested too deeply"),
])
def test_more_bad_records(tmp_path, bad, message):
    path = write_lines(tmp_path, [GOOD, bad])
    with pytest.raises(DataError) as e:
        load_examples(path)
    assert str(e.value).startswith(f"{path}:2: {message}")
    examples, report = load_examples(path, on_invalid="skip")
    assert [e.id for e in examples] == ["a"] and report.skipped[0].startswith(f"{path}:2: {message}")


JSON = st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=12),
                    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
                    max_leaves=12)
RECORD = st.fixed_dictionaries({}, optional={k: JSON | st.text(max_size=12) for k in ("id", "prompt", "context", "answer", "task")}) \
    | st.fixed_dictionaries({"prompt": st.lists(st.dictionaries(st.sampled_from(["role", "content", "x"]),
                                                                  st.sampled_from(["user", "system", "robot", "", " hi"]) | JSON,
                                                                  max_size=3), max_size=3),
                             "context": st.text(max_size=5)})


@settings(max_examples=150, deadline=None)
@given(lines=st.lists(st.one_of(st.binary(max_size=40), RECORD.map(lambda r: json.dumps(r).encode()),
                                JSON.map(lambda v: json.dumps(v).encode())), max_size=6),
       on_invalid=st.sampled_from(["error", "skip"]))
def test_no_input_crashes_the_loader(tmp_path_factory, lines, on_invalid):
    """Whatever the bytes: records come back validated, or a DataError names where the problem is."""
    path = tmp_path_factory.mktemp("fuzz") / "d.jsonl"
    path.write_bytes(b"\n".join(line.replace(b"\n", b" ") for line in lines))
    try:
        examples, report = load_examples(path, on_invalid=on_invalid)
    except DataError as e:
        assert str(e).startswith(str(path))
        return
    assert len({e.id for e in examples}) == len(examples) == report.kept
    for e in examples:
        assert e.context.strip() and (e.prompt.strip() if isinstance(e.prompt, str) else e.prompt)
        assert e.where.startswith(f"{path}:")
    fingerprint(examples)
