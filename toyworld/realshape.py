"""`selfdistill toy realshape --out DIR`: a model family of the shape users run, for benchmarks and
tests, built from nothing on this machine.

- **Tokenizer:** a real one, Mistral's 32,000-token SentencePiece model, shipped in `mistral_common`'s
  package data (never downloaded), with a chat template in Mistral's `[INST]` format. It loads with
  transformers' `AutoTokenizer` and in vLLM.
- **Model:** a randomly initialized Llama (vLLM and transformers both serve it): `bench` has 37M
  parameters, `test` 9M. Random weights: its figures are about throughput, never about learning.
- **Completions end at EOS** after a long-tailed number of tokens, as reasoning completions do: the
  EOS row of the (tied) output embedding is fitted so that at every position the model gives EOS a
  probability of 1/`mean_completion`. Lengths are then about geometric: mean ~200, p90 ~460, cut at
  `rollout.max_tokens` (1,024). The fit reads the model's own samples (EOS suppressed), so the
  hidden states it fits are the ones its generations visit. Nothing else in the model changes.
- **Prompts** are chat messages of pseudo-sentences drawn from the vocabulary's words, with a
  privileged context of the same kind for the teacher.

DIR/
  model/              tokenizer + model (save_pretrained format)
  data/train.jsonl    chat prompts with a context and an (unused) answer
  lengths.json        {"prompt": [...], "completion": [...]}: token lengths of `length_samples` prompts
                      and of the completions the model sampled for them (temperature 1, until EOS or
                      max_completion), for benchmarks that need the real shape without an engine
  settings.json       what was built; a rerun with the same settings and code reuses DIR
"""

import dataclasses
import hashlib
import json
import logging
import random
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerBase

from toyworld.prepare import build_fingerprint
from toyworld.tasks import write_jsonl

logger = logging.getLogger(__name__)

SIZES = {
    # head_dim 64 (vLLM's CPU attention needs >= 32); embeddings tied, as small chat models have them
    "bench": dict(hidden_size=512, num_hidden_layers=6, num_attention_heads=8, num_key_value_heads=4,
                  intermediate_size=1664),
    "test": dict(hidden_size=256, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                 intermediate_size=768),
}

CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if message['role'] == 'system' %}{{ message['content'] + '\n\n' }}"
    "{% elif message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ message['content'] + eos_token }}"
    "{% else %}{{ raise_exception('unknown role: ' + message['role']) }}{% endif %}{% endfor %}")
"""Mistral's v1 format; the `[/INST]` that ends a user turn is the generation prompt."""


@dataclass(frozen=True)
class RealShapeSettings:
    size: str = "bench"
    seed: int = 0
    mean_completion: int = 200
    """Mean completion length, in tokens, before the cut at `max_completion`."""
    max_completion: int = 1024
    prompts: int = 256
    calibration_samples: int = 8
    """Sampled completions (of `max_completion` tokens each) whose hidden states fit the EOS row."""
    length_samples: int = 64
    """Completions sampled from the finished model, whose lengths `lengths.json` keeps."""


def build_tokenizer() -> PreTrainedTokenizerBase:
    """Mistral's SentencePiece v1 model from mistral_common's package data, as a transformers
    tokenizer with a chat template. (Building `LlamaTokenizer(vocab_file=...)` directly gives a
    3-token tokenizer in transformers 5: it is loaded from a directory instead.)"""
    from importlib.resources import files
    source = files("mistral_common") / "data" / "tokenizer.model.v1"
    staging = Path(tempfile.mkdtemp(prefix="realshape-tokenizer-"))
    try:
        shutil.copyfile(str(source), staging / "tokenizer.model")
        (staging / "tokenizer_config.json").write_text(json.dumps({
            "tokenizer_class": "LlamaTokenizer", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
            "add_bos_token": True, "add_eos_token": False, "model_max_length": 4096}))
        tokenizer = AutoTokenizer.from_pretrained(staging)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.pad_token = tokenizer.unk_token  # a token no text produces; the learner masks it anyway
    return tokenizer


def model_config(tokenizer: PreTrainedTokenizerBase, size: str) -> LlamaConfig:
    return LlamaConfig(vocab_size=len(tokenizer), max_position_embeddings=tokenizer.model_max_length,
                       tie_word_embeddings=True, bos_token_id=tokenizer.bos_token_id,
                       eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                       torch_dtype="float32", **SIZES[size])


