"""The toy world's base model: a tiny Qwen2, pretrained on CPU into the situation the papers start
from. Shown the worked solution (teacher format) it answers nearly every problem; shown only the
question (student format) it knows just the problems of some ones-digit pairs, carries included
(`tasks.STUDENT_ONES_PAIRS`: why those and not the problems without a carry).

The recipe follows the calibration in the project's research notes: a batch mixes teacher-format
two-digit problems, one-digit problems in both formats, and student-format two-digit problems of
those ones-digit pairs (a quarter of the batch). A student with no partial skill at all can't be
taught in a few hundred steps, so the student format must not be left out entirely.
"""

import logging
import math
import random
from dataclasses import dataclass

import torch
from transformers import PreTrainedTokenizerBase, Qwen2Config, Qwen2ForCausalLM

from rewards.answer import is_match
from toyworld.tasks import FAMILIES, TEACHER_TEMPLATE, Family

logger = logging.getLogger(__name__)

SIZES = {
    # 594k parameters; head_dim 32 because vLLM's CPU attention needs >= 32.
    "toy": dict(hidden_size=128, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
                intermediate_size=384),
    # 20.1M parameters, same family and tokenizer: for benchmarks (weight sync, throughput), randomly initialized.
    "bench": dict(hidden_size=512, num_hidden_layers=6, num_attention_heads=8, num_key_value_heads=4,
                  intermediate_size=1664),
}


def model_config(tokenizer: PreTrainedTokenizerBase, size: str = "toy") -> Qwen2Config:
    return Qwen2Config(vocab_size=len(tokenizer), max_position_embeddings=tokenizer.model_max_length,
                       tie_word_embeddings=True, rope_theta=10_000.0, use_sliding_window=False,
                       eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                       bos_token_id=None, torch_dtype="float32", **SIZES[size])


@dataclass(frozen=True)
class PretrainSettings:
    steps: int = 600
    batch: int = 64
    lr: float = 3e-3
    warmup: int = 30
    student_fraction: float = 0.25
    """Share of each batch in student format, drawn from the problems of `tasks.STUDENT_ONES_PAIRS`."""
    one_digit_fraction: float = 0.125
    """Share of each batch of one-digit problems, in either format."""
    seed: int = 0


# ----------------------------------------------------------------------------------------------
# Sequences: segments of (text, in the loss?) → token ids and a loss mask
# ----------------------------------------------------------------------------------------------

def teacher_segments(family: Family, a: int, b: int) -> list[tuple[str, bool]]:
    """Teacher format; the loss covers the worked steps and the answer, not the copied question."""
    ex = family.example(a, b)
    question = ex["prompt"][2:-1]
    steps = ex["context"][len(f"W:{question}:"):]
    return [(f"W:{question}:", False), (steps, True), (f"\n{ex['prompt']}", False), (ex["answer"], True)]


def student_segments(family: Family, a: int, b: int) -> list[tuple[str, bool]]:
    ex = family.example(a, b)
    return [(ex["prompt"], False), (ex["answer"], True)]


def encode(tokenizer: PreTrainedTokenizerBase, segments: list[tuple[str, bool]]) -> tuple[list[int], list[int]]:
    ids, mask = [], []
    for text, in_loss in segments:
        piece = tokenizer(text, add_special_tokens=False)["input_ids"]
        ids += piece
        mask += [int(in_loss)] * len(piece)
    return ids + [tokenizer.eos_token_id], mask + [1]


