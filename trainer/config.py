"""Typed run configuration.

Every option is a dataclass field whose docstring (the string literal under it) is its only
documentation: `selfdistill config --reference` and the README table are generated from it.

Loading: YAML file -> dotted command-line overrides -> per-field type and range checks ->
cross-field checks in `Config.__post_init__`. Every error is a `ConfigError` whose message reads
`<where>: <field.path>: <problem>`, where <where> is `file:line` or the override that set it.
Nothing is ever rewritten silently: a conflict is an error.
"""

import ast
import dataclasses
import difflib
import inspect
import keyword
import math
import re
import string
import textwrap
import types
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal, Union, get_args, get_origin, get_type_hints

import yaml

from trainer.errors import ConfigError


@dataclass(frozen=True)
class Range:
    """Bounds for a number field, used as `Annotated[float, Range(gt=0)]`."""

    ge: float | None = None
    gt: float | None = None
    le: float | None = None
    lt: float | None = None

    def describe(self) -> str:
        parts = [f"{op} {bound}" for op, bound in ((">=", self.ge), (">", self.gt), ("<=", self.le), ("<", self.lt))
                 if bound is not None]
        return " and ".join(parts)

    def contains(self, x: float) -> bool:
        return ((self.ge is None or x >= self.ge) and (self.gt is None or x > self.gt)
                and (self.le is None or x <= self.le) and (self.lt is None or x < self.lt))


Positive = Annotated[int, Range(ge=1)]
NonNegative = Annotated[int, Range(ge=0)]

DEFAULT_TEACHER_TEMPLATE = (
    "{prompt}\n\n"
    "This is an example of a response to the question:\n{context}\n\n"
    "Now answer with a response of your own, reasoning step by step in your own words."
)
"""In the spirit of the SDFT and OPSD teacher prompts (see README): the privileged context is shown
as an example to learn from, and the teacher is asked for its own answer, so that it scores the
student's tokens as a capable solver rather than as a copier."""


# ----------------------------------------------------------------------------------------------
# Sections
# ----------------------------------------------------------------------------------------------

@dataclass
class LoraConfig:
    r: NonNegative = 0
    """LoRA rank; 0 = off (the learners train every weight). With r > 0 they train `peft` LoRA adapters on frozen base weights."""
    alpha: Annotated[float, Range(gt=0)] = 16.0
    """LoRA α: the adapter's update is scaled by α / r."""
    dropout: Annotated[float, Range(ge=0, lt=1)] = 0.0
    """Dropout on the adapter's input in the student's training forward; the teacher and the engines never use it."""
    target_modules: list[str] = field(default_factory=lambda: ["all-linear"])
    """Module names that get adapters (e.g. `[q_proj, v_proj]`), or `[all-linear]`: every linear layer but the output head."""
    sync: Literal["adapter", "merged"] = "adapter"
    """What reaches the engines after a step: the adapter alone (vLLM LoRA; the engines keep the base) or the merged weights."""
    save_merged: bool = False
    """Checkpoints also hold the merged weights in `save_pretrained` format (`hf/`), next to the adapter (`adapter/`)."""


@dataclass
class ModelConfig:
    path: str | None = None
    """Directory of a Hugging Face model saved with `save_pretrained` (config, weights, tokenizer). Required."""
    tokenizer: str | None = None
    """Tokenizer directory; null = `model.path`."""
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    """Weight and compute dtype of engines and learners: float32 on CPU, bfloat16 on GPUs."""
    max_model_len: Annotated[int, Range(ge=8)] | None = None
    """Longest prompt + completion, in tokens; null = the model's `max_position_embeddings`."""
    lora: LoraConfig = field(default_factory=LoraConfig)
    """LoRA adapters instead of full fine-tuning (off by default)."""


@dataclass
class ColumnsConfig:
    prompt: str = "prompt"
    """Column with the question: a string, or a list of chat messages `{role, content}`."""
    context: str = "context"
    """Column with the privileged context (demonstration, reference solution or feedback); only the teacher sees it."""
    answer: str | None = "answer"
    """Column with the reference answer, for rewards and evaluation; may be absent in a record; null = not used."""
    task: str | None = "task"
    """Column with a task name, for per-task curves; may be absent in a record (then `default`); null = not used."""
    id: str | None = "id"
    """Column with a unique record id; records without one are named `<file>:<line>`; null = always named so."""


