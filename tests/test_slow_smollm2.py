"""The pipeline on the real embedded default, SmolLM2-135M-Instruct (`make test-slow`, a few minutes): rollouts,
LenVM, predict-length, one GRPO step with the LenVM, and evaluate with LenVM-guided decoding."""

import json
import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow
RECIPES = "recipes/SmolLM2-135M-Instruct"


def run(*args, cwd):
    env = {**os.environ, "WANDB_MODE": "offline", "HF_HUB_OFFLINE": "1"}
    result = subprocess.run([sys.executable, "-m", "lenvm_rl", *args], cwd=cwd, env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


def test_pipeline_on_smollm2(tmp_path):
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    rollouts, held_out, lenvm = tmp_path / "rollouts", tmp_path / "held_out", tmp_path / "lenvm"
    small = ["--num_samples_per_prompt", "4", "--max_completion_tokens", "48", "--shard_size", "2"]
    run(
        "rollout",
        "--config",
        f"{RECIPES}/rollout/config_arithmetic.yaml",
        "--num_prompts",
        "4",
        "--output_dir",
        str(rollouts),
        *small,
        cwd=root,
    )
    run(
        "rollout",
        "--config",
        f"{RECIPES}/rollout/config_arithmetic_eval.yaml",
        "--num_prompts",
        "2",
        "--output_dir",
        str(held_out),
        *small,
        cwd=root,
    )
    out = run(
        "train-lenvm",
        "--config",
        f"{RECIPES}/lenvm/config_top_layers.yaml",
        "--rollouts_path",
        str(rollouts),
        "--eval_rollouts_path",
        str(held_out),
        "--output_dir",
        str(lenvm),
        "--max_steps",
        "2",
        cwd=root,
    )
    assert "prompt-boundary MRE" in out
    run(
        "predict-length",
        "--lenvm_model_path",
        str(lenvm),
        "--rollouts_path",
        str(held_out),
        "--output_dir",
        str(tmp_path / "predict"),
        cwd=root,
    )
    predictions = json.loads((tmp_path / "predict" / "predictions.json").read_text())
    assert predictions["prompts"] and all(p["predicted_tokens"] >= 0 for p in predictions["prompts"])
    assert (tmp_path / "predict" / "value_trace.png").stat().st_size > 1000
    # LenVM-shaped GRPO (LoRA) for one step, then the before/after evaluation with LenVM-guided decoding.
    grpo = tmp_path / "grpo"
    run(
        "grpo",
        "--config",
        f"{RECIPES}/grpo/config_lenvm_budget.yaml",
        "--lenvm_model_path",
        str(lenvm),
        "--output_dir",
        str(grpo),
        "--max_steps",
        "1",
        "--num_generations",
        "4",
        "--per_device_train_batch_size",
        "4",
        "--max_completion_length",
        "32",
        "--save_strategy",
        "no",
        cwd=root,
    )
    history = json.loads((grpo / "trainer_state.json").read_text())["log_history"]
    assert 0.0 <= history[0]["length/mean_length_score"] <= 1.0 and history[0]["length/scoring_time_s"] > 0
    out = run(
        "evaluate",
        "--config",
        f"{RECIPES}/evaluate/config_before_after.yaml",
        "--adapters",
        str(grpo),
        "--num_prompts",
        "2",
        "--budgets",
        "16",
        "--max_new_tokens",
        "32",
        "--guided_decoding",
        "true",
        "--lenvm_model_path",
        str(lenvm),
        "--output_dir",
        str(tmp_path / "evaluate"),
        cwd=root,
    )
    results = json.loads((tmp_path / "evaluate" / "results.json").read_text())["results"]
    assert len(results) == 4 and all(s[0]["n"] == 2 for s in results.values())  # 2 models x (plain, guided)
    assert "| model | kind | budget |" in out
