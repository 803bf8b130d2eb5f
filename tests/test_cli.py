"""The real entry point as a subprocess: `python -m lenvm_rl <stage>` on the tiny model, and the one-line
error (exit 2, no traceback) for mistakes a user can make."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import OFFLINE_ENV, ROOT, write_rollout_shard

from lenvm_rl.rollout_data import load_rollouts


def run_cli(*args, cwd):
    env = {
        **os.environ,
        **OFFLINE_ENV,
        "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
        # Progress bars write to stderr; without them stderr holds only what the program has to say.
        "HF_DATASETS_DISABLE_PROGRESS_BARS": "1",
        "HF_HUB_DISABLE_PROGRESS_BARS": "1",
        "TQDM_DISABLE": "1",
    }
    command = [sys.executable, "-m", "lenvm_rl", *map(str, args)]
    return subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def write_recipe(path, fields: dict):
    path.write_text(yaml.safe_dump({k: str(v) if isinstance(v, Path) else v for k, v in fields.items()}))
    return path


def rollout_recipe(model_path, output_dir, fields=()):
    return {
        "model_name_or_path": model_path,
        "dataset_name": "arithmetic",
        "num_prompts": 6,
        "num_samples_per_prompt": 2,
        "max_completion_tokens": 8,
        "prompts_per_batch": 2,
        "shard_size": 2,
        "output_dir": output_dir,
        **dict(fields),
    }


def lenvm_recipe(model_path, rollouts_path, output_dir, fields=()):
    return {
        "model_name_or_path": model_path,
        "rollouts_path": rollouts_path,
        "eval_prompt_fraction": 0.34,
        "gamma": "auto",
        "output_dir": output_dir,
        "max_steps": 2,
        "per_device_train_batch_size": 4,
        "learning_rate": 1.0e-3,
        "report_to": "none",
        "save_strategy": "no",
        "use_cpu": True,
        "seed": 0,
        **dict(fields),
    }


def test_rollout_train_predict(tiny_model_path, tmp_path):
    rollouts, lenvm, predictions = tmp_path / "rollouts", tmp_path / "lenvm", tmp_path / "predict"

    result = run_cli(
        "rollout",
        "--config",
        write_recipe(tmp_path / "rollout.yaml", rollout_recipe(tiny_model_path, rollouts)),
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr
    assert len(load_rollouts(rollouts)) == 12

    recipe = write_recipe(tmp_path / "lenvm.yaml", lenvm_recipe(tiny_model_path, rollouts, lenvm))
    result = run_cli("train-lenvm", "--config", recipe, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    config = json.loads((lenvm / "config.json").read_text())
    assert config["model_type"] == "lenvm" and 0 < config["gamma"] < 1
    assert (lenvm / "model.safetensors").is_file() and (lenvm / "tokenizer.json").is_file()

    result = run_cli(
        "predict-length",
        "--lenvm_model_path",
        lenvm,
        "--rollouts_path",
        rollouts,
        "--output_dir",
        predictions,
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr
    output = json.loads((predictions / "predictions.json").read_text())
    assert output["gamma"] == config["gamma"]
    assert 0 <= output["metrics"]["boundary_mre"] < float("inf") and output["metrics"]["value_mse"] >= 0
    assert output["prompts"] and all(p["predicted_tokens"] >= 0 for p in output["prompts"])
    assert (predictions / "value_trace.png").stat().st_size > 0
    assert "prompt-boundary MRE" in result.stdout


def test_rewards_lists_the_registry(tmp_path):
    result = run_cli("rewards", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    names = [line.split()[0] for line in result.stdout.splitlines()]
    assert {"length_score", "accuracy"} <= set(names)


def test_main_reads_its_argv_not_the_process_arguments(capsys, monkeypatch):
    from lenvm_rl.cli import main

    monkeypatch.setattr(sys, "argv", ["lenvm-rl", "no-such-stage"])
    main(["rewards"])  # the process's own arguments would exit 2
    assert "length_score" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exit_info:
        main(["rewards", "--verbose"])
    assert exit_info.value.code == 2
    assert "rewards: takes no arguments" in capsys.readouterr().err


BAD_INPUTS = {
    "misspelt-field": ("rollout", {"num_samples_per_promt": 2}, [], "recipe: unknown field(s) num_samples_per_promt"),
    "missing-prompt-column": (
        "rollout",
        {"dataset_name": "{jsonl}", "num_prompts": 2},
        [],
        "prompt_column: the dataset has no column 'prompt'",
    ),
    "no-finished-rollout": ("train-lenvm", {"rollouts_path": "{truncated}"}, [], "rollouts_path: none of its"),
    "nothing-fits-max-sequence-tokens": (
        "train-lenvm",
        {},
        ["--max_sequence_tokens", "2"],
        "max_sequence_tokens: no training rollout",
    ),
    "gamma-out-of-range": ("train-lenvm", {}, ["--gamma", "1.5"], "gamma: must be a number in (0, 1)"),
    "missing-lora-target": (
        "train-lenvm",
        {"use_peft": True},
        ["--lora_target_modules", "qkv_proj"],
        "lora_target_modules: qkv_proj not found",
    ),
}


@pytest.mark.parametrize("stage, fields, flags, message", BAD_INPUTS.values(), ids=BAD_INPUTS.keys())
def test_bad_input_is_one_line_exit_2(stage, fields, flags, message, tiny_model_path, rollouts_dir, tmp_path):
    # What a user already has: a rollout folder and an output folder; a failed run must leave both alone.
    rollouts, output_dir = tmp_path / "rollouts", tmp_path / "out"
    shutil.copytree(rollouts_dir, rollouts)
    output_dir.mkdir()
    (output_dir / "keep.txt").write_text("written before")
    jsonl = tmp_path / "questions.jsonl"
    jsonl.write_text(
        "".join(json.dumps({"question": f"What is {i} + 1?", "answer": str(i + 1)}) + "\n" for i in range(3))
    )
    truncated = write_rollout_shard(
        tmp_path / "truncated",
        [
            {
                "prompt_id": i,
                "sample_index": 0,
                "prompt_ids": [5, 6],
                "completion_ids": [7] * 8,
                "completion_tokens": 8,
                "finished": False,
            }
            for i in range(4)
        ],
    )
    fields = {
        k: str(v).format(jsonl=jsonl, truncated=truncated) if isinstance(v, str) else v for k, v in fields.items()
    }
    if stage == "rollout":  # aimed at the existing rollout folder
        recipe = rollout_recipe(tiny_model_path, rollouts, fields)
    else:
        recipe = lenvm_recipe(tiny_model_path, rollouts, output_dir, fields)

    result = run_cli(stage, "--config", write_recipe(tmp_path / "recipe.yaml", recipe), *flags, cwd=tmp_path)

    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith(f"lenvm-rl {stage}: error: {message}"), lines[0]
    assert load_rollouts(rollouts).to_list() == load_rollouts(rollouts_dir).to_list()
    assert [p.name for p in output_dir.iterdir()] == ["keep.txt"]
