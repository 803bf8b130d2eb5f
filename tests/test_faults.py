"""A GRPO run (tiny model, LoRA) killed with SIGTERM and with SIGKILL resumes from its last checkpoint with the
same step counter and its adapter; `resume_checkpoint` finds the last complete checkpoint or refuses clearly."""

import errno
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from conftest import OFFLINE_ENV, ROOT, make_tiny_llama

from lenvm_rl.errors import ConfigError
from lenvm_rl.faults import SIGTERM_EXIT_STATUS, resume_checkpoint
from lenvm_rl.modeling import LenVMModel

MAX_STEPS, SAVE_STEPS = 8, 2
ADAPTER = "adapter_model.safetensors"


def slow_reward(completions, **kwargs):
    """A constant reward that takes 0.5 s: a step lasts long enough for a signal to land inside the run."""
    time.sleep(0.5)
    return [0.0] * len(completions)


def start_grpo(recipe: Path, *flags) -> subprocess.Popen:
    env = {
        **os.environ,
        **OFFLINE_ENV,
        "OMP_NUM_THREADS": "1",
        "TQDM_DISABLE": "1",
        "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "tests"), os.environ.get("PYTHONPATH", "")]),
    }
    command = [sys.executable, "-m", "lenvm_rl", "grpo", "--config", str(recipe), *flags]
    return subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_for(path: Path, process: subprocess.Popen, timeout: float = 180.0) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if process.poll() is not None:
            pytest.fail(
                f"the run ended (status {process.returncode}) before {path} existed:\n{process.stderr.read()[-3000:]}"
            )
        assert time.monotonic() < deadline, f"no {path} after {timeout} s"
        time.sleep(0.05)


def complete_checkpoints(output_dir: Path) -> list[int]:
    return sorted(
        int(p.name.split("-")[1]) for p in output_dir.glob("checkpoint-*") if (p / "trainer_state.json").is_file()
    )


def global_step(checkpoint: Path) -> int:
    return json.loads((checkpoint / "trainer_state.json").read_text())["global_step"]


