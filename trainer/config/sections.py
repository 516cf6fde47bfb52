"""The config's sections: typed dataclasses, one per YAML section.

Every option is a dataclass field whose docstring (the string literal under it) is its only
documentation: `selfdistill config --reference` and the README table are generated from it
(`trainer.config.reference`). Cross-field checks run in `Config.__post_init__` (`trainer.config.checks`).
"""

import keyword
from dataclasses import dataclass, field
from typing import Annotated, Any, Literal

from core.errors import ConfigError
from trainer.config.checks import cross_field_problems


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
class QuantizationConfig:
    scheme: Literal["none", "int8", "int4", "int2"] = "none"
    """Weight-only integer quantization of the student (quantization-aware distillation): the learners train with the weights of every linear layer but the LM head fake-quantized in the forward (straight-through gradient, full-precision masters) and the engines sample from exactly those quantized weights; `none` = off (see README, *Quantization-aware distillation*)."""
    group_size: Positive = 32
    """Weights per quantization group along a layer's input (symmetric, one scale each); must divide every quantized layer's input size."""


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
    quantization: QuantizationConfig = field(default_factory=QuantizationConfig)
    """The student's weight quantization (off by default)."""
    attn_implementation: Literal["sdpa", "eager", "flash_attention_2", "flex_attention"] | None = None
    """The learner's attention kernels (transformers' `attn_implementation`); null = transformers' choice (SDPA). flash_attention_2 needs a CUDA GPU and the flash-attn package."""


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
    model: str | None = None
    """Another checkpoint as the teacher (e.g. a larger model of the student's family; it must share the student's tokenizer), frozen; null = the student's own weights."""
    weights: Literal["initial", "ema", "live"] = "initial"
    """Teacher weights: frozen at the start (`initial`), an EMA of the student (`ema`), or the student itself (`live`)."""
    ema_alpha: Annotated[float, Range(gt=0, le=1)] = 0.01
    """EMA rate α in φ ← (1−α)·φ + α·θ, applied after every optimizer step (SDFT: 0.01)."""
    scorer: Literal["engine", "learner"] = "engine"
    """Who scores the student's tokens: vLLM `prompt_logprobs` (`engine`: sampled + top-k) or a learner forward (`learner`: full vocabulary)."""
    template: str = DEFAULT_TEACHER_TEMPLATE
    """How the privileged context enters the teacher prompt; must use `{prompt}` and `{context}` and no other field (with `teacher.model`, `{context}` is optional: `"{prompt}"` is classic on-policy distillation)."""
    context: Literal["dataset", "sibling"] = "dataset"
    """The privileged context: the record's `context` column (`dataset`), or, as in SDPO, a successful rollout of the same group plus the reward's feedback on this one (`sibling`); samples without a successful sibling get no distillation loss."""
    sibling_template: str = "{solution}\n\n{feedback}"
    """With `context: sibling`, how the context is built: `{solution}` is the successful sibling's completion, `{feedback}` the rewards' feedback text on this sample (may be empty)."""
    success_reward: float = 1.0
    """With `context: sibling`, a sibling is successful when the sum of its rewards is at least this."""
    cache: str | None = None
    """A teacher cache written by `selfdistill score` (see README, *The teacher cache*): a `teacher.cache_fraction` share of each step's prompts are its records, trained against its stored top-k instead of a teacher's live scores; it must match the run's teacher (model, tokenizer, template) and `loss.topk`; null = off."""
    cache_fraction: Annotated[float, Range(gt=0, le=1)] = 0.5
    """With `teacher.cache`, the share of each step's prompts drawn from the cache (each one cached completion); the rest are sampled on-policy as usual (each `rollout.n` completions). 1 = train from the cache alone: no teacher engine."""


