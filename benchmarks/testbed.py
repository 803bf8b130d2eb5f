"""The testbed study (issue #8): do LenVM budget advantages teach token budgets in fewer GRPO steps than the same
length score given as a sequence-level reward, at equal accuracy?

Stages, each skipped when its output already exists (a rerun resumes; delete a folder to redo it):
1. the starting policy, trained from scratch (``python -m lenvm_rl.testbed``);
2. its rollouts and its LenVM, with the real stages and recipes (``lenvm-rl rollout``, ``lenvm-rl train-lenvm``);
3. every arm x seed as its own ``lenvm-rl grpo`` process (``recipes/testbed/grpo/config_<arm>.yaml``, ``--seed``),
   ``--jobs`` at a time, each with one thread; TRL evaluates the held-out prompts every ``eval_steps`` steps;
4. the held-out curves (``trainer_state.json``'s eval entries) as PNGs, and a table (steps to a held-out length
   score of ``--target``, best and final score, accuracy) written between markers into docs/BENCHMARKS.md.

    python benchmarks/testbed.py                      # what `make testbed` runs
    python benchmarks/testbed.py --arms lenvm_lambda1 --seeds 0 --max-steps 60   # a quick look

Arm (d), ``ppo_lenvm_lambda1`` (``lenvm-rl ppo``: a learned task critic instead of the group baseline, 32 prompts x 1
completion per step against GRPO's 4 x 8), runs only when named in ``--arms``; docs/BENCHMARKS.md has its study.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RECIPES = ROOT / "recipes" / "testbed"
ARMS = {  # name -> (recipe under recipes/testbed, whose folder names the stage; label in figures and table)
    "accuracy": ("grpo/config_accuracy.yaml", "(a) correctness only"),
    "length_score": ("grpo/config_length_score.yaml", "(b) + sequence-level length score"),
    "lenvm_lambda1": ("grpo/config_lenvm_lambda1.yaml", "(c) + LenVM budget advantages, λ = 1"),
    "lenvm_lambda095": ("grpo/config_lenvm_lambda095.yaml", "(c) + LenVM budget advantages, λ = 0.95"),
    "ppo_lenvm_lambda1": ("ppo/config_lenvm_lambda1.yaml", "(d) PPO task critic + LenVM budget advantages, λ = 1"),
}
DEFAULT_ARMS = ["accuracy", "length_score", "lenvm_lambda1", "lenvm_lambda095"]  # issue #8's study; (d) on request
SCORE_KEY, ACCURACY_KEY, HIT_KEY = (
    "eval_length/mean_length_score",
    "eval_rewards/accuracy/mean",
    "eval_length/budget_hit_rate",
)
BEGIN, END = "<!-- testbed:begin (written by benchmarks/testbed.py) -->", "<!-- testbed:end -->"
THREADS_ENV = {
    "OMP_NUM_THREADS": "1",
    "MKL_NUM_THREADS": "1",
    "TOKENIZERS_PARALLELISM": "false",
    "WANDB_MODE": "offline",
    "HF_HUB_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
}


def run_logged(command: list[str], log: Path) -> subprocess.Popen:
    log.parent.mkdir(parents=True, exist_ok=True)
    return subprocess.Popen(
        command, cwd=ROOT, env={**os.environ, **THREADS_ENV}, stdout=log.open("w"), stderr=subprocess.STDOUT
    )


def check(process: subprocess.Popen, log: Path) -> None:
    if process.wait() != 0:
        tail = log.read_text().strip().splitlines()[-5:]
        sys.exit(
            f"testbed: {' '.join(process.args[:5])} ... failed (exit {process.returncode}); {log}:\n" + "\n".join(tail)
        )


# The second task (``--form plan``, lenvm_rl.testbed): its budgets and generation limit, for every stage after SFT.
PLAN_OVERRIDES = {"budgets": ["32", "64", "96"], "max_completion_tokens": ["112"]}


def prepare(runs: Path, form: str = "tracker", sft_flags: tuple[str, ...] = ()) -> dict:
    """Stages 1-2: the policy, its rollouts and its LenVM under ``runs``; returns their wall times (s)."""
    times = {}
    plan = [part for key, values in PLAN_OVERRIDES.items() for part in (f"--{key}", *values)] if form == "plan" else []
    stages = [
        (
            "sft",
            runs / "sft" / "config.json",
            [sys.executable, "-m", "lenvm_rl.testbed", "--output_dir", str(runs / "sft"), "--form", form, *sft_flags],
        ),
        (
            "rollout",
            runs / "rollouts" / "shards",
            [
                sys.executable,
                "-m",
                "lenvm_rl",
                "rollout",
                "--config",
                str(RECIPES / "rollout" / "config_testbed.yaml"),
                "--model_name_or_path",
                str(runs / "sft"),
                "--output_dir",
                str(runs / "rollouts"),
                *plan,
            ],
        ),
        (
            "lenvm",
            runs / "lenvm" / "config.json",
            [
                sys.executable,
                "-m",
                "lenvm_rl",
                "train-lenvm",
                "--config",
                str(RECIPES / "lenvm" / "config_full.yaml"),
                "--model_name_or_path",
                str(runs / "sft"),
                "--rollouts_path",
                str(runs / "rollouts"),
                "--output_dir",
                str(runs / "lenvm"),
            ],
        ),
    ]
    for name, done, command in stages:
        if done.exists():
            continue
        start, log = time.perf_counter(), runs / "logs" / f"{name}.log"
        print(f"testbed: {name} ...", flush=True)
        check(run_logged(command, log), log)
        times[name] = time.perf_counter() - start
        print(f"testbed: {name} done in {times[name]:.0f} s ({log})", flush=True)
    return times


def train_command(runs: Path, arm: str, seed: int, args) -> list[str]:
    recipe = RECIPES / ARMS[arm][0]
    return [
        sys.executable,
        "-m",
        "lenvm_rl",
        recipe.parent.name,
        "--config",
        str(recipe),
        "--model_name_or_path",
        str(runs / "sft"),
        "--lenvm_model_path",
        str(runs / "lenvm"),
        "--output_dir",
        str(runs / "study" / arm / f"seed{seed}"),
        "--seed",
        str(seed),
        "--max_steps",
        str(args.max_steps),
        "--eval_steps",
        str(args.eval_steps),
        *[part for item in args.override for part in ("--" + item.split("=", 1)[0], item.split("=", 1)[1])],
    ]


def run_jobs(jobs: list[tuple[tuple, list[str], Path]], at_once: int, name: str, done=None) -> dict:
    """Run (key, command, log) jobs ``at_once`` at a time, each its own process; stop at the first failure.
    ``done(key, wall_s)`` is called as each one finishes. Returns {key: wall time (s)}."""
    queue, running, times = list(jobs), {}, {}
    while queue or running:
        while queue and len(running) < at_once:
            key, command, log = queue.pop(0)
            running[key] = (run_logged(command, log), log, time.perf_counter())
            print(f"{name}: {' seed '.join(map(str, key))} ... ({len(queue)} queued)", flush=True)
        time.sleep(1.0)
        for key, (process, log, start) in list(running.items()):
            if process.poll() is not None:
                check(process, log)
                times[key] = time.perf_counter() - start
                print(f"{name}: {' seed '.join(map(str, key))} done in {times[key]:.0f} s", flush=True)
                if done is not None:
                    done(key, times[key])
                del running[key]
    return times


def run_study(runs: Path, args) -> dict:
    """Stage 3: every arm x seed not yet finished, ``args.jobs`` processes at a time; returns wall times (s)."""
    jobs = [
        (
            (arm, seed),
            train_command(runs, arm, seed, args),
            runs / "logs" / f"{ARMS[arm][0].split('/')[0]}_{arm}_seed{seed}.log",
        )
        for seed in args.seeds
        for arm in args.arms
        if not (runs / "study" / arm / f"seed{seed}" / "trainer_state.json").exists()
    ]
    return run_jobs(jobs, args.jobs, "testbed")


def load_curves(runs: Path, arms, seeds) -> dict:
    """{arm: {seed: {"steps": [...], "score": [...], "accuracy": [...], "hit": [...], "train": [log rows]}}}."""
    curves = {}
    for arm in arms:
        for seed in seeds:
            state = json.loads((runs / "study" / arm / f"seed{seed}" / "trainer_state.json").read_text())
            evals = [row for row in state["log_history"] if SCORE_KEY in row]
            curves.setdefault(arm, {})[seed] = {
                "steps": [row["step"] for row in evals],
                "score": [row[SCORE_KEY] for row in evals],
                "accuracy": [row[ACCURACY_KEY] for row in evals],
                "hit": [row.get(HIT_KEY, float("nan")) for row in evals],
                "train": [row for row in state["log_history"] if "length/mean_length_score" in row],
            }
    return curves


def steps_to(curve: dict, target: float) -> int | None:
    """The first evaluated step whose held-out length score reaches ``target``; None when none does."""
    return next((step for step, score in zip(curve["steps"], curve["score"]) if score >= target), None)


def plot(curves: dict, key: str, ylabel: str, path: Path, target: float | None = None) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(7, 4.2))
    for index, (arm, seeds) in enumerate(curves.items()):
        color = f"C{index}"
        runs = list(seeds.values())
        steps = runs[0]["steps"]
        for run in runs:
            axis.plot(run["steps"], run[key], color=color, alpha=0.25, linewidth=0.8)
        mean = [statistics.fmean(run[key][i] for run in runs) for i in range(min(len(r[key]) for r in runs))]
        axis.plot(steps[: len(mean)], mean, color=color, linewidth=2, label=f"{ARMS[arm][1]} (mean of {len(runs)})")
    if target is not None:
        axis.axhline(target, color="grey", linestyle="--", linewidth=0.8)
    axis.set_xlabel("training step (32 completions each)")
    axis.set_ylabel(ylabel)
    axis.grid(alpha=0.3)
    axis.legend(fontsize=7, loc="best")
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)
    plt.close(figure)


def table(curves: dict, target: float, run_times: dict) -> str:
    lines = [
        f"| arm | steps to held-out LS ≥ {target} (per seed) | best held-out LS (mean) | LS start → final (mean) "
        f"| accuracy start → final (mean) | budget hit rate final (mean) | wall per run |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for arm, seeds in curves.items():
        runs = list(seeds.values())
        reached = [steps_to(run, target) for run in runs]
        shown = ", ".join("–" if step is None else str(step) for step in reached)
        if all(step is not None for step in reached):
            shown += f" (median {statistics.median(reached):g})"
        best = statistics.fmean(max(run["score"]) for run in runs)
        mean = lambda key, i: statistics.fmean(run[key][i] for run in runs)
        walls = [run_times[(arm, seed)] for seed in seeds if (arm, seed) in run_times]
        wall = f"{statistics.fmean(walls):.0f} s" if walls else "(earlier run)"
        lines.append(
            f"| {ARMS[arm][1]} | {shown} | {best:.3f} | {mean('score', 0):.3f} → {mean('score', -1):.3f} "
            f"| {mean('accuracy', 0):.3f} → {mean('accuracy', -1):.3f} | {mean('hit', -1):.3f} | {wall} |"
        )
    return "\n".join(lines)


def diagnostics(curves: dict, lenvm_metrics: dict, window: int = 25) -> str:
    """Where a length signal can be lost: the frozen LenVM's error on the starting policy's held-out rollouts, and
    its online error on each arm's training batches early and late (the policy drifts away from its rollouts)."""
    positions = " / ".join(f"{lenvm_metrics.get(f'eval_length_mae_p{q}', float('nan')):.1f}" for q in (0, 25, 50, 75))
    relative = " / ".join(
        f"{lenvm_metrics.get(f'eval_length_rel_err_p{q}', float('nan')):.2f}" for q in (0, 25, 50, 75)
    )
    lines = [
        f"LenVM on the starting policy's held-out rollouts: value MSE {lenvm_metrics.get('eval_value_mse', float('nan')):.4f}; "
        f"remaining-length MAE at 0 / 25 / 50 / 75 % of the completion {positions} tokens (relative {relative}); "
        f"prompt-boundary MRE {lenvm_metrics.get('eval_boundary_mre', float('nan')):.3f} (best constant "
        f"{lenvm_metrics.get('eval_constant_value_mre', float('nan')):.3f}).",
        "",
        f"| arm | LenVM online MRE, first → last {window} steps | mean abs c·A_len per token, first → last | "
        f"train length score, first → last {window} steps |",
        "| --- | --- | --- | --- |",
    ]

    def window_mean(runs, key, last):
        values = []
        for run in runs:
            rows = [row for row in run["train"] if key in row]
            cut = rows[-max(1, window // 5) :] if last else rows[: max(1, window // 5)]  # logging_steps = 5
            values += [row[key] for row in cut]
        return f"{statistics.fmean(values):.3f}" if values else "–"

    for arm, seeds in curves.items():
        runs = list(seeds.values())
        cells = [
            f"{window_mean(runs, key, False)} → {window_mean(runs, key, True)}"
            for key in ("length/online_mre", "length/mean_abs_advantage", "length/mean_length_score")
        ]
        lines.append(f"| {ARMS[arm][1]} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def machine() -> str:
    import torch
    import transformers
    import trl

    try:
        cpu = next(
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        )
    except (OSError, StopIteration):
        cpu = platform.processor() or "unknown CPU"
    return (
        f"{os.cpu_count()} CPU cores ({cpu}), no GPU; Python {platform.python_version()}, torch {torch.__version__}, "
        f"transformers {transformers.__version__}, TRL {trl.__version__}"
    )


def write_docs(docs: Path, section: str) -> None:
    text = docs.read_text()
    block = f"{BEGIN}\n{section}\n{END}"
    if BEGIN in text:
        text = text[: text.index(BEGIN)] + block + text[text.index(END) + len(END) :]
    else:
        text = text.rstrip() + "\n\n" + block + "\n"
    docs.write_text(text)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", default="runs/testbed", help="folder of every artefact and log")
    parser.add_argument("--arms", nargs="+", default=DEFAULT_ARMS, choices=list(ARMS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--max-steps", type=int, default=300)
    parser.add_argument("--eval-steps", type=int, default=25)
    parser.add_argument("--jobs", type=int, default=2, help="GRPO processes at a time (one thread each)")
    parser.add_argument("--target", type=float, default=0.8, help="held-out length score to reach")
    parser.add_argument("--figures", default="docs/figures", help="folder of the PNG curves")
    parser.add_argument(
        "--docs", default="docs/BENCHMARKS.md", help="file whose testbed block is (re)written; '' = none"
    )
    parser.add_argument(
        "--override",
        nargs="*",
        default=[],
        metavar="FIELD=VALUE",
        help="a recipe field for every arm, e.g. whiten_length_advantage=false (the table below)",
    )
    args = parser.parse_args(argv)
    if any("=" not in item for item in args.override):
        parser.error("--override: write each as field=value")
    runs = (ROOT / args.runs).resolve()

    start = time.perf_counter()
    prepare_times = prepare(runs)
    run_times = run_study(runs, args)
    wall = time.perf_counter() - start

    curves = load_curves(runs, args.arms, args.seeds)
    figures = ROOT / args.figures
    plot(curves, "score", "held-out length score (LIFEBench, mean)", figures / "testbed_length_score.png", args.target)
    plot(curves, "accuracy", "held-out accuracy", figures / "testbed_accuracy.png")
    result = table(curves, args.target, run_times)
    step_times = [
        row["step_time"]
        for arm in curves.values()
        for run in arm.values()
        for row in run["train"]
        if "step_time" in row
    ]
    lenvm_eval = runs / "lenvm" / "eval_results.json"
    lenvm_metrics = json.loads(lenvm_eval.read_text()) if lenvm_eval.exists() else {}
    summary = {
        "wall_s": wall,
        "prepare_s": prepare_times,
        "median_step_time_s": statistics.median(step_times) if step_times else None,
        "runs_s": {f"{arm}/seed{seed}": t for (arm, seed), t in run_times.items()},
        "lenvm_eval": lenvm_metrics,
        "curves": {
            arm: {seed: {k: v for k, v in run.items() if k != "train"} for seed, run in seeds.items()}
            for arm, seeds in curves.items()
        },
    }
    (runs / "study_summary.json").write_text(json.dumps(summary, indent=2))
    print(result)
    print(
        f"study wall time {wall / 60:.1f} min (this invocation); median GRPO step_time "
        f"{summary['median_step_time_s']} s; summary in {runs / 'study_summary.json'}"
    )
    if args.docs:
        command = (
            "make testbed"
            if argv is None and sys.argv[1:] == []
            else "python benchmarks/testbed.py " + " ".join(sys.argv[1:])
        )
        section = "\n".join(
            [
                f"Command: `{command}`. Machine: {machine()}.",
                f"{len(args.seeds)} seeds × {args.max_steps} GRPO steps per arm, held-out evaluation every "
                f"{args.eval_steps} steps (64 held-out problems × 2 samples at temperature 1.0). Wall time of this "
                f"invocation: {wall / 60:.1f} min ({args.jobs} GRPO processes at a time, one thread each); median TRL "
                f"`step_time` {summary['median_step_time_s']:.2f} s.",
                "",
                result,
                "",
                diagnostics(curves, lenvm_metrics),
                "",
                "![held-out length score](figures/testbed_length_score.png)",
                "![held-out accuracy](figures/testbed_accuracy.png)",
            ]
        )
        write_docs(ROOT / args.docs, section)


if __name__ == "__main__":
    main()
