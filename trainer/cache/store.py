"""The cache's files: safetensors shards of per-token teacher scores, and a manifest.

    DIR/manifest.json          what the cache is (below), written first; `complete` once every shard is there
    DIR/shard-00000.safetensors
      prompt_offsets     int64 [N+1]   record i's prompt is prompt_ids[prompt_offsets[i]:prompt_offsets[i+1]]
      prompt_ids         ids   [P]     the prompt the *student* trains on (plain, or teacher-format for replay)
      completion_offsets int64 [N+1]
      completion_ids     ids   [T]
      token_logprobs     fp16  [T]     log p_T of each completion token
      topk_ids           ids   [T, K]  the teacher's top-k at each completion position, by rank
      topk_logprobs      fp16  [T, K]  their log-probabilities (untempered, not renormalized)
      tail_logprobs      fp16  [T]     log(1 − Σ_k p_T(k)): the mass outside the top-k
      metadata: example_ids, tasks (JSON lists, one per record)

`ids` is the narrowest unsigned integer type that holds the vocabulary (uint8 up to 256 entries,
uint16 up to 65,536, else int32). Shards are written whole under a temporary name and renamed, so
a shard on disk is complete and an interrupted scoring resumes at the first missing one.

The manifest's `identity` (teacher model and tokenizer fingerprints, template, k, dataset
fingerprint, what the completions are) decides whether a cache fits a run; `check_identity`
names every field that differs.
"""

import hashlib
import itertools
import json
import math
import os
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import torch

from core.errors import ConfigError, DataError
from rollout.batch import TeacherScores

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
SAMPLED_BYTES = 4 << 20
"""A weight file is fingerprinted by its size and its first and last 4 MiB: hashing a 15 GB
checkpoint whole would take a minute at every run start; different weights of one shape differ
in those bytes (the header, the first and the last tensors) unless a run changed only the middle
layers' values, which the model's own path and file dates then tell apart in the manifest."""


# ----------------------------------------------------------------------------------------------
# Fingerprints
# ----------------------------------------------------------------------------------------------

def _file_digest(digest, path: Path) -> None:
    size = path.stat().st_size
    digest.update(f"{path.name}:{size}\n".encode())
    with path.open("rb") as f:
        if size <= 2 * SAMPLED_BYTES:
            digest.update(f.read())
            return
        digest.update(f.read(SAMPLED_BYTES))
        f.seek(size - SAMPLED_BYTES)
        digest.update(f.read(SAMPLED_BYTES))


def model_fingerprint(model_dir: str | Path) -> str:
    """A model's config and weight files (see SAMPLED_BYTES), not its path."""
    model_dir = Path(model_dir)
    files = sorted([model_dir / "config.json", *model_dir.glob("*.safetensors"), *model_dir.glob("*.bin")])
    if not files[0].is_file():
        raise ConfigError(f"{model_dir}: not a model directory (no config.json)")
    digest = hashlib.sha256()
    for path in files:
        _file_digest(digest, path)
    return digest.hexdigest()[:16]


def tokenizer_fingerprint(tokenizer) -> str:
    """The vocabulary (every token and its id) and the special tokens, not the files they came from."""
    digest = hashlib.sha256(json.dumps(sorted(tokenizer.get_vocab().items(), key=lambda item: item[1])).encode())
    digest.update(json.dumps(tokenizer.special_tokens_map, sort_keys=True, default=str).encode())
    return digest.hexdigest()[:16]


def id_dtype(vocab_size: int) -> torch.dtype:
    """The narrowest integer type holding every token id."""
    if vocab_size <= 2**8:
        return torch.uint8
    if vocab_size <= 2**16:
        return torch.uint16
    return torch.int32


# ----------------------------------------------------------------------------------------------
# Records
# ----------------------------------------------------------------------------------------------

@dataclass
class CachedRecord:
    """One completion and the teacher's view of it."""

    example_id: str
    task: str
    prompt_ids: list[int]
    completion_ids: list[int]
    scores: TeacherScores


def tail_logprobs(topk_logprobs_TK: torch.Tensor) -> torch.Tensor:
    """log(1 − Σ_k p(k)) per position, in fp32 (-inf when the top-k holds all the mass)."""
    mass = torch.logsumexp(topk_logprobs_TK.float(), dim=-1)
    return torch.where(mass < -1e-6, torch.log(-torch.expm1(mass.clamp(max=0.0))), -math.inf)


def shard_tensors(records: list[CachedRecord], vocab_size: int, k: int) -> dict[str, torch.Tensor]:
    """The tensors of one shard (see the module docstring)."""
    ids = id_dtype(vocab_size)

    def offsets(rows: list[list]) -> torch.Tensor:
        return torch.tensor([0, *itertools.accumulate(len(r) for r in rows)], dtype=torch.int64)

    def flat(rows: list[list[int]]) -> torch.Tensor:
        return torch.tensor([t for r in rows for t in r], dtype=torch.int64).to(ids)

    for record in records:
        if len(record.scores.topk_ids) != len(record.completion_ids) or \
                any(len(row) != k for row in record.scores.topk_ids):
            raise DataError(f"record {record.example_id}: its scores are not {k} per completion token")
    topk = torch.tensor([row for r in records for row in r.scores.topk_logprobs], dtype=torch.float32).reshape(-1, k)
    return {
        "prompt_offsets": offsets([r.prompt_ids for r in records]), "prompt_ids": flat([r.prompt_ids for r in records]),
        "completion_offsets": offsets([r.completion_ids for r in records]),
        "completion_ids": flat([r.completion_ids for r in records]),
        "token_logprobs": torch.tensor([v for r in records for v in r.scores.token_logprobs], dtype=torch.float16),
        "topk_ids": torch.tensor([row for r in records for row in r.scores.topk_ids], dtype=torch.int64)
                         .reshape(-1, k).to(ids),
        "topk_logprobs": topk.to(torch.float16),
        "tail_logprobs": tail_logprobs(topk).to(torch.float16),
    }


