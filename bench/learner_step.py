"""The learner alone, without Ray or vLLM: one DeepSpeed rank (NCCL on a GPU, gloo on CPU) trains
on a fixed batch of synthetic rollouts, with the teacher on the learner (full vocabulary).

    python bench/learner_step.py --model .cache/toyworld/model --zero 2
    python bench/learner_step.py --random 0.5b --dtype bfloat16 --zero 3 --completion 512

    python bench/learner_step.py --compare-checkpointing                  # 20M, 1,024-token completions
    python bench/learner_step.py --compare-packing                        # the real shape, packed vs padded

It prints, as measured: the loss of each step (on a fixed batch it must fall), seconds per step,
completion tokens per second, peak memory (the accelerator's; on CPU how far the process's resident
memory rose above its level before the first step), and two checks: the exported weights cover every
parameter, and the EMA teacher moved by exactly α toward the student.

`--compare-checkpointing` runs the same measurement twice, each in a process of its own (a process's
peak resident memory never falls), without and with `learner.gradient_checkpointing`, and prints

    checkpointing: completion=… peak_off_gib=… peak_on_gib=… memory_ratio=… s_per_step_off=… s_per_step_on=… time_ratio=…

`--compare-packing` runs the real shape (`selfdistill toy realshape`: the 37M Llama with a 32k
vocabulary; the prompt and completion lengths the model itself sampled, kept in its lengths.json,
the same on both sides) padded and packed (`learner.packing`), with the same micro-batches of 4
sequences, each side in a process of its own, alternating over `--rounds` rounds, and prints the
lengths' histogram, then

    packing: sequences=… padding_share=… padded_tps=… packed_tps=… ratio=… padded_peak_gib=… packed_peak_gib=…

tps = completion tokens trained per second (medians over the rounds); padding_share = the share of
the padded micro-batches' tokens that are padding.
"""

import argparse
import json
import re
import resource
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from rollout.batch import Rollout  # noqa: E402
from trainer.config import config_to_dict, load_config  # noqa: E402
from trainer.learner.learner import Learner  # noqa: E402

RANDOM_SIZES = {  # Qwen2 shapes with Qwen's 151,936-token vocabulary, randomly initialized
    "0.5b": dict(hidden_size=896, num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2,
                 intermediate_size=4864, vocab_size=151_936, tie_word_embeddings=True),
    # the toy world's bench size with a real tokenizer's vocabulary (SentencePiece, 32k): small enough
    # for 1,024-token completions on a CPU
    "20m": dict(hidden_size=512, num_hidden_layers=6, num_attention_heads=8, num_key_value_heads=4,
                intermediate_size=1664, vocab_size=32_000, tie_word_embeddings=True),
}
COMPARE_CHECKPOINTING = ["--random", "20m", "--sequences", "4", "--micro-batch", "2", "--prompt", "64",
                         "--completion", "1024", "--steps", "3"]


def resident_gib() -> float:
    """This process's resident memory now (Linux)."""
    return int(Path("/proc/self/statm").read_text().split()[1]) * resource.getpagesize() / 2**30


def peak_resident_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def compare_checkpointing() -> None:
    """The measurement without and with gradient checkpointing, each in a fresh process."""
    results = {}
    for flag in ("off", "on"):
        command = [sys.executable, __file__, *COMPARE_CHECKPOINTING] + (["--checkpointing"] if flag == "on" else [])
        output = subprocess.run(command, check=True, capture_output=True, text=True).stdout
        line = next(row for row in output.splitlines() if row.startswith("learner_step:"))
        print(line.replace("learner_step:", f"checkpointing {flag}:"), flush=True)
        results[flag] = {k: float(v) for k, v in re.findall(r"(s_per_step|peak_gib)=([0-9.]+)", line)}
    off, on = results["off"], results["on"]
    completion = COMPARE_CHECKPOINTING[COMPARE_CHECKPOINTING.index("--completion") + 1]
    print(f"checkpointing: completion={completion} peak_off_gib={off['peak_gib']:.2f} peak_on_gib={on['peak_gib']:.2f} "
          f"memory_ratio={on['peak_gib'] / off['peak_gib']:.2f} s_per_step_off={off['s_per_step']:.2f} "
          f"s_per_step_on={on['s_per_step']:.2f} time_ratio={on['s_per_step'] / off['s_per_step']:.2f}")


