"""Two processes on CPU (`accelerate launch --config_file accelerate_configs/cpu_2proc.yaml`, gloo) on the tiny
model: LenVM training's token-mean loss equals the single-process loss on the same data, in LenVM-shaped
GRPO both ranks' advantages agree with one computation over the gathered batch (whitening uses global
statistics), and PPO trains with the task value head's gradients all-reduced (both ranks end with the same
head). Also: the shipped accelerate configs parse, and the LenVM is prepared the way TRL prepares its reference
model under DeepSpeed and FSDP."""

import json
import math
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from conftest import OFFLINE_ENV, ROOT, make_tiny_llama
from safetensors.torch import load_file

from lenvm_rl.advantages import length_advantages, lenvm_state_values
from lenvm_rl.modeling import LenVMModel

CONFIGS = ROOT / "accelerate_configs"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def launch(args: list[str], processes: int, tmp_path: Path, check: bool = True) -> subprocess.CompletedProcess:
    """`accelerate launch` with the 2-process CPU config (or plain python for one process); fail with the log
    unless ``check`` is false."""
    env = {**os.environ, **OFFLINE_ENV, "OMP_NUM_THREADS": "1", "PYTHONPATH": f"{ROOT}{os.pathsep}{ROOT / 'tests'}"}
    if processes == 1:
        command = [sys.executable, *args]
    else:
        command = [
            sys.executable,
            "-m",
            "accelerate.commands.launch",
            "--config_file",
            str(CONFIGS / "cpu_2proc.yaml"),
            "--main_process_port",
            str(free_port()),
            *args,
        ]
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 or not check, done.stdout[-3000:] + done.stderr[-3000:]
    return done


def first_logged_loss(output_dir: Path) -> float:
    state = json.loads(next(output_dir.glob("checkpoint-*/trainer_state.json")).read_text())
    return next(row["loss"] for row in state["log_history"] if "loss" in row)


def test_lenvm_loss_with_two_processes_equals_one(rollouts_dir, tiny_model_path, tmp_path):
    # Exactly one global batch of data (4 finished rollouts of different lengths): whatever order the samplers
    # draw in, the step sees the same rollouts, so the two losses must match if normalisation is global.
    from conftest import write_rollout_shard

    from lenvm_rl.rollout_data import load_rollouts

    finished = load_rollouts(rollouts_dir).filter(lambda f: f, input_columns="finished")
    assert len(finished) >= 4 and len(set(finished["completion_tokens"][:4])) > 1
    data = write_rollout_shard(tmp_path / "rollouts", finished.select(range(4)).to_list())
    recipe = dict(
        model_name_or_path=tiny_model_path,
        rollouts_path=str(data),
        gamma=0.9,
        max_steps=1,
        logging_steps=1,
        learning_rate=1e-3,
        save_strategy="steps",
        save_steps=1,
        report_to="none",
        use_cpu=True,
        bf16=False,
        eval_strategy="no",
        eval_rollouts_path=str(data),
        seed=0,
        disable_tqdm=True,
    )
    losses = {}
    for processes, per_device in ((1, 4), (2, 2)):  # the same global batch of 4 rollouts
        out = tmp_path / f"p{processes}"
        path = tmp_path / f"lenvm_p{processes}.yaml"
        path.write_text(yaml.safe_dump({**recipe, "output_dir": str(out), "per_device_train_batch_size": per_device}))
        launch(["-m", "lenvm_rl", "train-lenvm", "--config", str(path)], processes, tmp_path)
        losses[processes] = first_logged_loss(out)
    assert losses[2] == pytest.approx(losses[1], rel=1e-4)