def vocabulary_words(tokenizer: PreTrainedTokenizerBase) -> list[str]:
    """The vocabulary's whole lowercase words (pieces that start a word and are letters only)."""
    words = []
    for piece in tokenizer.convert_ids_to_tokens(list(range(len(tokenizer)))):
        if piece.startswith("▁") and piece[1:].isascii() and piece[1:].isalpha() and piece[1:].islower():
            words.append(piece[1:])
    return words


def prompt_records(tokenizer: PreTrainedTokenizerBase, count: int, seed: int) -> list[dict]:
    """Chat prompts of 10 to 80 pseudo-words each, with a context of 20 to 120 for the teacher."""
    rng, words = random.Random(seed), vocabulary_words(tokenizer)
    sentence = lambda lo, hi: " ".join(rng.choice(words) for _ in range(rng.randint(lo, hi)))  # noqa: E731
    return [{"id": f"realshape-{i}", "prompt": [{"role": "user", "content": sentence(10, 80)}],
             "context": sentence(20, 120), "answer": "unused", "task": "realshape"} for i in range(count)]


CONSTANT_DIM = 0
CONSTANT_VALUE = 0.1
"""About three times a random residual coordinate's size (init std 0.02, grown by the layers)."""
"""The residual coordinate `add_constant_feature` holds at a constant (the embedding's first)."""


@torch.no_grad()
def add_constant_feature(model: LlamaForCausalLM, value: float) -> None:
    """Holds one residual coordinate at `value` for every token and position: every token embeds it,
    and no layer writes to it (its rows of o_proj and down_proj are zero). Every logit gains the same
    `value`-scaled term from it (the embeddings are tied), which softmax ignores, except EOS's, whose
    row `fit_eos_row` sets: a random model has no other feature constant enough to end at a steady rate."""
    model.get_input_embeddings().weight[:, CONSTANT_DIM] = value
    for layer in model.model.layers:
        layer.self_attn.o_proj.weight[CONSTANT_DIM] = 0.0
        layer.mlp.down_proj.weight[CONSTANT_DIM] = 0.0


@torch.no_grad()
def fit_eos_row(model: LlamaForCausalLM, tokenizer: PreTrainedTokenizerBase, prompts: list[list[int]],
                settings: RealShapeSettings) -> float:
    """Sets the EOS row of the output embedding to w on the constant coordinate (0 elsewhere), with w
    chosen (bisection) so that the model's mean EOS probability over the positions of its own
    generations (sampled with EOS suppressed) is 1/mean_completion; returns that mean."""
    eos, batch = tokenizer.eos_token_id, prompts[:settings.calibration_samples]
    generated, width = _generate(model, tokenizer, batch, settings.max_completion, suppress_eos=True)
    prompt_mask = torch.tensor([[0] * (width - len(ids)) + [1] * len(ids) for ids in batch])
    full_mask = torch.cat([prompt_mask, torch.ones_like(generated[:, width:])], dim=1)
    states = model.model(generated, attention_mask=full_mask).last_hidden_state[:, width - 1:-1].reshape(-1, model.config.hidden_size)
    weight = model.get_output_embeddings().weight
    weight[eos] = 0.0
    feature = states[:, CONSTANT_DIM]
    log_rest = torch.cat([states @ weight[:eos].T, states @ weight[eos + 1:].T], dim=1).logsumexp(-1)
    target = 1.0 / settings.mean_completion
    mean_probability = lambda w: torch.sigmoid(w * feature - log_rest).mean().item()  # noqa: E731
    low, high = -100.0, 100.0
    for _ in range(60):
        mid = (low + high) / 2
        low, high = (mid, high) if mean_probability(mid) < target else (low, mid)
    weight[eos, CONSTANT_DIM] = (low + high) / 2
    return mean_probability((low + high) / 2)


@torch.no_grad()
def sampled_lengths(model: LlamaForCausalLM, tokenizer: PreTrainedTokenizerBase, prompts: list[list[int]],
                    settings: RealShapeSettings) -> list[int]:
    """The completion length (EOS included) the model samples for each prompt, up to max_completion."""
    generated, width = _generate(model, tokenizer, prompts, settings.max_completion, suppress_eos=False)
    completions = generated[:, width:]
    ended = completions == tokenizer.eos_token_id
    return [int(row.nonzero()[0]) + 1 if row.any() else settings.max_completion for row in ended]