@dataclass
class DataConfig:
    train: str | None = None
    """Training prompts: a `.jsonl` or `.parquet` file, or a directory written by `datasets.save_to_disk`. Required."""
    eval: str | list[str] | None = None
    """Held-out prompts for evaluation, in the same formats, or a list of such sets (e.g. earlier tasks', to measure forgetting); null = no evaluation."""
    columns: ColumnsConfig = field(default_factory=ColumnsConfig)
    """Which column holds what."""
    on_invalid: Literal["error", "skip"] = "error"
    """An invalid record stops the run with its file, line and field (`error`), or is counted and reported (`skip`)."""


@dataclass
class TeacherConfig:
    weights: Literal["initial", "ema", "live"] = "initial"
    """Teacher weights: frozen at the start (`initial`), an EMA of the student (`ema`), or the student itself (`live`)."""
    ema_alpha: Annotated[float, Range(gt=0, le=1)] = 0.01
    """EMA rate α in φ ← (1−α)·φ + α·θ, applied after every optimizer step (SDFT: 0.01)."""
    scorer: Literal["engine", "learner"] = "engine"
    """Who scores the student's tokens: vLLM `prompt_logprobs` (`engine`: sampled + top-k) or a learner forward (`learner`: full vocabulary)."""
    template: str = DEFAULT_TEACHER_TEMPLATE
    """How the privileged context enters the teacher prompt; must use `{prompt}` and `{context}` and no other field."""
    context: Literal["dataset", "sibling"] = "dataset"
    """The privileged context: the record's `context` column (`dataset`), or, as in SDPO, a successful rollout of the same group plus the reward's feedback on this one (`sibling`); samples without a successful sibling get no distillation loss."""
    sibling_template: str = "{solution}\n\n{feedback}"
    """With `context: sibling`, how the context is built: `{solution}` is the successful sibling's completion, `{feedback}` the rewards' feedback text on this sample (may be empty)."""
    success_reward: float = 1.0
    """With `context: sibling`, a sibling is successful when the sum of its rewards is at least this."""


@dataclass
class LossConfig:
    divergence: Literal["reverse_kl", "forward_kl", "jsd"] = "reverse_kl"
    """Per-token divergence: `reverse_kl` = KL(student‖teacher), `forward_kl` = KL(teacher‖student), `jsd` = JSD_β."""
    jsd_beta: Annotated[float, Range(gt=0, lt=1)] = 0.5
    """β of JSD_β = β·KL(T‖M) + (1−β)·KL(S‖M), M = β·T + (1−β)·S; for the end points use forward_kl / reverse_kl."""
    estimator: Literal["full", "topk", "sampled"] = "topk"
    """Divergence over the full vocabulary, the teacher's top-k plus a tail bucket, or the sampled token alone (policy gradient)."""
    topk: Positive = 20
    """k of the `topk` estimator (SDPO: 20 or 100)."""
    mask_first_tokens: NonNegative = 0
    """Leave the first N completion tokens out of the loss (SDFT's code masks 3)."""
    clip_tau: Annotated[float, Range(gt=0)] | None = None
    """OPSD per-vocabulary-entry clip τ on the divergence terms; null = off."""
    is_cap: Annotated[float, Range(ge=1)] | None = None
    """Cap of the truncated importance weight w = min(π_learner(y)/π_engine(y), cap) of each sampled token, which corrects every loss term for the gap between the engine's (behaviour) and the learner's policy: numerics, or `train.async`'s one-step lag (SDFT: 2); null = off."""
    mode: Literal["distill", "sft", "grpo", "ssd"] = "distill"
    """Training objective: `distill` (self-distillation from the teacher), `sft` (cross-entropy on the record's demonstration, no sampling), `grpo` (group-normalized reward policy gradient alone), `ssd` (cross-entropy on samples of the frozen starting model, shortest dropped)."""
    rl_coef: Annotated[float, Range(ge=0)] = 0.0
    """With `mode: distill`, weight of an added GRPO policy-gradient term on the rewards; 0 = off."""
    sft_target: Literal["answer", "context"] = "answer"
    """With `mode: sft`, the completion to imitate, followed by EOS: the `answer` column (e.g. the toy world's) or the `context` column (a demonstration, as in SDFT's data)."""
    ssd_drop_shortest: Annotated[float, Range(ge=0, lt=1)] = 0.1
    """With `mode: ssd`, the fraction of each step's samples dropped, shortest first (SSD: 0.1)."""


