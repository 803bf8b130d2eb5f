"""Where the length critic pays (issue 18): arms x regimes x seeds on the learning testbed, compared by generated
tokens as well as steps.

A regime is a task and a number of completions per prompt at an equal number of completions per step (32): 8 per
prompt is 4 prompts a step, 2 per prompt is 16. An arm is a recipe of ``recipes/testbed`` (each one field away from
its neighbour, ``tests/test_testbed.py``), optionally with field overrides. Every run is its own ``lenvm-rl`` process
on the starting policy and LenVM that ``benchmarks/testbed.py`` makes (its stages 1-2, reused or made here),
``--jobs`` at a time with one thread each, logging every step so that generated tokens are counted per step.

Resumable: a run whose ``trainer_state.json`` exists is read, not rerun; an unfinished run's folder (the map's own
output) is cleared and the run started again. The table and the curves against generated tokens are written between
markers into docs/BENCHMARKS.md.

    python benchmarks/map.py                                   # the default cells (CELLS below)
    python benchmarks/map.py --cells g2:seq g2:frozen --seeds 0 --max-steps 60   # a quick look
    python benchmarks/map.py --cells g2:frozen@length_advantage_coef=0.5 --seeds 0  # an arm with a field changed
    python benchmarks/map.py --cells "g2:seq@reward_weights=1;2" --seeds 0          # a list field

A cell is ``regime:arm`` or ``regime:arm@field=value[,field=value]``: the arm's recipe with more overrides (the
sweeps of a coefficient or a reward weight), in its own folder.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from testbed import RECIPES, ROOT, machine, prepare, run_jobs  # noqa: E402  (same folder)

COMPLETIONS_PER_STEP = 32
PLAN = {"budgets": [32, 64, 96], "max_completion_length": 112}  # the second task (lenvm_rl.testbed, form plan)
REGIMES = {  # name -> (label, task folder under --runs' parent, overrides of every arm's recipe)
    "g8": ("testbed, 8 completions per prompt (4 prompts per step)", "testbed", {"num_generations": 8}),
    "g2": ("testbed, 2 completions per prompt (16 prompts per step)", "testbed", {"num_generations": 2}),
    "g1": ("testbed, 1 completion per prompt (32 prompts per step)", "testbed", {"num_generations": 1}),
    "plan_g8": ("plan testbed, 8 completions per prompt", "testbed_plan", {"num_generations": 8, **PLAN}),
    "plan_g2": ("plan testbed, 2 completions per prompt", "testbed_plan", {"num_generations": 2, **PLAN}),
}
ARMS = {  # name -> (recipe under recipes/testbed, overrides, label)
    "seq": ("grpo/config_length_score.yaml", {}, "sequence-level length score"),
    "frozen": ("grpo/config_lenvm_lambda095.yaml", {}, "LenVM, frozen"),
    "live": ("grpo/config_lenvm_live.yaml", {}, "LenVM, live"),
    "group": ("grpo/config_lenvm_group.yaml", {}, "LenVM, group-anchored, frozen"),
    "group_live": ("grpo/config_lenvm_group.yaml", {"lenvm_update": "live"}, "LenVM, group-anchored, live"),
    "expected": ("grpo/config_lenvm_expected.yaml", {}, "LenVM, expected-score potential, frozen"),
    "ppo": ("ppo/config_lenvm_lambda1.yaml", {"length_lambda": 0.95}, "PPO task critic + LenVM, frozen"),
    # Guided exploration (issue 25): k = 1 of each group sampled under the LenVM, importance-corrected.
    "guided": ("grpo/config_lenvm_lambda095.yaml", {"guided_generations": 1}, "LenVM, frozen, 1 guided per group"),
    "seq_guided": ("grpo/config_length_score.yaml", {"guided_generations": 1}, "sequence-level, 1 guided per group"),
    "guided_raw": (  # the same samples at full weight, w = 1: no importance correction
        "grpo/config_lenvm_lambda095.yaml",
        {"guided_generations": 1, "guided_importance_min": 1.0, "guided_importance_cap": 1.0},
        "LenVM, frozen, 1 guided per group, uncorrected (w = 1)",
    ),
}
FIRST, QUARTER = "length_advantage_scale=first", "length_advantage_scale=first,length_advantage_coef=0.25"
# The published map (docs/BENCHMARKS.md), in run order: the small-group regime first (where the first probe saw the
# critic pay), then 8 per prompt and 1 (PPO); the headline pair again at 5-step evaluations; the one-seed sweeps
# (published for seed 0 only; a fresh run makes all three seeds); the plan task at 200 steps, and one seed of its
# best pair at 800.
CELLS = [
    "g2:seq",
    "g2:frozen",
    f"g2:frozen@{FIRST}",
    "g2:live",
    "g2:group",
    f"g2:expected@{FIRST}",
    "g8:seq",
    "g8:frozen",
    f"g8:frozen@{FIRST}",
    "g8:live",
    "g8:expected",
    "g1:ppo",
    f"g1:ppo@{FIRST}",
    "g2:seq@eval_steps=5,max_steps=150",
    f"g2:frozen@{FIRST},eval_steps=5,max_steps=150",
    "g8:seq@eval_steps=5,max_steps=150",
    "g2:seq@reward_weights=1;2",
    "g2:seq@reward_weights=1;0.5",
    "g2:frozen@length_advantage_coef=0.5",
    "g2:frozen@length_advantage_coef=0.25",
    "g2:frozen@whiten_length_advantage=false,length_advantage_coef=6",
    f"g2:frozen@{QUARTER}",
    f"g8:frozen@{QUARTER}",
    "plan_g2:seq@max_steps=200",
    f"plan_g2:frozen@{FIRST},max_steps=200",
    f"plan_g2:frozen@{QUARTER},max_steps=200",
    "plan_g2:frozen@whiten_length_advantage=false,max_steps=200",
    "plan_g8:seq@max_steps=200",
    f"plan_g8:frozen@{QUARTER},max_steps=200",
    "plan_g2:seq@max_steps=800",
    f"plan_g2:frozen@{QUARTER},max_steps=800",
    f"plan_g2:frozen@{FIRST},length_advantage_coef=0.1,max_steps=800",
]
SCORE_KEY, ACCURACY_KEY = "eval_length/mean_length_score", "eval_rewards/accuracy/mean"
BEGIN, END = "<!-- map:begin (written by benchmarks/map.py) -->", "<!-- map:end -->"


def parse_cell(cell: str) -> tuple[str, str, dict[str, str]]:
    """``regime:arm@field=value,field=value`` -> (regime, arm, {field: value})."""
    regime, _, rest = cell.partition(":")
    arm, _, extra = rest.partition("@")
    overrides = {
        key: value.split(";") if ";" in value else value  # a list field: values joined by ";"
        for key, value in (item.split("=", 1) for item in extra.split(",") if "=" in item)
    }
    if regime not in REGIMES or arm not in ARMS or extra.count("=") != len(overrides) or (extra and not overrides):
        raise ValueError(
            f"--cells: {cell!r} is not regime:arm[@field=value,...] with regime in {list(REGIMES)} "
            f"and arm in {list(ARMS)}"
        )
    return regime, arm, overrides


def label(cell: str) -> str:
    _, arm, overrides = parse_cell(cell)
    shown = lambda value: " / ".join(value) if isinstance(value, list) else value
    return ARMS[arm][2] + "".join(f", {key} {shown(value)}" for key, value in overrides.items())


def task_dir(runs: Path, cell: str) -> Path:
    """The folder of a regime's task (policy, rollouts, LenVM): ``runs`` for the first task, a sibling for others."""
    folder = REGIMES[cell.split(":")[0]][1]
    return runs if folder == "testbed" else runs.parent / folder