def test_grpo_resumes_after_sigterm_and_sigkill(tiny_model_path, tokenizer, tmp_path):
    lenvm = tmp_path / "lenvm"
    torch.manual_seed(1)
    LenVMModel.from_backbone(make_tiny_llama(tokenizer), gamma=0.9).save_pretrained(lenvm)
    tokenizer.save_pretrained(lenvm)
    output_dir = tmp_path / "out"
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(
        yaml.safe_dump(
            dict(
                model_name_or_path=tiny_model_path,
                use_peft=True,
                lora_r=4,
                lora_target_modules=["q_proj", "v_proj"],
                num_prompts=8,
                budgets=[3, 6],
                reward_funcs=["test_faults:slow_reward"],
                lenvm_model_path=str(lenvm),
                num_generations=2,
                per_device_train_batch_size=4,
                max_completion_length=8,
                max_steps=MAX_STEPS,
                learning_rate=1e-2,
                save_strategy="steps",
                save_steps=SAVE_STEPS,
                logging_steps=1,
                use_cpu=True,
                bf16=False,
                activation_checkpointing=False,
                report_to="none",
                disable_tqdm=True,
                seed=0,
                output_dir=str(output_dir),
            )
        )
    )

    # SIGTERM once the first periodic checkpoint exists: the step in flight ends, is saved, and the run exits 143.
    run = start_grpo(recipe)
    wait_for(output_dir / f"checkpoint-{SAVE_STEPS}" / "trainer_state.json", run)
    run.send_signal(signal.SIGTERM)
    _, stderr = run.communicate(timeout=120)
    assert run.returncode == SIGTERM_EXIT_STATUS, stderr[-3000:]
    stopped_at = complete_checkpoints(output_dir)[-1]
    assert SAVE_STEPS < stopped_at < MAX_STEPS  # a checkpoint the schedule would not have written
    assert stderr.strip().splitlines()[-1] == (
        f"lenvm-rl: stopped by SIGTERM after step {stopped_at}; saved {output_dir}/checkpoint-{stopped_at}; "
        f"resume with the same recipe and --resume_from_checkpoint true"
    )
    assert global_step(output_dir / f"checkpoint-{stopped_at}") == stopped_at
    assert (output_dir / f"checkpoint-{stopped_at}" / ADAPTER).is_file()
    assert not (output_dir / ADAPTER).exists()  # no final adapter: the folder does not look like a finished run

    # Resume, then SIGKILL once the next periodic checkpoint is complete: nothing runs at a SIGKILL.
    next_periodic = (stopped_at // SAVE_STEPS + 1) * SAVE_STEPS
    assert next_periodic < MAX_STEPS
    run = start_grpo(recipe, "--resume_from_checkpoint", "true")
    wait_for(output_dir / f"checkpoint-{next_periodic}" / "trainer_state.json", run)
    run.kill()
    run.communicate(timeout=60)
    assert run.returncode == -signal.SIGKILL
    assert not (output_dir / ADAPTER).exists()
    resume_from = output_dir / f"checkpoint-{complete_checkpoints(output_dir)[-1]}"
    assert resume_checkpoint("true", str(output_dir)) == str(resume_from)

    # Resume to the end: the step counter continues, every step is logged once, the adapter is saved.
    run = start_grpo(recipe, "--resume_from_checkpoint", "true")
    _, stderr = run.communicate(timeout=300)
    assert run.returncode == 0, stderr[-3000:]
    state = json.loads((output_dir / "trainer_state.json").read_text())
    assert state["global_step"] == MAX_STEPS
    assert [row["step"] for row in state["log_history"] if "loss" in row] == list(range(1, MAX_STEPS + 1))
    assert {"adapter_config.json", ADAPTER} <= {p.name for p in output_dir.iterdir()}


def test_resume_checkpoint_skips_incomplete_and_refuses_nothing(tmp_path):
    for step, complete in ((2, True), (4, True), (10, True), (12, False)):  # 12: killed while saving
        (tmp_path / f"checkpoint-{step}").mkdir()
        if complete:
            (tmp_path / f"checkpoint-{step}" / "trainer_state.json").write_text(json.dumps({"global_step": step}))
    assert resume_checkpoint(True, str(tmp_path)) == str(tmp_path / "checkpoint-10")  # numeric, not text order
    assert resume_checkpoint("true", str(tmp_path)) == str(tmp_path / "checkpoint-10")
    assert resume_checkpoint(str(tmp_path / "checkpoint-4"), str(tmp_path)) == str(tmp_path / "checkpoint-4")
    assert resume_checkpoint(None, str(tmp_path)) is None and resume_checkpoint("false", str(tmp_path)) is None
    with pytest.raises(ConfigError, match="^resume_from_checkpoint: no complete checkpoint-N folder"):
        resume_checkpoint("true", str(tmp_path / "missing"))
    with pytest.raises(ConfigError, match="^resume_from_checkpoint: .*checkpoint-12' is not a complete checkpoint"):
        resume_checkpoint(str(tmp_path / "checkpoint-12"), str(tmp_path))


def test_train_lenvm_saves_on_sigterm_and_resumes(tiny_model_path, rollouts_dir, tmp_path, monkeypatch):
    """The same contract in-process for `train-lenvm`: SIGTERM (sent to itself at the end of step 2) saves
    checkpoint-2, exits 143 without a final model; the resumed run ends at max_steps with every step logged once."""
    from lenvm_rl.faults import SaveOnSigterm
    from lenvm_rl.train_lenvm import main

    output_dir = tmp_path / "lenvm"
    recipe = tmp_path / "lenvm.yaml"
    recipe.write_text(
        yaml.safe_dump(
            dict(
                model_name_or_path=tiny_model_path,
                rollouts_path=str(rollouts_dir),
                eval_prompt_fraction=0.34,
                max_steps=4,
                per_device_train_batch_size=2,
                learning_rate=1e-3,
                logging_steps=1,
                save_strategy="steps",
                save_steps=4,
                report_to="none",
                use_cpu=True,
                disable_tqdm=True,
                seed=0,
                output_dir=str(output_dir),
            )
        )
    )
    on_step_end = SaveOnSigterm.on_step_end

    def sigterm_at_step_2(self, args, state, control, **kwargs):
        if state.global_step == 2:
            os.kill(os.getpid(), signal.SIGTERM)  # the handler only sets a flag, read just below
        return on_step_end(self, args, state, control, **kwargs)

    with monkeypatch.context() as patch:
        patch.setattr(SaveOnSigterm, "on_step_end", sigterm_at_step_2)
        with pytest.raises(SystemExit) as exit_info:
            main(["--config", str(recipe)])
    assert exit_info.value.code == SIGTERM_EXIT_STATUS
    assert complete_checkpoints(output_dir) == [2] and not (output_dir / "model.safetensors").exists()
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # the handler is removed when training ends

    main(["--config", str(recipe), "--resume_from_checkpoint", "true"])
    state = json.loads((output_dir / "checkpoint-4" / "trainer_state.json").read_text())
    assert state["global_step"] == 4
    assert [row["step"] for row in state["log_history"] if "loss" in row] == [1, 2, 3, 4]
    assert (output_dir / "model.safetensors").is_file()


def damage_empty_state(folder: Path):
    (folder / "trainer_state.json").write_text("")  # a Ctrl-C during the save


def damage_cut_weights(folder: Path):
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-16])