COMPARE_PACKING = ["--sequences", "16", "--micro-batch", "4", "--steps", "3"]
REALSHAPE = Path(__file__).resolve().parents[1] / ".cache" / "realshape"


def compare_packing(rounds: int) -> None:
    """The real shape padded and packed, each run in a fresh process, alternating for `rounds` rounds."""
    import statistics

    from toyworld.realshape import RealShapeSettings, build, length_histogram
    build(REALSHAPE, RealShapeSettings(size="bench"))
    lengths = json.loads((REALSHAPE / "lengths.json").read_text())
    count = int(COMPARE_PACKING[COMPARE_PACKING.index("--sequences") + 1])
    micro = int(COMPARE_PACKING[COMPARE_PACKING.index("--micro-batch") + 1])
    print(length_histogram(lengths["completion"][:count]), flush=True)
    totals = [p + c for p, c in zip(lengths["prompt"][:count], lengths["completion"][:count], strict=True)]
    groups = [totals[i:i + micro] for i in range(0, count, micro)]
    padding_share = 1 - sum(totals) / sum(len(g) * max(g) for g in groups)
    results = {"padded": [], "packed": []}
    for r in range(rounds):
        for side in (("padded", "packed") if r % 2 == 0 else ("packed", "padded")):
            command = [sys.executable, __file__, "--model", str(REALSHAPE / "model"), "--lengths",
                       str(REALSHAPE / "lengths.json"), *COMPARE_PACKING] + (["--packing"] if side == "packed" else [])
            output = subprocess.run(command, check=True, capture_output=True, text=True).stdout
            line = next(row for row in output.splitlines() if row.startswith("learner_step:"))
            print(f"round {r + 1} {side}: {line.removeprefix('learner_step: ')}", flush=True)
            results[side].append({k: float(v) for k, v in re.findall(r"(tokens_per_s|peak_gib)=([0-9.]+)", line)})
    median = {side: {key: statistics.median(run[key] for run in runs) for key in runs[0]} for side, runs in results.items()}
    padded, packed = median["padded"], median["packed"]
    print(f"packing: sequences={count} padding_share={padding_share:.2f} padded_tps={padded['tokens_per_s']:.1f} "
          f"packed_tps={packed['tokens_per_s']:.1f} ratio={packed['tokens_per_s'] / padded['tokens_per_s']:.2f} "
          f"padded_peak_gib={padded['peak_gib']:.2f} packed_peak_gib={packed['peak_gib']:.2f}")


def random_model(size: str, dtype: str) -> str:
    from transformers import Qwen2Config, Qwen2ForCausalLM
    directory = Path(tempfile.gettempdir()) / f"selfdistill-random-qwen2-{size}-{dtype}"
    if (directory / "random.json").is_file():
        return str(directory)
    torch.manual_seed(0)
    Qwen2ForCausalLM(Qwen2Config(max_position_embeddings=4096, **RANDOM_SIZES[size])).to(
        getattr(torch, dtype)).save_pretrained(directory)
    (directory / "random.json").write_text(json.dumps({"size": size}))
    return str(directory)