@dataclass
class RolloutConfig:
    backend: Literal["vllm", "transformers"] = "vllm"
    """What the engines run: vLLM, or a plain transformers model with a KV cache, for tiny models on CPU where vLLM's fixed per-step cost (decode iteration, prompt-logprob scoring, in-place reload) dominates; `transformers` serves no LoRA adapters (use `model.lora.sync=merged`)."""
    engines: Positive = 1
    """Number of engine actors."""
    n: Positive = 1
    """Completions sampled per prompt."""
    max_tokens: Positive = 16
    """Longest completion, in tokens."""
    min_tokens: NonNegative = 0
    """Shortest completion, in tokens: end-of-sequence is not sampled before it (vLLM `min_tokens`); 0 = off. For benchmarks that need long completions from an untrained model."""
    temperature: Annotated[float, Range(gt=0)] = 1.0
    """Sampling temperature; the teacher's and the learner's logits are divided by the same value."""
    top_p: Annotated[float, Range(gt=0, le=1)] = 1.0
    """Nucleus sampling mass; 1 = off."""
    top_k: int = -1
    """Sample from the k most likely tokens; -1 = off."""
    gpu_memory_utilization: Annotated[float, Range(gt=0, le=1)] = 0.5
    """Fraction of a GPU's memory an engine may take (GPU only)."""
    sync_timeout_s: Annotated[float, Range(gt=0)] = 300.0
    """Seconds a weight sync may take before the run stops with an error naming the engine."""
    max_restarts: NonNegative = 3
    """Times Ray restarts a dead engine; the restarted engine gets the current weights and redoes its lost shard."""
    cpu_threads: Positive | None = None
    """CPU only: torch threads per engine; null = its node's cores shared among the actors that compute at the same time (see `learner.cpu_threads`)."""


@dataclass
class LearnerConfig:
    num: Positive = 1
    """Data-parallel learner actors (DeepSpeed ranks)."""
    zero_stage: Literal[2, 3] = 2
    """DeepSpeed ZeRO stage: 2 shards optimizer state and gradients, 3 also the weights."""
    lr: Annotated[float, Range(gt=0)] = 5.0e-6
    """AdamW learning rate (OPSD and SSD: 5e-6)."""
    weight_decay: Annotated[float, Range(ge=0)] = 0.0
    """AdamW weight decay."""
    warmup_steps: NonNegative = 0
    """Linear warm-up steps of the learning rate."""
    schedule: Literal["constant", "cosine"] = "constant"
    """Learning-rate schedule after warm-up."""
    grad_clip: Annotated[float, Range(gt=0)] | None = 1.0
    """Clip the gradient norm to this value; null = off."""
    micro_batch: Positive = 8
    """Sequences per forward/backward on one learner; larger batches accumulate gradients."""
    cpu_threads: Positive | None = None
    """CPU only: torch threads per learner rank; null = its node's cores divided by the actors that compute at the same time: the ranks (a sync step's phases run one after another), or with `train.async` the ranks and all engines."""


@dataclass
class TrainConfig:
    steps: Positive = 100
    """Optimizer steps."""
    prompts_per_step: Positive = 32
    """Prompts sampled per step (each gets `rollout.n` completions)."""
    eval_every: NonNegative = 25
    """Evaluate every N steps, and always at step 0 and the last step; 0 = only then."""
    save_every: NonNegative = 0
    """Save a checkpoint every N steps, and always at the end (and on SIGTERM); 0 = only at the end."""
    keep_checkpoints: NonNegative = 0
    """Keep only the newest N checkpoints (the optimizer state is 3× the weights); 0 = keep all."""
    seed: int = 0
    """Seed of the data sampler, the engines' sampling and the learners."""
    max_skipped_steps: Positive = 3
    """Stop the run after this many steps in a row skipped for a non-finite loss or gradient."""
    async_: bool = False
    """One-step off-policy: the engines sample step t+1 while the learners train step t. The policy lag is at most 1 (enforced) and `loss.is_cap`'s truncated importance weight corrects for it (required)."""