def damage_cut_optimizer(folder: Path):
    optimizer = folder / "optimizer.pt"
    optimizer.write_bytes(optimizer.read_bytes()[: optimizer.stat().st_size // 2])


def damage_scale(text: str):
    def damage(folder: Path):
        (folder / "length_advantage_scale.json").write_text(text)

    damage.__name__ = f"damage_scale_{text}"
    return damage


def damage_no_critic_optimizer(folder: Path):
    (folder / "lenvm_optimizer.pt").unlink()  # the live critic's weights without its optimizer state


LIVE_CRITIC_DAMAGES = [
    damage_scale('{"length_advantage_sc'),  # cut off
    damage_scale("{}"),
    damage_scale('{"length_advantage_scale": 0.0}'),
    damage_scale('{"length_advantage_scale": NaN}'),
    damage_scale('{"length_advantage_scale": -Infinity}'),
    damage_scale('{"length_advantage_scale": "1.5"}'),
    damage_no_critic_optimizer,
]


@pytest.mark.parametrize(
    "damage",
    [damage_empty_state, damage_cut_weights, damage_cut_optimizer, *LIVE_CRITIC_DAMAGES],
    ids=lambda damage: damage.__name__,
)
def test_resume_skips_a_checkpoint_that_does_not_verify(damage, tmp_path, capsys):
    """Case 4: a checkpoint is complete only when its files parse (a live critic's too: its weights, optimizer state
    and kept scale); the last incomplete one is skipped, with a notice."""
    from safetensors.torch import save_file

    for step in (2, 4):
        folder = tmp_path / f"checkpoint-{step}"
        (folder / "lenvm").mkdir(parents=True)
        save_file({"w": torch.zeros(8)}, str(folder / "model.safetensors"))
        save_file({"w": torch.zeros(8)}, str(folder / "lenvm" / "model.safetensors"))
        torch.save({"state": torch.ones(8)}, folder / "optimizer.pt")
        torch.save({"state": {}, "param_groups": []}, folder / "lenvm_optimizer.pt")
        (folder / "length_advantage_scale.json").write_text(json.dumps({"length_advantage_scale": 0.25}))
        (folder / "trainer_state.json").write_text(json.dumps({"global_step": step}))
    assert resume_checkpoint(True, str(tmp_path)) == str(tmp_path / "checkpoint-4")
    damage(tmp_path / "checkpoint-4")
    capsys.readouterr()
    assert resume_checkpoint(True, str(tmp_path)) == str(tmp_path / "checkpoint-2")
    notice = capsys.readouterr().err.strip().splitlines()
    assert len(notice) == 1 and notice[0].startswith(
        f"lenvm-rl: skipping the incomplete checkpoint {tmp_path}/checkpoint-4 ("
    )
    with pytest.raises(ConfigError, match="^resume_from_checkpoint: .*checkpoint-4' is not a complete checkpoint"):
        resume_checkpoint(str(tmp_path / "checkpoint-4"), str(tmp_path))


def lenvm_recipe(tmp_path, tiny_model_path, rollouts_dir, **overrides) -> Path:
    recipe = tmp_path / "lenvm.yaml"
    recipe.write_text(
        yaml.safe_dump(
            {
                **dict(
                    model_name_or_path=tiny_model_path,
                    rollouts_path=str(rollouts_dir),
                    eval_prompt_fraction=0.34,
                    max_steps=1,
                    per_device_train_batch_size=4,
                    save_strategy="no",
                    report_to="none",
                    use_cpu=True,
                    disable_tqdm=True,
                    output_dir=str(tmp_path / "lenvm"),
                ),
                **overrides,
            }
        )
    )
    return recipe


def run_cli(argv, capsys) -> str:
    """``lenvm-rl`` in-process; the one stderr line of a refusal (exit 2)."""
    import datasets
    import transformers

    from lenvm_rl.cli import main

    capsys.readouterr()
    datasets.disable_progress_bars()  # they write to stderr
    transformers.utils.logging.disable_progress_bar()
    try:
        with pytest.raises(SystemExit) as exit_info:
            main(argv)
    finally:
        datasets.enable_progress_bars()
        transformers.utils.logging.enable_progress_bar()
    stderr = capsys.readouterr().err.strip().splitlines()
    assert exit_info.value.code == 2 and len(stderr) == 1, stderr
    return stderr[0]


def checksums(folder: Path) -> dict[str, str]:
    import hashlib

    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() for p in folder.rglob("*") if p.is_file()
    }


def test_a_full_disk_during_a_checkpoint_save_is_said(tiny_model_path, rollouts_dir, tmp_path, monkeypatch, capsys):
    from transformers import Trainer

    def disk_full(self, output_dir):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(Trainer, "_save_optimizer_and_scheduler", disk_full)
    recipe = lenvm_recipe(tmp_path, tiny_model_path, rollouts_dir, save_strategy="steps", save_steps=1)
    line = run_cli(["train-lenvm", "--config", str(recipe)], capsys)
    assert line.startswith("lenvm-rl train-lenvm: error: output_dir: the disk is full; saving checkpoint-1 in "), line
    assert "--resume_from_checkpoint true" in line


@pytest.mark.parametrize("failure", [OSError(errno.ENOSPC, "No space left on device"), RuntimeError("killed mid-save")])
def test_a_failed_final_save_keeps_the_model_already_there(
    failure, tiny_model_path, rollouts_dir, tmp_path, monkeypatch, capsys
):
    """Case 5: the final files are written aside and moved in; a save that fails leaves output_dir as it was."""
    from lenvm_rl.cli import main
    from lenvm_rl.modeling import LenVMModel

    recipe = lenvm_recipe(tmp_path, tiny_model_path, rollouts_dir)
    main(["train-lenvm", "--config", str(recipe)])
    output_dir = tmp_path / "lenvm"
    before = checksums(output_dir)
    assert "model.safetensors" in before and "README.md" in before
    save_pretrained = LenVMModel.save_pretrained

    def fails_half_way(self, folder, **kwargs):
        save_pretrained(self, folder, **kwargs)
        Path(folder, "model.safetensors").write_bytes(b"cut")  # what a dying write leaves
        raise failure

    monkeypatch.setattr(LenVMModel, "save_pretrained", fails_half_way)
    again = ["train-lenvm", "--config", str(recipe), "--seed", "1", "--overwrite_output_dir", "true"]
    if isinstance(failure, OSError):
        line = run_cli(again, capsys)
        assert line.startswith("lenvm-rl train-lenvm: error: output_dir: the disk is full; the final save"), line
    else:
        with pytest.raises(RuntimeError, match="killed mid-save"):
            main(again)
    assert checksums(output_dir) == before
    monkeypatch.undo()
    main(again)  # the toolkit's own files are replaced
    assert checksums(output_dir)["model.safetensors"] != before["model.safetensors"]


def quiet_progress(module, monkeypatch):
    """A stage's own progress bars write to stderr, which the tests read: off."""
    bar = module.tqdm
    monkeypatch.setattr(module, "tqdm", lambda *args, **kwargs: bar(*args, **{**kwargs, "disable": True}))


def rollout_recipe(tmp_path, tiny_model_path, **overrides) -> Path:
    recipe = tmp_path / "rollout.yaml"
    settings = dict(
        model_name_or_path=tiny_model_path,
        dataset_name="arithmetic",
        num_prompts=4,
        num_samples_per_prompt=2,
        max_completion_tokens=4,
        prompts_per_batch=2,
        shard_size=2,
        output_dir=str(tmp_path / "rollouts"),
    )
    recipe.write_text(yaml.safe_dump({**settings, **overrides}))
    return recipe


def test_a_full_disk_during_rollout_is_said_and_the_rerun_finishes(tiny_model_path, tmp_path, monkeypatch, capsys):
    """The second shard's write fails for want of space: one line; the first shard is kept; the rerun writes the
    rest, as an uninterrupted run would have."""
    from datasets import Dataset

    import lenvm_rl.rollout
    from lenvm_rl.cli import main

    quiet_progress(lenvm_rl.rollout, monkeypatch)
    save_to_disk = Dataset.save_to_disk

    def second_shard_fails(self, path, **kwargs):
        if list(tmp_path.glob("rollouts/shards/shard-*")):
            raise OSError(errno.ENOSPC, "No space left on device")
        return save_to_disk(self, path, **kwargs)

    recipe = rollout_recipe(tmp_path, tiny_model_path)
    with monkeypatch.context() as patch:
        patch.setattr(Dataset, "save_to_disk", second_shard_fails)
        line = run_cli(["rollout", "--config", str(recipe)], capsys)
    assert line == (
        "lenvm-rl rollout: error: output_dir: the disk is full ([Errno 28] No space left on device); what was written "
        "before is kept whole: free space and rerun the same command"
    )
    assert [p.name for p in (tmp_path / "rollouts" / "shards").iterdir()] == ["shard-00000"]
    main(["rollout", "--config", str(recipe)])
    whole = rollout_recipe(tmp_path, tiny_model_path, output_dir=str(tmp_path / "whole"))
    main(["rollout", "--config", str(whole)])
    assert checksums(tmp_path / "rollouts" / "shards") == checksums(tmp_path / "whole" / "shards")


def evaluate_recipe(tmp_path, tiny_model_path) -> Path:
    recipe = tmp_path / "evaluate.yaml"
    settings = dict(
        model_name_or_path=tiny_model_path,
        num_prompts=3,
        budgets=[4],
        max_new_tokens=4,
        batch_size=1,  # one line per batch
        output_dir=str(tmp_path / "evaluate"),
    )
    recipe.write_text(yaml.safe_dump(settings))
    return recipe


def test_evaluate_survives_a_full_disk_and_a_damaged_line(tiny_model_path, tmp_path, monkeypatch, capsys):
    """A full disk while appending generations is one line; a line damaged inside the generations file (not only a
    torn last one) is left out with a notice and generated again: the rerun's file equals an undamaged run's."""
    import lenvm_rl.generation
    from lenvm_rl.cli import main

    quiet_progress(lenvm_rl.generation, monkeypatch)
    recipe = evaluate_recipe(tmp_path, tiny_model_path)
    fsync = os.fsync
    calls = []

    def second_write_fails(descriptor):
        calls.append(descriptor)
        if len(calls) == 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        fsync(descriptor)

    with monkeypatch.context() as patch:
        patch.setattr(lenvm_rl.generation.os, "fsync", second_write_fails)
        line = run_cli(["evaluate", "--config", str(recipe)], capsys)
    assert line.startswith("lenvm-rl evaluate: error: output_dir: the disk is full ([Errno 28] No space"), line
    main(["evaluate", "--config", str(recipe)])
    generations = tmp_path / "evaluate" / "generations" / "base.jsonl"
    whole = generations.read_text()
    assert len(whole.splitlines()) == 3
    lines = whole.splitlines(keepends=True)
    generations.write_text(lines[0] + '{"row": 1, "sample_ind\x00\n' + lines[2])  # damaged in the middle
    capsys.readouterr()
    main(["evaluate", "--config", str(recipe)])
    assert f"lenvm-rl: {generations}: line 2 is damaged; left out, and generated again" in capsys.readouterr().err
    timeless = lambda text: [
        {k: v for k, v in json.loads(line).items() if k != "seconds"} for line in text.splitlines()
    ]
    assert timeless(generations.read_text()) == timeless(whole)


def grpo_recipe(tmp_path, tiny_model_path, **overrides) -> Path:
    """A one-step GRPO recipe on the tiny model, without a LenVM."""
    recipe = tmp_path / "grpo.yaml"
    settings = dict(
        model_name_or_path=tiny_model_path,
        num_prompts=4,
        reward_funcs=["accuracy"],
        length_objective="none",
        num_generations=2,
        per_device_train_batch_size=4,
        max_completion_length=4,
        max_steps=1,
        save_strategy="no",
        use_cpu=True,
        bf16=False,
        activation_checkpointing=False,
        report_to="none",
        disable_tqdm=True,
        output_dir=str(tmp_path / "out"),
    )
    recipe.write_text(yaml.safe_dump({**settings, **overrides}))
    return recipe


def test_a_user_reward_that_returns_nan_stops_the_run_with_one_line(tiny_model_path, tmp_path, capsys):
    recipe = grpo_recipe(tmp_path, tiny_model_path, reward_funcs=["test_faults:nan_reward"])
    line = run_cli(["grpo", "--config", str(recipe)], capsys)
    assert line == (
        "lenvm-rl grpo: error: reward_funcs: 'test_faults:nan_reward' returned nan for completion 1; return finite "
        "numbers, or None where a completion has no reward"
    )


def nan_reward(completions, **kwargs):
    return [0.0, float("nan"), *[1.0] * (len(completions) - 2)]


def test_a_damaged_line_inside_a_part_file_is_left_out_of_the_merge(tmp_path, capsys):
    """A data-parallel evaluate's part file with a line that is not JSON, or not a record, in its middle (not only a
    torn last line): the merge keeps every whole record once, in order, and names each damaged line."""
    from lenvm_rl.data_parallel import merge_records, part_path

    path = tmp_path / "base.jsonl"
    record = lambda row: json.dumps({"row": row, "sample_index": 0}) + "\n"
    path.write_text(record(0))
    part_path(path, 1).write_text(record(3) + "not json\n" + "[1, 2]\n" + '{"row": 5}\n' + record(1) + '{"row": 7, "sa')
    key = lambda r: (r["row"], r["sample_index"])
    assert [r["row"] for r in merge_records(path, key)] == [0, 1, 3]
    notices = capsys.readouterr().err.splitlines()
    assert notices == [
        f"lenvm-rl: {part_path(path, 1)}: line {n} is damaged; left out, and generated again" for n in (2, 3, 4)
    ]
    assert path.read_text() == record(0) + record(1) + record(3) and not part_path(path, 1).exists()
