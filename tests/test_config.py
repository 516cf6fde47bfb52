import dataclasses
import re
import subprocess
import sys

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import ROOT
from core.errors import ConfigError
from trainer.config import (
    Config,
    config_from_dict,
    config_to_dict,
    dump_config,
    field_docs,
    load_config,
    reference,
    reference_markdown,
)

TOY = ROOT / "configs" / "toy.yaml"


def write(tmp_path, text: str):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    return path


MINIMAL = "model:\n  path: m\ndata:\n  train: t.jsonl\n"


def test_toy_config_loads_and_round_trips():
    cfg = load_config(TOY)
    assert cfg.loss.divergence == "reverse_kl" and cfg.learner.lr == 1e-3 and cfg.teacher.template == "{context}\n{prompt}"
    again = config_from_dict(__import__("yaml").safe_load(dump_config(cfg)))
    assert again == cfg


def test_overrides_are_typed():
    cfg = load_config(TOY, ["loss.divergence=forward_kl", "train.steps=50", "learner.lr=1e-4", "ray.address=null",
                            "rewards=[answer_match, my.mod:fn]"])
    assert (cfg.loss.divergence, cfg.train.steps, cfg.learner.lr) == ("forward_kl", 50, 1e-4)
    assert cfg.ray.address is None and cfg.rewards == ["answer_match", "my.mod:fn"]


def test_unknown_key_names_file_line_and_suggests(tmp_path):
    path = write(tmp_path, MINIMAL + "loss:\n  divergense: forward_kl\n")
    with pytest.raises(ConfigError, match=re.escape(f"{path}:6: loss.divergense: unknown key; did you mean 'loss.divergence'?")):
        load_config(path)


def test_misplaced_key_suggests_its_section(tmp_path):
    with pytest.raises(ConfigError, match="did you mean 'learner.lr'"):
        load_config(write(tmp_path, MINIMAL + "lr: 0.1\n"))


def test_unknown_key_without_a_close_match_lists_valid_keys(tmp_path):
    with pytest.raises(ConfigError, match="valid keys here: divergence, jsd_beta"):
        load_config(write(tmp_path, MINIMAL + "loss:\n  zzzz: 1\n"))


def test_bad_choice_names_value_and_choices(tmp_path):
    path = write(tmp_path, MINIMAL + "teacher:\n  weights: emma\n")
    with pytest.raises(ConfigError) as e:
        load_config(path)
    assert str(e.value) == (f"{path}:6: teacher.weights: 'emma' is not one of 'initial', 'ema', 'live'; "
                            "did you mean 'ema'?")


@pytest.mark.parametrize("override, message", [
    ("learner.lr=-1", "learner.lr: -1.0 is out of range: must be > 0"),
    ("teacher.ema_alpha=1.5", "teacher.ema_alpha: 1.5 is out of range: must be > 0 and <= 1"),
    ("train.steps=0", "train.steps: 0 is out of range: must be >= 1"),
    ("train.steps=ten", "train.steps: expected an integer, got 'ten' (str)"),
    ("train.steps=2.5", "train.steps: expected an integer, got 2.5 (float)"),
    ("log.tensorboard=1", "log.tensorboard: expected true or false, got 1 (int)"),
    ("learner.zero_stage=1", "learner.zero_stage: 1 is not one of 2, 3"),
    ("rollout.top_k=0", "rollout.top_k: must be -1 (off) or >= 1, got 0"),
    ("rollout.min_tokens=9", "rollout.min_tokens: must be at most rollout.max_tokens=8, got 9"),
    ("model.path=null", "model.path: is required"),
    ("teacher.template={prompt}", "teacher.template: must use exactly the fields {prompt} and {context}"),
    ("loss.estimator=full", "loss.estimator: 'full' needs the full-vocabulary teacher of teacher.scorer='learner'"),
    ("loss.token_cap=0", "loss.token_cap: 0.0 is out of range: must be > 0"),
])
def test_bad_values_name_the_override_field_and_value(override, message):
    with pytest.raises(ConfigError) as e:
        load_config(TOY, [override])
    assert str(e.value).startswith(f"override '{override}': {message}")