@dataclass
class LogConfig:
    tensorboard: bool = True
    """Write TensorBoard event files to `runs/<name>/tb/`."""
    samples_every: NonNegative = 25
    """Append a few rollouts (prompt, completion, reward, per-token student and teacher logprobs) to `samples.jsonl` every N steps; 0 = never."""
    wandb: bool = False
    """Also log to Weights & Biases (needs the `wandb` package; `WANDB_MODE=offline` writes `runs/<name>/wandb/` only)."""
    wandb_project: str = "selfdistill"
    """W&B project; the W&B run is named after `name`."""


@dataclass
class RayConfig:
    address: str | None = None
    """Ray cluster to join (`auto` or `host:port`); null = the job's cluster under `ray job submit`, else a local Ray."""
    placement: Literal["pack", "spread"] = "pack"
    """Placement groups of engines and learners: `pack` them onto as few nodes as possible, or `spread` each group across nodes."""
    placement_timeout_s: Annotated[float, Range(gt=0)] = 600.0
    """Seconds to wait for the cluster to have room for a placement group before the run stops with an error."""


@dataclass
class StageConfig:
    name: str = "stage"
    """Stage name; its run directory is `<run dir>/stages/<name>/`."""
    train: str | None = None
    """The stage's training prompts (as `data.train`). Required."""
    eval: str | None = None
    """The stage's held-out prompts (as `data.eval`); every stage is evaluated on every stage's set."""
    steps: Positive = 100
    """Optimizer steps of the stage."""


@dataclass
class Config:
    name: str = "run"
    """Run name; the run directory is `<output_dir>/<name>/`."""
    output_dir: str = "runs"
    """Parent directory of run directories."""
    model: ModelConfig = field(default_factory=ModelConfig)
    """The model being trained (student) and, with other weights or prompts, the teacher."""
    data: DataConfig = field(default_factory=DataConfig)
    """Prompt datasets."""
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    """The teacher: the same model shown the privileged context."""
    loss: LossConfig = field(default_factory=LossConfig)
    """The distillation loss."""
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    """On-policy sampling by the vLLM engines."""
    learner: LearnerConfig = field(default_factory=LearnerConfig)
    """DeepSpeed learners and the optimizer."""
    train: TrainConfig = field(default_factory=TrainConfig)
    """The step loop."""
    rewards: list[str] = field(default_factory=lambda: ["answer_match"])
    """Reward functions logged as `reward/<name>` curves: built-in names or `module:function` paths."""
    log: LogConfig = field(default_factory=LogConfig)
    """Metric sinks."""
    ray: RayConfig = field(default_factory=RayConfig)
    """Where the actors run."""
    stages: list[StageConfig] = field(default_factory=list)
    """Continual learning: stages run in order, each from the previous one's final weights, each evaluated on every stage's eval set, with a forgetting table at the end; empty = one run on `data.train` (see README)."""

    def __post_init__(self):
        problems = cross_field_problems(self)
        if problems:
            raise ConfigError("\n".join(f"{path}: {message}" for path, message in problems))


