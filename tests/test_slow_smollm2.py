"""The pipeline on the real embedded default, SmolLM2-135M-Instruct (`make test-slow`, a few minutes)."""

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


def test_rollout_lenvm_predict_on_smollm2(tmp_path):
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    rollouts, held_out, lenvm = tmp_path / "rollouts", tmp_path / "held_out", tmp_path / "lenvm"
    small = ["--num_samples_per_prompt", "4", "--max_completion_tokens", "48", "--shard_size", "2"]
    run("rollout", "--config", f"{RECIPES}/rollout/config_arithmetic.yaml", "--num_prompts", "4",
        "--output_dir", str(rollouts), *small, cwd=root)
    run("rollout", "--config", f"{RECIPES}/rollout/config_arithmetic_eval.yaml", "--num_prompts", "2",
        "--output_dir", str(held_out), *small, cwd=root)
    out = run("train-lenvm", "--config", f"{RECIPES}/lenvm/config_top_layers.yaml", "--rollouts_path", str(rollouts),
              "--eval_rollouts_path", str(held_out), "--output_dir", str(lenvm), "--max_steps", "2", cwd=root)
    assert "prompt-boundary MRE" in out
    run("predict-length", "--lenvm_model_path", str(lenvm), "--rollouts_path", str(held_out),
        "--output_dir", str(tmp_path / "predict"), cwd=root)
    predictions = json.loads((tmp_path / "predict" / "predictions.json").read_text())
    assert predictions["prompts"] and all(p["predicted_tokens"] >= 0 for p in predictions["prompts"])
    assert (tmp_path / "predict" / "value_trace.png").stat().st_size > 1000
