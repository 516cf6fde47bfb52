"""`selfdistill report RUN_DIR [RUN_DIR ...]`: plots and a rollout page from run directories.

Everything is read from the run directory, never from memory of the run: `metrics.jsonl` for the
curves and `samples.jsonl` for the rollouts. With several runs every plot overlays them (one colour
per run), e.g. reverse against forward KL. Writes:

    reward.png    rollout reward per step, raw and smoothed
    eval.png      greedy held-out accuracy per task (the teacher's at step 0 dashed)
    loss.png      the sampled-token KL estimate and the loss, per completion token
    time.png      seconds per step in each phase, stacked, and completion tokens per second
    samples.html  sample rollouts, each token coloured by teacher minus student logprob
"""

import html
import json
from dataclasses import dataclass
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; no display needed (and none on a cluster node)
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from matplotlib.ticker import MaxNLocator, PercentFormatter  # noqa: E402

from core.errors import SelfDistillError  # noqa: E402

PHASES = ("generate", "score", "train", "sync")
SMOOTHING = 0.9
"""Weight of the past in the smoothed curves (TensorBoard's exponential moving average, debiased)."""


@dataclass
class Run:
    name: str
    metrics: list[dict]
    samples: list[dict]


def smooth(values: list[float], weight: float = SMOOTHING) -> list[float]:
    """Debiased exponential moving average: the first points are not pulled toward zero."""
    out, average = [], 0.0
    for i, value in enumerate(values, start=1):
        average = weight * average + (1 - weight) * value
        out.append(average / (1 - weight ** i))
    return out


def series(metrics: list[dict], key: str) -> tuple[list[int], list[float]]:
    """(steps, values) of the steps that logged `key`."""
    rows = [m for m in metrics if key in m]
    return [m["step"] for m in rows], [m[key] for m in rows]


def _read_jsonl(path: Path) -> list[dict]:
    if not path.exists():
        return []
    rows = []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise SelfDistillError(f"{path}:{number}: not JSON ({e.msg})") from e
    return rows


def load_run(run_dir: Path, name: str | None = None) -> Run:
    run_dir = Path(run_dir)
    if not (run_dir / "metrics.jsonl").is_file():
        raise SelfDistillError(f"{run_dir}: no metrics.jsonl; give a run directory (runs/<name>)")
    return Run(name or run_dir.name, _read_jsonl(run_dir / "metrics.jsonl"), _read_jsonl(run_dir / "samples.jsonl"))


def _colors(runs: list[Run]) -> dict[str, str]:
    cycle = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    return {run.name: cycle[i % len(cycle)] for i, run in enumerate(runs)}


def _raw_and_smoothed(ax, run: Run, key: str, color: str, label: str | None = None):
    steps, values = series(run.metrics, key)
    if not steps:
        return
    label = label or run.name
    ax.plot(steps, values, color=color, alpha=0.3, linewidth=0.8, label=f"{label} (raw)")
    ax.plot(steps, smooth(values), color=color, linewidth=2, label=f"{label} (smoothed, EMA {SMOOTHING})")


def _finish(ax, title: str, ylabel: str, xlabel: str = "step"):
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # steps are whole numbers
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize="small")


def reward_figure(runs: list[Run]) -> Figure:
    fig, ax = plt.subplots(figsize=(8, 4.5), layout="constrained")
    colors = _colors(runs)
    for run in runs:
        _raw_and_smoothed(ax, run, "reward/mean", colors[run.name])
    _finish(ax, "Rollout reward (reward/mean: the mean over reward functions and rollouts)",
            "mean reward per rollout")
    return fig


def eval_figure(runs: list[Run]) -> Figure:
    fig, ax = plt.subplots(figsize=(8, 4.5), layout="constrained")
    colors = _colors(runs)
    markers = "osD^v<>p*h"
    for run in runs:
        tasks = sorted({k.split("/")[1] for m in run.metrics for k in m if k.startswith("eval/")})
        for marker, task in zip(markers * len(tasks), tasks):
            steps, values = series(run.metrics, f"eval/{task}/accuracy")
            if steps:
                ax.plot(steps, values, color=colors[run.name], marker=marker, label=f"{run.name}: {task}, student")
            teacher_steps, teacher = series(run.metrics, f"eval/{task}/teacher_accuracy")
            if teacher:
                ax.axhline(teacher[0], color=colors[run.name], linestyle="--", linewidth=1,
                           label=f"{run.name}: {task}, teacher at step {teacher_steps[0]} (privileged context)")
    ax.yaxis.set_major_formatter(PercentFormatter(xmax=1))
    ax.set_ylim(-0.02, 1.02)
    _finish(ax, "Held-out accuracy per task (greedy decoding)", "accuracy")
    return fig


def loss_figure(runs: list[Run]) -> Figure:
    fig, (kl_ax, loss_ax) = plt.subplots(1, 2, figsize=(12, 4.5), layout="constrained")
    colors = _colors(runs)
    for run in runs:
        _raw_and_smoothed(kl_ax, run, "distill/kl", colors[run.name])
        _raw_and_smoothed(loss_ax, run, "distill/loss", colors[run.name])
    _finish(kl_ax, "KL(student‖teacher), sampled-token estimate (distill/kl)", "nats per completion token")
    _finish(loss_ax, "Distillation loss (distill/loss)", "nats per completion token")
    return fig


