"""FSDP2, ZeRO-2 and ZeRO-3 for real, on 2 CPU processes (gloo) through ``lenvm_rl.cpu_launch`` and
accelerate_configs/cpu/, each checked against the same stages under 2-process DDP (accelerate_configs/cpu_2proc.yaml).

One launch per config runs every stage in a row (tests/mp_stages.py; the imports are paid once): ``train-lenvm``
(2 steps), ``grpo`` with that LenVM (1 step, a full fine-tune), ``ppo`` (2 steps, a checkpoint after each) and a
``ppo`` resumed from its first checkpoint (compared with DDP's resumed run: a resumed GRPO/PPO run is not
bit-identical to an uninterrupted one, under DDP too). Each run records the distributed type and world size it ran under, so a
silent fallback to one process or to DDP fails, and how the checked parameters were laid out (sharded or not).
These runs are float32 (``bf16: false``); a second test runs the stages under ZeRO-2/3 in bf16, as the GPU configs
do, for the heads' precision and ZeRO-3's single parameter dtype.
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
from conftest import OFFLINE_ENV, ROOT
from safetensors.torch import load_file
from test_multiprocess import free_port

CONFIGS = {
    "ddp": ROOT / "accelerate_configs" / "cpu_2proc.yaml",
    **{name: ROOT / "accelerate_configs" / "cpu" / f"{name}.yaml" for name in ("fsdp", "zero2", "zero3")},
}
EXPECTED_TYPE = {"ddp": "MULTI_CPU", "fsdp": "FSDP", "zero2": "DEEPSPEED", "zero3": "DEEPSPEED"}
STAGE_NAMES = ["train-lenvm", "grpo", "ppo", "ppo-resumed"]
# DeepSpeed's CPU shared-memory op, compiled once (make install prebuilds it there).
TORCH_EXTENSIONS_DIR = ROOT / ".cache" / "torch_extensions"


def recipes(work: Path, tiny_model_path: str, rollouts_path: Path) -> list[list[str]]:
    """The stages of one launch, as `lenvm-rl` argument lists; the same for every config."""
    common = dict(report_to="none", disable_tqdm=True, seed=0, logging_steps=1, activation_checkpointing=False)
    policy = dict(
        common,
        model_name_or_path=tiny_model_path,
        num_prompts=8,
        budgets=[3, 6],
        budget_kinds=["exact", "at_most"],
        reward_funcs=["accuracy", "length_score"],
        lenvm_model_path=str(work / "lenvm"),
        max_completion_length=8,
        per_device_train_batch_size=4,
        learning_rate=1e-2,
        use_peft=False,
    )
    stages = {
        "train-lenvm": dict(
            common,
            model_name_or_path=tiny_model_path,
            rollouts_path=str(rollouts_path),
            eval_rollouts_path=str(rollouts_path),
            gamma=0.9,
            max_steps=2,
            learning_rate=1e-2,
            per_device_train_batch_size=2,
            save_strategy="no",
            eval_strategy="no",
            output_dir=str(work / "lenvm"),
        ),
        "grpo": dict(policy, num_generations=4, max_steps=1, save_strategy="no", output_dir=str(work / "grpo")),
        "ppo": dict(
            policy,
            num_generations=1,
            max_steps=2,
            save_strategy="steps",
            save_steps=1,
            output_dir=str(work / "ppo"),
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


def run_config(
    config: str,
    work: Path,
    tiny_model_path: str,
    rollouts_path: Path,
    names: list[str] = STAGE_NAMES,
    bf16: bool = False,
) -> list[list[dict]]:
    """The stages ``names`` under one 2-process launch of ``config``; the facts each rank recorded, per stage.
    ``bf16``: DeepSpeed runs them in bf16 (tests/mp_stages.py)."""
    work.mkdir(parents=True, exist_ok=True)
    stages = work / "stages.json"
    commands = dict(zip(STAGE_NAMES, recipes(work, tiny_model_path, rollouts_path)))
    stages.write_text(json.dumps([commands[name] + (["--bf16", "true"] if bf16 else []) for name in names]))
    env = {
        **os.environ,
        **OFFLINE_ENV,
        "OMP_NUM_THREADS": "1",
        "TORCH_EXTENSIONS_DIR": str(TORCH_EXTENSIONS_DIR),
        "PYTHONPATH": f"{ROOT}{os.pathsep}{ROOT / 'tests'}",
        "MP_STAGES_DEEPSPEED_BF16": "1" if bf16 else "0",
    }
    command = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--config_file",
        str(CONFIGS[config]),
        "--main_process_port",
        str(free_port()),
        str(ROOT / "tests" / "mp_stages.py"),
        str(work / "facts"),
        str(stages),
    ]
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    return [
        [json.loads((work / "facts" / f"{i}_rank{r}.json").read_text()) for r in range(2)] for i in range(len(names))
    ]


def deepspeed_missing() -> str | None:
    if importlib.util.find_spec("deepspeed") is None:
        return "DeepSpeed is not installed (`pip install -e '.[dev]'` installs it)"
    return None


@pytest.fixture(scope="module")
def ddp_run(tiny_model_path, rollouts_dir, tmp_path_factory) -> tuple[Path, list]:
    work = tmp_path_factory.mktemp("ddp")
    return work, run_config("ddp", work, tiny_model_path, rollouts_dir)


def weights(path: Path) -> dict[str, torch.Tensor]:
    return load_file(path / "model.safetensors") if path.is_dir() else load_file(path)


def assert_same_weights(actual: dict, expected: dict, atol: float) -> None:
    assert actual.keys() == expected.keys()
    for name, value in expected.items():
        torch.testing.assert_close(actual[name], value, rtol=0, atol=atol, msg=name)


def logged(output_dir: Path, step: int) -> dict:
    """The training metrics logged at ``step``."""
    history = json.loads((output_dir / "trainer_state.json").read_text())["log_history"]
    return next(row for row in history if row.get("step") == step and "loss" in row)


@pytest.mark.parametrize("config", ["fsdp", "zero2", "zero3"])
def test_stages_run_sharded_as_under_ddp(config, ddp_run, tiny_model_path, rollouts_dir, tmp_path):
    if config.startswith("zero") and deepspeed_missing():
        pytest.skip(deepspeed_missing())
    ddp_work, ddp_facts = ddp_run
    facts = run_config(config, tmp_path, tiny_model_path, rollouts_dir)
    for name, (rank0, rank1), (ddp0, _) in zip(STAGE_NAMES, facts, ddp_facts):
        # The launch really was distributed, of this type: no silent single-process or DDP fallback.
        assert (rank0["world_size"], rank0["distributed_type"]) == (2, EXPECTED_TYPE[config]), name
        assert (rank1["rank"], rank1["distributed_type"]) == (1, EXPECTED_TYPE[config]), name
        assert (ddp0["world_size"], ddp0["distributed_type"]) == (2, "MULTI_CPU"), name
        sharded = config in ("fsdp", "zero3")
        layouts = {**rank0["parameters"], **rank0.get("lenvm_parameters", {})}
        assert layouts, name
        for parameter, layout in layouts.items():  # ZeRO-3 partitions, FSDP2 shards; DDP and ZeRO-2 replicate
            assert layout["kind"] == {"fsdp": "dtensor", "zero3": "zero3"}.get(config, "plain"), (name, parameter)
            assert layout["local"] == (layout["full"] // 2 if sharded else layout["full"]), (name, parameter)
        if name != "train-lenvm":
            # The frozen LenVM is prepared as TRL prepares its reference model: a DeepSpeed engine, an FSDP2 module.
            expected_class = {"fsdp": "FSDPLenVMModel"}.get(config, "DeepSpeedEngine")
            assert rank0["lenvm_class"] == expected_class and rank0["lenvm_dtypes"] == ["torch.float32"], name
        if name.startswith("ppo"):
            assert any("task_value_head" in p for p in rank0["parameters"]), "the task head is part of the policy"
        if config == "zero3":  # one dtype for every ZeRO-3 parameter (its optimizer's flat buffers refuse a mix)
            assert len(rank0["model_dtypes"]) == 1 and len(rank0.get("lenvm_dtypes", [0])) == 1, name
        # The LenVM (trained, or frozen as prepared) computes its head in float32 and gives DDP's z on the probe.
        assert set(rank0["head_compute_dtypes"].values()) == {"torch.float32"}, name
        assert rank0["lenvm_logits_dtype"] == "torch.float32", name
        z, ddp_z = torch.tensor(rank0["lenvm_logits"]), torch.tensor(ddp0["lenvm_logits"])  # (2, 5)
        torch.testing.assert_close(z, ddp_z, rtol=0, atol=1e-4, msg=name)

    tiny = weights(Path(tiny_model_path))
    # train-lenvm: the saved LenVM is whole (gathered), loads as a LenVM, and equals DDP's after the same 2 steps.
    from lenvm_rl.modeling import load_lenvm

    lenvm = weights(tmp_path / "lenvm")
    assert_same_weights(lenvm, weights(ddp_work / "lenvm"), atol=1e-5)
    assert load_lenvm(str(tmp_path / "lenvm")).head.dense.weight.shape == (32, 32)
    assert (
        lenvm["backbone.layers.0.mlp.down_proj.weight"] - tiny["model.layers.0.mlp.down_proj.weight"]
    ).abs().max() > 1e-3
    # grpo with that LenVM: the saved policy equals DDP's and moved (lr 1e-2).
    policy = weights(tmp_path / "grpo")
    assert_same_weights(policy, weights(ddp_work / "grpo"), atol=1e-4)
    assert (policy["lm_head.weight"] - tiny["lm_head.weight"]).abs().max() > 1e-3
    # ppo: policy and the gathered task head equal DDP's; the saved policy holds no head (it loads as a plain LM).
    for run in ("ppo", "ppo_resumed"):
        assert_same_weights(weights(tmp_path / run), weights(ddp_work / run), atol=1e-4)
        assert not any(k.startswith("task_value_head") for k in weights(tmp_path / run))
        head = weights(tmp_path / run / "task_value_head" / "model.safetensors")
        assert_same_weights(head, weights(ddp_work / run / "task_value_head" / "model.safetensors"), atol=1e-4)
        assert head["out.weight"].abs().max() > 1e-3  # trained away from its zero initialisation
    # Resumed from checkpoint-1 (the sharded optimizer, policy and head reloaded; equal to DDP's resumed run above):
    # it ran step 2 only, and trained on from the checkpoint.
    history = json.loads((tmp_path / "ppo_resumed" / "trainer_state.json").read_text())
    assert history["global_step"] == 2 and logged(tmp_path / "ppo_resumed", 1) == logged(tmp_path / "ppo", 1)
    checkpoint = weights(tmp_path / "ppo" / "checkpoint-1")
    assert (weights(tmp_path / "ppo_resumed")["lm_head.weight"] - checkpoint["lm_head.weight"]).abs().max() > 1e-3


@pytest.mark.parametrize("config", ["zero2", "zero3"])
def test_lenvm_head_computes_in_float32_under_deepspeed_bf16(config, tiny_model_path, rollouts_dir, tmp_path):
    """DeepSpeed in bf16, as the GPU configs run it: ZeRO-2's engines cast every parameter to bf16 (the frozen LenVM's
    through trl.models.prepare_deepspeed too), ZeRO-3 builds bf16 parameters under zero.Init. The heads still compute in
    float32, and ZeRO-3's parameters share one dtype (a float32 head beside them stopped its optimizer's construction)."""
    if deepspeed_missing():
        pytest.skip(deepspeed_missing())
    names = ["train-lenvm", "grpo", "ppo"]
    for name, (rank0, _) in zip(names, run_config(config, tmp_path, tiny_model_path, rollouts_dir, names, bf16=True)):
        assert (rank0["world_size"], rank0["distributed_type"]) == (2, "DEEPSPEED"), name
        assert rank0["model_dtypes"] == ["torch.bfloat16"], name  # DeepSpeed did run in bf16
        assert rank0.get("lenvm_dtypes", ["torch.bfloat16"]) == ["torch.bfloat16"], name
        assert set(rank0["head_compute_dtypes"].values()) == {"torch.float32"}, name
        z = torch.tensor(rank0["lenvm_logits"])
        assert rank0["lenvm_logits_dtype"] == "torch.float32" and torch.isfinite(z).all(), name
        assert not torch.equal(z, z.bfloat16().float()), name  # a bf16 computation would leave only bf16 values
    assert (tmp_path / "ppo" / "task_value_head" / "model.safetensors").is_file()
