"""`make demo`: what lenvm-rl does, on the embedded SmolLM2-135M-Instruct and on the learning testbed, on a CPU.

Stages (each a real `lenvm-rl` / `python -m lenvm_rl.testbed` process, from the shipped recipes with the smaller
sizes below written as flags; two run at a time, one thread each, so two cores stay busy and neither process
oversubscribes them):

- SmolLM2: rollouts -> LenVM (top 4 layers) -> the prompt-boundary prediction table; then on held-out budgeted
  prompts the base model, hard truncation at the budget and LenVM-guided decoding (length score, accuracy, mean
  tokens per budget). The base and truncation arms generate in one process, the guided arm in another, with the
  same seeds.
- Testbed: the tiny policy trained from scratch, its rollouts and LenVM, then LenVM-shaped GRPO (the recipes'
  default arm: frozen LenVM, λ = 0.95, A_len scaled by the first batch's std)
  with held-out evaluations every 25 steps: a before/after table and a learning-curve PNG.

Every stage is skipped when its output exists (a rerun resumes; delete a folder under runs/demo to redo it), and
the running stages' progress and ETA (their tqdm bars, read from their logs) are printed every 20 s. SmolLM2 GRPO
is not in the demo (twelve CPU steps move it no more than noise, docs/BENCHMARKS.md); `make test-slow` runs it.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # this checkout's lenvm_rl, whichever checkout an installed copy points at
RUNS = ROOT / "runs" / "demo"
SMOL = ROOT / "recipes" / "SmolLM2-135M-Instruct"
TESTBED = ROOT / "recipes" / "testbed"
LM = [sys.executable, "-m", "lenvm_rl"]
HELD_OUT = ["--num_prompts", "16", "--skip_prompts", "100"]  # 16 held-out prompts x exact {16, 32, 64}
# The before/after recipe without its GRPO adapter (a list field cannot be emptied by a flag): written by main().
EVALUATE_RECIPE = RUNS / "smollm2" / "config_base_model.yaml"
EVALUATE = [
    *LM,
    "evaluate",
    "--config",
    str(EVALUATE_RECIPE),
    *HELD_OUT,
    "--max_new_tokens",
    "96",
    "--lenvm_model_path",
    str(RUNS / "smollm2" / "lenvm"),
]
# name: (command, file that marks it done, stages it needs)
STAGES = {
    "smollm2 rollouts": (
        [
            *LM,
            "rollout",
            "--config",
            str(SMOL / "rollout" / "config_arithmetic.yaml"),
            "--num_prompts",
            "32",
            "--num_samples_per_prompt",
            "4",
            "--max_completion_tokens",
            "96",
            "--prompts_per_batch",
            "16",
            "--shard_size",
            "16",
            "--output_dir",
            str(RUNS / "smollm2" / "rollouts"),
        ],
        RUNS / "smollm2" / "rollouts" / "shards" / "shard-00001",
        [],
    ),
    "smollm2 held-out rollouts": (
        [
            *LM,
            "rollout",
            "--config",
            str(SMOL / "rollout" / "config_arithmetic_eval.yaml"),
            "--num_prompts",
            "16",
            "--max_completion_tokens",
            "96",
            "--shard_size",
            "8",
            "--output_dir",
            str(RUNS / "smollm2" / "rollouts_eval"),
        ],
        RUNS / "smollm2" / "rollouts_eval" / "shards" / "shard-00001",
        [],
    ),
    "smollm2 LenVM": (
        [
            *LM,
            "train-lenvm",
            "--config",
            str(SMOL / "lenvm" / "config_top_layers.yaml"),
            "--rollouts_path",
            str(RUNS / "smollm2" / "rollouts"),
            "--eval_rollouts_path",
            str(RUNS / "smollm2" / "rollouts_eval"),
            "--output_dir",
            str(RUNS / "smollm2" / "lenvm"),
        ],
        RUNS / "smollm2" / "lenvm" / "eval_results.json",
        ["smollm2 rollouts", "smollm2 held-out rollouts"],
    ),
    "smollm2 guided decoding": (
        [
            *EVALUATE,
            "--plain_decoding",
            "false",
            "--guided_decoding",
            "true",
            # Score-tilted guidance over the top 8 (issue 25): select over the min-p 0.3 candidates lost to truncation.
            "--guidance_mode",
            "score",
            "--guidance_beta",
            "4",
            "--guidance_top_p",
            "1.0",
            "--guidance_min_p",
            "0.0",
            "--output_dir",
            str(RUNS / "smollm2" / "guided"),
        ],
        RUNS / "smollm2" / "guided" / "results.json",
        ["smollm2 LenVM"],
    ),
    "smollm2 prediction": (
        [
            *LM,
            "predict-length",
            "--lenvm_model_path",
            str(RUNS / "smollm2" / "lenvm"),
            "--rollouts_path",
            str(RUNS / "smollm2" / "rollouts_eval"),
            "--output_dir",
            str(RUNS / "smollm2" / "predict"),
        ],
        RUNS / "smollm2" / "predict" / "predictions.json",
        ["smollm2 LenVM"],
    ),
    "testbed policy": (
        [
            sys.executable,
            "-m",
            "lenvm_rl.testbed",
            "--output_dir",
            str(RUNS / "testbed" / "sft"),
            "--num_examples",
            "30000",
            "--epochs",
            "2",
        ],
        RUNS / "testbed" / "sft" / "config.json",
        [],
    ),
    "testbed rollouts": (
        [
            *LM,
            "rollout",
            "--config",
            str(TESTBED / "rollout" / "config_testbed.yaml"),
            "--model_name_or_path",
            str(RUNS / "testbed" / "sft"),
            "--num_prompts",
            "128",
            "--output_dir",
            str(RUNS / "testbed" / "rollouts"),
        ],
        RUNS / "testbed" / "rollouts" / "shards" / "shard-00000",
        ["testbed policy"],
    ),
    "testbed LenVM": (
        [
            *LM,
            "train-lenvm",
            "--config",
            str(TESTBED / "lenvm" / "config_full.yaml"),
            "--model_name_or_path",
            str(RUNS / "testbed" / "sft"),
            "--rollouts_path",
            str(RUNS / "testbed" / "rollouts"),
            "--output_dir",
            str(RUNS / "testbed" / "lenvm"),
        ],
        RUNS / "testbed" / "lenvm" / "eval_results.json",
        ["testbed rollouts"],
    ),
    "testbed GRPO": (
        [
            *LM,
            "grpo",
            "--config",
            str(TESTBED / "grpo" / "config_lenvm_lambda095.yaml"),
            "--length_advantage_scale",
            "first",  # the model recipes' default arm
            "--model_name_or_path",
            str(RUNS / "testbed" / "sft"),
            "--lenvm_model_path",
            str(RUNS / "testbed" / "lenvm"),
            "--output_dir",
            str(RUNS / "testbed" / "grpo"),
            "--max_steps",
            "150",
            "--eval_steps",
            "25",
            "--eval_num_prompts",
            "128",
        ],
        RUNS / "testbed" / "grpo" / "trainer_state.json",
        ["testbed LenVM"],
    ),
    "smollm2 base and truncation": (
        [*EVALUATE, "--hard_truncation", "true", "--output_dir", str(RUNS / "smollm2" / "plain")],
        RUNS / "smollm2" / "plain" / "results.json",
        [],
    ),
}
ENV = {
    **os.environ,
    "OMP_NUM_THREADS": "1",
    "MKL_NUM_THREADS": "1",
    "TOKENIZERS_PARALLELISM": "false",
    "WANDB_MODE": "offline",
    "HF_HUB_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
}
PROGRESS = re.compile(r"([^\r\n|]*?)\s*\d+%\|[^|\r\n]*\| (\d+)/(\d+) \[([\d:]+)<([\d:?]+)")
# Bars of loading and saving, not of the stage's work: a stage's progress is its last other bar.
SIDE_BARS = ("Loading", "Writing", "Saving", "Map", "Filter", "Converting", "Generating", "Fetching")


def progress(log: Path) -> str:
    """The last tqdm position of a stage's own work in its log, as "done/total, ETA m:ss"."""
    text = log.read_text(errors="replace") if log.exists() else ""
    found = [bar for bar in PROGRESS.findall(text[-50_000:]) if not bar[0].strip().startswith(SIDE_BARS)]
    return f"{found[-1][1]}/{found[-1][2]}, ETA {found[-1][4]}" if found else "starting"