def time_figure(runs: list[Run]) -> Figure:
    fig, axes = plt.subplots(len(runs), 2, figsize=(12, 3.8 * len(runs)), layout="constrained", squeeze=False)
    colors = _colors(runs)
    for run, (time_ax, speed_ax) in zip(runs, axes):
        steps, _ = series(run.metrics, "time/step")
        rows = [m for m in run.metrics if "time/step" in m]
        if steps:
            time_ax.stackplot(steps, *[[m.get(f"time/{p}", 0.0) for m in rows] for p in PHASES],
                              labels=[f"time/{p}" for p in PHASES], alpha=0.8)
            time_ax.plot(steps, [m["time/step"] for m in rows], color="black", linewidth=0.8, label="time/step (total)")
        _finish(time_ax, f"Seconds per step by phase: {run.name}", "seconds")
        _raw_and_smoothed(speed_ax, run, "throughput/tokens_per_s", colors[run.name])
        _finish(speed_ax, f"Throughput: {run.name}", "completion tokens trained per second")
    return fig


def _token_color(delta: float) -> str:
    """Red where the teacher finds the token less likely than the student did, green where more;
    full strength at a difference of 3 nats."""
    strength = min(abs(delta) / 3.0, 1.0)
    red, green = (220, 50) if delta < 0 else (40, 170)
    return f"rgba({red},{green},60,{0.08 + 0.72 * strength:.2f})"


def _visible(token: str) -> str:
    return html.escape(token.replace("\n", "↵\n").replace("\t", "→"))


def _tokens_html(sample: dict) -> str:
    tokens, student = sample.get("tokens", []), sample.get("student_logprobs", [])
    teacher = sample.get("teacher_logprobs")
    spans = []
    for i, token in enumerate(tokens):
        if teacher is None or i >= len(teacher) or i >= len(student):
            spans.append(f'<span class="tok">{_visible(token)}</span>')
            continue
        delta = teacher[i] - student[i]
        tip = f"{token!r}: student {student[i]:.3f}, teacher {teacher[i]:.3f}, teacher − student {delta:+.3f}"
        spans.append(f'<span class="tok" style="background:{_token_color(delta)}" title="{html.escape(tip)}">'
                     f'{_visible(token)}</span>')
    return "".join(spans) or html.escape(sample.get("completion", ""))


def _prompt_text(prompt) -> str:
    if isinstance(prompt, list):
        return "\n".join(f"[{m.get('role')}] {m.get('content')}" for m in prompt)
    return str(prompt)


STYLE = """body{font-family:system-ui,sans-serif;margin:2em;max-width:70em}
table{border-collapse:collapse;width:100%}td,th{border:1px solid #ddd;padding:4px 8px;vertical-align:top;text-align:left}
.tok{font-family:monospace;white-space:pre-wrap;border-radius:2px;padding:0 1px}.mono{font-family:monospace;white-space:pre-wrap}
.legend span{padding:2px 8px;margin-right:4px;font-family:monospace}"""


def samples_html(runs: list[Run]) -> str:
    legend = "".join(f'<span style="background:{_token_color(d)}">{d:+.0f}</span>' for d in (-3, -1, 0.01, 1, 3))
    parts = [f"<!doctype html><meta charset='utf-8'><title>selfdistill samples</title><style>{STYLE}</style>",
             "<h1>Sample rollouts</h1>",
             "<p>Each completion token is coloured by <b>log p<sub>teacher</sub> − log p<sub>student</sub></b> of that "
             "token: red where the teacher (shown the privileged context) found it less likely than the student "
             "did, i.e. where the teacher disagreed; green where the teacher found it more likely. Hover a token for "
             "both logprobs. The student's is that of the distribution it sampled from (at the rollout temperature), "
             f"the teacher's is untempered.</p><p class='legend'>nats: {legend}</p>"]
    for run in runs:
        parts.append(f"<h2>{html.escape(run.name)}</h2>")
        if not run.samples:
            parts.append("<p>No samples.jsonl (log.samples_every = 0?).</p>")
            continue
        if not any("teacher_logprobs" in s for s in run.samples):
            parts.append("<p>No teacher logprobs in these samples (the teacher was scored on the learner), "
                         "so the tokens are not coloured.</p>")
        parts.append("<table><tr><th>step</th><th>prompt</th><th>answer</th><th>reward</th><th>completion</th></tr>")
        for s in run.samples:
            reward = "" if s.get("reward") is None else f"{s['reward']:.3g}"
            parts.append(f"<tr><td>{s.get('step', '')}</td><td class='mono'>{html.escape(_prompt_text(s.get('prompt', '')))}</td>"
                         f"<td class='mono'>{html.escape(str(s.get('answer', '')))}</td><td>{reward}</td>"
                         f"<td>{_tokens_html(s)}</td></tr>")
        parts.append("</table>")
    return "\n".join(parts) + "\n"


FIGURES = {"reward.png": reward_figure, "eval.png": eval_figure, "loss.png": loss_figure, "time.png": time_figure}


def run_names(run_dirs: list[Path]) -> list[str]:
    """Directory names, or fuller paths where two runs share a name."""
    names = [Path(d).name for d in run_dirs]
    return [str(d) if names.count(n) > 1 else n for d, n in zip(run_dirs, names)]


def write_report(run_dirs: list[Path], out: Path | None = None) -> Path:
    """Writes the plots and samples.html; returns the report directory (`RUN_DIR/report/` for one
    run, `report-compare/` for several, unless `out` is given)."""
    run_dirs = [Path(d) for d in run_dirs]
    runs = [load_run(d, name) for d, name in zip(run_dirs, run_names(run_dirs))]
    out = Path(out) if out else (run_dirs[0] / "report" if len(runs) == 1 else Path("report-compare"))
    out.mkdir(parents=True, exist_ok=True)
    for filename, build in FIGURES.items():
        fig = build(runs)
        fig.savefig(out / filename, dpi=110)
        plt.close(fig)
    (out / "samples.html").write_text(samples_html(runs))
    return out

