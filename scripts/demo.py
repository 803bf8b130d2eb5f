"""`make demo`: what lenvm-rl does, on the embedded SmolLM2-135M-Instruct and on the learning testbed, on a CPU.

Stages (each a real `lenvm-rl` / `python -m lenvm_rl.testbed` process, from the shipped recipes with the smaller
sizes below written as flags; one thread per process, two cores busy: the stages on the longest chain, the SmolLM2
rollouts and the guided decoding, run as two data-parallel processes, the others two at a time):

- SmolLM2: rollouts -> LenVM (top 4 layers), whose held-out evaluation is the prompt-boundary prediction table;
  then on held-out budgeted prompts the base model, hard truncation at the budget and LenVM-guided decoding (length
  score, accuracy, mean tokens per budget). The base and truncation arms generate in one process, the guided arm in
  another, with the same seeds.
- Testbed: the tiny policy trained from scratch, its rollouts and LenVM, then two GRPO arms from it with the same
  seed and steps: the LenVM critic (the recipes' default arm: frozen LenVM, λ = 0.95, A_len scaled by the first
  batch's std) and its sequence-level twin (the same LIFEBench length score as a reward), with held-out evaluations
  every 25 steps: a before/after table and their curves against generated tokens.

Every stage is skipped when its output exists (a rerun resumes; delete a folder under runs/demo to redo it), and
the running stages' progress and ETA (their tqdm bars, read from their logs) are printed every 20 s. The summary
gives each stage's wall and CPU time and the load average. SmolLM2 GRPO is not in the demo (twelve CPU steps move it
no more than noise, docs/BENCHMARKS.md); `make test-slow` runs it.
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


sys.path.insert(0, str(ROOT))  # this checkout's lenvm_rl, whichever checkout an installed copy points at
RUNS = ROOT / "runs" / "demo"
SMOL = ROOT / "recipes" / "SmolLM2-135M-Instruct"
TESTBED = ROOT / "recipes" / "testbed"
LM = [sys.executable, "-m", "lenvm_rl"]
# The stages on the longest chain (rollouts -> LenVM -> guided decoding) generate on both cores: two processes, each
# taking every other shard or batch, with the seeds and outputs of a one-process run (lenvm_rl/data_parallel.py).
# run_stages adds a port free at launch (the config's fixed one may be taken by other work on the machine).
TWO_PROCESSES = [
    sys.executable,
    "-m",
    "accelerate.commands.launch",
    "--config_file",
    str(ROOT / "accelerate_configs" / "cpu_2proc.yaml"),
    "-m",
    "lenvm_rl",
]
HELD_OUT = ["--num_prompts", "16", "--skip_prompts", "100"]  # 16 held-out prompts x exact {16, 32, 64}
# The before/after recipe without its GRPO adapter (a list field cannot be emptied by a flag): written by main().
EVALUATE_RECIPE = RUNS / "smollm2" / "config_base_model.yaml"
EVALUATE = [
    "evaluate",
    "--config",
    str(EVALUATE_RECIPE),
    *HELD_OUT,
    "--max_new_tokens",
    "96",
    "--batch_size",
    "8",  # 6 batches (2 per budget): 3 for each process of the two-process guided stage
    "--lenvm_model_path",
    str(RUNS / "smollm2" / "lenvm"),
]
# The testbed's two GRPO arms: the same policy, LenVM, prompts, seed and steps; the recipes differ in one field each
# from config_accuracy.yaml (tests/test_testbed.py). Held-out evaluation every 25 steps on 128 problems x 2 samples.
# Learning rate 5e-5, not the recipes' 1e-4: from this shorter SFT's policy (sampled accuracy about 0.82), GRPO at
# 1e-4 lost 5-10 points of held-out accuracy with the accuracy reward alone (no length signal: 0.81 -> 0.71 by step
# 75), and kept it at 3e-5 and 5e-5 (docs/BENCHMARKS.md, "make demo"); 200 steps at 5e-5 learn the budgets.
LENVM_ARM = ["--length_advantage_scale", "first"]  # the model recipes' default arm (README "When to use ...")
TESTBED_GRPO = ["--learning_rate", "5e-5", "--max_steps", "200", "--eval_steps", "25", "--eval_num_prompts", "128"]


def testbed_grpo(recipe: str, folder: str, *flags: str) -> tuple[list[str], Path, list[str]]:
    """A GRPO stage on the testbed policy and its LenVM (the sequence-level arm loads it for its length metrics)."""
    output = RUNS / "testbed" / folder
    command = [
        *LM,
        "grpo",
        "--config",
        str(TESTBED / recipe),
        *flags,
        "--model_name_or_path",
        str(RUNS / "testbed" / "sft"),
        "--lenvm_model_path",
        str(RUNS / "testbed" / "lenvm"),
        "--output_dir",
        str(output),
        *TESTBED_GRPO,
    ]
    return command, output / "trainer_state.json", ["testbed LenVM"]


# name: (command, file that marks it done, stages it needs)
STAGES = {
    "smollm2 held-out rollouts": (
        [
            *TWO_PROCESSES,
            "rollout",
            "--config",
            str(SMOL / "rollout" / "config_arithmetic_eval.yaml"),
            "--num_prompts",
            "16",
            "--num_samples_per_prompt",
            "4",
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
    "smollm2 rollouts": (
        [
            *TWO_PROCESSES,
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
    "smollm2 base and truncation": (
        [*LM, *EVALUATE, "--hard_truncation", "true", "--output_dir", str(RUNS / "smollm2" / "plain")],
        RUNS / "smollm2" / "plain" / "results.json",
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
    "smollm2 guided decoding": (
        [
            *TWO_PROCESSES,
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
    "testbed GRPO with the LenVM critic": testbed_grpo("grpo/config_lenvm_lambda095.yaml", "grpo", *LENVM_ARM),
    "testbed GRPO with the sequence-level reward": testbed_grpo("grpo/config_length_score.yaml", "grpo_length_score"),
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


def run_stages(jobs: int = 2) -> dict[str, tuple[float, float]]:
    """Run every unfinished stage, ``jobs`` at a time, in STAGES order as their needs finish; per stage its wall and
    CPU seconds (user + system of the stage's process and its children: the CPU time does not grow when other work
    shares the cores, the wall time does)."""
    todo = [name for name, (_, done, _) in STAGES.items() if not done.exists()]
    running, times, last_report = {}, {}, 0.0
    for name in STAGES:
        if name not in todo:
            print(f"demo: {name}: done earlier, skipped", flush=True)
    while todo or running:
        for name in list(todo):
            needs = STAGES[name][2]
            if any(n in todo or n in running for n in needs):
                continue
            slots = jobs if STAGES[name][0][2] == "accelerate.commands.launch" else 1
            if sum(used for *_, used in running.values()) + slots > jobs:
                break  # a stage waiting for both cores keeps its place: later stages do not start before it
            log = RUNS / "logs" / (re.sub(r"\W+", "_", name) + ".log")
            log.parent.mkdir(parents=True, exist_ok=True)
            command = STAGES[name][0]
            if slots > 1:  # after the launcher's --config_file
                command = [*command[:5], "--main_process_port", str(free_port()), *command[5:]]
            process = subprocess.Popen(command, cwd=ROOT, env=ENV, stdout=log.open("w"), stderr=subprocess.STDOUT)
            running[name] = (process, log, time.perf_counter(), slots)
            todo.remove(name)
            print(f"demo: {name} ... (log: {log.relative_to(ROOT)})", flush=True)
        time.sleep(1.0)
        for name, (process, log, start, _) in list(running.items()):
            pid, status, usage = os.wait4(process.pid, os.WNOHANG)  # the stage's own resource usage
            if pid == 0:
                continue
            process.returncode = os.waitstatus_to_exitcode(status)
            del running[name]
            if process.returncode != 0:
                tail = "\n".join(log.read_text(errors="replace").strip().splitlines()[-8:])
                for other, *_ in running.values():
                    other.terminate()
                sys.exit(f"demo: {name} failed (exit {process.returncode}); {log}:\n{tail}")
            times[name] = (time.perf_counter() - start, usage.ru_utime + usage.ru_stime)
            print(f"demo: {name} done in {times[name][0]:.0f} s ({times[name][1]:.0f} s CPU)", flush=True)
        if running and time.perf_counter() - last_report > 20:
            last_report = time.perf_counter()
            print(
                "demo: running: " + "; ".join(f"{n} ({progress(log)})" for n, (_, log, *_) in running.items()),
                flush=True,
            )
    return times


def prediction_table() -> str:
    """The LenVM's prompt-boundary length error on the held-out rollouts against two constants (train-lenvm's own
    evaluation of them, ``eval_results.json``: the numbers ``lenvm-rl predict-length`` prints for the same rollouts)."""
    metrics = json.loads((RUNS / "smollm2" / "lenvm" / "eval_results.json").read_text())
    lines = ["| predictor of the held-out prompt-boundary length | MRE |", "| --- | ---: |"]
    lines.append(f"| constant: mean training length | {metrics['eval_constant_mre']:.3f} |")
    lines.append(f"| constant: best in value space | {metrics['eval_constant_value_mre']:.3f} |")
    lines.append(f"| LenVM, V(s_0) -> L̂ = ln(1 + V)/ln γ | {metrics['eval_boundary_mre']:.3f} |")
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


TESTBED_ARMS = {  # label -> the folder of its GRPO run under runs/demo/testbed
    "GRPO + LenVM critic": "grpo",
    "GRPO + sequence-level length reward": "grpo_length_score",
}
TESTBED_KEYS = [
    ("held-out length score", "eval_length/mean_length_score"),
    ("accuracy", "eval_rewards/accuracy/mean"),
    ("budget hit rate", "eval_length/budget_hit_rate"),
    ("mean tokens", "eval_completions/mean_length"),
]
COMPLETIONS_PER_STEP = 32  # the testbed recipes' per_device_train_batch_size
TARGET_SCORE = 0.8


def testbed_curve(folder: str) -> tuple[list[dict], list[float]]:
    """A testbed GRPO run's held-out evaluations and the completion tokens generated in training before each.

    TRL logs every ``logging_steps`` the mean completion length (EOS included) over the steps since its last log."""
    history = json.loads((RUNS / "testbed" / folder / "trainer_state.json").read_text())["log_history"]
    generated, last_step, tokens_at = 0.0, 0, {0: 0.0}
    for row in history:
        if "completions/mean_length" in row and "loss" in row:
            generated += row["completions/mean_length"] * COMPLETIONS_PER_STEP * (row["step"] - last_step)
            last_step, tokens_at[row["step"]] = row["step"], generated
    evals = [row for row in history if TESTBED_KEYS[0][1] in row]
    return evals, [tokens_at.get(row["step"], float("nan")) for row in evals]


def testbed_table_and_curve() -> str:
    """Before / after rows of both GRPO arms, the generated tokens each took to a held-out length score of 0.8,
    and their held-out curves against generated tokens (runs/demo/testbed/learning_curve.png)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = {label: testbed_curve(folder) for label, folder in TESTBED_ARMS.items()}
    names = " | ".join(name for name, _ in TESTBED_KEYS)
    lines = [
        f"| testbed policy | {names} | generated tokens to length score ≥ {TARGET_SCORE} |",
        "|---|" + "---:|" * (len(TESTBED_KEYS) + 1),
    ]
    cells = lambda row: " | ".join(f"{row.get(key, float('nan')):.3f}" for _, key in TESTBED_KEYS)
    first_evals = next(iter(runs.values()))[0]
    lines.append(f"| before (step {first_evals[0]['step']}) | {cells(first_evals[0])} | |")
    for label, (evals, tokens) in runs.items():
        reached = next((t for t, row in zip(tokens, evals) if row[TESTBED_KEYS[0][1]] >= TARGET_SCORE), None)
        reached = f"{reached / 1000:.0f}k" if reached is not None else "not reached"
        lines.append(f"| after {label} (step {evals[-1]['step']}) | {cells(evals[-1])} | {reached} |")
    figure, axes = plt.subplots(1, 2, figsize=(10, 4))
    for index, (label, (evals, tokens)) in enumerate(runs.items()):
        thousands = [t / 1000 for t in tokens]
        for axis, (name, key) in zip(axes, TESTBED_KEYS[:2]):
            axis.plot(
                thousands, [row.get(key, float("nan")) for row in evals], marker="o", color=f"C{index}", label=label
            )
            axis.set(
                xlabel="completion tokens generated in training (thousands)", ylabel=f"held-out {name.split()[-1]}"
            )
    axes[0].axhline(TARGET_SCORE, color="grey", linestyle=":", linewidth=1)
    axes[0].set(title="Budgets learnt (held-out length score)", ylim=(0, 1.02))
    axes[1].set(title="Task kept (held-out accuracy)", ylim=(0, 1.02))
    for axis in axes:
        axis.grid(alpha=0.3)
    axes[1].legend(loc="lower right")
    figure.suptitle("Learning testbed: the LenVM critic against a sequence-level length reward", fontsize=10)
    figure.tight_layout()
    figure.savefig(RUNS / "testbed" / "learning_curve.png", dpi=110)
    plt.close(figure)
    return "\n".join(lines)