def test_frozen_layer_cache_under_two_processes_trains_as_without(rollouts_dir, tiny_model_path, tmp_path):
    """Each rank records and replays its own rows (DDP): 3 epochs with the cache end where they end without it."""
    from conftest import write_rollout_shard

    from lenvm_rl.modeling import load_lenvm
    from lenvm_rl.rollout_data import load_rollouts

    finished = load_rollouts(rollouts_dir).filter(lambda f: f, input_columns="finished")
    data = write_rollout_shard(tmp_path / "rollouts", finished.select(range(4)).to_list())
    recipe = dict(
        model_name_or_path=tiny_model_path, rollouts_path=str(data), eval_rollouts_path=str(data), gamma=0.9,
        trainable_top_layers=1, num_train_epochs=3, per_device_train_batch_size=1, learning_rate=1e-3,
        save_strategy="no", report_to="none", use_cpu=True, bf16=False, eval_strategy="no", seed=0,
        disable_tqdm=True, logging_steps=1,
    )  # fmt: skip
    weights, logs = {}, {}
    for choice in ("false", "true"):
        path = tmp_path / f"lenvm_{choice}.yaml"
        out = tmp_path / choice
        path.write_text(yaml.safe_dump({**recipe, "output_dir": str(out), "cache_frozen_layers": choice}))
        logs[choice] = launch(["-m", "lenvm_rl", "train-lenvm", "--config", str(path)], 2, tmp_path).stdout
        weights[choice] = load_lenvm(str(out)).state_dict()
    # A rank replays the rows it has seen: the sampler reshuffles across ranks each epoch, so some rows run in full.
    assert re.search(r"cache_frozen_layers: [1-4] training batches skipped the frozen layers", logs["true"])
    for name, value in weights["true"].items():
        torch.testing.assert_close(value, weights["false"][name], rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.parametrize("update", ["frozen", "live"])
def test_grpo_ranks_agree_on_the_advantages(update, tiny_model_path, tokenizer, tmp_path):
    """Both ranks' length advantages equal one computation over the gathered batch (whitening uses global
    statistics); with a live critic, both ranks end with identical LenVM weights that moved away from the start."""
    lenvm = tmp_path / "lenvm"
    torch.manual_seed(1)
    model = LenVMModel.from_backbone(make_tiny_llama(tokenizer), gamma=0.9)
    with torch.no_grad():
        model.head.out.weight.normal_(std=1.0)
    model.save_pretrained(lenvm)
    tokenizer.save_pretrained(lenvm)
    recipe = tmp_path / "grpo.yaml"
    recipe.write_text(
        yaml.safe_dump(
            dict(
                model_name_or_path=tiny_model_path,
                num_prompts=8,
                budgets=[3, 6],
                budget_kinds=["exact", "at_most"],
                reward_funcs=["accuracy", "length_score"],
                lenvm_model_path=str(lenvm),
                whiten_length_advantage=True,
                length_advantage_coef=0.5,
                num_generations=4,
                per_device_train_batch_size=4,
                max_completion_length=8,
                max_steps=2 if update == "live" else 1,
                use_cpu=True,
                bf16=False,
                activation_checkpointing=False,
                report_to="none",
                save_strategy="steps" if update == "live" else "no",
                save_steps=1,
                disable_tqdm=True,
                output_dir=str(tmp_path / "out"),
                seed=0,
                lenvm_update=update,
                lenvm_learning_rate=1e-2,
                lenvm_batch_size=2,
            )
        )
    )
    dumps = tmp_path / "dumps"
    launch([str(ROOT / "tests" / "mp_grpo_probe.py"), str(dumps), "--config", str(recipe)], 2, tmp_path)
    ranks = [torch.load(dumps / f"rank{r}_0.pt") for r in range(2)]
    assert all(d["world_size"] == 2 for d in ranks)
    # One computation over both ranks' rows: A_len per rank, whitened with the statistics of all valid tokens.
    raw = [
        length_advantages(
            lenvm_state_values(d["values_full"], d["prompt_length"], d["completion_mask"], d["finished"]),
            d["completion_mask"],
            d["finished"],
            0.9,
            1.0,
            "budget",
            budgets=d["budgets"],
            kinds=d["kinds"],
            discount=1.0,
        )
        for d in ranks
    ]
    masks = [d["completion_mask"].bool() for d in ranks]
    pooled = torch.cat([a[m] for a, m in zip(raw, masks)]).double()
    mean, std = pooled.mean(), pooled.std(correction=0)
    for d, a, m in zip(ranks, raw, masks):
        expected = 0.5 * (a - mean) / (std + 1e-8) * m
        torch.testing.assert_close(d["length"].double(), expected.double(), atol=1e-5, rtol=1e-5)
        assert (d["length"][~m] == 0).all()
    out = tmp_path / "out"
    assert (out / "adapter_model.safetensors").exists() or (out / "model.safetensors").exists()
    if update == "live":
        weights = [torch.load(dumps / f"rank{r}_lenvm.pt") for r in range(2)]
        start = load_file(lenvm / "model.safetensors")
        assert any(not torch.equal(weights[0][k], start[k]) for k in start)  # the critic learned
        for name, value in weights[0].items():  # the ranks saw different rows: identical weights = averaged grads
            torch.testing.assert_close(weights[1][name], value, rtol=0, atol=0)
        saved = load_file(out / "lenvm" / "model.safetensors")
        assert all(torch.equal(saved[k], weights[0][k]) for k in saved)
        # Resumed from step 1 under two processes (critic weights, optimizer and scale restored on every rank), the
        # run ends where the uninterrupted one did.
        resumed = ["-m", "lenvm_rl", "grpo", "--config", str(recipe), "--output_dir", str(tmp_path / "resumed")]
        launch([*resumed, "--resume_from_checkpoint", str(out / "checkpoint-1")], 2, tmp_path)
        again = load_file(tmp_path / "resumed" / "lenvm" / "model.safetensors")
        for name, value in saved.items():
            torch.testing.assert_close(again[name], value)


def test_ppo_trains_with_two_processes(tiny_model_path, tokenizer, tmp_path):
    lenvm = tmp_path / "lenvm"
    LenVMModel.from_backbone(make_tiny_llama(tokenizer), gamma=0.9).save_pretrained(lenvm)
    tokenizer.save_pretrained(lenvm)
    recipe = tmp_path / "ppo.yaml"
    recipe.write_text(
        yaml.safe_dump(
            dict(
                model_name_or_path=tiny_model_path,
                use_peft=True,
                lora_r=4,
                lora_target_modules=["q_proj", "v_proj"],
                num_prompts=8,
                budgets=[3, 6],
                reward_funcs=["accuracy", "length_score"],
                lenvm_model_path=str(lenvm),
                num_generations=1,
                per_device_train_batch_size=4,
                max_completion_length=8,
                max_steps=2,
                use_cpu=True,
                bf16=False,
                activation_checkpointing=False,
                report_to="none",
                save_strategy="no",
                disable_tqdm=True,
                logging_steps=1,
                output_dir=str(tmp_path / "out"),
                seed=0,
            )
        )
    )
    dumps = tmp_path / "dumps"
    launch([str(ROOT / "tests" / "mp_ppo_probe.py"), str(dumps), "--config", str(recipe)], 2, tmp_path)
    out = tmp_path / "out"
    assert (out / "adapter_model.safetensors").is_file() and (out / "task_value_head" / "model.safetensors").is_file()
    logged = [
        row for row in json.loads((out / "trainer_state.json").read_text())["log_history"] if "ppo/value_loss" in row
    ]
    assert len(logged) == 2 and all(math.isfinite(row["ppo/value_loss"]) for row in logged)
    # The ranks trained on different prompts: identical heads mean the head's gradients were all-reduced.
    heads = [torch.load(dumps / f"rank{r}_head.pt") for r in range(2)]
    assert heads[0]["out.weight"].abs().sum() > 0  # trained away from its zero initialisation
    for name, value in heads[0].items():
        torch.testing.assert_close(heads[1][name], value, rtol=0, atol=0)
    saved = load_file(out / "task_value_head" / "model.safetensors")
    assert saved.keys() == heads[0].keys() and all(torch.equal(saved[k], heads[0][k].float()) for k in saved)


@pytest.mark.parametrize("name", ["ddp", "zero2", "zero3", "fsdp", "cpu_2proc"])
def test_accelerate_configs_parse(name):
    from accelerate.commands.config.config_args import load_config_from_file

    config = load_config_from_file(str(CONFIGS / f"{name}.yaml"))
    assert config.num_processes >= 2
    assert config.mixed_precision == ("no" if name == "cpu_2proc" else "bf16")
    if name.startswith("zero"):
        assert config.deepspeed_config["zero_stage"] == int(name[-1])


@pytest.mark.parametrize("name", ["fsdp", "zero2", "zero3"])
def test_cpu_accelerate_configs_parse_as_their_gpu_configs(name):
    """accelerate_configs/cpu/<name>.yaml: the GPU config's plugin settings on 2 CPU processes without mixed precision
    and without use_cpu (accelerate would drop DeepSpeed with it; lenvm_rl.cpu_launch sets what a CPU needs)."""
    from accelerate.commands.config.config_args import load_config_from_file

    cpu = load_config_from_file(str(CONFIGS / "cpu" / f"{name}.yaml"))
    gpu = load_config_from_file(str(CONFIGS / f"{name}.yaml"))
    assert (cpu.num_processes, cpu.mixed_precision, cpu.use_cpu) == (2, "no", False)
    assert cpu.distributed_type == gpu.distributed_type
    assert (cpu.fsdp_config, cpu.deepspeed_config) == (gpu.fsdp_config, gpu.deepspeed_config)
    if name.startswith("zero"):
        assert cpu.deepspeed_config["zero_stage"] == int(name[-1])
    else:
        assert cpu.fsdp_config["fsdp_version"] == 2


def test_lenvm_is_prepared_like_trls_reference_model(monkeypatch, tiny_model_path, tokenizer, tmp_path):
    """Under DeepSpeed the LenVM goes through trl.models.prepare_deepspeed, under FSDP through prepare_fsdp."""
    from conftest import make_trainer

    import lenvm_rl.grpo_trainer as grpo
    from lenvm_rl.data import DatasetArguments, load_prompts

    lenvm = tmp_path / "lenvm"
    LenVMModel.from_backbone(make_tiny_llama(tokenizer), gamma=0.9).save_pretrained(lenvm)
    tokenizer.save_pretrained(lenvm)
    dataset = load_prompts(DatasetArguments(num_prompts=8, budgets=[3]))
    calls = []
    for backend, attribute in (("deepspeed", "is_deepspeed_enabled"), ("fsdp", "is_fsdp_enabled")):
        monkeypatch.setattr(
            grpo,
            f"prepare_{backend}",
            lambda model, accelerator, b=backend: calls.append((b, type(model).__name__)) or model,
        )
        monkeypatch.setattr(grpo.GRPOTrainer, attribute, True, raising=False)
        for other in {"is_deepspeed_enabled", "is_fsdp_enabled"} - {attribute}:
            monkeypatch.setattr(grpo.GRPOTrainer, other, False, raising=False)
        original_init = grpo.GRPOTrainer.__init__

        def init_without_distributed(self, *args, original_init=original_init, attribute=attribute, **kwargs):
            original_init(self, *args, **kwargs)
            setattr(self, attribute, True)  # TRL's __init__ sets these from the accelerator; force the backend

        monkeypatch.setattr(grpo.GRPOTrainer, "__init__", init_without_distributed)
        make_trainer(tiny_model_path, tokenizer, dataset, tmp_path / backend, lenvm_model_path=str(lenvm))
        monkeypatch.setattr(grpo.GRPOTrainer, "__init__", original_init)
    assert calls == [("deepspeed", "LenVMModel"), ("fsdp", "LenVMModel")]