def cross_field_problems(cfg: Config) -> list[tuple[str, str]]:
    """Checks that span fields; returns (field path, message) pairs, empty when the config is sound."""
    problems = []
    if not cfg.model.path:
        problems.append(("model.path", "is required (a directory written by save_pretrained)"))
    if not cfg.data.train and not cfg.stages:
        problems.append(("data.train", "is required (a .jsonl/.parquet file or a datasets directory)"))
    for i, stage in enumerate(cfg.stages):
        if not stage.train:
            problems.append((f"stages.{i}.train", "is required (a .jsonl/.parquet file or a datasets directory)"))
        if not re.fullmatch(r"[A-Za-z0-9._-]+", stage.name):
            problems.append((f"stages.{i}.name", f"must be letters, digits, '.', '_' or '-' (it names a directory), "
                                                 f"got {stage.name!r}"))
    names = [stage.name for stage in cfg.stages]
    for name in sorted({n for n in names if names.count(n) > 1}):
        problems.append((f"stages.{names.index(name)}.name", f"{name!r} names more than one stage"))
    if cfg.loss.estimator == "full" and cfg.teacher.scorer != "learner":
        problems.append(("loss.estimator", "'full' needs the full-vocabulary teacher of teacher.scorer='learner' "
                                           f"(got teacher.scorer={cfg.teacher.scorer!r}); "
                                           "the engine scorer gives only top-k logprobs: use estimator 'topk' or 'sampled'"))
    try:
        fields = {name for _, name, _, _ in string.Formatter().parse(cfg.teacher.template) if name is not None}
    except ValueError as e:  # e.g. a lone '{'
        fields = {f"<{e}>"}
    if fields != {"prompt", "context"}:
        problems.append(("teacher.template", f"must use exactly the fields {{prompt}} and {{context}}, got {sorted(fields)}"))
    if cfg.rollout.min_tokens > cfg.rollout.max_tokens:
        problems.append(("rollout.min_tokens", f"must be at most rollout.max_tokens={cfg.rollout.max_tokens}, "
                                               f"got {cfg.rollout.min_tokens}"))
    if cfg.rollout.top_k == 0 or cfg.rollout.top_k < -1:
        problems.append(("rollout.top_k", f"must be -1 (off) or >= 1, got {cfg.rollout.top_k}"))
    if cfg.loss.estimator == "sampled" and cfg.loss.divergence != "reverse_kl":
        problems.append(("loss.divergence", f"the 'sampled' estimator is the policy gradient of reverse_kl; "
                                            f"got {cfg.loss.divergence!r}: use estimator 'topk' or 'full' for it"))
    sequences = cfg.train.prompts_per_step * cfg.rollout.n
    if sequences % cfg.learner.num:
        problems.append(("learner.num", f"must divide train.prompts_per_step × rollout.n = {sequences} so that every "
                                        f"rank gets the same share, got {cfg.learner.num}"))
    problems += _objective_problems(cfg)
    if not cfg.model.lora.target_modules:
        problems.append(("model.lora.target_modules", "must name at least one module, or be [all-linear]"))
    if cfg.rollout.backend == "transformers" and cfg.model.lora.r > 0 and cfg.model.lora.sync == "adapter":
        problems.append(("model.lora.sync", "'adapter' needs vLLM's LoRA serving; rollout.backend='transformers' "
                                            "takes merged weights only: set model.lora.sync=merged"))
    if not re.fullmatch(r"[A-Za-z0-9._-]+", cfg.name):
        problems.append(("name", f"must be letters, digits, '.', '_' or '-' (it names a directory), got {cfg.name!r}"))
    return problems


def _objective_problems(cfg: Config) -> list[tuple[str, str]]:
    """Checks of loss.mode, the RL term and the sibling teacher context."""
    problems = []
    mode, uses_rl = cfg.loss.mode, cfg.loss.mode == "grpo" or cfg.loss.rl_coef > 0
    if cfg.loss.rl_coef > 0 and mode != "distill":
        problems.append(("loss.rl_coef", f"adds the RL term to the distillation loss; loss.mode={mode!r} "
                                         "has none (grpo is the RL term alone)"))
    needs_groups = [what for what, on in (("the RL term", uses_rl), ("teacher.context='sibling'",
                                                                     cfg.teacher.context == "sibling")) if on]
    if needs_groups and cfg.rollout.n < 2:
        problems.append(("rollout.n", f"{' and '.join(needs_groups)} compares samples of the same prompt: "
                                      f"needs rollout.n >= 2, got {cfg.rollout.n}"))
    if needs_groups and not cfg.rewards:
        problems.append(("rewards", f"{' and '.join(needs_groups)} needs at least one reward function"))
    if cfg.teacher.context == "sibling" and mode != "distill":
        problems.append(("teacher.context", f"'sibling' builds the distillation teacher's context; "
                                            f"loss.mode={mode!r} uses no teacher"))
    fields = {name for _, name, _, _ in string.Formatter().parse(cfg.teacher.sibling_template) if name is not None}
    if "solution" not in fields or not fields <= {"solution", "feedback"}:
        problems.append(("teacher.sibling_template", f"must use {{solution}} and may use {{feedback}}, got {sorted(fields)}"))
    if cfg.train.async_ and mode == "sft":
        problems.append(("train.async", "loss.mode='sft' samples nothing: there is no generation to overlap"))
    if cfg.train.async_ and mode in ("distill", "grpo") and cfg.loss.is_cap is None:
        problems.append(("loss.is_cap", "train.async trains on rollouts one policy version old; set the truncated "
                                        "importance weight's cap that corrects for it (e.g. 2.0)"))
    if mode == "sft" and cfg.rollout.n != 1:
        problems.append(("rollout.n", f"loss.mode='sft' trains on one demonstration per prompt: needs 1, got {cfg.rollout.n}"))
    if mode == "sft" and cfg.loss.sft_target == "answer" and cfg.data.columns.answer is None:
        problems.append(("loss.sft_target", "'answer' needs data.columns.answer (it is null)"))
    return problems