def run_dir(runs: Path, cell: str, seed: int) -> Path:
    regime, arm, _ = parse_cell(cell)
    return runs / "map" / regime / cell.partition(":")[2].replace(";", "_") / f"seed{seed}"


def train_command(runs: Path, cell: str, seed: int, args) -> list[str]:
    regime, arm, cell_overrides = parse_cell(cell)
    recipe, arm_overrides, _ = ARMS[arm]
    task = task_dir(runs, cell)
    overrides = {
        **REGIMES[regime][2],
        **arm_overrides,
        "per_device_train_batch_size": COMPLETIONS_PER_STEP,
        "seed": seed,
        "max_steps": args.max_steps,
        "eval_steps": args.eval_steps,
        "logging_steps": 1,
        "model_name_or_path": task / "sft",
        "lenvm_model_path": task / "lenvm",
        "output_dir": run_dir(runs, cell, seed),
        **cell_overrides,
    }  # a cell's own fields win
    flags = [
        item
        for key, value in overrides.items()
        for item in (f"--{key}", *(map(str, value) if isinstance(value, list) else [str(value)]))
    ]
    return [sys.executable, "-m", "lenvm_rl", recipe.split("/")[0], "--config", str(RECIPES / recipe), *flags]


def run_cells(runs: Path, args) -> dict:
    """Every cell x seed not yet finished, ``args.jobs`` processes at a time; returns {(cell, seed): wall s}."""
    todo = [
        (cell, seed)
        for cell in args.cells
        for seed in args.seeds
        if not (run_dir(runs, cell, seed) / "trainer_state.json").exists()
    ]
    for cell, seed in todo:
        shutil.rmtree(run_dir(runs, cell, seed), ignore_errors=True)  # an unfinished run of this map's own
    jobs = [
        (
            (cell, seed),
            train_command(runs, cell, seed, args),
            runs / "logs" / "map" / f"{cell.replace(':', '_')}_seed{seed}.log",
        )
        for cell, seed in todo
    ]
    record = lambda key, wall: (run_dir(runs, *key) / "wall_s.txt").write_text(f"{wall:.1f}\n")
    return run_jobs(jobs, args.jobs, "map", done=record)


