"""The teacher cache's two numbers: what the top-k + tail form loses, and what it weighs.

    python bench/cache.py              # ~2 minutes on a 2-core CPU (the real-shape model is built once)

1. **Fidelity.** The teacher's full next-token distribution p at each completion position, against
   p̂, the cache's top-k with the tail mass spread evenly over the other V − k tokens: mean
   KL(p ‖ p̂) per token (`trainer.cache.fidelity`), at k = 5, 10, 20, 50.
   - toy: the toy base reading the worked solution (the self-teacher of `make demo`), on the
     demonstrations of 256 held-out additions;
   - real-shape: the real-shape `bench` model (32,000-token vocabulary) reading the privileged
     context, on 32 of its prompts, at every completion position of its own samples. Its weights
     are random but for the EOS row: its distributions are far flatter than a trained model's,
     which is the hard case for a top-k (a trained model's mass sits in fewer tokens).
2. **Size.** `selfdistill score` (k = 20) of those completions, through a vLLM engine: the shards'
   bytes per completion token (the prompts stored with them included), against the 2·V bytes of the
   same token's full distribution in bf16.

Last lines:

    fidelity: model=… k=5 kl=… k=10 kl=… k=20 kl=… k=50 kl=…   (a line per model)
    size: model=… k=20 bytes_per_token=… full_bf16_bytes=… ratio=…   (a line per model)
"""

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

KS = (5, 10, 20, 50)


def subset(source: Path, out: Path, count: int) -> Path:
    out.write_text("".join(source.read_text().splitlines(True)[:count]))
    return out


def fidelity(model_dir: Path, cache: Path) -> dict[int, float]:
    """Mean KL(full ‖ top-k + uniform tail) per completion token of the cache's records, the full
    distribution recomputed by a transformers forward of the teacher prompt + completion."""
    import torch
    from transformers import AutoModelForCausalLM

    from trainer.cache.fidelity import reconstruction_kl
    from trainer.cache.store import TeacherCache
    from trainer.learner.forward import completion_logits
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    records = TeacherCache(cache)
    teacher_prompts = json.loads((cache / "teacher_prompts.json").read_text())
    sums, tokens = dict.fromkeys(KS, 0.0), 0
    with torch.no_grad():
        for start in range(0, len(records), 16):
            rows = [records[i] for i in range(start, min(start + 16, len(records)))]
            logits = completion_logits(model, [teacher_prompts[r.example_id] for r in rows],
                                       [r.completion_ids for r in rows], False)
            logprobs = logits.float().log_softmax(-1)
            for k in KS:
                sums[k] += reconstruction_kl(logprobs, k).sum().item()
            tokens += logprobs.shape[0]
    return {k: sums[k] / tokens for k in KS}


def score(config_overrides: list[str], out: Path, completions: str) -> tuple[Path, int]:
    """`selfdistill score` into `out`; also writes each record's teacher prompt (for the fidelity
    forward). Returns the cache and the vocabulary size."""
    from trainer.cache.scoring import score_dataset
    from trainer.config import load_config
    from trainer.lifecycle.startup import load_inputs
    cfg = load_config(ROOT / "configs" / "toy.yaml", config_overrides)
    manifest = score_dataset(cfg, out, completions, shard_size=64)
    inputs = load_inputs(cfg)
    (out / "teacher_prompts.json").write_text(json.dumps(inputs.encoded_train.teacher))
    return out, manifest["vocab_size"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=str(ROOT / "runs" / "bench-cache"))
    parser.add_argument("--toy-records", type=int, default=256)
    parser.add_argument("--real-records", type=int, default=32)
    args = parser.parse_args()
    started = time.perf_counter()
    out = Path(args.out) / time.strftime("%Y%m%d-%H%M%S")
    out.mkdir(parents=True)
    from toyworld.base import PretrainSettings
    from toyworld.prepare import prepare
    from toyworld.realshape import RealShapeSettings, build
    toy = ROOT / ".cache" / "toyworld"
    prepare(toy, PretrainSettings())
    real = build(ROOT / ".cache" / "realshape", RealShapeSettings(size="bench"))
    common = [f"output_dir={out}", "loss.topk=20", "rollout.engines=1"]
    models = {
        "toy": (toy / "model", "demonstrations",
                [f"model.path={toy / 'model'}", "teacher.template={context}\n{prompt}",
                 f"data.train={subset(toy / 'data' / 'addition' / 'eval.jsonl', out / 'toy.jsonl', args.toy_records)}"]),
        "realshape": (real / "model", "samples",
                      [f"model.path={real / 'model'}", "teacher.template={context}\n\n{prompt}",
                       f"data.train={subset(real / 'data' / 'train.jsonl', out / 'real.jsonl', args.real_records)}",
                       "rollout.max_tokens=1024", "model.max_model_len=4096"]),
    }
    results = {}
    for name, (model_dir, completions, overrides) in models.items():
        cache, vocab = score([*common, *overrides], out / f"{name}-cache", completions)
        from trainer.cache.store import TeacherCache
        kls = fidelity(model_dir, cache)
        size = TeacherCache(cache).bytes_per_token()
        results[name] = (kls, size, 2 * vocab)
        print(f"[{name}] V={vocab}: " + ", ".join(f"k={k} KL {kl:.4g} nats/token" for k, kl in kls.items())
              + f"; {size:.1f} bytes/token cached vs {2 * vocab} in bf16", flush=True)
    print(f"({time.perf_counter() - started:.0f} s in all; caches in {out})")
    for name, (kls, _, _) in results.items():
        print(f"fidelity: model={name} " + " ".join(f"k={k} kl={kl:.3g}" for k, kl in kls.items()))
    for name, (_, size, full) in results.items():
        print(f"size: model={name} k=20 bytes_per_token={size:.1f} full_bf16_bytes={full} ratio={size / full:.4f}")


if __name__ == "__main__":
    main()
