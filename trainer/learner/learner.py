"""Learner: one data-parallel rank of the student, wrapped in a DeepSpeed ZeRO engine.

A plain class: `trainer.cluster.learners` wraps it in `ray.remote`, and it runs without Ray as well
(one process per rank, e.g. under torchrun on a GPU machine). On CPU it uses the gloo backend and a
client `torch.optim.AdamW`, so nothing is compiled; on GPUs, NCCL.

A step's loss is the `loss.mode`'s function in `trainer.learner.objectives`; this class owns the
models (the student under DeepSpeed, the teacher copy, LoRA adapters) and the state around them
(EMA, exports, checkpoints).

Loss temperature: the divergence compares the *untempered* student and teacher distributions
(log-softmax of the raw logits), because vLLM's prompt logprobs, which the engine scorer returns,
are untempered; both scorers therefore train the same objective. The rollout temperature only
decides which tokens are visited, and it is used where the sampling distribution itself matters:
the importance weight and the engine–learner logprob gap, computed as log_softmax(logits / T).
"""

import contextlib
import os

import torch

from core.errors import ConfigError
from rollout.batch import Rollout, TeacherScores
from trainer.config import config_from_dict
from trainer.config.implied import (colocated, external_models, needs_teacher_engine, own_teacher_on_learners,
                                    quantized_student, task_teacher)
from trainer.learner import adapters, batching, colocated_engines, objectives, quantization
from trainer.learner.forward import WithKwargs, aligned_vocabulary, completion_logits
from trainer.learner.metrics import token_means
from trainer.learner.optim import DTYPES, deepspeed_config, lr_lambda, micro_steps