def _generate(model, tokenizer, prompts: list[list[int]], new_tokens: int, suppress_eos: bool):
    """Left-padded batch sampling at temperature 1 over the whole vocabulary; (ids, prompt width)."""
    pad, width = tokenizer.pad_token_id, max(map(len, prompts))
    inputs = torch.tensor([[pad] * (width - len(ids)) + ids for ids in prompts])
    mask = (torch.arange(width) >= torch.tensor([width - len(ids) for ids in prompts])[:, None]).long()
    fixed = dict(min_new_tokens=new_tokens, suppress_tokens=[tokenizer.eos_token_id]) if suppress_eos else {}
    generated = model.generate(inputs, attention_mask=mask, do_sample=True, temperature=1.0, top_k=0,
                               max_new_tokens=new_tokens, pad_token_id=pad, **fixed)
    return generated, width


def _record(settings: RealShapeSettings) -> dict:
    code = hashlib.sha256(Path(__file__).read_bytes()).hexdigest()[:16]
    return {**dataclasses.asdict(settings), "built_by": {"code": code, "packages": build_fingerprint()["packages"]}}


def is_built(out: Path, settings: RealShapeSettings) -> bool:
    try:
        recorded = json.loads((out / "settings.json").read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return False
    recorded.pop("seconds", None)
    recorded.pop("eos_probability", None)
    return recorded == _record(settings)


def build(out: str | Path, settings: RealShapeSettings = RealShapeSettings(), force: bool = False) -> Path:
    """Builds (or reuses) the real-shape family in `out`; returns `out`."""
    out = Path(out)
    if not force and is_built(out, settings):
        logger.info("%s is already built with these settings; reusing it", out)
        return out
    started = time.perf_counter()
    (out / "settings.json").unlink(missing_ok=True)  # written last: its presence marks a finished build
    torch.manual_seed(settings.seed)
    tokenizer = build_tokenizer()
    model = LlamaForCausalLM(model_config(tokenizer, settings.size)).eval()
    add_constant_feature(model, CONSTANT_VALUE)
    records = prompt_records(tokenizer, settings.prompts, settings.seed)
    write_jsonl(out / "data" / "train.jsonl", records)
    prompts = [tokenizer.apply_chat_template(r["prompt"], tokenize=True, add_generation_prompt=True, return_dict=False)
               for r in records]
    probability = fit_eos_row(model, tokenizer, prompts, settings)
    sampled = prompts[settings.calibration_samples:settings.calibration_samples + settings.length_samples]
    lengths = {"prompt": [len(ids) for ids in sampled], "completion": sampled_lengths(model, tokenizer, sampled, settings)}
    (out / "lengths.json").write_text(json.dumps(lengths))
    logger.info("realshape %s: %s", settings.size, length_histogram(lengths["completion"]))
    logger.info("realshape %s: %.1fM parameters, EOS probability %.4f a token", settings.size,
                model.num_parameters() / 1e6, probability)
    staging = out / "model.tmp"
    shutil.rmtree(staging, ignore_errors=True)
    model.save_pretrained(staging)
    tokenizer.save_pretrained(staging)
    shutil.rmtree(out / "model", ignore_errors=True)
    staging.rename(out / "model")
    (out / "settings.json").write_text(json.dumps({**_record(settings), "eos_probability": probability,
                                                   "seconds": round(time.perf_counter() - started, 1)}, indent=1))
    return out


def length_histogram(lengths: list[int], edges=(0, 50, 100, 200, 300, 500, 750, 1000, 1025)) -> str:
    """One line: the count of lengths in each [edge, next edge) bin, and the mean, p50, p90 and max."""
    ordered = sorted(lengths)
    bins = [sum(lo <= n < hi for n in lengths) for lo, hi in zip(edges, edges[1:])]
    cells = " ".join(f"[{lo},{hi}):{count}" for lo, hi, count in zip(edges, edges[1:], bins))
    quantile = lambda q: ordered[min(len(ordered) - 1, int(q * len(ordered)))]  # noqa: E731
    return (f"lengths n={len(lengths)} mean={sum(lengths) / len(lengths):.0f} p50={quantile(0.5)} "
            f"p90={quantile(0.9)} max={ordered[-1]}  {cells}")
