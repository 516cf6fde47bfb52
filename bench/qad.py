"""On-policy quantization-aware distillation (QAD) on the toy world, against quantization-aware SFT.

The model is the toy world's stronger checkpoint (`selfdistill toy prepare --with-teacher`), which
answers most additions from the question alone. Two runs of the real trainer, one after the other,
both with `model.quantization` (the learners train fake-quantized weights with full-precision
masters; the engines sample from the quantized weights):

- QAD: the quantized copy samples its own answers and the full-precision start (`teacher.weights:
  initial`, shown the plain prompt, `teacher.template: "{prompt}"`) scores every token; reverse KL;
- SFT-QAT: the same quantized training with cross-entropy on the records' answers (`loss.mode=sft`).

Accuracies are greedy, held-out, from the question alone: `fp` is the full-precision model's (the
teacher's step-0 evaluation, which runs on its full-precision engine), `ptq` the quantized model's
before training (the student's step-0 evaluation), `qad` and `sft_qat` each run's last. The last
line is

    qad: fp=… ptq=… qad=… sft_qat=… recovered=…

with recovered = (qad − ptq) / (fp − ptq). When quantization costs nothing (fp ≤ ptq) there is
nothing to recover: the script says so and exits with status 1. Finally the QAD run's `quantized/`
export (the quantized weights, dequantized, in `save_pretrained` format) is loaded into a fresh vLLM
engine and evaluated: it must give the `qad` accuracy.

    python bench/qad.py                      # int2, groups of 32, 200 steps of 64 prompts
    python bench/qad.py --set model.quantization.scheme=int4
"""

import argparse
import gc
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
from efficiency import start_ray  # noqa: E402  (one local Ray, restarted when its start-up times out)

QUANTIZED = ("model.quantization.scheme=int2", "model.quantization.group_size=32")
METHODS = {
    "qad": ("teacher.weights=initial", "teacher.template={prompt}", "loss.divergence=reverse_kl"),
    "sft_qat": ("loss.mode=sft",),
}


def run(name: str, args) -> tuple[list[dict], Path]:
    from trainer.config import load_config
    from trainer.loop import train
    from trainer.monitoring.metrics import read_metrics
    toy = Path(args.toy)
    overrides = [f"name={name}", f"output_dir={args.out}", f"model.path={toy / 'teacher' / 'model'}",
                 f"data.train={toy / 'data' / 'addition' / 'train.jsonl'}", f"data.eval={args.eval_file}",
                 f"train.steps={args.steps}", f"train.eval_every={args.eval_every}", "train.save_every=0",
                 "log.samples_every=0", "log.tensorboard=false", f"learner.lr={args.lr}",
                 f"learner.warmup_steps={args.warmup}", *QUANTIZED, *METHODS[name], *args.set]
    train(load_config(ROOT / "configs" / "toy.yaml", overrides), resume="never")
    gc.collect()
    return read_metrics(Path(args.out) / name), Path(args.out) / name


def export_accuracy(run_dir: Path, eval_file: str) -> float:
    """Greedy held-out accuracy of the last checkpoint's `quantized/` export, in a fresh vLLM engine."""
    from trainer.lifecycle.checkpoint import resolve_resume
    from trainer.step.evaluation import saved_model_accuracy
    return saved_model_accuracy(resolve_resume(run_dir, "auto") / "quantized", eval_file)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--toy", default=str(ROOT / ".cache" / "toyworld"))
    parser.add_argument("--out", default=str(ROOT / "runs" / "qad" / time.strftime("%Y%m%d-%H%M%S")))
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--eval-every", type=int, default=25)
    parser.add_argument("--lr", type=float, default=3e-4)
    parser.add_argument("--warmup", type=int, default=0)
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="overrides of both runs")
    args = parser.parse_args()
    args.eval_file = str(Path(args.toy) / "data" / "addition" / "eval.jsonl")
    if not (Path(args.toy) / "teacher" / "prepare.json").is_file():
        sys.exit(f"qad: no stronger checkpoint in {args.toy}/teacher: run `selfdistill toy prepare --out {args.toy} "
                 "--with-teacher` first")
    start_ray()
    accuracy = {}
    for name in METHODS:
        metrics, run_dir = run(name, args)
        curve = [(m["step"], m["eval/addition/accuracy"]) for m in metrics if "eval/addition/accuracy" in m]
        print(f"{name}: " + " ".join(f"{step}:{value:.3f}" for step, value in curve), flush=True)
        accuracy[name] = curve[-1][1]
        if name == "qad":
            fp, ptq = metrics[0]["eval/addition/teacher_accuracy"], curve[0][1]
            accuracy["export"] = export_accuracy(run_dir, args.eval_file)
            print(f"qad: the quantized export in a fresh vLLM engine: {accuracy['export']:.3f} "
                  f"(the run's last evaluation: {accuracy['qad']:.3f})", flush=True)
    if fp <= ptq:
        sys.exit(f"qad: no comparison: quantization cost nothing here (fp={fp:.4f}, ptq={ptq:.4f})")
    recovered = (accuracy["qad"] - ptq) / (fp - ptq)
    print(f"qad: fp={fp:.4f} ptq={ptq:.4f} qad={accuracy['qad']:.4f} sft_qat={accuracy['sft_qat']:.4f} "
          f"recovered={recovered:.2f}")


if __name__ == "__main__":
    main()
