"""PPO with a task critic and the LenVM length critic (`lenvm-rl ppo --config recipes/<Model>/ppo/config_<x>.yaml`).

TRL removed its PPOTrainer in 1.13; this is a ``LenVMGRPOTrainer`` subclass, so generation (vLLM included),
DeepSpeed/FSDP, the clipped policy loss (``loss_type``, ``epsilon``), reward functions and logging stay TRL's. How it
departs from its anchor, TRL's GRPO (the design is docs/DESIGN.md §4.3, the math §3.12, the choices §10.1-§10.2):

    A_j = whiten(A_task)_j + c · A_len_j      on completion tokens, 0 on padding
    A_task = GAE(task_gamma, task_lambda) of r_j = -kl_coef · (log π_old - log π_ref)_j + R · [j = n - 1]
    critic targets: the returns of GAE(task_gamma, task_value_lambda)

- The task advantage is GAE of the raw weighted reward R against a learned critic, not TRL's group-normalised
  reward; groups are optional (``num_generations: 1``: the critic is the baseline). λ defaults to 1 for both.
- The critic is a value head on the policy's trunk (``task_value_head``), fed by forward hooks on TRL's own log-prob
  forward: no second model to load, shard or sync with vLLM; its values reach the forward's output for DDP.
- The loss gains ``vf_coef`` × the clipped value loss; the head has its own learning rate.
- The KL penalty (``kl_coef``) is in the reward, not the loss (TRL's ``beta`` still adds its own if set).
- The head is saved to ``task_value_head/model.safetensors`` beside the policy, in checkpoints too; a full
  fine-tune's ``model.safetensors`` leaves it out, so the saved policy loads as a plain causal LM.
"""

from __future__ import annotations

import os
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import ClassVar

import torch
from accelerate.utils import is_peft_model
from safetensors.torch import load_file, save_file
from trl.models.utils import disable_gradient_checkpointing
from trl.trainer.utils import (
    FusedCausalLMOutput,
    add_fused_lm_head,
    create_model_from_path,
    get_config_model_id,
    use_adapter,
)

from lenvm_rl.advantages import clipped_value_loss, task_advantages
from lenvm_rl.errors import ConfigError
from lenvm_rl.grpo_config import LenVMGRPOConfig
from lenvm_rl.grpo_trainer import LenVMGRPOTrainer
from lenvm_rl.modeling import ValueHead, head_dtype
from lenvm_rl.train_policy import train_policy

# In a subfolder: vLLM loads every *.safetensors at a model folder's top level (without an index file), and the
# head's weights beside a full fine-tune's model.safetensors would be read as the policy's.
VALUE_HEAD_FILE = "task_value_head/model.safetensors"
VALUE_HEAD_PREFIX = "task_value_head."


@dataclass
class FusedOutputWithValues(FusedCausalLMOutput):
    """TRL's fused log-prob output plus the task critic's values (B, P + T) (``LenVMPPOTrainer._expose_values``).

    A ModelOutput subclass, so the pytree flatten and rebuild DDP applies to a forward's output keep the field.
    """

    task_values: torch.Tensor | None = None


