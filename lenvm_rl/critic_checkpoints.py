"""What a ``LenVMGRPOTrainer`` checkpoint holds beyond TRL's: the live LenVM's weights and optimizer state, and the
length advantage's kept scale (``length_advantage_scale: first``), saved and restored with the policy's
(docs/DESIGN.md §5). A mixin placed before ``GRPOTrainer``: each method extends TRL's through ``super()``."""

from __future__ import annotations

import json
import os

import torch
from transformers.utils import logging

from lenvm_rl.errors import ConfigError
from lenvm_rl.grpo_config import LENGTH_SCALE_FILE, LIVE_LENVM_DIR, LIVE_LENVM_OPTIMIZER

logger = logging.get_logger(__name__)


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
        lenvm = self.accelerator.unwrap_model(self.lenvm)
        lenvm.load_state_dict(load_file(path, device=str(lenvm.device)))

    def _load_optimizer_and_scheduler(self, checkpoint):
        super()._load_optimizer_and_scheduler(checkpoint)
        if checkpoint is not None and self.args.whiten_length_advantage and self.args.length_advantage_scale == "first":
            path = os.path.join(checkpoint, LENGTH_SCALE_FILE)
            if os.path.isfile(path):
                with open(path) as handle:
                    self.length_scale = float(json.load(handle)["length_advantage_scale"])
            else:
                logger.warning(
                    "%s has no %s: the length advantage's scale is measured again on the next batch",
                    checkpoint,
                    LENGTH_SCALE_FILE,
                )
        if self.lenvm_optimizer is not None and checkpoint is not None:
            state = torch.load(os.path.join(checkpoint, LIVE_LENVM_OPTIMIZER), map_location=self.accelerator.device)
            self.lenvm_optimizer.load_state_dict(state)