def run_stages(jobs: int = 2) -> dict[str, float]:
    """Run every unfinished stage, ``jobs`` at a time, in STAGES order as their needs finish; wall times (s)."""
    todo = [name for name, (_, done, _) in STAGES.items() if not done.exists()]
    running, times, last_report = {}, {}, 0.0
    for name in STAGES:
        if name not in todo:
            print(f"demo: {name}: done earlier, skipped", flush=True)
    while todo or running:
        for name in list(todo):
            needs = STAGES[name][2]
            if len(running) < jobs and not any(n in todo or n in running for n in needs):
                log = RUNS / "logs" / f"{name.replace(' ', '_')}.log"
                log.parent.mkdir(parents=True, exist_ok=True)
                process = subprocess.Popen(
                    STAGES[name][0], cwd=ROOT, env=ENV, stdout=log.open("w"), stderr=subprocess.STDOUT
                )
                running[name] = (process, log, time.perf_counter())
                todo.remove(name)
                print(f"demo: {name} ... (log: {log.relative_to(ROOT)})", flush=True)
        time.sleep(1.0)
        for name, (process, log, start) in list(running.items()):
            if process.poll() is None:
                continue
            del running[name]
            if process.returncode != 0:
                tail = "\n".join(log.read_text(errors="replace").strip().splitlines()[-8:])
                for other, _, _ in running.values():
                    other.terminate()
                sys.exit(f"demo: {name} failed (exit {process.returncode}); {log}:\n{tail}")
            times[name] = time.perf_counter() - start
            print(f"demo: {name} done in {times[name]:.0f} s", flush=True)
        if running and time.perf_counter() - last_report > 20:
            last_report = time.perf_counter()
            print(
                "demo: running: " + "; ".join(f"{n} ({progress(log)})" for n, (_, log, _) in running.items()),
                flush=True,
            )
    return times