def collate(sequences: list[tuple[list[int], list[int]]], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pads to a batch; labels are -100 outside the loss mask."""
    width = max(len(ids) for ids, _ in sequences)
    input_ids = torch.full((len(sequences), width), pad_id)
    attention_mask = torch.zeros((len(sequences), width), dtype=torch.long)
    labels = torch.full((len(sequences), width), -100)
    for row, (ids, mask) in enumerate(sequences):
        input_ids[row, :len(ids)] = torch.tensor(ids)
        attention_mask[row, :len(ids)] = 1
        labels[row, :len(ids)] = torch.where(torch.tensor(mask, dtype=torch.bool), torch.tensor(ids), -100)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


# ----------------------------------------------------------------------------------------------
# Pretraining
# ----------------------------------------------------------------------------------------------

class Mixture:
    """Draws pretraining sequences from the families' training splits (never their eval splits)."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, train_pairs: dict[str, list[tuple[int, int]]],
                 settings: PretrainSettings):
        self.tokenizer, self.settings = tokenizer, settings
        self.rng = random.Random(settings.seed)
        self.families = [FAMILIES[name] for name in train_pairs]
        self.train = dict(train_pairs)
        self.easy = {name: [p for p in pairs if FAMILIES[name].student_pretrained(*p)]
                     for name, pairs in train_pairs.items()}
        self.one_digit = {name: FAMILIES[name].pairs(0, 10) for name in train_pairs}

    def _one(self, kind: str) -> tuple[list[int], list[int]]:
        family = self.rng.choice(self.families)
        if kind == "student":
            return encode(self.tokenizer, student_segments(family, *self.rng.choice(self.easy[family.name])))
        if kind == "one_digit":
            fmt = self.rng.choice([student_segments, teacher_segments])
            return encode(self.tokenizer, fmt(family, *self.rng.choice(self.one_digit[family.name])))
        return encode(self.tokenizer, teacher_segments(family, *self.rng.choice(self.train[family.name])))

    def batch(self) -> dict[str, torch.Tensor]:
        s = self.settings
        n_student = round(s.batch * s.student_fraction)
        n_one = round(s.batch * s.one_digit_fraction)
        kinds = ["student"] * n_student + ["one_digit"] * n_one + ["teacher"] * (s.batch - n_student - n_one)
        return collate([self._one(kind) for kind in kinds], self.tokenizer.pad_token_id)


def lr_at(step: int, settings: PretrainSettings) -> float:
    """Linear warm-up, then cosine decay to a tenth of the peak."""
    if step < settings.warmup:
        return settings.lr * (step + 1) / settings.warmup
    progress = (step - settings.warmup) / max(1, settings.steps - settings.warmup)
    return settings.lr * (0.1 + 0.45 * (1 + math.cos(math.pi * progress)))


def pretrain(model: Qwen2ForCausalLM, mixture: Mixture, settings: PretrainSettings) -> list[float]:
    """Plain AdamW pretraining; returns the loss of every step."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=settings.lr, betas=(0.9, 0.95), weight_decay=0.01)
    model.train()
    losses = []
    for step in range(settings.steps):
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, settings)
        loss = model(**mixture.batch()).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        losses.append(loss.item())
        if step % 100 == 0 or step == settings.steps - 1:
            logger.info("pretrain step %d/%d loss %.4f", step, settings.steps, losses[-1])
    model.eval()
    return losses


# ----------------------------------------------------------------------------------------------
# Greedy evaluation (transformers; the trainer evaluates through its vLLM engines instead)
# ----------------------------------------------------------------------------------------------

@torch.no_grad()
def greedy_completions(model: Qwen2ForCausalLM, tokenizer: PreTrainedTokenizerBase, prompts: list[str],
                       max_new_tokens: int = 6, batch_size: int = 512) -> list[str]:
    model.eval()
    out = []
    for start in range(0, len(prompts), batch_size):
        batch = tokenizer(prompts[start:start + batch_size], return_tensors="pt", padding=True,
                          padding_side="left", add_special_tokens=False)
        generated = model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False,
                                   pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
        out += tokenizer.batch_decode(generated[:, batch["input_ids"].shape[1]:], skip_special_tokens=True)
    return out


def format_accuracy(model: Qwen2ForCausalLM, tokenizer: PreTrainedTokenizerBase, records: list[dict],
                    teacher: bool) -> float:
    """Greedy exact-match accuracy in the student format (question only) or the teacher format."""
    prompts = [TEACHER_TEMPLATE.format(prompt=r["prompt"], context=r["context"]) if teacher else r["prompt"]
               for r in records]
    completions = greedy_completions(model, tokenizer, prompts)
    return sum(is_match(c, r["answer"]) for c, r in zip(completions, records, strict=True)) / len(records)