def load_run(path: Path) -> dict:
    """Held-out curve against steps and generated tokens, and the train rows, of one finished run."""
    history = json.loads((path / "trainer_state.json").read_text())["log_history"]
    train = [row for row in history if "completions/mean_length" in row and "loss" in row]
    tokens, generated = {0: 0.0}, 0.0
    guidance, scored = {0: 0.0}, 0.0  # tokens through the LenVM while guiding samples: guidance's cost
    for row in train:  # logging_steps 1: one row per step; TRL's mean length counts the EOS token, guided rows too
        generated += row["completions/mean_length"] * COMPLETIONS_PER_STEP
        scored += row.get("guided/lenvm_scored_tokens", 0.0)
        tokens[row["step"]], guidance[row["step"]] = generated, scored
    evals = [row for row in history if SCORE_KEY in row]
    wall = path / "wall_s.txt"
    return {
        "steps": [row["step"] for row in evals],
        "tokens": [tokens.get(row["step"], float("nan")) for row in evals],
        "guidance_tokens": [guidance.get(row["step"], float("nan")) for row in evals],
        "score": [row[SCORE_KEY] for row in evals],
        "accuracy": [row[ACCURACY_KEY] for row in evals],
        "train": train,
        "wall_s": float(wall.read_text()) if wall.exists() else None,
    }


def reach(run: dict, target: float, key: str) -> float | None:
    """``run[key]`` (steps or tokens) at the first evaluation whose held-out length score reaches ``target``."""
    return next((x for x, score in zip(run[key], run["score"]) if score >= target), None)


def window_mean(run: dict, key: str, window: int, last: bool) -> float:
    rows = [row[key] for row in run["train"] if key in row]
    rows = rows[-window:] if last else rows[:window]
    return statistics.fmean(rows) if rows else float("nan")


def late_mean(run: dict, key: str) -> float:
    """Mean of ``run[key]`` over the evaluations in the last quarter of the run's steps (steps >= 3/4 of the last):
    one evaluation samples 128 completions (accuracy's standard error about 0.03), the quarter 4+ of them."""
    last = run["steps"][-1]
    return statistics.fmean(v for step, v in zip(run["steps"], run[key]) if step >= 0.75 * last)


def median_or_none(values: list) -> float | None:
    return statistics.median(values) if values and all(v is not None for v in values) else None


