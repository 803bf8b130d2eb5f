"""Issue #4's two-arm comparison on SmolLM2-135M-Instruct (CPU): LenVM budget advantages against the same
length score as a sequence-level reward, same steps and seeds, scored on held-out prompts.

    python benchmarks/grpo_two_arms.py --steps 12 --seeds 0 1 2      # after `make demo` (needs its LenVM)

Each (arm, seed) is a real `lenvm-rl grpo` run of the arm's recipe (the twins differ only in the length
signal) with ``--max_steps``, ``--seed`` and the overrides below; then one `lenvm-rl evaluate` scores the
base model and every adapter on the 30 held-out prompts × budgets {16, 32, 64}. Runs already finished are
skipped, so the script resumes. Writes ``<output>/summary.json``, ``<output>/summary.md`` and
``<output>/train_curves.png`` (training-batch length score and accuracy per step, mean over seeds).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

from common import mean_over_budgets, run, seed_cell  # same folder

ROOT = Path(__file__).resolve().parents[1]
RECIPES = ROOT / "recipes" / "SmolLM2-135M-Instruct"
ARMS = {
    "lenvm_budget": RECIPES / "grpo" / "config_lenvm_budget.yaml",
    "seq_length_score": RECIPES / "grpo" / "config_seq_length_score.yaml",
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--learning_rate", type=float, default=None, help="override both recipes' learning rate")
    parser.add_argument("--output", type=Path, default=ROOT / "runs" / "bench_two_arms")
    options = parser.parse_args()
    options.output.mkdir(parents=True, exist_ok=True)
    overrides = [
        "--max_steps",
        str(options.steps),
        "--save_strategy",
        "no",
        "--report_to",
        "none",
        "--disable_tqdm",
        "true",
    ]
    if options.learning_rate is not None:
        overrides += ["--learning_rate", str(options.learning_rate)]

    wall, adapters, labels = {}, [], []
    for seed in options.seeds:
        for arm, recipe in ARMS.items():
            out = options.output / f"{arm}_seed{seed}"
            if not (out / "trainer_state.json").exists():
                command = [
                    sys.executable,
                    "-m",
                    "lenvm_rl",
                    "grpo",
                    "--config",
                    str(recipe),
                    "--seed",
                    str(seed),
                    "--output_dir",
                    str(out),
                    *overrides,
                ]
                wall[out.name] = run(command, options.output / f"{out.name}.log")
                (out / "wall_time_s.txt").write_text(f"{wall[out.name]:.1f}\n")
                print(f"{out.name}: {wall[out.name]:.0f} s", flush=True)
            wall[out.name] = float((out / "wall_time_s.txt").read_text())
            adapters.append(str(out))
            labels.append(out.name)

    evaluation = options.output / "evaluate"
    command = [
        sys.executable,
        "-m",
        "lenvm_rl",
        "evaluate",
        "--config",
        str(RECIPES / "evaluate" / "config_before_after.yaml"),
        "--adapters",
        *adapters,
        "--labels",
        "base",
        *labels,
        "--output_dir",
        str(evaluation),
    ]
    eval_wall = run(command, options.output / "evaluate.log")
    results = json.loads((evaluation / "results.json").read_text())["results"]

    rows = {}
    for arm in ARMS:
        per_seed = {seed: results[f"{arm}_seed{seed}"] for seed in options.seeds}
        rows[arm] = {
            "length_score": [mean_over_budgets(s, "length_score") for s in per_seed.values()],
            "accuracy": [mean_over_budgets(s, "accuracy") for s in per_seed.values()],
            "mean_tokens": [mean_over_budgets(s, "mean_tokens") for s in per_seed.values()],
            "hit_rate": [mean_over_budgets(s, "hit_rate") for s in per_seed.values()],
            "wall_s": [wall[f"{arm}_seed{seed}"] for seed in options.seeds],
        }
    base = {
        name: mean_over_budgets(results["base"], name)
        for name in ("length_score", "accuracy", "mean_tokens", "hit_rate")
    }

    lines = [
        f"{options.steps} GRPO steps per run, seeds {options.seeds}; held-out: 30 prompts × exact {{16, 32, 64}}, "
        f"one sample each (temperature 0.7). Means over budgets; mean ± sd over seeds (per-seed values).",
        "",
        "| arm | length score | accuracy | mean tokens | hit rate | wall time per run (s) |",
        "|---|---|---|---|---|---|",
        f"| base (no GRPO) | {base['length_score']:.3f} | {base['accuracy']:.3f} | {base['mean_tokens']:.1f} | {base['hit_rate']:.3f} | – |",
    ]
    for arm, row in rows.items():
        lines.append(
            f"| {arm} | {seed_cell(row['length_score'])} | {seed_cell(row['accuracy'])} | {seed_cell(row['mean_tokens'], '.1f')} | "
            f"{seed_cell(row['hit_rate'])} | {seed_cell(row['wall_s'], '.0f')} |"
        )
    lines.append(f"\nEvaluation of {len(adapters) + 1} models: {eval_wall:.0f} s.")
    (options.output / "summary.md").write_text("\n".join(lines) + "\n")
    (options.output / "summary.json").write_text(
        json.dumps({"base": base, "arms": rows, "eval_wall_s": eval_wall}, indent=2)
    )
    plot_training_curves(options.output, options.seeds)
    print("\n".join(lines))


def plot_training_curves(output: Path, seeds: list[int]) -> None:
    """Training-batch length score and accuracy per step, each arm's mean over seeds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, 2, figsize=(10, 4))
    for arm in ARMS:
        for axis, key in zip(axes, ("length/mean_length_score", "rewards/accuracy/mean")):
            curves = []
            for seed in seeds:
                history = json.loads((output / f"{arm}_seed{seed}" / "trainer_state.json").read_text())["log_history"]
                curves.append([row[key] for row in history if key in row])
            steps = range(1, min(map(len, curves)) + 1)
            axis.plot(steps, [statistics.fmean(c[i - 1] for c in curves) for i in steps], marker=".", label=arm)
            axis.set(xlabel="GRPO step", ylabel=key)
    axes[0].legend()
    figure.suptitle("Training batches (2 prompts × 8 completions), mean over seeds")
    figure.tight_layout()
    figure.savefig(output / "train_curves.png", dpi=100)
    plt.close(figure)


if __name__ == "__main__":
    main()
