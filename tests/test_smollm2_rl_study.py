"""benchmarks/smollm2_rl.py: held-out curves against generated tokens (fast), and the whole study at a tiny size on
the real SmolLM2-135M-Instruct, run twice: the second run finds every stage done and only rewrites the summary
(slow)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import smollm2_rl  # noqa: E402


def test_curve_counts_completion_tokens_generated_before_each_evaluation():
    log_history = [
        {"step": 0, "eval_length/mean_length_score": 0.2, "eval_rewards/accuracy/mean": 0.5, "eval_loss": 0.0},
        {"step": 1, "completions/mean_length": 10.0},
        {"step": 2, "completions/mean_length": 30.0},
        {"step": 2, "eval_length/mean_length_score": 0.4, "eval_rewards/accuracy/mean": 0.25, "eval_loss": 0.0},
        # a rerun with more steps resumed here and evaluated step 2 again (eval_on_start): the first one is kept
        {"step": 2, "eval_length/mean_length_score": 0.9, "eval_rewards/accuracy/mean": 0.9, "eval_loss": 0.0},
    ]
    points = smollm2_rl.curve(log_history, batch=4)
    assert points == [
        {"step": 0, "generated_tokens": 0.0, "length_score": 0.2, "accuracy": 0.5},
        {"step": 2, "generated_tokens": 160.0, "length_score": 0.4, "accuracy": 0.25},  # (10 + 30) x 4
    ]


def test_vllm_python_runs_both_arms_with_the_same_vllm_flags(tmp_path):
    import argparse

    options = argparse.Namespace(
        steps=4,
        eval_steps=2,
        eval_prompts=2,
        eval_batch=None,
        batch=4,
        grpo_flags="--max_completion_length 16",
        vllm_python=None,
    )
    plain = {arm: smollm2_rl.grpo_command(arm, 0, tmp_path, options) for arm in smollm2_rl.ARMS}
    options.vllm_python = Path("/venv/bin/python")
    vllm = {arm: smollm2_rl.grpo_command(arm, 0, tmp_path, options) for arm in smollm2_rl.ARMS}
    for arm in smollm2_rl.ARMS:
        assert plain[arm][0] == sys.executable and "--use_vllm" not in plain[arm]
        assert vllm[arm][:3] == ["/venv/bin/python", "-m", "lenvm_rl"]
        flags = vllm[arm][vllm[arm].index("--use_vllm") :]
        assert flags == [*smollm2_rl.VLLM_GRPO_FLAGS, "--max_completion_length", "16"]  # the same for both arms
        assert flags[flags.index("--top_p") + 1] == "1.0"
        # nothing else differs from the generate run but the Python and the vLLM flags
        assert [a for a in vllm[arm][3:] if a not in smollm2_rl.VLLM_GRPO_FLAGS] == [
            a for a in plain[arm][3:] if a not in smollm2_rl.VLLM_GRPO_FLAGS
        ]


def test_a_run_that_ended_before_the_asked_steps_is_not_finished_and_its_furthest_state_is_read(tmp_path):
    run = tmp_path / "run"
    assert not smollm2_rl.finished(run, 20) and smollm2_rl.history(run) is None
    (run / "checkpoint-30").mkdir(parents=True)
    (run / "trainer_state.json").write_text(json.dumps({"global_step": 20, "log_history": [{"step": 20}]}))
    assert smollm2_rl.finished(run, 20) and not smollm2_rl.finished(run, 40)
    state = {"global_step": 30, "log_history": [{"step": 20}, {"step": 30}]}  # a rerun with --steps 40, cut off
    (run / "checkpoint-30" / "trainer_state.json").write_text(json.dumps(state))
    assert smollm2_rl.history(run)[-1] == {"step": 30} and not smollm2_rl.finished(run, 40)


def test_missing_vllm_python_is_one_clear_error(tmp_path):
    script = ROOT / "benchmarks" / "smollm2_rl.py"
    done = subprocess.run(
        [sys.executable, str(script), "--output", str(tmp_path / "out"), "--vllm_python", str(tmp_path / "nope")],
        capture_output=True,
        text=True,
    )
    assert done.returncode != 0 and "--vllm_python:" in done.stderr and "does not exist" in done.stderr
    assert not (tmp_path / "out").exists()  # refused before anything was written


@pytest.mark.slow
def test_tiny_study_runs_and_resumes(tmp_path):
    command = [
        sys.executable, str(ROOT / "benchmarks" / "smollm2_rl.py"), "--output", str(tmp_path), "--seeds", "0",
        "--steps", "2", "--eval_steps", "1", "--eval_prompts", "2", "--batch", "4", "--lenvm_prompts", "2",
        "--lenvm_eval_prompts", "2", "--lenvm_flags", "--num_train_epochs 1", "--grpo_flags",
        "--max_completion_length 16",
    ]  # fmt: skip
    env = {**os.environ, "WANDB_MODE": "offline", "HF_HUB_OFFLINE": "1"}
    for attempt in range(2):
        done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True)
        assert done.returncode == 0, done.stderr[-3000:]
        assert ("started" in done.stdout) == (attempt == 0)  # the rerun resumes: nothing left to run
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["complete"] and 0.0 <= summary["base_length_score"] <= 1.0
    for arm in smollm2_rl.ARMS:
        result = summary["arms"][arm]
        assert result["seeds"] == [0] and len(result["heldout_length_score"]) == 1
        steps = [point["step"] for point in result["curves"]["0"]]
        assert steps == [0, 1, 2]  # the base model, then every eval_steps
        assert 0 < result["curves"]["0"][-1]["generated_tokens"] <= 2 * 4 * 16