# ----------------------------------------------------------------------------------------------
# Loading
# ----------------------------------------------------------------------------------------------

class _Source:
    """Says where a field's value came from: `file:line`, a command-line override, or a default."""

    def __init__(self, file: str | None, lines: dict[str, int], overrides: dict[str, str]):
        self.file, self.lines, self.overrides = file, lines, overrides

    def locate(self, path: str) -> str:
        if path in self.overrides:
            return f"override '{self.overrides[path]}'"
        prefix = path
        while prefix:  # the nearest enclosing key that has a line, e.g. a list item's list
            if prefix in self.lines:
                return f"{self.file}:{self.lines[prefix]}"
            prefix = prefix.rpartition(".")[0]
        return self.file or "<config>"

    def fail(self, path: str, message: str):
        raise ConfigError(f"{self.locate(path)}: {path}: {message}")


def load_config(path: str | Path | None = None, overrides: Sequence[str] = ()) -> Config:
    """Reads a YAML config (or starts from defaults when path is None), applies `a.b=value` overrides, validates."""
    data, lines = {}, {}
    file = str(path) if path is not None else None
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"{path}: config file not found")
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError as e:
            raise ConfigError(f"{path}: not valid UTF-8 (byte {e.object[e.start]:#04x} at offset {e.start})") from None
        try:
            node = yaml.compose(text, Loader=yaml.SafeLoader)
            data = yaml.safe_load(text)
        except RecursionError:
            raise ConfigError(f"{path}: not valid YAML: nested too deeply") from None
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            where = f"{path}:{mark.line + 1}" if mark else str(path)
            raise ConfigError(f"{where}: not valid YAML: {getattr(e, 'problem', e)}") from None
        data = {} if data is None else data
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: the top level must be a mapping of sections, got {type(data).__name__}")
        lines = _line_map(node)
    applied = {}
    for item in overrides:
        key, value = _parse_override(item)
        _set_dotted(data, key, value, item)
        applied[key] = item
    source = _Source(file, lines, applied)
    return _build(Config, data, "", source)


def config_from_dict(data: dict) -> Config:
    """Rebuilds a config from `config_to_dict` output (e.g. a run directory's config.yaml), with full checks."""
    return _build(Config, data, "", _Source(None, {}, {}))


def config_to_dict(cfg: Config) -> dict:
    return _to_dict(cfg)