def write_shard(path: Path, records: list[CachedRecord], vocab_size: int, k: int) -> int:
    """Writes one shard atomically; returns its bytes."""
    from safetensors.torch import save_file
    metadata = {"example_ids": json.dumps([r.example_id for r in records]), "tasks": json.dumps([r.task for r in records])}
    staging = path.with_name(path.name + ".tmp")
    save_file(shard_tensors(records, vocab_size, k), str(staging), metadata=metadata)
    os.replace(staging, path)
    return path.stat().st_size


def shard_name(index: int) -> str:
    return f"shard-{index:05d}.safetensors"


# ----------------------------------------------------------------------------------------------
# Manifest
# ----------------------------------------------------------------------------------------------

def write_manifest(directory: Path, manifest: dict) -> None:
    staging = directory / (MANIFEST + ".tmp")
    staging.write_text(json.dumps(manifest, indent=1))
    os.replace(staging, directory / MANIFEST)


def read_manifest(directory: str | Path) -> dict:
    path = Path(directory) / MANIFEST
    if not path.is_file():
        raise ConfigError(f"{path}: no teacher cache here (no manifest; `selfdistill score` writes one)")
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise DataError(f"{path}: line {e.lineno}: not JSON ({e.msg})") from e
    if manifest.get("format") != FORMAT_VERSION:
        raise DataError(f"{path}: field 'format': {manifest.get('format')!r}, this version reads {FORMAT_VERSION}")
    return manifest


def identity_differences(found: dict, expected: dict, keys: tuple[str, ...] | None = None) -> list[str]:
    """The identity fields (dotted) whose values differ, each with both values."""
    problems = []
    for key in keys or sorted(set(found) | set(expected)):
        a, b = found.get(key), expected.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            problems += [f"{key}.{p}" for p in identity_differences(a, b)]
        elif a != b:
            problems.append(f"{key}: the cache has {a!r:.120}, the run {b!r:.120}")
    return problems


def check_identity(directory: str | Path, manifest: dict, expected: dict, keys: tuple[str, ...], what: str) -> None:
    """ConfigError naming every field of `keys` in which the cache's identity and the run's differ."""
    problems = identity_differences(manifest["identity"], expected, keys)
    if problems:
        raise ConfigError(f"{what} {directory}: made for another run; what differs:\n  " + "\n  ".join(problems))


# ----------------------------------------------------------------------------------------------
# Reading
# ----------------------------------------------------------------------------------------------

class TeacherCache:
    """A complete cache, read a record at a time: `len(cache)`, `cache[i]` → CachedRecord. Shards are
    opened lazily (memory-mapped by safetensors), a few at a time, so a cache larger than memory
    trains as well as a small one."""

    OPEN_SHARDS = 4

    def __init__(self, directory: str | Path):
        self.directory = Path(directory)
        self.manifest = read_manifest(self.directory)
        if not self.manifest.get("complete"):
            raise DataError(f"{self.directory / MANIFEST}: the cache is incomplete (scoring stopped after "
                            f"{len(self.manifest.get('shards', []))} shard(s)); run the same `selfdistill score` to finish it")
        self.k = self.manifest["identity"]["k"]
        self._starts = [0]
        for shard in self.manifest["shards"]:
            self._starts.append(self._starts[-1] + shard["records"])
        self._open: OrderedDict[int, tuple[dict, dict]] = OrderedDict()

    def __len__(self) -> int:
        return self._starts[-1]

    def _shard(self, index: int) -> tuple[dict, dict]:
        if index not in self._open:
            from safetensors import safe_open
            path = self.directory / self.manifest["shards"][index]["file"]
            if not path.is_file():
                raise DataError(f"{path}: a shard named in {self.directory / MANIFEST} is missing")
            with safe_open(str(path), framework="pt") as f:
                tensors = {name: f.get_tensor(name) for name in f.keys()}
                metadata = {key: json.loads(value) for key, value in (f.metadata() or {}).items()}
            self._open[index] = (tensors, metadata)
            while len(self._open) > self.OPEN_SHARDS:
                self._open.popitem(last=False)
        self._open.move_to_end(index)
        return self._open[index]

    def __getitem__(self, i: int) -> CachedRecord:
        if not 0 <= i < len(self):
            raise IndexError(i)
        shard = next(s for s in range(len(self._starts) - 1) if i < self._starts[s + 1])
        tensors, metadata = self._shard(shard)
        row = i - self._starts[shard]

        def span(name: str) -> slice:
            offsets = tensors[f"{name}_offsets"]
            return slice(int(offsets[row]), int(offsets[row + 1]))

        prompt, completion = span("prompt"), span("completion")
        scores = TeacherScores(token_logprobs=tensors["token_logprobs"][completion].float().tolist(),
                               topk_ids=tensors["topk_ids"][completion].int().tolist(),
                               topk_logprobs=tensors["topk_logprobs"][completion].float().tolist())
        return CachedRecord(example_id=metadata["example_ids"][row], task=metadata["tasks"][row],
                            prompt_ids=tensors["prompt_ids"][prompt].int().tolist(),
                            completion_ids=tensors["completion_ids"][completion].int().tolist(), scores=scores)

    def bytes_per_token(self) -> float:
        """The shards' bytes over their completion tokens (prompts and offsets included)."""
        return sum(s["bytes"] for s in self.manifest["shards"]) / max(sum(s["tokens"] for s in self.manifest["shards"]), 1)