@dataclass
class TaskTeacherConfig:
    model: str | None = None
    """The task's teacher checkpoint (as `teacher.model`); null = the `teacher` section's."""
    template: str | None = None
    """The task's teacher prompt (as `teacher.template`); null = the `teacher` section's."""
    weights: Literal["initial", "ema", "live"] | None = None
    """As `teacher.weights`; null = the `teacher` section's."""
    scorer: Literal["engine", "learner"] | None = None
    """As `teacher.scorer`; null = the `teacher` section's."""


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
    token_cap: Annotated[float, Range(gt=0)] | None = None
    """Cap (nats) on each token's divergence: a larger one is scaled down to the cap, gradient included, so the tokens the student gets badly wrong don't drown the ones it nearly has right; null = off."""
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
    colocate: bool = False
    """Each learner rank hosts the engines itself and samples (and, as the teacher, scores) its own shard: no engine actors. For one node and small models; `rollout.engines` is then the learner count. Transformers engines read the rank's own modules (a sync moves nothing); vLLM engines run in the rank's process and load its weights at every sync."""
    sleep: bool = False
    """Colocated vLLM engines on GPUs only (untested: no GPU with vLLM was reachable): vLLM's sleep mode frees the engines' device memory while the learner trains (level 1) and wakes the weights for the sync, then the KV cache. Refused on a cluster without GPUs (sleep mode is CUDA-only)."""


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
    max_tokens_per_micro_batch: Positive | None = None
    """Group sequences by tokens instead of `micro_batch`: each forward computes at most this many (packed: the sequences' prompt + completion tokens; padded: rows × the longest), and the batch is split across ranks by tokens; null = by count. Must hold the longest prompt plus `rollout.max_tokens`."""
    packing: bool = False
    """Padding-free forwards: a micro-batch's sequences back to back in one row, position ids restarting per sequence, so no padding is computed (same losses and gradients as padded, to float rounding)."""
    gradient_checkpointing: bool = False
    """Recompute each decoder layer's activations in the backward pass instead of keeping them (transformers' gradient checkpointing, non-reentrant): less memory for long sequences, about one more forward of compute; the same losses and gradients."""
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
class ReplayConfig:
    data: str | list[str] | None = None
    """Prior tasks' prompts to replay (files as `data.train`), with the completions and the distributions of the run's starting model (the parent), scored once when the run starts into `<run dir>/replay/`; null = none (see README, *Replay*)."""
    fraction: Annotated[float, Range(ge=0, lt=1)] = 0.0
    """The share of each step's prompts replayed (each one cached completion, trained by forward KL to the parent's top-k + tail); 0 = no replay."""
    teacher_format: bool = True
    """Also replay the parent reading its privileged context: prompts of `data.train` and `replay.data` in the teacher's format (the teacher template with the record's context), with the parent's answers and distributions, so the model stays able to teach itself in the next stage."""
    prompts: Positive = 256
    """Prompts scored from each replayed set and format (fewer if the set is smaller), drawn with `train.seed`."""


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
    replay: Annotated[float, Range(ge=0, lt=1)] = 0.0
    """The share of each step's prompts replayed from every earlier stage's training prompts (and `replay.data`), with the distributions of the model the stage starts from (`replay`); 0 = the `replay` section as it is."""


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
    teachers: dict[str, TaskTeacherConfig] = field(default_factory=dict)
    """A teacher per task: task name (the `task` column) → the settings that differ from the `teacher` section's; a task not named here uses the `teacher` section (see README, *A teacher per task*)."""
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
    replay: ReplayConfig = field(default_factory=ReplayConfig)
    """Replay against forgetting: a share of each step from prior tasks, trained to the starting model's distributions (off by default)."""
    stages: list[StageConfig] = field(default_factory=list)
    """Continual learning: stages run in order, each from the previous one's final weights, each evaluated on every stage's eval set, with a forgetting table at the end; empty = one run on `data.train` (see README)."""

    def __post_init__(self):
        problems = cross_field_problems(self)
        if problems:
            raise ConfigError("\n".join(f"{path}: {message}" for path, message in problems))


# Field names and config paths

def yaml_key(field_name: str) -> str:
    """A field's config key: its name, less the trailing `_` of a name that is a Python keyword (`async_`)."""
    bare = field_name.removesuffix("_")
    return bare if field_name.endswith("_") and keyword.iskeyword(bare) else field_name


def join_path(prefix: str, key: Any) -> str:
    return f"{prefix}.{key}" if prefix else str(key)