def _to_dict(value: Any) -> Any:
    """dataclasses.asdict, with the YAML key of each field (`train.async` for the field `async_`)."""
    if dataclasses.is_dataclass(value):
        return {_key(f.name): _to_dict(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, list):
        return [_to_dict(v) for v in value]
    return value


def _key(field_name: str) -> str:
    """A field's config key: its name, less the trailing `_` of a name that is a Python keyword (`async_`)."""
    bare = field_name.removesuffix("_")
    return bare if field_name.endswith("_") and keyword.iskeyword(bare) else field_name


def dump_config(cfg: Config) -> str:
    return yaml.safe_dump(config_to_dict(cfg), sort_keys=False, allow_unicode=True)


def _line_map(node, prefix: str = "") -> dict[str, int]:
    """Maps dotted key paths to 1-based YAML line numbers."""
    lines = {}
    if isinstance(node, yaml.MappingNode):
        for key_node, value_node in node.value:
            path = f"{prefix}.{key_node.value}" if prefix else str(key_node.value)
            lines[path] = key_node.start_mark.line + 1
            lines.update(_line_map(value_node, path))
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            path = f"{prefix}.{i}"
            lines[path] = item.start_mark.line + 1
            lines.update(_line_map(item, path))
    return lines


class _OverrideText(str):
    """An override's raw text; it is parsed once the field's type is known (see `_coerce`)."""


def _parse_override(item: str) -> tuple[str, "_OverrideText"]:
    key, sep, raw = item.partition("=")
    if not sep or not re.fullmatch(r"[A-Za-z_][\w]*(\.[A-Za-z_][\w]*)*", key):
        raise ConfigError(f"override '{item}': expected 'section.field=value', e.g. 'loss.divergence=forward_kl'")
    return key, _OverrideText(raw)


def _parse_override_text(raw: str, tp: Any) -> Any:
    """A string field takes the text as it is (so `{context}\n{prompt}` stays text); other fields
    read it as YAML, so that 50 is an int, null is None and [a, b] a list."""
    options = get_args(tp) if get_origin(tp) in (Union, types.UnionType) else (tp,)
    if raw == "null" and type(None) in options:
        return None
    base = next(o for o in options if o is not type(None))
    if get_origin(base) is Annotated:
        base = get_args(base)[0]
    if base is str and not (raw.startswith("[") and any(get_origin(o) is list for o in options)):
        return str(raw)
    try:
        return yaml.safe_load(raw)
    except yaml.YAMLError:
        return str(raw)


def _set_dotted(data: dict, key: str, value: Any, item: str):
    *parents, leaf = key.split(".")
    node = data
    for i, part in enumerate(parents):
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"override '{item}': {'.'.join(parents[:i + 1])} is not a section")
        node = child
    node[leaf] = value


def _build(cls, data: Any, prefix: str, source: _Source):
    if not isinstance(data, dict):
        source.fail(prefix or "<top level>", f"expected a mapping of fields, got {data!r}")
    hints = get_type_hints(cls, include_extras=True)
    fields = {_key(f.name): f.name for f in dataclasses.fields(cls)}
    for key in data:
        if key not in fields:
            source.fail(_join(prefix, key), f"unknown key{_suggest(str(key), list(fields), prefix)}")
    values = {name: _coerce(data[key], hints[name], _join(prefix, key), source) for key, name in fields.items() if key in data}
    try:
        return cls(**values)
    except ConfigError as e:  # cross-field problems: add where each field was set
        located = [f"{source.locate(line.partition(':')[0])}: {line}" for line in str(e).splitlines()]
        raise ConfigError("\n".join(located)) from None


def _join(prefix: str, key: Any) -> str:
    return f"{prefix}.{key}" if prefix else str(key)


def _suggest(key: str, names: list[str], prefix: str) -> str:
    close = difflib.get_close_matches(key, names, n=1, cutoff=0.6)
    if close:
        return f"; did you mean '{_join(prefix, close[0])}'?"
    elsewhere = [path for path, _, _, _ in reference() if path.rpartition(".")[2] == key]
    if elsewhere:
        return f"; did you mean '{elsewhere[0]}'?"
    return f"; valid keys here: {', '.join(names)}"


def _coerce(value: Any, tp: Any, path: str, source: _Source) -> Any:
    if isinstance(value, _OverrideText):
        value = _parse_override_text(value, tp)
    origin = get_origin(tp)
    if origin is Annotated:
        base, *meta = get_args(tp)
        value = _coerce(value, base, path, source)
        for bound in meta:
            if isinstance(bound, Range) and not bound.contains(value):
                source.fail(path, f"{value!r} is out of range: must be {bound.describe()}")
        return value
    if origin in (Union, types.UnionType):
        options = [a for a in get_args(tp) if a is not type(None)]
        if value is None:
            if len(options) < len(get_args(tp)):
                return None
            source.fail(path, "must not be null")
        return _coerce(value, _option_for(value, options), path, source)
    if origin is Literal:
        choices = get_args(tp)
        if any(value == c and type(value) is type(c) for c in choices):
            return value
        hint = difflib.get_close_matches(str(value), [str(c) for c in choices], n=1, cutoff=0.6)
        source.fail(path, f"{value!r} is not one of {', '.join(repr(c) for c in choices)}"
                          + (f"; did you mean {hint[0]!r}?" if hint else ""))
    if origin is list:
        if not isinstance(value, list):
            source.fail(path, f"expected a list, got {value!r}")
        (item_type,) = get_args(tp)
        return [_coerce(v, item_type, f"{path}.{i}", source) for i, v in enumerate(value)]
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, path, source)
    return _coerce_scalar(value, tp, path, source)