def summarise(runs_by_cell: dict, target: float) -> dict:
    """Per cell: per-seed steps and generated tokens to ``target``, their medians, and means of the rest."""
    summary = {}
    for cell, runs in runs_by_cell.items():
        seeds = list(runs.values())
        steps = [reach(run, target, "steps") for run in seeds]
        tokens = [reach(run, target, "tokens") for run in seeds]
        guidance = [reach(run, target, "guidance_tokens") for run in seeds]
        mean = lambda values: statistics.fmean(values)
        summary[cell] = {
            "seeds": list(runs),
            "steps": steps,
            "tokens": tokens,
            "interval": seeds[0]["steps"][1] - seeds[0]["steps"][0],  # evaluation interval: the resolution of reach
            "median_steps": median_or_none(steps),
            "median_tokens": median_or_none(tokens),
            "median_guidance_tokens": median_or_none(guidance),
            "best": mean([max(run["score"]) for run in seeds]),
            "final": mean([run["score"][-1] for run in seeds]),
            "start": mean([run["score"][0] for run in seeds]),
            "accuracy_start": mean([run["accuracy"][0] for run in seeds]),
            "accuracy_final": mean([late_mean(run, "accuracy") for run in seeds]),
            "mre_first": mean([window_mean(run, "length/online_mre", 25, False) for run in seeds]),
            "mre_last": mean([window_mean(run, "length/online_mre", 25, True) for run in seeds]),
            "wall_s": mean([run["wall_s"] for run in seeds if run["wall_s"] is not None] or [float("nan")]),
        }
    return summary