def test_cross_field_error_points_at_the_file_line(tmp_path):
    path = write(tmp_path, MINIMAL + "loss:\n  estimator: full\n")
    with pytest.raises(ConfigError, match=re.escape(f"{path}:6: loss.estimator: 'full' needs")):
        load_config(path)
    assert load_config(path, ["teacher.scorer=learner"]).loss.estimator == "full"


def test_impossible_combinations_fail_at_start():
    with pytest.raises(ConfigError, match="loss.divergence: the 'sampled' estimator is the policy gradient of reverse_kl"):
        load_config(TOY, ["loss.estimator=sampled", "loss.divergence=forward_kl"])
    with pytest.raises(ConfigError, match="loss.token_cap: caps a token's divergence; the 'sampled' estimator"):
        load_config(TOY, ["loss.estimator=sampled", "loss.token_cap=1"])
    with pytest.raises(ConfigError, match=r"learner.num: must divide train.prompts_per_step × rollout.n = 64 .* got 3"):
        load_config(TOY, ["learner.num=3"])


@pytest.mark.parametrize("overrides, message", [
    (["teacher.model=/m", "teacher.weights=ema"], "teacher.weights: another checkpoint (teacher.model) is a frozen teacher: needs 'initial', got 'ema'"),
    (["teacher.model=/m", "teacher.weights=live"], "teacher.weights: another checkpoint (teacher.model) is a frozen teacher: needs 'initial', got 'live'"),
    (["teacher.model=/m", "teacher.template={context}"], "teacher.template: must use {prompt} and may use {context}, got ['context']"),
    (["teacher.model=/m", "teacher.template={prompt}{solution}"], "teacher.template: must use {prompt} and may use {context}"),
])
def test_an_external_teacher_is_frozen_and_needs_the_prompt(overrides, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_config(TOY, overrides)


def test_an_external_teacher_may_go_without_the_context():
    cfg = load_config(TOY, ["teacher.model=/m", "teacher.template={prompt}"])  # classic on-policy distillation
    assert cfg.teacher.model == "/m" and cfg.teacher.template == "{prompt}"
    assert load_config(TOY, ["teacher.model=/m", "teacher.scorer=learner", "model.lora.r=8"]).teacher.model == "/m"


def test_yaml_syntax_error_and_missing_file(tmp_path):
    with pytest.raises(ConfigError, match=r"c\.yaml:2: not valid YAML"):
        load_config(write(tmp_path, "model:\n  path: a: b\n"))
    with pytest.raises(ConfigError, match="nope.yaml: config file not found"):
        load_config(tmp_path / "nope.yaml")


def test_yaml_exponent_without_dot_is_a_number(tmp_path):
    # YAML 1.1 reads 5e-4 as a string; users write it anyway.
    assert load_config(write(tmp_path, MINIMAL + "learner:\n  lr: 5e-4\n")).learner.lr == 5e-4


def test_bad_override_syntax():
    with pytest.raises(ConfigError, match="expected 'section.field=value'"):
        load_config(TOY, ["loss.divergence"])
    with pytest.raises(ConfigError, match="loss.divergence is not a section"):
        load_config(TOY, ["loss.divergence.x=1"])


def test_every_field_is_documented():
    for path, _, _, doc in reference():
        assert len(doc) > 10, f"{path} has no docstring"
    sections = [f.type for f in dataclasses.fields(Config) if dataclasses.is_dataclass(f.type)]
    assert all(field_docs(s) for s in sections)


def test_readme_config_table_is_generated_from_the_docstrings():
    readme = (ROOT / "README.md").read_text()
    assert reference_markdown() in readme, "README's config table is stale: paste `selfdistill config --reference`"


def test_cli_reports_config_errors_with_exit_code_2():
    result = subprocess.run([sys.executable, "-m", "trainer.cli", "config", str(TOY), "learner.lrr=1"],
                            capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 2
    assert "learner.lrr: unknown key; did you mean 'learner.lr'?" in result.stderr
    ok = subprocess.run([sys.executable, "-m", "trainer.cli", "config", str(TOY), "train.steps=7"],
                        capture_output=True, text=True, cwd=ROOT)
    assert ok.returncode == 0 and "steps: 7" in ok.stdout


def test_lora_is_off_by_default_and_the_lora_recipe_loads():
    assert load_config(TOY).model.lora.r == 0
    cfg = load_config(ROOT / "configs" / "toy-lora.yaml")
    assert cfg.model.lora.r > 0 and cfg.model.lora.sync == "adapter" and cfg.model.lora.target_modules == ["all-linear"]
    assert load_config(ROOT / "configs" / "toy-lora.yaml", ["model.lora.target_modules=[q_proj, v_proj]"]
                       ).model.lora.target_modules == ["q_proj", "v_proj"]


def test_lora_refuses_empty_targets_and_unknown_sync():
    with pytest.raises(ConfigError, match="model.lora.target_modules: must name at least one module"):
        load_config(ROOT / "configs" / "toy-lora.yaml", ["model.lora.target_modules=[]"])
    with pytest.raises(ConfigError, match="model.lora.sync: 'merge' is not one of"):
        load_config(ROOT / "configs" / "toy-lora.yaml", ["model.lora.sync=merge"])


def test_the_transformers_backend_takes_merged_lora_weights_only():
    assert load_config(TOY, ["rollout.backend=transformers"]).rollout.backend == "transformers"
    with pytest.raises(ConfigError, match="model.lora.sync: 'adapter' needs vLLM's LoRA serving"):
        load_config(ROOT / "configs" / "toy-lora.yaml", ["rollout.backend=transformers"])
    assert load_config(ROOT / "configs" / "toy-lora.yaml", ["rollout.backend=transformers", "model.lora.sync=merged"])


KEYS = [path for path, _, _, _ in reference()]
YAML_VALUES = st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=10) \
    | st.lists(st.text(max_size=5), max_size=2) | st.dictionaries(st.text(max_size=5), st.integers(), max_size=2)


@settings(max_examples=200, deadline=None)
@given(text=st.text(max_size=200) | st.binary(max_size=100))
def test_no_config_file_crashes_the_parser(tmp_path_factory, text):
    path = tmp_path_factory.mktemp("fuzz") / "c.yaml"
    path.write_bytes(text if isinstance(text, bytes) else text.encode("utf-8", "surrogatepass"))
    try:
        load_config(path)
    except ConfigError as e:
        assert str(e).startswith(str(path))


@settings(max_examples=300, deadline=None)
@given(values=st.dictionaries(st.sampled_from(KEYS) | st.text(max_size=12), YAML_VALUES, max_size=5),
       overrides=st.lists(st.tuples(st.sampled_from(KEYS) | st.text(max_size=12), st.text(max_size=12)), max_size=3))
def test_no_keys_values_or_overrides_crash_the_parser(tmp_path_factory, values, overrides):
    """Known and unknown keys with any YAML values, and any overrides: a Config or a ConfigError."""
    import yaml
    data = {}
    for key, value in values.items():
        node, *rest = key.split(".")
        target = data
        for part in [node, *rest][:-1]:
            target = target.setdefault(part, {}) if isinstance(target.get(part, {}), dict) else {}
        target[[node, *rest][-1]] = value
    path = tmp_path_factory.mktemp("fuzz") / "c.yaml"
    path.write_text(MINIMAL + yaml.safe_dump(data))
    try:
        cfg = load_config(path, [f"{k}={v}" for k, v in overrides])
    except ConfigError:
        return
    assert config_from_dict(config_to_dict(cfg)) == cfg