def _option_for(value: Any, options: list) -> Any:
    """The member of a union that a value's shape asks for: a list for a list, else the first."""
    if isinstance(value, list):
        return next((o for o in options if get_origin(o) is list), options[0])
    return options[0]


def _coerce_scalar(value: Any, tp: type, path: str, source: _Source) -> Any:
    if tp is bool and isinstance(value, bool):
        return value
    if tp is int and isinstance(value, int) and not isinstance(value, bool):
        return value
    if tp is float and isinstance(value, (int, float, str)) and not isinstance(value, bool):
        # YAML 1.1 reads `5e-4` (no dot) as a string; accept what float() reads, nothing looser.
        try:
            number = float(value)
        except (ValueError, OverflowError):
            number = None
        if number is not None and math.isfinite(number):
            return number
        if number is not None:
            source.fail(path, f"must be a finite number, got {value!r}")
    if tp is str and isinstance(value, str):
        return value
    kind = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}[tp]
    source.fail(path, f"expected {kind}, got {value!r} ({type(value).__name__})")


# ----------------------------------------------------------------------------------------------
# Documentation, generated from the field docstrings
# ----------------------------------------------------------------------------------------------

def field_docs(cls) -> dict[str, str]:
    """The docstring under each field of a dataclass, read from its source."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    body = tree.body[0].body
    docs = {}
    for node, following in zip(body, body[1:]):
        if (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)
                and isinstance(following, ast.Expr) and isinstance(following.value, ast.Constant)):
            docs[node.target.id] = " ".join(following.value.value.split())
    return docs


def reference(cls=Config, prefix: str = "") -> list[tuple[str, str, str, str]]:
    """(field path, type, default, doc) for every leaf field, in declaration order."""
    rows = []
    hints = get_type_hints(cls, include_extras=True)
    docs = field_docs(cls)
    for f in dataclasses.fields(cls):
        path = _join(prefix, _key(f.name))
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        if dataclasses.is_dataclass(hints[f.name]):
            rows.extend(reference(hints[f.name], path))
            continue
        rows.append((path, _type_name(hints[f.name]), _default_text(default), docs.get(f.name, "")))
        item = get_args(hints[f.name])[0] if get_origin(hints[f.name]) is list else None
        if dataclasses.is_dataclass(item):  # a list of sections, e.g. stages: document an item's fields
            rows.extend(reference(item, f"{path}[]"))
    return rows


def _type_name(tp: Any) -> str:
    origin = get_origin(tp)
    if origin is Annotated:
        base, *meta = get_args(tp)
        bounds = " ".join(m.describe() for m in meta if isinstance(m, Range))
        return f"{_type_name(base)} ({bounds})" if bounds else _type_name(base)
    if origin in (Union, types.UnionType):
        return " | ".join(_type_name(a) for a in get_args(tp))
    if origin is Literal:
        return " | ".join(str(c) for c in get_args(tp))
    if origin is list:
        item = get_args(tp)[0]
        return "list of sections" if dataclasses.is_dataclass(item) else f"list[{_type_name(item)}]"
    return "null" if tp is type(None) else tp.__name__


def _default_text(value: Any) -> str:
    text = yaml.safe_dump(value, default_flow_style=True, width=10_000).strip()
    text = text.removesuffix("\n...").removesuffix("...").strip()
    return text if len(text) <= 40 else "(see `selfdistill config --reference`)"


def reference_markdown() -> str:
    rows = ["| key | type | default | meaning |", "|---|---|---|---|"]
    for path, type_name, default, doc in reference():
        rows.append(f"| `{path}` | {type_name.replace('|', '&#124;')} | `{default}` | {doc.replace('|', '&#124;')} |")
    return "\n".join(rows) + "\n"