def table(summary: dict, target: float) -> str:
    """One row per cell; the tokens ratio is against the best sequence-level cell (any group size) of the same task
    and evaluation interval (a coarser interval rounds steps to the target up further)."""

    def key(cell: str) -> tuple[str, int]:
        return REGIMES[cell.split(":")[0]][1], summary[cell]["interval"]

    best_seq = {}
    for cell, s in summary.items():
        if parse_cell(cell)[1] == "seq" and s["median_tokens"]:
            best_seq[key(cell)] = min(best_seq.get(key(cell), float("inf")), s["median_tokens"])
    shown = lambda values: ", ".join("–" if v is None else f"{v / 1000:.0f}k" if v > 999 else f"{v:g}" for v in values)
    lines = [
        f"| regime | arm | steps to LS ≥ {target} (per seed) "
        f"| generated tokens to LS ≥ {target} (per seed; median) "
        f"| × best sequence-level | best / final LS | accuracy start → final (last quarter's evaluations) "
        f"| online MRE first → last 25 steps | guidance: LenVM tokens to LS ≥ {target} (median) | evaluated every "
        f"| wall per run |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for cell, s in summary.items():
        regime = cell.split(":")[0]
        median = s["median_tokens"]
        baseline = best_seq.get(key(cell))
        ratio = f"{median / baseline:.2f}" if median and baseline else "–"
        cost = s.get("median_guidance_tokens")
        guidance = "–" if not cost else f"{cost / 1000:.0f}k"
        lines.append(
            f"| {regime} | {label(cell)} | {shown(s['steps'])} | {shown(s['tokens'])}; "
            f"{'–' if median is None else f'{median / 1000:.0f}k'} | {ratio} | {s['best']:.3f} / {s['final']:.3f} "
            f"| {s['accuracy_start']:.3f} → {s['accuracy_final']:.3f} | {s['mre_first']:.2f} → {s['mre_last']:.2f} "
            f"| {guidance} | {s['interval']} steps | {s['wall_s']:.0f} s |"
        )
    return "\n".join(lines)


def plot(runs_by_cell: dict, regime: str, path: Path, target: float) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(7, 4.2))
    cells = [cell for cell in runs_by_cell if cell.startswith(f"{regime}:")]
    for index, cell in enumerate(cells):
        seeds = list(runs_by_cell[cell].values())
        for run in seeds:
            axis.plot([t / 1000 for t in run["tokens"]], run["score"], color=f"C{index}", alpha=0.25, linewidth=0.8)
        count = min(len(run["score"]) for run in seeds)
        tokens = [statistics.fmean(run["tokens"][i] for run in seeds) / 1000 for i in range(count)]
        score = [statistics.fmean(run["score"][i] for run in seeds) for i in range(count)]
        axis.plot(tokens, score, color=f"C{index}", linewidth=2, label=f"{label(cell)} (mean of {len(seeds)})")
    axis.axhline(target, color="grey", linestyle="--", linewidth=0.8)
    axis.set_xlabel("generated tokens (thousands)")
    axis.set_ylabel("held-out length score (LIFEBench, mean)")
    axis.set_title(REGIMES[regime][0], fontsize=9)
    axis.grid(alpha=0.3)
    axis.legend(fontsize=7, loc="lower right")
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)
    plt.close(figure)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", default="runs/testbed", help="folder of the policy, the LenVM and the map's runs")
    parser.add_argument("--cells", nargs="+", default=CELLS, help="regime:arm, e.g. g2:live")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--max-steps", type=int, default=300)
    parser.add_argument("--eval-steps", type=int, default=25)
    parser.add_argument("--jobs", type=int, default=2, help="training processes at a time (one thread each)")
    parser.add_argument("--target", type=float, default=0.8, help="held-out length score to reach")
    parser.add_argument("--figures", default="docs/figures", help="folder of the PNG curves")
    parser.add_argument("--docs", default="docs/BENCHMARKS.md", help="file whose map block is (re)written; '' = none")
    parser.add_argument("--report-only", action="store_true", help="write the table from the finished runs only")
    args = parser.parse_args(argv)
    for cell in args.cells:
        try:
            parse_cell(cell)
        except ValueError as error:
            parser.error(str(error))
    runs = (ROOT / args.runs).resolve()

    start = time.perf_counter()
    if not args.report_only:
        for folder in dict.fromkeys(task_dir(runs, cell) for cell in args.cells):
            prepare(folder, form="tracker" if folder == runs else "plan")
        run_cells(runs, args)
    wall = time.perf_counter() - start

    runs_by_cell = {}
    for cell in args.cells:
        done = {
            seed: load_run(run_dir(runs, cell, seed))
            for seed in args.seeds
            if (run_dir(runs, cell, seed) / "trainer_state.json").exists()
        }
        if done:
            runs_by_cell[cell] = done
    summary = summarise(runs_by_cell, args.target)
    (runs / "map" / "summary.json").write_text(
        json.dumps(
            {
                "wall_s": wall,
                "cells": summary,
                "curves": {
                    cell: {seed: {k: v for k, v in run.items() if k != "train"} for seed, run in seeds.items()}
                    for cell, seeds in runs_by_cell.items()
                },
            },
            indent=2,
        )
    )
    result = table(summary, args.target)
    print(result)
    regimes = sorted({cell.split(":")[0] for cell in runs_by_cell}, key=list(REGIMES).index)
    curves = {cell: seeds for cell, seeds in runs_by_cell.items() if len(seeds) >= 3}  # one-seed sweeps: table only
    plotted = [regime for regime in regimes if any(cell.startswith(f"{regime}:") for cell in curves)]
    for regime in plotted:
        plot(curves, regime, ROOT / args.figures / f"map_{regime}.png", args.target)
    if args.docs:
        command = "python benchmarks/map.py " + " ".join(a for a in sys.argv[1:] if a != "--report-only")
        run_walls = [run["wall_s"] for seeds in runs_by_cell.values() for run in seeds.values() if run["wall_s"]]
        section = "\n".join(
            [
                f"Command: `{command.strip()}`. Machine: {machine()}.",
                f"Steps per run: {steps_per_run(runs_by_cell)}; {COMPLETIONS_PER_STEP} completions per step, held-out "
                f"evaluation at the interval in the table (64 held-out problems × 2 samples). Seeds per cell: as listed. "
                f"Sum of the runs' wall times: {sum(run_walls) / 60:.0f} min ({args.jobs} processes at a time, one thread each, on a "
                f"machine shared with other work: per-run wall times are not comparable between cells).",
                "",
                result,
                "",
                *[f"![{REGIMES[r][0]}](figures/map_{r}.png)" for r in plotted],
            ]
        )
        text = (ROOT / args.docs).read_text()
        if BEGIN not in text:
            (ROOT / args.docs).write_text(text.rstrip() + f"\n\n{BEGIN}\n{END}\n")
        write_docs_block(ROOT / args.docs, section)


def steps_per_run(runs_by_cell: dict) -> str:
    """ "300 (g8, g2), 200 (plan_g2)": the last evaluated step of the runs, by regime."""
    by_steps = {}
    for cell, seeds in runs_by_cell.items():
        for run in seeds.values():
            regimes = by_steps.setdefault(run["steps"][-1], [])
            if cell.split(":")[0] not in regimes:
                regimes.append(cell.split(":")[0])
    return ", ".join(f"{steps} ({', '.join(regimes)})" for steps, regimes in sorted(by_steps.items(), reverse=True))


def write_docs_block(docs: Path, section: str) -> None:
    text = docs.read_text()
    docs.write_text(text[: text.index(BEGIN)] + f"{BEGIN}\n{section}\n{END}" + text[text.index(END) + len(END) :])


if __name__ == "__main__":
    main()