def synthetic_batch(vocab: int, prompts: list[int], completions: list[int], seed: int = 0):
    """Random token ids at the given prompt and completion lengths, one sequence per pair."""
    g = torch.Generator().manual_seed(seed)
    rollouts, teacher_prompts = [], []
    for i, (prompt, completion) in enumerate(zip(prompts, completions, strict=True)):
        ids = torch.randint(3, vocab, (prompt + completion,), generator=g).tolist()
        rollouts.append(Rollout(str(i), ids[:prompt], ids[prompt:], [0.0] * completion, 0, "length"))
        teacher_prompts.append(ids[:prompt] + ids[:prompt // 2])  # a longer teacher prompt
    return rollouts, teacher_prompts


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="a save_pretrained directory")
    parser.add_argument("--random", choices=sorted(RANDOM_SIZES), help="a randomly initialized Qwen2 instead")
    parser.add_argument("--zero", type=int, default=2, choices=[2, 3])
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--estimator", default="full", choices=["full", "topk", "sampled"])
    parser.add_argument("--sequences", type=int, default=16)
    parser.add_argument("--prompt", type=int, default=16)
    parser.add_argument("--completion", type=int, default=8)
    parser.add_argument("--micro-batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--checkpointing", action="store_true", help="learner.gradient_checkpointing=true")
    parser.add_argument("--packing", action="store_true", help="learner.packing=true")
    parser.add_argument("--lengths", help="a lengths.json (`selfdistill toy realshape`): the first --sequences "
                                          "prompt and completion lengths, instead of --prompt and --completion")
    parser.add_argument("--compare-checkpointing", action="store_true",
                        help="peak memory and step time without and with gradient checkpointing (see above)")
    parser.add_argument("--compare-packing", action="store_true", help="the real shape, padded vs packed (see above)")
    parser.add_argument("--rounds", type=int, default=3, help="--compare-packing: rounds of both sides")
    args = parser.parse_args()
    if args.compare_checkpointing:
        return compare_checkpointing()
    if args.compare_packing:
        return compare_packing(args.rounds)
    model = args.model or random_model(args.random, args.dtype)
    with socket.socket() as s:
        s.bind(("", 0))
        port = s.getsockname()[1]
    cfg = load_config(Path(__file__).resolve().parents[1] / "configs" / "toy.yaml", [
        f"model.path={model}", f"model.dtype={args.dtype}", f"learner.zero_stage={args.zero}",
        "teacher.scorer=learner", "teacher.weights=ema", "teacher.ema_alpha=0.5", f"loss.estimator={args.estimator}",
        f"train.prompts_per_step={args.sequences}", f"learner.micro_batch={args.micro_batch}", "learner.lr=1e-4",
        "data.train=unused.jsonl", f"learner.gradient_checkpointing={str(args.checkpointing).lower()}",
        f"learner.packing={str(args.packing).lower()}"])
    learner = Learner(config_to_dict(cfg), 0, 1, "127.0.0.1", port)
    vocab = learner.engine.module.config.vocab_size
    if args.lengths:
        lengths = json.loads(Path(args.lengths).read_text())
        prompts, completions = lengths["prompt"][:args.sequences], lengths["completion"][:args.sequences]
    else:
        prompts, completions = [args.prompt] * args.sequences, [args.completion] * args.sequences
    rollouts, teacher_prompts = synthetic_batch(vocab, prompts, completions)
    tokens = sum(completions)
    cuda = torch.cuda.is_available()
    print(f"device={'cuda:' + torch.cuda.get_device_name(0) if cuda else 'cpu'} zero={args.zero} dtype={args.dtype} "
          f"estimator={args.estimator} params={sum(p.numel() for p in learner.teacher.parameters()) / 1e6:.1f}M "
          f"sequences={args.sequences} prompt_mean={sum(prompts) / len(prompts):.0f} "
          f"completion_mean={tokens / len(completions):.0f} checkpointing={args.checkpointing} packing={args.packing}")
    resident_before = resident_gib()

    teacher_before = learner.export_weights("teacher")
    losses, seconds = [], []
    for step in range(args.steps):
        if cuda:
            torch.cuda.synchronize()
        started = time.perf_counter()
        metrics = learner.train_step(rollouts, teacher_prompts, None, tokens)
        if cuda:
            torch.cuda.synchronize()
        seconds.append(time.perf_counter() - started)
        losses.append(metrics["distill/loss"])
        print(f"step {step}: loss {metrics['distill/loss']:.5f} grad_norm {metrics['learner/grad_norm']:.3f} "
              f"{seconds[-1]:.3f} s")
        if step == 0:
            student, teacher_after = learner.export_weights("student"), learner.export_weights("teacher")
            ema_error = max((teacher_after[k] - (0.5 * teacher_before[k] + 0.5 * student[k])).abs().max().item()
                            for k in student)
            missing = set(dict(learner.engine.module.named_parameters())) - set(student)
    steady = seconds[1:] or seconds
    peak = torch.cuda.max_memory_allocated() / 2**30 if cuda else peak_resident_gib() - resident_before
    print(f"learner_step: s_per_step={sum(steady) / len(steady):.4f} tokens_per_s={tokens * len(steady) / sum(steady):.1f} "
          f"loss_first={losses[0]:.5f} loss_last={losses[-1]:.5f} falls={losses[-1] < losses[0]} "
          f"peak_gib={peak:.2f} export_missing={len(missing)} ema_max_error={ema_error:.2e}")


if __name__ == "__main__":
    main()
