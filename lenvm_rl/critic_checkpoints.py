"""What a ``LenVMGRPOTrainer`` checkpoint holds beyond TRL's: the live LenVM's weights and optimizer state, and the
length advantage's kept scale (``length_advantage_scale: first``), saved and restored with the policy's
(docs/DESIGN.md §5). A mixin placed before ``GRPOTrainer``: each method extends TRL's through ``super()``."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import torch
from transformers.utils import logging

from lenvm_rl.errors import ConfigError
from lenvm_rl.grpo_config import LENGTH_SCALE_FILE, LIVE_LENVM_DIR, LIVE_LENVM_OPTIMIZER

logger = logging.get_logger(__name__)


def read_length_scale(path: Path) -> float:
    """The kept scale in a checkpoint's ``length_advantage_scale.json``; ValueError saying what is wrong with it."""
    try:
        scale = json.loads(Path(path).read_text())["length_advantage_scale"]
    except (ValueError, KeyError, TypeError):
        raise ValueError(f"{LENGTH_SCALE_FILE} is cut off or holds no length_advantage_scale") from None
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale) or scale <= 0:
        raise ValueError(f"{LENGTH_SCALE_FILE} holds {scale!r}, not a positive finite scale")
    return float(scale)


def live_critic_problem(folder: Path) -> str | None:
    """Why a checkpoint's live-critic files are incomplete (``lenvm/`` without its optimizer state, a damaged kept
    scale), or None; ``faults.checkpoint_problem`` counts such a checkpoint as incomplete."""
    if (folder / LIVE_LENVM_DIR).is_dir() and not (folder / LIVE_LENVM_OPTIMIZER).is_file():
        return f"{LIVE_LENVM_DIR}/ without {LIVE_LENVM_OPTIMIZER}"
    try:
        if (folder / LENGTH_SCALE_FILE).exists():
            read_length_scale(folder / LENGTH_SCALE_FILE)
    except ValueError as error:
        return str(error)
    return None


def check_resumed_critic(checkpoint: str | None, lenvm_update: str) -> None:
    """Refuse, before any model loads, a resume whose critic is not the checkpoint's: a live run's trained LenVM
    would be dropped for lenvm_model_path's without a word (frozen), or a live run would have none to restore."""
    if checkpoint is None:
        return
    trained = (Path(checkpoint) / LIVE_LENVM_DIR / "model.safetensors").is_file()
    if trained and lenvm_update != "live":
        raise ConfigError(
            f"lenvm_update: {checkpoint} holds a live critic trained with the policy ({LIVE_LENVM_DIR}/), which "
            f"lenvm_update {lenvm_update!r} would replace by lenvm_model_path's; resume with lenvm_update: live, or to "
            f"freeze the trained critic copy {checkpoint}/{LIVE_LENVM_DIR} outside output_dir and set lenvm_model_path "
            f"to the copy"
        )
    if not trained and lenvm_update == "live":
        raise ConfigError(
            f"resume_from_checkpoint: {checkpoint} has no {LIVE_LENVM_DIR}/model.safetensors (not a checkpoint of a "
            f"lenvm_update: live run); resume it with lenvm_update: frozen, or start afresh"
        )


def critic_mismatch(checkpoint: str, name: str, error: Exception) -> str:
    return (
        f"resume_from_checkpoint: {checkpoint}/{name} does not fit the LenVM at lenvm_model_path "
        f"({str(error).strip().splitlines()[0][:100]}); resume with the lenvm_model_path the run started from"
    )


class LiveCriticCheckpoints:
    """Needs ``lenvm``, ``lenvm_optimizer`` (None for a frozen critic) and ``length_scale`` on the trainer."""

    def _save(self, output_dir=None, state_dict=None):
        super()._save(output_dir, state_dict)
        if self.lenvm_optimizer is None or not self.args.should_save:
            return
        folder = os.path.join(output_dir or self.args.output_dir, LIVE_LENVM_DIR)
        self.accelerator.unwrap_model(self.lenvm).save_pretrained(folder)
        self.processing_class.save_pretrained(folder)  # the policy's tokenizer: the LenVM shares it

    def _save_optimizer_and_scheduler(self, output_dir):
        super()._save_optimizer_and_scheduler(output_dir)
        if self.lenvm_optimizer is not None and self.args.should_save:
            torch.save(self.lenvm_optimizer.state_dict(), os.path.join(output_dir, LIVE_LENVM_OPTIMIZER))
        if self.length_scale is not None and self.args.should_save:
            with open(os.path.join(output_dir, LENGTH_SCALE_FILE), "w") as handle:
                json.dump({"length_advantage_scale": self.length_scale}, handle)

    def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
        super()._load_from_checkpoint(resume_from_checkpoint, model)
        if self.lenvm_optimizer is None:
            return
        from safetensors.torch import load_file

        path = os.path.join(resume_from_checkpoint, LIVE_LENVM_DIR, "model.safetensors")
        if not os.path.isfile(path):
            raise ConfigError(
                f"resume_from_checkpoint: {resume_from_checkpoint} has no {LIVE_LENVM_DIR}/model.safetensors (not a "
                f"checkpoint of a lenvm_update: live run); resume from one, or start afresh"
            )
        # Read to the CPU, copied onto each rank's device by load_state_dict: a device named in the file (cpu:0,
        # cuda:1) need not exist on the rank that resumes.
        try:
            self.accelerator.unwrap_model(self.lenvm).load_state_dict(load_file(path, device="cpu"))
        except RuntimeError as error:  # shapes or names differ: the checkpoint's critic is not lenvm_model_path's
            raise ConfigError(critic_mismatch(resume_from_checkpoint, LIVE_LENVM_DIR, error)) from None

    def _load_optimizer_and_scheduler(self, checkpoint):
        super()._load_optimizer_and_scheduler(checkpoint)
        if checkpoint is not None and self.args.whiten_length_advantage and self.args.length_advantage_scale == "first":
            path = os.path.join(checkpoint, LENGTH_SCALE_FILE)
            if os.path.isfile(path):
                try:
                    self.length_scale = read_length_scale(path)
                except ValueError as error:
                    raise ConfigError(
                        f"resume_from_checkpoint: {checkpoint}: {error}; resume from an earlier checkpoint"
                    ) from None
            else:
                logger.warning(
                    "%s has no %s: the length advantage's scale is measured again on the next batch",
                    checkpoint,
                    LENGTH_SCALE_FILE,
                )
        if self.lenvm_optimizer is not None and checkpoint is not None:
            state = torch.load(os.path.join(checkpoint, LIVE_LENVM_OPTIMIZER), map_location="cpu", weights_only=True)
            try:
                self.lenvm_optimizer.load_state_dict(state)  # moves the state onto each parameter's device
            except (ValueError, KeyError) as error:
                raise ConfigError(critic_mismatch(checkpoint, LIVE_LENVM_OPTIMIZER, error)) from None
