"""FSDP2, ZeRO-2 and ZeRO-3 for real, on 2 CPU processes (gloo) through ``lenvm_rl.cpu_launch`` and
accelerate_configs/cpu/, each checked against the same stages under 2-process DDP (accelerate_configs/cpu_2proc.yaml).

One launch per config runs every stage in a row (tests/mp_stages.py; the imports are paid once): ``train-lenvm``
(2 steps), ``grpo`` with that LenVM (1 step, a full fine-tune), ``ppo`` (2 steps, a checkpoint after each) and a
``ppo`` resumed from its first checkpoint. Each run records the distributed type and world size it ran under, so a
silent fallback to one process or to DDP fails, and how the checked parameters were laid out (sharded or not).
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from conftest import OFFLINE_ENV, ROOT, make_tiny_llama
from test_multiprocess import free_port

CONFIGS = {"ddp": ROOT / "accelerate_configs" / "cpu_2proc.yaml",
           **{name: ROOT / "accelerate_configs" / "cpu" / f"{name}.yaml" for name in ("fsdp", "zero2", "zero3")}}
EXPECTED_TYPE = {"ddp": "MULTI_CPU", "fsdp": "FSDP", "zero2": "DEEPSPEED", "zero3": "DEEPSPEED"}
STAGE_NAMES = ["train-lenvm", "grpo", "ppo", "ppo-resumed"]
# DeepSpeed's CPU shared-memory op, compiled once (make install prebuilds it there).
TORCH_EXTENSIONS_DIR = ROOT / ".cache" / "torch_extensions"


def recipes(work: Path, tiny_model_path: str, rollouts_path: Path) -> list[list[str]]:
    """The stages of one launch, as `lenvm-rl` argument lists; the same for every config."""
    common = dict(report_to="none", disable_tqdm=True, seed=0, logging_steps=1, activation_checkpointing=False)
    policy = dict(
        common, model_name_or_path=tiny_model_path, num_prompts=8, budgets=[3, 6], budget_kinds=["exact", "at_most"],
        reward_funcs=["accuracy", "length_score"], lenvm_model_path=str(work / "lenvm"), max_completion_length=8,
        per_device_train_batch_size=4, learning_rate=1e-2, use_peft=False,
    )
    stages = {
        "train-lenvm": dict(
            common, model_name_or_path=tiny_model_path, rollouts_path=str(rollouts_path),
            eval_rollouts_path=str(rollouts_path), gamma=0.9, max_steps=2, learning_rate=1e-2,
            per_device_train_batch_size=2, save_strategy="no", eval_strategy="no", output_dir=str(work / "lenvm"),
        ),
        "grpo": dict(policy, num_generations=4, max_steps=1, save_strategy="no", output_dir=str(work / "grpo")),
        "ppo": dict(
            policy, num_generations=1, max_steps=2, save_strategy="steps", save_steps=1, output_dir=str(work / "ppo"),
            value_head_learning_rate=1e-1,
        ),
    }
    stages["ppo-resumed"] = dict(
        stages["ppo"], output_dir=str(work / "ppo_resumed"), resume_from_checkpoint=str(work / "ppo" / "checkpoint-1")
    )
    commands = []
    for name in STAGE_NAMES:
        path = work / f"{name}.yaml"
        path.write_text(yaml.safe_dump(stages[name]))
        commands.append([name.removesuffix("-resumed"), "--config", str(path)])
    return commands


def run_config(config: str, work: Path, tiny_model_path: str, rollouts_path: Path) -> list[list[dict]]:
    """Every stage under one 2-process launch of ``config``; the facts each rank recorded, per stage."""
    work.mkdir(parents=True, exist_ok=True)
    stages = work / "stages.json"
    stages.write_text(json.dumps(recipes(work, tiny_model_path, rollouts_path)))
    env = {
        **os.environ, **OFFLINE_ENV, "OMP_NUM_THREADS": "1", "TORCH_EXTENSIONS_DIR": str(TORCH_EXTENSIONS_DIR),
        "PYTHONPATH": f"{ROOT}{os.pathsep}{ROOT / 'tests'}",
    }
    command = [
        sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(CONFIGS[config]),
        "--main_process_port", str(free_port()), str(ROOT / "tests" / "mp_stages.py"), str(work / "facts"), str(stages),
    ]
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    return [[json.loads((work / "facts" / f"{i}_rank{r}.json").read_text()) for r in range(2)] for i in range(len(STAGE_NAMES))]
