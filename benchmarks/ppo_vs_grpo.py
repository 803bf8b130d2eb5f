"""Issue #5's benchmark on SmolLM2-135M-Instruct (CPU): PPO + LenVM against GRPO + LenVM at an equal number of
generated completions, scored on held-out prompts for length score and accuracy.

    python benchmarks/ppo_vs_grpo.py --max_steps 12 --seeds 0 1 2      # after `make demo` (needs its LenVM); docs/BENCHMARKS.md

Each (arm, seed) is a real run of the arm's recipe with ``--max_steps`` and ``--seed``: `lenvm-rl grpo` with
grpo/config_lenvm_budget.yaml (2 prompts x 8 completions per step, group baseline) and `lenvm-rl ppo` with
ppo/config_lenvm_budget.yaml (16 prompts x 1 completion per step, learned task critic). Both generate 16
completions of at most 96 tokens per step from the same prompt pool, budgets, LenVM, length objective, LoRA and
policy learning rate, so equal steps are equal completions; the tokens each arm actually generated are counted
from its log (completions/mean_length includes the EOS) and reported beside the scores, and train_curves.png plots
the training-batch length score and accuracy against cumulative generated tokens. Then one `lenvm-rl evaluate`
scores the base model and every adapter on the held-out prompts x exact budgets {16, 32, 64}. Runs already
finished are skipped, so the script resumes. Writes ``<output>/summary.json`` and ``<output>/summary.md``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from common import mean_over_budgets, run, seed_cell  # same folder

ROOT = Path(__file__).resolve().parents[1]
RECIPES = ROOT / "recipes" / "SmolLM2-135M-Instruct"
ARMS = {  # arm -> (stage, recipe, completions per step)
    "grpo_lenvm": ("grpo", RECIPES / "grpo" / "config_lenvm_budget.yaml", 16),
    "ppo_lenvm": ("ppo", RECIPES / "ppo" / "config_lenvm_budget.yaml", 16),
}
METRICS = ("length_score", "accuracy", "mean_tokens", "hit_rate")


def token_curve(history: list[dict], completions_per_step: int) -> tuple[list[float], list[dict]]:
    """Cumulative generated tokens after each generation batch, and that batch's log row."""
    rows = [row for row in history if "completions/mean_length" in row]
    tokens, total = [], 0.0
    for row in rows:
        total += row["completions/mean_length"] * completions_per_step
        tokens.append(total)
    return tokens, rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--max_steps", type=int, default=40)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--eval_prompts", type=int, default=30, help="held-out prompts for `lenvm-rl evaluate`")
    parser.add_argument("--output", type=Path, default=ROOT / "runs" / "bench_ppo_vs_grpo")
    options = parser.parse_args()
    options.output.mkdir(parents=True, exist_ok=True)
    overrides = [
        "--max_steps",
        str(options.max_steps),
        "--save_strategy",
        "no",
        "--report_to",
        "none",
        "--disable_tqdm",
        "true",
    ]
    if {completions for _, _, completions in ARMS.values()} != {16}:
        sys.exit("the arms must generate the same number of completions per step")

    wall, adapters, labels, generated = {}, [], [], {}
    for seed in options.seeds:
        for arm, (stage, recipe, completions) in ARMS.items():
            out = options.output / f"{arm}_seed{seed}"
            if not (out / "trainer_state.json").exists():
                command = [
                    sys.executable,
                    "-m",
                    "lenvm_rl",
                    stage,
                    "--config",
                    str(recipe),
                    "--seed",
                    str(seed),
                    "--output_dir",
                    str(out),
                    *overrides,
                ]
                seconds = run(command, options.output / f"{out.name}.log")
                (out / "wall_time_s.txt").write_text(f"{seconds:.1f}\n")
            wall[out.name] = float((out / "wall_time_s.txt").read_text())
            history = json.loads((out / "trainer_state.json").read_text())["log_history"]
            generated[out.name] = token_curve(history, completions)[0][-1]
            print(f"{out.name}: {wall[out.name]:.0f} s, {generated[out.name]:.0f} generated tokens", flush=True)
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
        "--num_prompts",
        str(options.eval_prompts),
        "--output_dir",
        str(evaluation),
    ]
    eval_wall = run(command, options.output / "evaluate.log")
    results = json.loads((evaluation / "results.json").read_text())["results"]

    rows = {}
    for arm in ARMS:
        names = [f"{arm}_seed{seed}" for seed in options.seeds]
        rows[arm] = {metric: [mean_over_budgets(results[name], metric) for name in names] for metric in METRICS}
        rows[arm]["generated_tokens"] = [generated[name] for name in names]
        rows[arm]["wall_s"] = [wall[name] for name in names]
    base = {metric: mean_over_budgets(results["base"], metric) for metric in METRICS}

    lines = [
        f"{options.max_steps} steps x 16 completions per run (GRPO: 2 prompts x 8, PPO: 16 prompts x 1), seeds "
        f"{options.seeds}; held-out: {options.eval_prompts} prompts x exact {{16, 32, 64}}, one sample each "
        f"(temperature 0.7). Means over budgets; mean ± sd over seeds (per-seed values).",
        "",
        "| arm | length score | accuracy | mean tokens | hit rate | generated tokens (training) | wall time per run (s) |",
        "|---|---|---|---|---|---|---|",
        f"| base (no RL) | {base['length_score']:.3f} | {base['accuracy']:.3f} | {base['mean_tokens']:.1f} | "
        f"{base['hit_rate']:.3f} | – | – |",
    ]
    for arm, row in rows.items():
        lines.append(
            f"| {arm} | {seed_cell(row['length_score'])} | {seed_cell(row['accuracy'])} | {seed_cell(row['mean_tokens'], '.1f')} | "
            f"{seed_cell(row['hit_rate'])} | {seed_cell(row['generated_tokens'], '.0f')} | {seed_cell(row['wall_s'], '.0f')} |"
        )
    lines.append(f"\nEvaluation of {len(adapters) + 1} models: {eval_wall:.0f} s.")
    (options.output / "summary.md").write_text("\n".join(lines) + "\n")
    (options.output / "summary.json").write_text(
        json.dumps({"base": base, "arms": rows, "eval_wall_s": eval_wall}, indent=2)
    )
    plot_token_curves(options.output, options.seeds)
    print("\n".join(lines))


def plot_token_curves(output: Path, seeds: list[int]) -> None:
    """Training-batch length score and accuracy against cumulative generated tokens, every (arm, seed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, 2, figsize=(10, 4))
    for color, (arm, (_, _, completions)) in zip(("C0", "C1"), ARMS.items()):
        for seed in seeds:
            history = json.loads((output / f"{arm}_seed{seed}" / "trainer_state.json").read_text())["log_history"]
            tokens, rows = token_curve(history, completions)
            for axis, key in zip(axes, ("length/mean_length_score", "rewards/accuracy/mean")):
                axis.plot(
                    tokens,
                    [row[key] for row in rows],
                    color=color,
                    marker=".",
                    alpha=0.7,
                    label=arm if seed == seeds[0] else None,
                )
                axis.set(xlabel="generated tokens (cumulative)", ylabel=key)
    axes[0].legend()
    figure.suptitle("Training batches (16 completions per step)")
    figure.tight_layout()
    figure.savefig(output / "train_curves.png", dpi=100)
    plt.close(figure)


if __name__ == "__main__":
    main()