class Learner:
    """One DeepSpeed rank. The teacher copy it holds (for `teacher.scorer=learner` or an EMA
    teacher) is in eval mode and never gets gradients."""

    def __init__(self, config: dict, rank: int, world_size: int, master_addr: str, master_port: int,
                 cpu_threads: int = 1):
        self.rank, self.world_size = rank, world_size
        os.environ.update(MASTER_ADDR=master_addr, MASTER_PORT=str(master_port), RANK=str(rank),
                          WORLD_SIZE=str(world_size), LOCAL_RANK="0")
        self.device = torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")
        if self.device.type == "cpu":
            torch.set_num_threads(cpu_threads)  # the driver's share of the node's cores (trainer.cluster)
        import deepspeed
        if self.device.type == "cpu":
            _without_shared_memory_all_reduce()
        deepspeed.init_distributed(dist_backend="nccl" if self.device.type == "cuda" else "gloo")
        self.configure(config)

    def configure(self, config: dict) -> int:
        """Builds the models, the optimizer and the DeepSpeed engine for `config`, from its
        `model.path`, as a fresh rank would. A rank that trained a run before is reconfigured this
        way for the next run of the same driver (`trainer.cluster.warm`): its process, imports and
        process group stay, nothing of the old run does. Every rank must call it (ZeRO-3 is collective)."""
        import deepspeed
        from transformers import AutoModelForCausalLM
        from transformers.integrations import HfDeepSpeedConfig
        self._release()
        self.cfg = cfg = config_from_dict(config)
        torch.manual_seed(cfg.train.seed)
        dtype = DTYPES[cfg.model.dtype]
        self.lora = cfg.model.lora.r > 0
        # The teacher copy is a plain model, built before ZeRO-3 is configured so that it is not partitioned.
        # With LoRA there is no copy of the student's own weights: the teacher is the same base with
        # another adapter, or none. Another checkpoint that scores here is always a copy of its own.
        self.teacher = None if self.lora else self._build_teacher(AutoModelForCausalLM, dtype)
        self.external_teachers = {path: self._frozen(AutoModelForCausalLM, dtype, path)
                                  for path in external_models(cfg, "learner")}
        ds_config = deepspeed_config(cfg)
        # ZeRO-3 partitions weights while from_pretrained builds the model, if this object is alive then.
        self._hf_ds_config = HfDeepSpeedConfig(ds_config) if cfg.learner.zero_stage == 3 else None
        model = self._load(AutoModelForCausalLM, dtype)
        self.vocab_size = model.config.vocab_size
        self.checkpointed = self._enable_checkpointing(model) if cfg.learner.gradient_checkpointing else []
        self.quantized = quantized_student(cfg)
        if self.quantized:  # before DeepSpeed and LoRA: the engine trains the fake-quantized layers
            model = quantization.prepare(model, cfg.model.quantization)
        if self.lora:
            model = adapters.wrap(model, cfg.model.lora, ema=cfg.teacher.weights == "ema")
        trainable = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(trainable, lr=cfg.learner.lr, weight_decay=cfg.learner.weight_decay)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg))
        self.engine, self.optimizer, _, self.scheduler = deepspeed.initialize(
            model=model, optimizer=optimizer, lr_scheduler=scheduler, config=ds_config)
        self.colocated_engines = self._colocated_engines() if colocated(cfg) else {}
        return self.rank

    def _colocated_engines(self) -> dict:
        """`rollout.colocate`: this rank's engines (`trainer.learner.colocated_engines`), on the student
        it trains and, when an engine scores them, its copy of its own teacher weights."""
        modules = {"student": self.engine.module}
        if needs_teacher_engine(self.cfg):
            modules["teacher"] = self.teacher
        # every rank's engine syncs at once, so under ZeRO-3 every rank enters the gather
        served = {role: (lambda role=role: self._full_weights(role, rank_0_only=False, to_cpu=False))
                  for role in modules}
        return colocated_engines.build(self.cfg, self.rank, modules, served)

    def _sleep_engines(self) -> None:
        """`rollout.sleep`: the colocated vLLM engines give their device memory back while this rank trains."""
        if self.cfg.rollout.sleep:
            for engine in self.colocated_engines.values():
                engine.sleep()

    def colocated(self, role: str, method: str, *args, **kwargs):
        """A call of this rank's colocated `role` engine (`trainer.cluster.colocated`): `generate`,
        `score` or `set_version`, as on an engine actor. The modules stay in eval mode (as in training:
        no dropout), and sampling draws from the engine's own generators, never this rank's RNG."""
        self.engine.eval()
        return getattr(self.colocated_engines[role], method)(*args, **kwargs)

    def _release(self):
        """Drops the previous run's models and engine, and its ZeRO-3 marker: transformers reads a
        live `HfDeepSpeedConfig` as "partition every model built from now on"."""
        import gc
        for name in ("colocated_engines", "engine", "optimizer", "scheduler", "teacher", "external_teachers",
                     "checkpointed", "_ema_master", "_hf_ds_config"):
            self.__dict__.pop(name, None)
        gc.collect()

    def _load(self, auto_cls, dtype, path: str | None = None):
        """`path` (default `model.path`) at `dtype`, with `model.attn_implementation`'s kernels when one is set."""
        implementation, path = self.cfg.model.attn_implementation, path or self.cfg.model.path
        if implementation is None:
            return auto_cls.from_pretrained(path, dtype=dtype)
        try:
            return auto_cls.from_pretrained(path, dtype=dtype, attn_implementation=implementation)
        except (ImportError, ValueError) as e:  # transformers' words for a kernel this machine lacks
            raise ConfigError(f"model.attn_implementation: {implementation!r} can't run on learner rank {self.rank} "
                              f"({self.device.type}): {e}") from e

    def _frozen(self, auto_cls, dtype, path: str | None = None):
        """A plain full copy of `path` (default `model.path`), outside DeepSpeed: it is never trained,
        only read (or EMA-updated), in eval mode."""
        model = self._load(auto_cls, dtype, path).to(self.device)
        return model.eval().requires_grad_(False)

    def _build_teacher(self, auto_cls, dtype):
        """The copy of the student's own teacher weights (initial or EMA) on this rank, when one is
        needed; None for a live teacher, initial weights held by a teacher engine, or no teacher."""
        if not own_teacher_on_learners(self.cfg):
            return None
        teacher = self._frozen(auto_cls, dtype)
        # In bf16 an α = 0.01 step is below the weights' resolution (8 bits of mantissa) and the
        # EMA would not move: keep an fp32 master of the EMA and copy it into the teacher.
        self._ema_master = None
        if self.cfg.teacher.weights == "ema" and dtype != torch.float32:
            self._ema_master = [p.detach().float().clone() for p in teacher.parameters()]
        return teacher

    # ------------------------------------------------------------------------------------------
    def train_step(self, rollouts: list[Rollout], teacher_prompts: list[list[int]],
                   scores: list[TeacherScores] | None, total_tokens: int) -> dict[str, float]:
        """One optimizer step on this rank's share of the batch. `total_tokens` counts the loss
        tokens of the whole batch over all ranks, so the gradient is the global per-token mean."""
        self._sleep_engines()
        plan = self._micro_batch_plan(rollouts)
        sums: dict[str, float] = {}
        # Dropout stays off: the engines sample without it, the health gap compares against them, and
        # a live teacher shares these weights and must score deterministically.
        self.engine.eval()
        skipped_before = self.engine.skipped_steps
        for i, (rows, weight) in enumerate(plan):
            loss, stats = self._micro_step([rollouts[r] for r in rows], [teacher_prompts[r] for r in rows],
                                           [scores[r] for r in rows] if scores is not None else None)
            if weight == 0.0:  # a stand-in: every forward and backward of a real one, no gradient, no statistics
                loss, stats = loss * 0.0, {}
            if not torch.isfinite(loss):
                # DeepSpeed skips an optimizer step whose global gradient norm is not finite, on every
                # rank alike (the norm is all-reduced), leaving weights, optimizer state and the lr
                # schedule untouched. A non-finite loss can still have finite gradients (an Inf term
                # whose gradient is 0); scaling by NaN makes them NaN, so the step is skipped too.
                loss = loss * float("nan")
            # The plan's length, not DeepSpeed's micro-step counter, says which backward ends the
            # step (a token budget gives a varying count). DeepSpeed averages over ranks: undo it, so
            # that the summed gradient is Σ token losses / total_tokens.
            self.engine.set_gradient_accumulation_boundary(i == len(plan) - 1)
            self.engine.backward(loss * self.world_size / max(total_tokens, 1), scale_wrt_gas=False)
            self.engine.step()
            for key, value in stats.items():
                sums[key] = sums.get(key, 0.0) + value
        skipped = self.engine.skipped_steps > skipped_before
        if self.cfg.teacher.weights == "ema" and (self.teacher is not None or self.lora) and not skipped:
            self._update_ema()
        metrics = token_means(sums)
        grad_norm = self.engine.get_global_grad_norm()
        metrics["learner/grad_norm"] = float(grad_norm) if grad_norm is not None else float("nan")
        metrics["learner/lr"] = self.scheduler.get_last_lr()[0]
        metrics["learner/skipped"] = float(skipped)
        metrics["learner/micro_batches"] = float(len(plan))
        return metrics

    def _micro_batch_plan(self, rollouts: list[Rollout]) -> list[tuple[list[int], float]]:
        """This rank's micro-batches: (rows of `rollouts`, weight). By count every rank has the same
        number. By token budget the counts differ, but every rank must run as many forwards and
        backwards (ZeRO reduces gradients in each backward; ZeRO-3 gathers weights in each forward,
        the student's and a teacher's on these weights): a rank with fewer repeats its shortest
        sequence at weight 0 until the counts match."""
        learner = self.cfg.learner
        if learner.max_tokens_per_micro_batch is None:
            steps = micro_steps(self.cfg)
            assert len(rollouts) <= steps * learner.micro_batch, (len(rollouts), steps, learner.micro_batch)
            return [(rows, 1.0) for rows in batching.count_micro_batches(len(rollouts), learner.micro_batch, steps)]
        lengths = [batching.sequence_length(r) for r in rollouts]
        plan = [(rows, 1.0) for rows in batching.budget_micro_batches(lengths, learner.max_tokens_per_micro_batch,
                                                                      learner.packing)]
        count = torch.tensor([len(plan)])
        if self.world_size > 1:
            torch.distributed.all_reduce(count, op=torch.distributed.ReduceOp.MAX)
        stand_in = ([min(range(len(lengths)), key=lengths.__getitem__)], 0.0)
        return plan + [stand_in] * (int(count) - len(plan))

    def _micro_step(self, rollouts, teacher_prompts, scores) -> tuple[torch.Tensor, dict[str, float]]:
        """Sum of per-token losses over a micro-batch, and token-summed statistics for logging: the
        `loss.mode`'s function in `trainer.learner.objectives`."""
        if not rollouts:  # an empty micro-batch still joins the collective step, with zero loss
            return sum(p.sum() * 0.0 for p in self.engine.module.parameters()), {}
        batch = objectives.micro_batch(rollouts, self.cfg.loss.mask_first_tokens, self.device)
        with self._student_dropout(), self._checkpointing():
            student_logits = completion_logits(self.engine, batch.prompts, batch.completions, self.cfg.learner.packing)
        mode = self.cfg.loss.mode
        if mode in ("sft", "ssd"):
            return objectives.cross_entropy(student_logits, batch)
        if mode == "grpo":
            return objectives.grpo(student_logits, batch, self.cfg)
        return objectives.distill(student_logits, batch, self.cfg, self._teacher_targets(batch, teacher_prompts, scores))

    def _teacher_targets(self, batch, teacher_prompts, scores) -> objectives.TeacherTargets:
        """Each rollout's teacher targets, from its task's teacher: scored here (a forward of the
        teacher on this rank) or by its engine (`scores`); a batch of several teachers is scored by
        each on its own rollouts, then put back in order. A cached record's targets came with it
        (`scores`), as an engine's do."""
        teacher_of = {task: task_teacher(self.cfg, task) for task in {r.task for r in batch.rollouts}}
        groups: dict[tuple, list[int]] = {}
        for row, rollout in enumerate(batch.rollouts):
            teacher = teacher_of[rollout.task]
            groups.setdefault((None, "cache") if rollout.cached else (teacher.model, teacher.scorer), []).append(row)
        parts = []
        for (model, scorer), rows in groups.items():
            part = batch if len(groups) == 1 else objectives.micro_batch(
                [batch.rollouts[i] for i in rows], self.cfg.loss.mask_first_tokens, self.device)
            if scorer == "learner":
                logits = self._teacher_logits(model, [teacher_prompts[i] for i in rows], part.completions)
                parts.append((rows, objectives.targets_from_logits(logits, part, self.cfg.loss.topk)))
            else:
                parts.append((rows, objectives.targets_from_scores([scores[i] for i in rows], part, self.vocab_size)))
        return parts[0][1] if len(parts) == 1 else objectives.merge_targets(parts, [len(c) for c in batch.completions])

    @staticmethod
    def _enable_checkpointing(model) -> list:
        """Turns on transformers' checkpointing; returns the modules whose flag it set (its decoder
        layers; the base model, in older code): `_checkpointing` raises their training flag."""
        try:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        except ValueError as e:  # transformers' words for a model class without it
            raise ConfigError(f"learner.gradient_checkpointing: {e}") from e
        return [m for m in model.modules() if getattr(m, "gradient_checkpointing", False) is True]

    @contextlib.contextmanager
    def _checkpointing(self):
        """With `learner.gradient_checkpointing`, the student's training forward checkpoints its
        decoder layers. transformers checkpoints a layer only in training mode, and the learner runs
        in eval mode (no dropout: see `train_step`), so just the layers' own flag is set, for this
        forward: everything inside them stays in eval mode, and the backward's recomputation (decided
        at the forward) replays the same deterministic layer."""
        for layer in self.checkpointed:
            layer.training = True
        try:
            yield
        finally:
            for layer in self.checkpointed:
                layer.training = False

    def _student_dropout(self):
        """LoRA dropout, when configured, is on in the student's training forward only."""
        if self.lora and self.cfg.model.lora.dropout > 0:
            return adapters.adapter_dropout(self.engine.module, on=True)
        return contextlib.nullcontext()

    @torch.no_grad()
    def _teacher_logits(self, model: str | None, teacher_prompts, completions) -> torch.Tensor:
        """The completion logits of the teacher checkpoint `model` (None: the student's own teacher
        weights), in eval mode (no dropout of any kind) and without gradient."""
        if model is not None:
            return aligned_vocabulary(completion_logits(self.external_teachers[model], teacher_prompts, completions,
                                                        self.cfg.learner.packing), self.vocab_size)
        if self.teacher is not None:
            return completion_logits(self.teacher, teacher_prompts, completions, self.cfg.learner.packing)
        if self.lora:
            name = adapters.teacher_adapter(self.cfg.teacher.weights)
            model = self.engine.module
            forward = lambda **kw: model(**kw, adapter_names=[name] * kw["input_ids"].shape[0])  # noqa: E731
            return completion_logits(WithKwargs(forward, model), teacher_prompts, completions, self.cfg.learner.packing)
        return completion_logits(self.engine.module, teacher_prompts, completions, self.cfg.learner.packing)

    # ------------------------------------------------------------------------------------------
    @torch.no_grad()
    def _update_ema(self):
        """φ ← (1−α)·φ + α·θ, after every optimizer step (SDFT)."""
        alpha = self.cfg.teacher.ema_alpha
        if self.lora:  # an EMA of the adapter only: the base is frozen and shared
            module = self.engine.module
            if getattr(self, "_ema_master", None) is None:
                # fp32 masters, as below; the adapter is small, so always
                self._ema_master = [p.detach().float().clone() for p in adapters.adapter_parameters(module, adapters.EMA)]
            teacher, student = adapters.adapter_parameters(module, adapters.EMA), \
                adapters.adapter_parameters(module, adapters.STUDENT)
        else:
            teacher, student = list(self.teacher.parameters()), list(self.engine.module.parameters())
        masters = self._ema_master or teacher
        with self._gathered(self.engine.module.parameters()):
            for master, phi, theta in zip(masters, teacher, student, strict=True):
                master.lerp_(theta.detach().to(master.dtype), alpha)
                if master is not phi:
                    phi.copy_(master)

    def _gathered(self, params):
        """Full parameters under ZeRO-3 (a collective: every rank must enter); a no-op otherwise."""
        import deepspeed
        if self.cfg.learner.zero_stage == 3:
            return deepspeed.zero.GatheredParameters(list(params), modifier_rank=None)
        return contextlib.nullcontext()

    @torch.no_grad()
    def export_weights(self, which: str = "student") -> dict[str, torch.Tensor] | None:
        """Full CPU weights by checkpoint name, on rank 0 (None elsewhere): the student's as the
        engines serve them (`student`: quantized, with `model.quantization`), its full-precision
        master weights (`master`: the same without quantization), or the EMA teacher's (`teacher`).
        Every rank must call it under ZeRO-3, because gathering is collective. With LoRA: the base
        plus the student's (or the EMA teacher's) adapter, merged."""
        if self.lora:
            with self._gathered(self.engine.module.parameters()):
                if self.rank != 0:
                    return None
                return adapters.merged_state_dict(self.engine.module, self._adapter_name(which))
        return self._full_weights(which, rank_0_only=True, to_cpu=True)

    @torch.no_grad()
    def _full_weights(self, which: str, rank_0_only: bool, to_cpu: bool) -> dict[str, torch.Tensor] | None:
        """`export_weights`' full weights (without LoRA), on rank 0 only or on every rank (a colocated
        engine's sync). Copied out to the CPU, or on their device under ZeRO-3, where the gathered
        full parameters are freed again on leaving the gather; otherwise the live tensors themselves."""
        student = which in ("student", "master")
        module = self.engine.module if student else self.teacher
        with self._gathered(module.parameters() if student else []):
            if rank_0_only and self.rank != 0:
                return None
            weights = module.state_dict()
            if to_cpu or (student and self.cfg.learner.zero_stage == 3):
                weights = {name: tensor.detach().to("cpu" if to_cpu else tensor.device, copy=True)
                           for name, tensor in weights.items()}
            if which == "student" and self.quantized:
                weights = quantization.quantized_state_dict(module, weights)
            return weights

    def _adapter_name(self, which: str) -> str:
        if which in ("student", "master"):
            return adapters.STUDENT
        if self.cfg.teacher.weights != "ema":
            raise ValueError(f"only an EMA teacher has weights of its own to export (teacher.weights="
                             f"{self.cfg.teacher.weights!r})")
        return adapters.EMA

    @torch.no_grad()
    def export_adapter(self, which: str = "student") -> "adapters.AdapterPayload | None":
        """The student's (or the EMA teacher's) LoRA adapter alone, on rank 0 (None elsewhere); every
        rank must call it under ZeRO-3."""
        name = self._adapter_name(which)
        with self._gathered(adapters.adapter_parameters(self.engine.module, name)):
            if self.rank != 0:
                return None
            return adapters.adapter_payload(self.engine.module, name)

    def save_adapter(self, directory: str) -> None:
        """Writes the adapters in peft's format on rank 0: the student's in `directory`, an EMA
        teacher's in `directory/ema/` (peft's layout for a second adapter)."""
        names = [adapters.STUDENT] + ([adapters.EMA] if self.cfg.teacher.weights == "ema" else [])
        params = [p for name in names for p in adapters.adapter_parameters(self.engine.module, name)]
        with self._gathered(params):
            if self.rank == 0:
                self.engine.module.save_pretrained(directory, selected_adapters=names)

    def save_pretrained(self, directory: str, which: str = "master") -> None:
        """Writes the student in `save_pretrained` format (plus the tokenizer) on rank 0: its
        full-precision weights (`master`) or, with `model.quantization`, the quantized ones the
        engines serve (`student`); with LoRA, the base with the adapter merged in, under the base
        model's names."""
        weights = self.export_weights(which)
        if self.rank != 0:
            return
        from transformers import AutoTokenizer
        module = self.engine.module.get_base_model() if self.lora else self.engine.module
        module.save_pretrained(directory, state_dict=weights)
        AutoTokenizer.from_pretrained(self.cfg.model.tokenizer or self.cfg.model.path).save_pretrained(directory)

    # ------------------------------------------------------------------------------------------
    def save(self, directory: str) -> None:
        """This rank's part of a resumable checkpoint in `directory/engine/`: DeepSpeed's model,
        optimizer and scheduler states, this rank's RNG, and (rank 0) the EMA teacher. Every rank
        must call it: DeepSpeed's save is collective."""
        self.engine.save_checkpoint(directory, tag="engine", save_latest=False)
        engine_dir = os.path.join(directory, "engine")
        torch.save(_rng_state(), os.path.join(engine_dir, f"rng_rank{self.rank}.pt"))
        if self.rank == 0 and self.cfg.teacher.weights == "ema" and self.teacher is not None:
            torch.save({"teacher": self.teacher.state_dict(), "fp32_master": self._ema_master},
                       os.path.join(engine_dir, "ema_teacher.pt"))

    def load(self, directory: str) -> None:
        """Restores what `save` wrote: after it, training continues exactly where it stopped."""
        path, _ = self.engine.load_checkpoint(directory, tag="engine", load_optimizer_states=True,
                                              load_lr_scheduler_states=True)
        if path is None:
            raise FileNotFoundError(f"{directory}/engine: no DeepSpeed checkpoint to resume from")
        engine_dir = os.path.join(directory, "engine")
        if self.cfg.teacher.weights == "ema" and self.teacher is not None:
            saved = torch.load(os.path.join(engine_dir, "ema_teacher.pt"), map_location=self.device, weights_only=False)
            self.teacher.load_state_dict(saved["teacher"])
            if self._ema_master is not None:
                for master, value in zip(self._ema_master, saved["fp32_master"], strict=True):
                    master.copy_(value)
        rng = os.path.join(engine_dir, f"rng_rank{self.rank}.pt")
        if os.path.exists(rng):  # a checkpoint from a run with another learner count has none for new ranks
            _set_rng_state(torch.load(rng, weights_only=False))

    def ready(self) -> int:
        return self.rank

    def state_bytes(self) -> dict[str, int]:
        """This rank's memory: bytes of the model's parameters (all, and the trained ones), of a
        teacher copy, of the optimizer's state (DeepSpeed's fp32 partitions and Adam's moments), and
        the process's peak RSS."""
        import resource

        def nbytes(tensors):  # a ZeRO-3 partitioned parameter counts at its full size (ds_numel)
            return sum(getattr(t, "ds_numel", t.numel()) * t.element_size() for t in tensors)
        params = list(self.engine.module.parameters())
        inner = getattr(self.optimizer, "optimizer", self.optimizer)
        state = [t for entry in inner.state.values() for t in entry.values() if isinstance(t, torch.Tensor)]
        fp32_partitions = getattr(self.optimizer, "single_partition_of_fp32_groups", [])
        return {"parameters": nbytes(params), "trainable_parameters": nbytes(p for p in params if p.requires_grad),
                "teacher_copy": nbytes(self.teacher.parameters()) if self.teacher is not None else 0,
                "optimizer_state": nbytes(state) + nbytes(fp32_partitions),
                "peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}


def _rng_state() -> dict:
    import random

    import numpy as np
    state = {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict) -> None:
    import random

    import numpy as np
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def _without_shared_memory_all_reduce() -> None:
    """Keeps DeepSpeed's CPU backend from JIT-compiling its shared-memory all-reduce, which only its
    inference path calls (training reduces through gloo). The build goes to one directory per user
    (~/.cache/torch_extensions) under a lock file: about 45 s of compiling on 2 cores whenever the
    installed paths change, and a build killed midway (a learner killed while it starts) leaves the
    lock behind, so every later learner of that user waits on it forever. DeepSpeed reads this
    module-level table only to decide whether to build it."""
    import deepspeed.ops
    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
