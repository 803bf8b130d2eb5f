"""Surviving a killed training run: checkpoint on SIGTERM, and find the checkpoint to resume from.

What happens to a `grpo` or `train-lenvm` run that is killed:

- **SIGTERM** (a scheduler's pre-emption, `kill PID`, Ctrl-C is SIGINT and is not handled): the run
  finishes the optimizer step it is in, saves a full checkpoint `output_dir/checkpoint-<step>` (adapter
  or weights, optimizer, scheduler, RNG, trainer state), prints one line to stderr and exits with
  status 143 (128 + SIGTERM, what a shell reports for a process SIGTERM killed), so a scheduler sees a
  terminated run, not a finished one. The final model is *not* written to `output_dir`: a folder with
  the final adapter means the run finished. This works with `save_strategy: no` too. A second SIGTERM
  kills at once.
- **SIGKILL** (out of memory, a hard time limit) cannot be caught: the run resumes from its last
  periodic checkpoint (`save_strategy: steps`, `save_steps`), losing the steps after it.

Resume with the same recipe plus `--resume_from_checkpoint true` (the last complete checkpoint in
`output_dir`) or `--resume_from_checkpoint <output_dir>/checkpoint-N`. transformers' Trainer then
restores the weights (or LoRA adapter), optimizer, scheduler, RNG and `global_step`, skips the batches
already seen, and appends to the same `log_history`.
"""

from __future__ import annotations

import json
import os
import re
import signal
import sys
import threading
import zipfile
from pathlib import Path

import torch
from transformers import TrainerCallback

from lenvm_rl.errors import ConfigError

# 128 + signal number: the status a shell gives a process that the signal ended.
SIGTERM_EXIT_STATUS = 128 + signal.SIGTERM


class SaveOnSigterm(TrainerCallback):
    """On SIGTERM, ask the Trainer to save a checkpoint at the end of the current step and stop.

    The handler only sets a flag (Python runs it between bytecodes, so it never interrupts a tensor op);
    ``on_step_end`` turns it into ``should_save`` and ``should_training_stop``. Under several processes the
    flag is max-reduced over ranks at every step end, so all ranks save and stop at the same step even
    when the launcher signalled only some of them (otherwise the others would wait in a collective forever).
    """

    def __init__(self):
        self.received = False
        self._previous_handler = None

    def _handle(self, signum, frame):
        if self.received:  # a second SIGTERM: the user wants it gone now
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            os.kill(os.getpid(), signal.SIGTERM)
        self.received = True

    def on_train_begin(self, args, state, control, **kwargs):
        if threading.current_thread() is threading.main_thread():  # Python allows handlers only there
            self._previous_handler = signal.signal(signal.SIGTERM, self._handle)

    def on_step_end(self, args, state, control, **kwargs):
        received = self.received
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            flag = torch.tensor(float(received), device=args.device)
            torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
            received = self.received = bool(flag.item())
        if received:
            control.should_save = True
            control.should_training_stop = True
        return control

    def on_train_end(self, args, state, control, **kwargs):
        if self._previous_handler is not None:
            signal.signal(signal.SIGTERM, self._previous_handler)
            self._previous_handler = None

    def exit_if_stopped(self, trainer) -> None:
        """After ``trainer.train()``: exit 143 with one line naming the checkpoint when SIGTERM stopped the run."""
        if not self.received:
            return
        if trainer.is_world_process_zero():
            checkpoint = Path(trainer.args.output_dir) / f"checkpoint-{trainer.state.global_step}"
            print(
                f"lenvm-rl: stopped by SIGTERM after step {trainer.state.global_step}; saved {checkpoint}; "
                f"resume with the same recipe and --resume_from_checkpoint true",
                file=sys.stderr,
            )
        sys.exit(SIGTERM_EXIT_STATUS)