def machine() -> str:
    """ "2 cores of AMD EPYC (AVX512-BF16)": the core count, lscpu's model name and the widest matrix kind."""
    from lenvm_rl.precision import cpu_flags

    cpuinfo = Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").exists() else []
    model = next((line.split(":", 1)[1].strip() for line in cpuinfo if line.startswith("model name")), "a CPU")
    flags = cpu_flags() or set()
    kinds = (("amx_bf16", "AMX"), ("avx512_bf16", "AVX512-BF16"), ("avx512f", "AVX512"), ("avx2", "AVX2"))
    kind = next((label for flag, label in kinds if flag in flags), "no AVX2")
    return f"{os.cpu_count()} cores of {model} ({kind})"


def write_evaluate_recipe() -> None:
    import yaml

    recipe = yaml.safe_load((SMOL / "evaluate" / "config_before_after.yaml").read_text())
    recipe.update(adapters=[], labels=["SmolLM2"])
    EVALUATE_RECIPE.parent.mkdir(parents=True, exist_ok=True)
    EVALUATE_RECIPE.write_text(yaml.safe_dump(recipe, sort_keys=False))


def main() -> None:
    start, load = time.perf_counter(), os.getloadavg()
    write_evaluate_recipe()
    times = run_stages()
    precision = json.loads((RUNS / "smollm2" / "rollouts" / "rollout_args.json").read_text())["dtype"]
    report = "\n\n".join(
        [
            f"SmolLM2-135M-Instruct ({precision}): LenVM prompt-boundary prediction on 16 held-out prompts x 4 samples "
            f"(runs/demo/smollm2/lenvm/eval_results.json)",
            prediction_table(),
            "SmolLM2 on 16 held-out prompts x exactly 16 / 32 / 64 tokens (means over the budgets; per budget in "
            "runs/demo/smollm2/{plain,guided}/results.md)",
            length_control_table(),
            "Learning testbed: 128 held-out problems x 2 samples (curve: runs/demo/testbed/learning_curve.png)",
            testbed_table_and_curve(),
            f"Wall time of this invocation: {(time.perf_counter() - start) / 60:.1f} min on {machine()}; load average "
            f"at the start {load[0]:.1f}, at the end {os.getloadavg()[0]:.1f} (above 2, other work shared the two "
            "cores and the wall times grew; the CPU times did not). Stages, wall / CPU s: "
            + ", ".join(f"{name} {wall:.0f} / {cpu:.0f}" for name, (wall, cpu) in times.items()),
        ]
    )
    (RUNS / "summary.md").write_text(report + "\n")
    print("\n" + report + f"\n\nwrote {RUNS.relative_to(ROOT)}/summary.md")


if __name__ == "__main__":
    main()