@dataclass
class LenVMPPOConfig(LenVMGRPOConfig):
    """`LenVMGRPOConfig` plus the task critic's fields; the LenVM's `length_*` fields keep their meaning.

    The task advantage and value loss are docs/DESIGN.md §3.12; the trainer, §4.3.

    Parameters:
        > Parameters that control the task critic (docs/DESIGN.md §4.3)

        vf_coef (`float`, *optional*, defaults to `0.1`):
            Weight of the value loss added to TRL's policy loss.
        cliprange_value (`float`, *optional*, defaults to `0.2`):
            ε of the value clip: V_clip = V_old + clip(V - V_old, ±ε), in reward units.
        value_head_learning_rate (`float` or `None`, *optional*):
            Learning rate of the task value head; default: learning_rate.

        > Parameters that control the task advantage (docs/DESIGN.md §3.12)

        task_gamma (`float`, *optional*, defaults to `1.0`):
            Discount γ_task of the task GAE, in (0, 1].
        task_lambda (`float`, *optional*, defaults to `1.0`):
            λ_task of the actor's GAE, in [0, 1]. < 1 with a critic that has not learned yet favours short completions
            (docs/DESIGN.md §10.1): lower it only once the critic explains the returns.
        task_value_lambda (`float`, *optional*, defaults to `1.0`):
            λ of the critic's GAE returns (its targets), in [0, 1]; 1 = Monte Carlo.
        kl_coef (`float`, *optional*, defaults to `0.0`):
            Per-token KL penalty -kl_coef · (log π - log π_ref) in the task reward; 0 turns it off.
        whiten_task_advantage (`bool`, *optional*, defaults to `True`):
            Normalise A_task to mean 0, std 1 over the valid tokens of all ranks.
    """

    min_generations: ClassVar[int] = 1  # the critic is the baseline: one completion per prompt is enough

    vf_coef: float = field(default=0.1, metadata={"help": "Weight of the value loss added to TRL's policy loss."})
    cliprange_value: float = field(
        default=0.2, metadata={"help": "ε of the value clip: V_clip = V_old + clip(V - V_old, ±ε), in reward units."}
    )
    task_gamma: float = field(default=1.0, metadata={"help": "Discount γ_task of the task GAE, in (0, 1]."})
    task_lambda: float = field(
        default=1.0,
        metadata={
            "help": "λ_task of the actor's GAE, in [0, 1]. < 1 with a critic that has not learned yet favours "
            "short completions (docs/DESIGN.md §10.1): lower it once the critic explains the returns."
        },
    )
    task_value_lambda: float = field(
        default=1.0, metadata={"help": "λ of the critic's GAE returns (its targets), in [0, 1]; 1 = Monte Carlo."}
    )
    kl_coef: float = field(
        default=0.0,
        metadata={"help": "Per-token KL penalty -kl_coef · (log π - log π_ref) in the task reward; 0 turns it off."},
    )
    whiten_task_advantage: bool = field(
        default=True, metadata={"help": "Normalise A_task to mean 0, std 1 over the valid tokens of all ranks."}
    )
    value_head_learning_rate: float | None = field(
        default=None, metadata={"help": "Learning rate of the task value head; default: learning_rate."}
    )

    def __post_init__(self):
        super().__post_init__()
        if self.vf_coef <= 0:
            raise ConfigError(
                f"vf_coef: must be > 0 (the task critic learns only from the value loss), got {self.vf_coef}"
            )
        if self.cliprange_value <= 0:
            raise ConfigError(f"cliprange_value: must be > 0 (in reward units), got {self.cliprange_value}")
        if not 0.0 < self.task_gamma <= 1.0:
            raise ConfigError(f"task_gamma: must lie in (0, 1], got {self.task_gamma}")
        for name in ("task_lambda", "task_value_lambda"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ConfigError(f"{name}: must lie in [0, 1], got {getattr(self, name)}")
        if self.kl_coef < 0:
            raise ConfigError(f"kl_coef: must be >= 0 (0 turns the KL penalty off), got {self.kl_coef}")
        if self.value_head_learning_rate is not None and self.value_head_learning_rate <= 0:
            raise ConfigError(
                f"value_head_learning_rate: must be > 0 or unset (learning_rate), got {self.value_head_learning_rate}"
            )


class LenVMPPOTrainer(LenVMGRPOTrainer):
    """PPO on TRL's GRPO machinery: task critic on the policy's trunk, LenVM length critic (module docstring)."""

    policy_heads: ClassVar[tuple[str, ...]] = (VALUE_HEAD_PREFIX,)  # kept out of vLLM's weight sync

    def __init__(self, model, reward_funcs=None, args: LenVMPPOConfig | None = None, train_dataset=None, **kwargs):
        if not isinstance(args, LenVMPPOConfig):
            raise TypeError(f"args: LenVMPPOTrainer needs a LenVMPPOConfig, got {type(args).__name__}")
        super().__init__(model, reward_funcs, args, train_dataset, **kwargs)
        causal_lm = self.model.get_base_model() if is_peft_model(self.model) else self.model
        hidden_size = causal_lm.config.get_text_config().hidden_size
        head = ValueHead(hidden_size, hidden_size, zero_init=True)
        # A submodule of the trained model: DDP reduces its gradients, DeepSpeed shards it, the optimizer sees it.
        self.model.add_module("task_value_head", head.to(causal_lm.device, head_dtype(causal_lm.dtype)))
        if not is_peft_model(self.model):  # the saved policy stays a plain causal LM; the head has its own file
            self.model._keys_to_ignore_on_save = set(self.model._keys_to_ignore_on_save or ()) | {
                VALUE_HEAD_PREFIX + name for name in head.state_dict()
            }
        self._captured_values = None  # a list while a forward's values are wanted (see _capture_values)
        causal_lm.base_model.register_forward_hook(self._capture_values)
        self.model.register_forward_hook(self._expose_values)  # the module that DDP, DeepSpeed or FSDP wraps
        if args.kl_coef > 0 and self.ref_model is None and not is_peft_model(self.model):
            # TRL builds its reference model only when beta != 0; the reward's KL penalty needs one as well.
            reference = create_model_from_path(
                get_config_model_id(causal_lm.config),
                dtype=causal_lm.dtype,
                device_map=None,
                attn_implementation=causal_lm.config._attn_implementation,
            )
            add_fused_lm_head(reference, temperature=self.temperature)
            self.ref_model = self.prepare_side_model(reference)

    @property
    def task_value_head(self) -> ValueHead:
        return self.model.task_value_head

    def _capture_values(self, module, args, output):
        """Forward hook on the backbone: V at every position (B, P + T), float32, when a caller asked for it."""
        if self._captured_values is not None:
            self._captured_values.append(self.task_value_head(output[0]))

    def _expose_values(self, module, args, output):
        """Forward hook on the policy: its output gains the values just captured, ``task_values`` (B, P + T).

        DDP with ``find_unused_parameters`` (Trainer's default unless activation checkpointing is on) marks every
        parameter it cannot reach from the forward's output as unused, ready before the backward; a head whose values
        left only through the backbone hook was marked ready again when the value loss reached it, and failed.
        """
        if self._captured_values:  # only TRL's fused log-prob forward asks for values
            return FusedOutputWithValues(**output, task_values=self._captured_values[-1])

    def _forward_with_values(self, model, output, batch_size=None, **kwargs):
        """TRL's log-prob forward of cat(prompt, completion) plus the critic's V(s_0..s_{T-1}): (B, T), (B, T)."""
        prompt_ids, completion_ids = output["prompt_ids"], output["completion_ids"]
        input_ids = torch.cat([prompt_ids, completion_ids], dim=1)  # (B, P + T)
        attention_mask = torch.cat([output["prompt_mask"], output["completion_mask"]], dim=1)  # (B, P + T)
        num_tokens, start = completion_ids.size(1), prompt_ids.size(1) - 1
        self._captured_values = []
        try:
            logps, _, _ = self._get_per_token_logps_and_entropies(
                model, input_ids, attention_mask, num_tokens, batch_size=batch_size, **kwargs
            )
            values = torch.cat(self._captured_values)[:, start : start + num_tokens]  # (B, T) s_j at P - 1 + j
        finally:
            self._captured_values = None
        return logps, values

    @torch.no_grad()
    def reference_logps(self, output, batch_size) -> torch.Tensor:
        """log π_ref of the completion tokens (B, T): the reference model, or the policy without its adapter."""
        input_ids = torch.cat([output["prompt_ids"], output["completion_ids"]], dim=1)
        attention_mask = torch.cat([output["prompt_mask"], output["completion_mask"]], dim=1)
        if self.ref_model is not None:
            model, context = self.ref_model, nullcontext()
        else:
            unwrapped = self.accelerator.unwrap_model(self.model)
            model, context = self.model, use_adapter(unwrapped, "ref" if "ref" in unwrapped.peft_config else None)
        with context:
            logps, _, _ = self._get_per_token_logps_and_entropies(
                model, input_ids, attention_mask, output["completion_ids"].size(1), batch_size=batch_size
            )
        return logps

    def task_advantages(self, output: dict, batch: dict) -> torch.Tensor:
        """whiten(GAE of the task reward with the critic's old values) (B, T), in place of TRL's group advantage.

        Also puts ``old_values`` and ``returns`` (B, T) into ``output``, so TRL's shuffle and split keep them with
        their rows, and logs the critic's metrics.
        """
        args, device = self.args, self.accelerator.device
        mode = "train" if self.model.training else "eval"
        metrics = self._metrics[mode]
        mask = output["completion_mask"].bool()  # (B, T)
        rewards = self.batch_rewards[batch["local_rows"]]  # (B, F)
        scores = (rewards * self.reward_weights.to(device)).nansum(1)  # (B,) R
        scorable = ~torch.isnan(rewards).all(1)  # (B,)

        batch_size = args.per_device_train_batch_size if mode == "train" else args.per_device_eval_batch_size
        with torch.no_grad(), disable_gradient_checkpointing(self.model, args.gradient_checkpointing_kwargs):
            logps, old_values = self._forward_with_values(self.model, output, batch_size)  # (B, T), (B, T)
        kl = None
        if args.kl_coef > 0:
            ref_logps = output.get("ref_per_token_logps")  # TRL's, when beta != 0
            kl = logps - (ref_logps if ref_logps is not None else self.reference_logps(output, batch_size))  # (B, T)
        advantages, returns = task_advantages(
            scores,
            old_values,
            mask,
            args.task_gamma,
            args.task_lambda,
            kl=kl,
            kl_coef=args.kl_coef,
            value_lam=args.task_value_lambda,
        )  # (B, T), (B, T)
        returns = torch.where(scorable[:, None] & mask, returns, old_values * mask)
        task_mask = mask & scorable[:, None]

        # Explained variance of the old values, over the valid tokens of all ranks: 1 - Var(R - V) / Var(R).
        residual = returns - old_values
        count, sum_r, sum_r2, sum_d, sum_d2, sum_v, *kl_stats = self.ranks_sum(
            task_mask.sum().float(),
            (returns * task_mask).sum(),
            (returns.square() * task_mask).sum(),
            (residual * task_mask).sum(),
            (residual.square() * task_mask).sum(),
            (old_values * task_mask).sum(),
            *(((kl * mask).sum(), mask.sum().float()) if kl is not None else ()),
        )
        count = max(count, 1.0)
        var_returns, var_residual = sum_r2 / count - (sum_r / count) ** 2, sum_d2 / count - (sum_d / count) ** 2
        metrics["ppo/explained_variance"].append(1.0 - var_residual / var_returns if var_returns > 0 else float("nan"))
        metrics["ppo/mean_value"].append(sum_v / count)
        metrics["ppo/mean_return"].append(sum_r / count)
        if kl_stats:
            metrics["ppo/kl"].append(kl_stats[0] / max(kl_stats[1], 1.0))

        if args.whiten_task_advantage:
            advantages = self.masked_whiten(advantages, task_mask)
        output["old_values"], output["returns"] = old_values.float(), returns.float()  # split with the batch
        return advantages * task_mask  # (B, T); the parent adds c · A_len and masks

    def _compute_loss(self, model, inputs):
        self._captured_values = []
        try:
            loss = super()._compute_loss(model, inputs)  # TRL's clipped policy loss; the hook reads the values
            values_full = torch.cat(self._captured_values)  # (B, P + T)
        finally:
            self._captured_values = None
        start, num_tokens = inputs["prompt_ids"].size(1) - 1, inputs["completion_ids"].size(1)
        values = values_full[:, start : start + num_tokens]  # (B, T) V(s_j)
        mask = inputs["completion_mask"].to(values.dtype)  # (B, T)
        per_token, clipped = clipped_value_loss(
            values, inputs["old_values"], inputs["returns"], self.args.cliprange_value
        )
        mode = "train" if self.model.training else "eval"
        # Token mean over the accumulation window, as TRL normalises its dapo loss.
        normalizer = inputs["num_items_in_batch"].clamp(min=1.0) / self.accelerator.num_processes
        if mode == "train":
            normalizer = normalizer * self.current_gradient_accumulation_steps / self.args.steps_per_generation
        value_loss = (per_token * mask).sum() / normalizer

        total, total_clipped, count = self.ranks_sum(
            (per_token * mask).sum().detach(), (clipped * mask).sum().detach(), mask.sum().detach()
        )
        self._metrics[mode]["ppo/value_loss"].append(total / max(count, 1.0))
        self._metrics[mode]["ppo/value_clipfrac"].append(total_clipped / max(count, 1.0))
        return loss + self.args.vf_coef * value_loss

    def create_optimizer(self, model=None):
        """Trainer's optimizer, plus one parameter group for the value head at ``value_head_learning_rate``."""
        head = self.task_value_head
        if self.optimizer is not None:
            return super().create_optimizer(model)
        head.requires_grad_(False)  # kept out of Trainer's groups, which run at the policy's learning rate
        try:
            optimizer = super().create_optimizer(model)
        finally:
            head.requires_grad_(True)
        learning_rate = self.args.value_head_learning_rate or self.args.learning_rate
        optimizer.add_param_group({"params": list(head.parameters()), "lr": learning_rate, "weight_decay": 0.0})
        return optimizer

    def _save(self, output_dir=None, state_dict=None):
        # Under DeepSpeed the consolidated state dict holds the gathered head; otherwise read the module. Read it
        # first: a full fine-tune's save_pretrained deletes the head's keys from that dict (_keys_to_ignore_on_save).
        head = {
            k[len(VALUE_HEAD_PREFIX) :]: v for k, v in (state_dict or {}).items() if k.startswith(VALUE_HEAD_PREFIX)
        }
        head = head or self.task_value_head.state_dict()
        super()._save(output_dir, state_dict)
        if not self.args.should_save:
            return
        output_dir = output_dir or self.args.output_dir
        os.makedirs(os.path.join(output_dir, os.path.dirname(VALUE_HEAD_FILE)), exist_ok=True)
        save_file(
            {k: v.detach().float().cpu().contiguous() for k, v in head.items()},
            os.path.join(output_dir, VALUE_HEAD_FILE),
        )

    def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
        super()._load_from_checkpoint(resume_from_checkpoint, model)
        if self.is_fsdp_enabled:
            # The FSDP checkpoint just loaded is the whole model, the head included (so is DeepSpeed's, which the
            # Trainer loads without calling this method); its head is sharded, and the file holds the full tensors.
            return
        path = os.path.join(resume_from_checkpoint, VALUE_HEAD_FILE)
        if not os.path.isfile(path):
            raise ConfigError(
                f"resume_from_checkpoint: {resume_from_checkpoint} has no {VALUE_HEAD_FILE} (not a `lenvm-rl ppo` "
                f"checkpoint); resume from a ppo run's checkpoint, or start afresh"
            )
        self.task_value_head.load_state_dict(load_file(path, device=str(self.task_value_head.out.weight.device)))


def main(argv: list[str] | None = None) -> None:
    """`lenvm-rl ppo --config recipes/<Model>/ppo/config_<variant>.yaml`"""
    train_policy(argv, "ppo", LenVMPPOConfig, LenVMPPOTrainer)