def prediction_table() -> str:
    result = json.loads((RUNS / "smollm2" / "predict" / "predictions.json").read_text())
    metrics = result["metrics"]
    lines = ["| predictor of the held-out prompt-boundary length | MRE |", "| --- | ---: |"]
    lines.append(f"| constant: mean training length | {metrics.get('constant_mre', float('nan')):.3f} |")
    lines.append(f"| constant: best in value space | {metrics.get('constant_value_mre', float('nan')):.3f} |")
    lines.append(f"| LenVM, V(s_0) -> L̂ = ln(1 + V)/ln γ | {metrics['boundary_mre']:.3f} |")
    return "\n".join(lines)


def length_control_table() -> str:
    from lenvm_rl.reporting import mean_row

    results = {}
    for arm in ("plain", "guided"):
        results.update(json.loads((RUNS / "smollm2" / arm / "results.json").read_text())["results"])
    lines = ["| arm | length score | accuracy | mean tokens (16 / 32 / 64) | hit rate |", "|---|---:|---:|---|---:|"]
    for label, summary in results.items():
        mean = mean_row(summary)
        per_budget = " / ".join(f"{s['mean_tokens']:.1f}" for s in summary)
        lines.append(
            f"| {label} | {mean['length_score']:.3f} | {mean['accuracy']:.3f} | {mean['mean_tokens']:.1f} "
            f"({per_budget}) | {mean['hit_rate']:.3f} |"
        )
    return "\n".join(lines)


def testbed_table_and_curve() -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    history = json.loads((RUNS / "testbed" / "grpo" / "trainer_state.json").read_text())["log_history"]
    evals = [row for row in history if "eval_length/mean_length_score" in row]
    keys = [
        ("held-out length score", "eval_length/mean_length_score"),
        ("accuracy", "eval_rewards/accuracy/mean"),
        ("budget hit rate", "eval_length/budget_hit_rate"),
        ("mean tokens", "eval_completions/mean_length"),
    ]
    lines = [f"| testbed policy | {' | '.join(name for name, _ in keys)} |", "|---|" + "---:|" * len(keys)]
    for label, row in (
        (f"before (step {evals[0]['step']})", evals[0]),
        (f"after GRPO-LenVM (step {evals[-1]['step']})", evals[-1]),
    ):
        lines.append(f"| {label} | " + " | ".join(f"{row.get(key, float('nan')):.3f}" for _, key in keys) + " |")
    figure, axis = plt.subplots(figsize=(6.5, 4))
    steps = [row["step"] for row in evals]
    for name, key in keys[:3]:
        axis.plot(steps, [row.get(key, float("nan")) for row in evals], marker="o", label=name)
    axis.set(
        xlabel="GRPO step (32 completions each)",
        ylabel="held-out score",
        ylim=(0, 1.02),
        title="Testbed: LenVM-shaped GRPO learns budgets",
    )
    axis.grid(alpha=0.3)
    axis.legend()
    figure.tight_layout()
    figure.savefig(RUNS / "testbed" / "learning_curve.png", dpi=110)
    plt.close(figure)
    return "\n".join(lines)


def write_evaluate_recipe() -> None:
    import yaml

    recipe = yaml.safe_load((SMOL / "evaluate" / "config_before_after.yaml").read_text())
    recipe.update(adapters=[], labels=["SmolLM2"])
    EVALUATE_RECIPE.parent.mkdir(parents=True, exist_ok=True)
    EVALUATE_RECIPE.write_text(yaml.safe_dump(recipe, sort_keys=False))


def main() -> None:
    start = time.perf_counter()
    write_evaluate_recipe()
    times = run_stages()
    precision = json.loads((RUNS / "smollm2" / "rollouts" / "rollout_args.json").read_text())["dtype"]
    report = "\n\n".join(
        [
            f"SmolLM2-135M-Instruct ({precision}): LenVM prompt-boundary prediction on 16 held-out prompts x 8 samples "
            f"(runs/demo/smollm2/predict)",
            prediction_table(),
            "SmolLM2 on 16 held-out prompts x exactly 16 / 32 / 64 tokens (means over the budgets; per budget in "
            "runs/demo/smollm2/{plain,guided}/results.md)",
            length_control_table(),
            "Learning testbed: 128 held-out problems x 2 samples (curve: runs/demo/testbed/learning_curve.png)",
            testbed_table_and_curve(),
            f"Wall time of this invocation: {(time.perf_counter() - start) / 60:.1f} min; stages (s): "
            + ", ".join(f"{name} {seconds:.0f}" for name, seconds in times.items()),
        ]
    )
    (RUNS / "summary.md").write_text(report + "\n")
    print("\n" + report + f"\n\nwrote {RUNS.relative_to(ROOT)}/summary.md")


if __name__ == "__main__":
    main()