def checkpoint_problem(folder: Path) -> str | None:
    """Why ``folder`` is not a complete checkpoint, or None when it is.

    Complete means verifiably so, not merely present: ``trainer_state.json`` parses and holds ``global_step``
    (a Ctrl-C during a save can leave it empty), every file reads whole (``file_is_whole``), and a live critic's files
    are all there (``critic_checkpoints.live_critic_problem``). The checks read a few bytes, not the tensors.
    """
    state = folder / "trainer_state.json"
    if not state.is_file():
        return "no trainer_state.json"
    try:
        json.loads(state.read_text())["global_step"]
    except (ValueError, KeyError, TypeError):
        return "trainer_state.json is empty or cut off"
    damaged = next((path for path in sorted(folder.rglob("*")) if not file_is_whole(path)), None)
    if damaged is not None:
        return f"{damaged.relative_to(folder)} is cut off or corrupt"
    from lenvm_rl.critic_checkpoints import live_critic_problem

    return live_critic_problem(folder)


def file_is_whole(path: Path) -> bool:
    """Whether a saved file reads whole, from a few bytes: a ``.safetensors`` header covers the file, a torch file
    (``.pt`` / ``.pth`` / ``.bin``) has its zip directory, which torch writes last, a ``.json`` file parses. Other
    files, and folders, count as whole."""
    from safetensors import safe_open

    try:
        if path.suffix == ".safetensors":
            with safe_open(str(path), "pt"):
                pass
        elif path.suffix in (".pt", ".pth", ".bin"):
            zipfile.ZipFile(path).close()
        elif path.suffix == ".json" and path.is_file():
            json.loads(path.read_text())
    except Exception:  # safetensors raises its own error type, zipfile BadZipFile, json ValueError
        return False
    return True


def resume_checkpoint(resume_from_checkpoint: str | bool | None, output_dir: str) -> str | None:
    """The checkpoint folder a recipe's ``resume_from_checkpoint`` names, checked before any model is loaded.

    None, false or "" → None (start afresh). true → the highest ``checkpoint-N`` in ``output_dir`` that is
    complete (``checkpoint_problem``); a run killed while saving leaves an incomplete folder, which is skipped with
    a one-line notice on stderr. A path → that folder, which must be a complete checkpoint.
    Raises ConfigError naming the field and the fix when there is nothing to resume from.

    >>> resume_checkpoint("false", "runs/x") is None
    True
    """
    value = str(resume_from_checkpoint).strip() if resume_from_checkpoint is not None else ""
    if value.lower() in ("", "false", "none"):
        return None
    if value.lower() == "true":
        folder = Path(output_dir)
        steps = sorted(
            (int(match.group(1)), path)
            for path in (folder.iterdir() if folder.is_dir() else [])
            if (match := re.fullmatch(r"checkpoint-(\d+)", path.name)) and path.is_dir()
        )
        for _, path in reversed(steps):
            problem = checkpoint_problem(path)
            if problem is None:
                return str(path)
            print(f"lenvm-rl: skipping the incomplete checkpoint {path} ({problem})", file=sys.stderr)
        raise ConfigError(
            f"resume_from_checkpoint: no complete checkpoint-N folder in output_dir {output_dir!r} to resume "
            f"from; check output_dir, save checkpoints with save_strategy: steps, or drop resume_from_checkpoint"
        )
    problem = checkpoint_problem(Path(value)) if Path(value).is_dir() else "no such folder"
    if problem is not None:
        raise ConfigError(
            f"resume_from_checkpoint: {value!r} is not a complete checkpoint folder ({problem}); give an "
            f"<output_dir>/checkpoint-N folder, or true for the last complete one in output_dir"
        )
    return value


def train(trainer, resume_from: str | None) -> None:
    """``trainer.train``, with a checkpoint save that fails for want of disk space said as one line."""
    from lenvm_rl.outputs import full_disk

    try:
        trainer.train(resume_from_checkpoint=resume_from)
    except Exception as error:
        if not full_disk(error):
            raise
        raise ConfigError(
            f"output_dir: the disk is full; saving checkpoint-{trainer.state.global_step} in {trainer.args.output_dir!r} "
            f"failed ({str(error).splitlines()[0][:120]}); free space, then rerun with --resume_from_checkpoint true "
            f"(the cut-off checkpoint is skipped)"
        ) from None
