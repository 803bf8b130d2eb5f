"""GRPO with per-token LenVM length advantages (`lenvm-rl grpo --config recipes/<Model>/grpo/config_<variant>.yaml`).

How this departs from TRL's GRPO:
- After TRL generates and scores a batch, a Length Value Model scores cat(prompt, completion) once, without
  gradients, and its values V(s_0) .. V(s_T) become per-token length advantages A_len (B, T)
  (``returns.length_advantages``: budget / efficiency / shaping). The advantage TRL's loss sees is
  A_j = A_task + c · A_len_j on completion tokens and 0 on padding, with A_task TRL's group-normalised
  sequence advantage broadcast over tokens. ``length_objective: none`` leaves TRL's advantages untouched.
- Scale: A_len is whitened over the valid tokens of the batch by default (``whiten_length_advantage``), so it
  enters at the scale of TRL's A_task, which is divided by its group's reward std. Unwhitened, c · A_len is a
  difference of scores in [0, 1] (0.1-0.3 per token on the testbed) against an A_task of order 1.
  ``length_advantage_scale: first`` divides every batch by the first training batch's std instead (kept, in
  checkpoints): whitened per batch, the LenVM's leftover error is scaled back up to std 1 once budgets are met,
  where a sequence-level reward's advantage falls to 0 (docs/BENCHMARKS.md, "Where the length critic pays").
- Baseline (budget objective): ``length_baseline: lenvm`` uses the LenVM's potential Φ(s_0) at the prompt
  boundary; ``group`` anchors it at the group's mean realised score, as TRL's advantage does for rewards, and
  keeps the LenVM's change Φ_j - Φ_0 within the completion (still a state-dependent baseline); unwhitened, the
  result is divided by the group's score std when ``scale_rewards`` is ``group`` (TRL's own field, its own
  meaning); whitened (the default), the whitening alone sets the scale.
- Potential (budget objective): ``length_potential: point`` scores the LenVM's expected length, S(E[L]);
  ``expected`` is E[S(L)] under a constant stop hazard matched to the LenVM's value (``returns.expected_length_score``).
- EOS: TRL's completion_mask includes the EOS token. A completion is finished when its last masked token is
  one of TRL's ``eos_token_ids``; then L = mask.sum() - 1 (EOS excluded) and the EOS token is the action taken
  in s_L. By default V(s_L) := 0 and the EOS action gets no length advantage; ``eos_credit`` keeps the LenVM's
  V(s_L), so the decision to stop carries its own credit. A truncated completion (no EOS) bootstraps from V(s_T).
- Live critic (``lenvm_update: live``): the LenVM keeps learning from every training batch, with the token-mean
  targets of ``lenvm-rl train-lenvm`` (realised remaining lengths; truncated rows dropped or bootstrapped as the
  LenVM's config says), its own AdamW (``lenvm_learning_rate``) and ``lenvm_epochs`` passes per batch, after the
  advantages are computed from the values before the update (as PPO does). It is a separate model with its own
  optimizer, not a head on the policy's trunk: the trained LenVM is the exact starting point (a trunk head would
  need the LenVM's own features, which a full or top-layer LenVM fine-tune has moved away from the policy's), the
  policy gets no value-loss gradient, nothing of it reaches vLLM's weight sync, and the critic saved at the end is
  a plain LenVM folder (``<output_dir>/lenvm``) that predict-length, guided decoding and push read as they are. It
  is saved with its optimizer state in every checkpoint and restored on resume. Under DDP it is wrapped by the
  accelerator like the policy, so its gradients are averaged and the ranks keep identical weights.
- Discount: the RL discount d of δ and of the GAE sum defaults to 1 (``length_discount``), because GRPO's
  objective is the undiscounted sequence reward; γ (the LenVM's) only turns values into lengths.
- Prompts are left-padded: the LenVM gets position ids cumsum(mask) - 1, as for the unpadded sequences it
  was trained on.

Hooks for subclasses (``lenvm_rl.ppo`` uses them): ``task_advantages`` (A_task, (B,) or (B, T)),
``length_advantages`` (c · A_len (B, T) or None), ``prepare_side_model`` (a second model prepared for the
launch: frozen like TRL's reference model, or trained), and ``batch_rewards`` (every reward function's value for
the rows of the current generation batch, gathered over ranks, (B_global, F)).
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from typing import ClassVar

import torch
from trl import GRPOConfig, GRPOTrainer
from transformers.utils import logging
from trl.models import prepare_deepspeed, prepare_fsdp

from lenvm_rl.errors import ConfigError, check_training_counts
from lenvm_rl.precision import resolve_bf16
from lenvm_rl.advantages import (
    group_stats,
    LENGTH_ADVANTAGE_MODES,
    length_advantages,
    LENGTH_POTENTIALS,
    lenvm_state_values,
)
from lenvm_rl.returns import remaining_from_value, value_targets
from rewards.scores import budget_hit, budget_kind_codes, BUDGET_KINDS, LENGTH_SCORES

logger = logging.get_logger(__name__)

LENGTH_OBJECTIVES = (*LENGTH_ADVANTAGE_MODES, "none")
LENGTH_BASELINES = ("lenvm", "group")
LENVM_UPDATES = ("frozen", "live")
LENGTH_ADVANTAGE_SCALES = ("batch", "first")
LENGTH_SCALE_FILE = "length_advantage_scale.json"  # length_advantage_scale first: its kept scale, in checkpoints
BUDGET_COLUMNS = ("budget_tokens", "budget_kind")
LIVE_LENVM_DIR = "lenvm"  # the live critic's folder inside output_dir and every checkpoint
LIVE_LENVM_OPTIMIZER = "lenvm_optimizer.pt"  # its optimizer state, in checkpoints only


@dataclass
class LenVMGRPOConfig(GRPOConfig):
    """GRPOConfig plus the LenVM critic's fields."""

    # GRPO's baseline is the group mean, so it needs >= 2 completions per prompt; PPO's critic allows 1.
    min_generations: ClassVar[int] = 2

    lenvm_model_path: str | None = field(
        default=None,
        metadata={"help": "Output folder of `lenvm-rl train-lenvm`; with length_objective none it feeds metrics only."},
    )
    length_objective: str = field(
        default="budget",
        metadata={"help": "budget (hit the prompt's budget), efficiency (c > 0: shorter), shaping, or none."},
    )
    length_advantage_coef: float = field(
        default=1.0, metadata={"help": "c in A_task + c · A_len; >= 0 for budget/shaping, any sign for efficiency."}
    )
    length_gamma: float | None = field(
        default=None, metadata={"help": "γ that turns LenVM values into lengths; default: the LenVM's own γ."}
    )
    length_lambda: float = field(default=1.0, metadata={"help": "GAE λ of the length advantage, in [0, 1]."})
    length_discount: float = field(
        default=1.0,
        metadata={"help": "RL discount d of δ and the GAE sum; 1 because GRPO's sequence reward is undiscounted."},
    )
    length_score: str = field(default="lifebench", metadata={"help": "Budget score S: lifebench or l1."})
    whiten_length_advantage: bool = field(
        default=True,
        metadata={"help": "Normalise A_len over the valid tokens of all ranks to the scale of A_task "
                          "(length_advantage_scale says how)."},
    )
    length_advantage_scale: str = field(
        default="batch",
        metadata={"help": "With whiten_length_advantage: batch (mean 0, std 1 in every batch) or first (divided by "
                          "the std of the first training batch's A_len, kept for the run and in checkpoints, not "
                          "centred: A_len shrinks as budgets are met instead of the critic's leftover error being "
                          "scaled back up to std 1)."},
    )
    length_baseline: str = field(
        default="lenvm",
        metadata={"help": "Budget baseline at the prompt boundary: lenvm (Φ(s_0)) or group (the group's mean realised "
                          "score; unwhitened, divided by its std when scale_rewards is group); needs >= 2 generations."},
    )
    length_potential: str = field(
        default="point",
        metadata={"help": "Budget potential: point (S of the LenVM's expected length) or expected (E[S(L)] under a "
                          "constant stop hazard matched to the LenVM's value)."},
    )
    eos_credit: bool = field(
        default=False, metadata={"help": "The EOS action carries the length advantage of stopping (V(s_L) kept)."}
    )
    lenvm_update: str = field(
        default="frozen",
        metadata={"help": "frozen, or live: the LenVM keeps learning from every training batch (saved to "
                          "<output_dir>/lenvm)."},
    )
    lenvm_learning_rate: float = field(default=1e-5, metadata={"help": "AdamW learning rate of the live LenVM."})
    lenvm_epochs: int = field(default=1, metadata={"help": "Passes of the live LenVM over each generation batch."})
    lenvm_batch_size: int = field(default=8, metadata={"help": "Sequences per LenVM forward pass (and update)."})
    bf16: str = field(
        default="auto",
        metadata={"help": "bf16 autocast: true, false, or auto (bf16 where the device computes it natively, float32 "
                          "elsewhere; lenvm_rl.precision). Resolved to true / false before training."},
    )

    def __post_init__(self):
        self.bf16 = resolve_bf16(self.bf16, self.use_cpu, self.fp16)
        check_training_counts(self)  # before TRL's own checks, some of which divide by these counts
        for name in ("num_generations", "max_completion_length"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ConfigError(f"{name}: must be positive, got {getattr(self, name)}")
        try:
            super().__post_init__()
        except ValueError as error:  # TRL's group-size checks speak of generation_batch_size, rarely set by hand
            if "generations" not in str(error):
                raise
            # TRL's last generation check refuses 1, which a critic baseline (PPO) allows; only TRL's vLLM
            # importance-sampling clip checks come after that check, and are skipped then.
            if self.num_generations < self.min_generations or "at least 2 generations" not in str(error):
                raise ConfigError(
                    f"num_generations: {self.num_generations} completions per prompt must be >= "
                    f"{self.min_generations} and divide the batch "
                    f"(per_device_train_batch_size x processes x steps_per_generation; per_device_eval_batch_size x "
                    f"processes for evaluation); TRL says: {str(error).splitlines()[0]}"
                ) from None
        if self.length_objective not in LENGTH_OBJECTIVES:
            raise ConfigError(
                f"length_objective: {self.length_objective!r} is unknown; use one of {', '.join(LENGTH_OBJECTIVES)}"
            )
        if self.length_objective != "none" and self.lenvm_model_path is None:
            raise ConfigError(
                f"lenvm_model_path: length_objective {self.length_objective!r} needs a LenVM; give the output_dir of "
                f"`lenvm-rl train-lenvm`, or set length_objective: none"
            )
        # Budget and shaping advantages point towards the budget / the LenVM's shorter states; a negative c would
        # push away. Efficiency is a direction, not a target: c > 0 prefers shorter, c < 0 longer completions.
        if self.length_objective in ("budget", "shaping") and self.length_advantage_coef < 0:
            raise ConfigError(
                f"length_advantage_coef: must be >= 0 for length_objective {self.length_objective!r}, got "
                f"{self.length_advantage_coef}; a negative coefficient pushes away from the objective"
            )
        if self.length_gamma is not None and not 0.0 < self.length_gamma < 1.0:
            raise ConfigError(f"length_gamma: must lie in (0, 1) or be unset (the LenVM's γ), got {self.length_gamma}")
        if not 0.0 <= self.length_lambda <= 1.0:
            raise ConfigError(f"length_lambda: must lie in [0, 1], got {self.length_lambda}")
        if not 0.0 < self.length_discount <= 1.0:
            raise ConfigError(
                f"length_discount: must lie in (0, 1] (1 matches GRPO's undiscounted objective), "
                f"got {self.length_discount}"
            )
        if self.length_score not in LENGTH_SCORES:
            raise ConfigError(f"length_score: {self.length_score!r} is unknown; use one of {', '.join(LENGTH_SCORES)}")
        if self.lenvm_batch_size < 1:
            raise ConfigError(f"lenvm_batch_size: must be a positive number of sequences, got {self.lenvm_batch_size}")
        choices = {"length_baseline": LENGTH_BASELINES, "length_potential": LENGTH_POTENTIALS,
                   "lenvm_update": LENVM_UPDATES, "length_advantage_scale": LENGTH_ADVANTAGE_SCALES}
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ConfigError(f"{name}: {getattr(self, name)!r} is unknown; use one of {', '.join(allowed)}")
        budget_only = {"length_baseline": "lenvm", "length_potential": "point"}
        for name, default in budget_only.items():
            if getattr(self, name) != default and self.length_objective != "budget":
                raise ConfigError(
                    f"{name}: {getattr(self, name)!r} applies to length_objective 'budget' only, got "
                    f"{self.length_objective!r}; set {name}: {default} or length_objective: budget"
                )
        if self.length_baseline == "group" and self.num_generations < 2:
            raise ConfigError(
                f"length_baseline: 'group' needs a group, got num_generations {self.num_generations}; set "
                f"num_generations >= 2 or length_baseline: lenvm"
            )
        if self.lenvm_update == "live" and self.lenvm_model_path is None:
            raise ConfigError("lenvm_update: 'live' needs a LenVM to train; set lenvm_model_path")
        if self.lenvm_learning_rate <= 0:
            raise ConfigError(f"lenvm_learning_rate: must be > 0, got {self.lenvm_learning_rate}")
        if self.lenvm_epochs < 1:
            raise ConfigError(f"lenvm_epochs: must be a positive number of passes, got {self.lenvm_epochs}")


class LenVMGRPOTrainer(GRPOTrainer):
    """``GRPOTrainer`` whose advantages gain the LenVM's per-token length term (see the module docstring).

    Logged per generation batch, gathered over ranks: ``length/mean_abs_advantage`` (token mean of |c · A_len|),
    ``length/lenvm_boundary_pred_tokens`` (mean L̂ = ln(1 + V(s_0)) / ln γ; compare ``length/mean_length_tokens``,
    EOS excluded, whereas TRL's ``completions/mean_length`` counts it), ``length/online_mre`` (mean |L̂ - L| / L
    over finished completions with L > 0), ``length/critic_mse`` (the LenVM's value MSE against this batch's
    realised returns, before any update: how stale the critic is), ``length/critic_update_loss`` (live critic: its
    mean loss over the update), ``length/budget_hit_rate``, ``length/mean_length_score``, and
    ``length/scoring_time_share``: the wall time this class adds after TRL's generation and scoring (LenVM
    forwards, advantage assembly, these metrics, the live critic's update) over the wall time of the whole
    ``_generate_and_score_completions`` (generation, rewards, TRL's extra log-prob passes, plus that). The
    backward pass and the optimizer step are not in the denominator; ``length/scoring_time_s`` gives seconds,
    ``length/critic_update_time_s`` the live update's share of them.
    """

    def __init__(self, model, reward_funcs=None, args: LenVMGRPOConfig | None = None, train_dataset=None, **kwargs):
        if not isinstance(args, LenVMGRPOConfig):
            raise TypeError(f"args: LenVMGRPOTrainer needs a LenVMGRPOConfig, got {type(args).__name__}")
        columns = train_dataset.column_names if train_dataset is not None else None
        missing = [name for name in BUDGET_COLUMNS if columns is not None and name not in columns]
        if args.length_objective == "budget" and missing:
            raise ConfigError(
                f"length_objective: 'budget' needs the dataset columns {', '.join(missing)}; set budgets or "
                f"budget_range in the recipe (the budget transform adds them), or choose another length_objective"
            )
        if columns is not None and "budget_kind" in columns:
            unknown = sorted(set(train_dataset["budget_kind"]) - set(BUDGET_KINDS))
            if unknown:
                raise ConfigError(
                    f"budget_kind: the dataset has unknown kinds {unknown}; use {', '.join(BUDGET_KINDS)}"
                )
        super().__init__(model, reward_funcs, args, train_dataset, **kwargs)
        if args.use_vllm:
            self.keep_heads_out_of_vllm(self.vllm_generation)
        self.lenvm = self.lenvm_optimizer = None
        self.length_scale = None  # length_advantage_scale first: the std of the first training batch's A_len
        self.batch_rewards = None  # (B_global, F), set by _calculate_rewards for the current generation batch
        if args.lenvm_model_path is None:
            return
        from lenvm_rl.modeling import check_lenvm_tokenizer, load_lenvm

        lenvm = load_lenvm(args.lenvm_model_path, dtype=self.model.dtype)
        check_lenvm_tokenizer(args.lenvm_model_path, self._tokenizer)
        self.length_gamma = args.length_gamma or lenvm.config.gamma
        live = args.lenvm_update == "live"
        lenvm.eval().requires_grad_(live)
        self.lenvm = self.prepare_side_model(lenvm, trainable=live)
        if live:
            self.lenvm_optimizer = torch.optim.AdamW(
                [p for p in lenvm.parameters() if p.requires_grad], lr=args.lenvm_learning_rate, weight_decay=0.0
            )

    # Submodules this project adds to the policy (PPO's task value head); never sent to vLLM.
    policy_heads: ClassVar[tuple[str, ...]] = ()

    def keep_heads_out_of_vllm(self, generation) -> None:
        """TRL's weight sync sends every named parameter of the policy to vLLM, whose ``load_weights`` raises on a
        name it does not know: drop ``policy_heads`` from what ``generation`` (TRL's ``VLLMGeneration``) sends. Every
        parameter is still walked, because gathering one (ZeRO-3, FSDP) is a collective all ranks take part in."""
        walk = generation._iter_named_params

        def policy_weights():
            for name, param in walk():
                if not name.startswith(self.policy_heads):
                    yield name, param

        generation._iter_named_params = policy_weights

    # ------------------------------------------------------------------------------------------------ hooks

    def prepare_side_model(self, model: torch.nn.Module, trainable: bool = False) -> torch.nn.Module:
        """A second model (the LenVM, PPO's reference) prepared for this launch.

        Frozen: as TRL prepares its reference model (``prepare_deepspeed``, ``prepare_fsdp``, or the accelerator in
        evaluation mode). Trained: the accelerator wraps it like the policy (DDP averages its gradients); a trained
        side model under DeepSpeed or FSDP would need its own engine or sharding plan, which is not built yet.
        """
        if trainable:
            if self.is_deepspeed_enabled or self.is_fsdp_enabled:
                raise ConfigError(
                    "lenvm_update: 'live' runs on one process or DDP; under DeepSpeed or FSDP set lenvm_update: frozen "
                    "(a trained second model there needs its own engine, not built yet)"
                )
            return self.accelerator.prepare_model(model)
        if self.is_deepspeed_enabled:
            return prepare_deepspeed(model, self.accelerator)
        if self.is_fsdp_enabled:
            return prepare_fsdp(model, self.accelerator)
        return self.accelerator.prepare_model(model, evaluation_mode=True)

    def task_advantages(self, output: dict, batch: dict) -> torch.Tensor:
        """A_task, (B,) or (B, T): TRL's group-normalised sequence advantage. PPO returns its critic's (B, T)."""
        return output["advantages"]

    def length_advantages(self, output: dict, batch: dict) -> torch.Tensor | None:
        """c · A_len (B, T), 0 on padding, from the LenVM's values (``batch["values_full"]``, (B, P + T)); None without
        a length objective. ``batch`` is ``describe_batch``'s dict."""
        args = self.args
        if args.length_objective == "none" or batch["values_full"] is None:
            return None
        completion_mask = output["completion_mask"]
        mask = completion_mask.bool()  # (B, T)
        values = lenvm_state_values(
            batch["values_full"], output["prompt_ids"].size(1), completion_mask, batch["finished"], args.eos_credit
        )  # (B, T + 1)
        anchors = scale = None
        if args.length_baseline == "group":
            group_size = self.num_generations if self.model.training else self.num_generations_eval
            mean, std = group_stats(batch["all_scores"], group_size)  # (B_global,)
            local = batch["local_rows"]
            anchors = mean[local]
            # Whitened, the batch sets the scale. A group's std does not bound the LenVM's part Φ_j - Φ_0, so
            # dividing by it blows up groups of (nearly) equal scores: at 2 completions per prompt that collapsed
            # the testbed runs (docs/BENCHMARKS.md); only an unwhitened run takes TRL's scaling.
            if not args.whiten_length_advantage and self.scale_rewards == "group":
                scale = std[local]
            elif not args.whiten_length_advantage and self.scale_rewards == "batch":
                scale = batch["all_scores"].std().expand_as(anchors)
        length = length_advantages(
            values, completion_mask, batch["finished"], self.length_gamma, args.length_lambda, args.length_objective,
            budgets=batch["budgets"], kinds=batch["kinds"], score=args.length_score, discount=args.length_discount,
            eos_credit=args.eos_credit, potential=args.length_potential,
            max_completion_tokens=args.max_completion_length, anchors=anchors,
        )  # (B, T)
        if scale is not None:
            length = length / (scale[:, None] + 1e-4)  # TRL's group scaling of its own advantage
        if args.whiten_length_advantage and args.length_advantage_scale == "batch":
            length = self.masked_whiten(length, mask)
        elif args.whiten_length_advantage:
            length = length / (self.first_batch_scale(length, mask) + 1e-8)
        return args.length_advantage_coef * length * mask

    # ------------------------------------------------------------------------------------- the batch, scored

    def _calculate_rewards(self, inputs, prompts, completions, completion_ids_list):
        self.batch_rewards = super()._calculate_rewards(inputs, prompts, completions, completion_ids_list)
        return self.batch_rewards  # (B_global, F), gathered over ranks

    @torch.no_grad()
    def lenvm_values(self, prompt_ids, prompt_mask, completion_ids, completion_mask) -> torch.Tensor:
        """V at every position of cat(prompt, completion) (B, P + T), in chunks of ``lenvm_batch_size``."""
        input_ids = torch.cat([prompt_ids, completion_ids], dim=1)  # (B, P + T)
        attention_mask = torch.cat([prompt_mask, completion_mask], dim=1)  # (B, P + T)
        position_ids = (attention_mask.cumsum(1) - 1).clamp(min=0)  # left padding: the first real token is 0
        size = self.args.lenvm_batch_size
        return torch.cat([
            self.lenvm(
                input_ids=input_ids[i : i + size],
                attention_mask=attention_mask[i : i + size],
                position_ids=position_ids[i : i + size],
                use_cache=False,
            ).length_values
            for i in range(0, input_ids.size(0), size)
        ])

    def masked_moments(self, x: torch.Tensor, mask: torch.Tensor) -> tuple[float, float]:
        """Mean and std of ``x`` (B, T) over the valid tokens of all ranks."""
        stats = torch.stack([(x * mask).sum(), (x.square() * mask).sum(), mask.sum().to(x.dtype)])
        total, total_sq, count = self.accelerator.reduce(stats, reduction="sum").tolist()
        mean = total / max(count, 1.0)
        return mean, max(total_sq / max(count, 1.0) - mean**2, 0.0) ** 0.5

    def masked_whiten(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """(x - mean) / (std + 1e-8), mean and std over the valid tokens of all ranks; padding is not zeroed. (B, T)"""
        mean, std = self.masked_moments(x, mask)
        return (x - mean) / (std + 1e-8)

    def first_batch_scale(self, x: torch.Tensor, mask: torch.Tensor) -> float:
        """The std of A_len over the first training batch's valid tokens (all ranks), kept from then on. Before it
        (``eval_on_start``) and while every A_len is 0, the batch's own std, not kept."""
        if self.length_scale is not None:
            return self.length_scale
        std = self.masked_moments(x, mask)[1]
        if self.model.training and std > 1e-6:
            self.length_scale = std
        return std

    def describe_batch(self, output: dict, inputs: list[dict]) -> dict:
        """What the length hooks read, for the local rows (B,) and gathered over ranks (B_global,): ``finished``,
        ``lengths`` (EOS excluded), ``budgets`` and ``kinds`` (or None), ``all_*`` gathered, ``all_scores`` (the
        realised length scores), ``local_rows`` (this rank's slice of the gathered rows), ``values_full`` (the
        LenVM's values (B, P + T), or None without a LenVM)."""
        gather, device = self.accelerator.gather, self.accelerator.device
        completion_ids, completion_mask = output["completion_ids"], output["completion_mask"]  # (B, T)
        # Finished = the last masked token is an EOS (TRL's mask ends at and includes the first EOS). Rows that
        # mask_truncated_completions emptied are truncated; their length is their non-pad tokens.
        masked_tokens = completion_mask.sum(1)  # (B,)
        last_token = completion_ids.gather(1, (masked_tokens - 1).clamp(min=0)[:, None]).squeeze(1)  # (B,)
        finished = (masked_tokens > 0) & torch.isin(last_token, torch.tensor(self.eos_token_ids, device=device))
        lengths = torch.where(finished, masked_tokens - 1, (completion_ids != self._tokenizer.pad_token_id).sum(1))
        rows = lengths.size(0)
        batch = {
            "finished": finished, "lengths": lengths, "all_finished": gather(finished),
            "all_lengths": gather(lengths).float(), "budgets": None, "kinds": None, "all_scores": None,
            "local_rows": slice(self.accelerator.process_index * rows, (self.accelerator.process_index + 1) * rows),
            "values_full": None,
        }
        if all(name in inputs[0] for name in BUDGET_COLUMNS):
            batch["budgets"] = torch.tensor([float(x["budget_tokens"]) for x in inputs], device=device)  # (B,)
            batch["kinds"] = budget_kind_codes([x["budget_kind"] for x in inputs]).to(device)  # (B,)
            batch["all_budgets"], batch["all_kinds"] = gather(batch["budgets"]), gather(batch["kinds"])
            batch["all_scores"] = LENGTH_SCORES[self.args.length_score](
                batch["all_lengths"], batch["all_budgets"], batch["all_kinds"]
            ).double()  # (B_global,)
        if self.lenvm is not None:
            batch["values_full"] = self.lenvm_values(
                output["prompt_ids"], output["prompt_mask"], completion_ids, completion_mask
            )  # (B, P + T)
        return batch

    def log_length_metrics(self, output: dict, batch: dict, length: torch.Tensor | None) -> None:
        """The ``length/*`` metrics of this generation batch (class docstring), gathered over ranks."""
        metrics = self._metrics["train" if self.model.training else "eval"]
        all_lengths = batch["all_lengths"]
        metrics["length/mean_length_tokens"].append(all_lengths.mean().item())
        if batch["all_scores"] is not None:
            hit = budget_hit(all_lengths, batch["all_budgets"], batch["all_kinds"])
            metrics["length/budget_hit_rate"].append(hit.float().mean().item())
            metrics["length/mean_length_score"].append(batch["all_scores"].mean().item())
        if batch["values_full"] is None:
            return
        prompt_length, values_full = output["prompt_ids"].size(1), batch["values_full"]
        boundary = remaining_from_value(values_full[:, prompt_length - 1], self.length_gamma)  # (B,) L̂
        all_boundary, all_finished = self.accelerator.gather(boundary), batch["all_finished"]
        metrics["length/lenvm_boundary_pred_tokens"].append(all_boundary.mean().item())
        scored = all_finished & (all_lengths > 0)
        relative_error = (all_boundary - all_lengths).abs()[scored] / all_lengths[scored]
        metrics["length/online_mre"].append(relative_error.mean().item() if scored.any() else float("nan"))
        # The critic's error on this batch's realised returns (finished rows), before any update.
        num_tokens = output["completion_ids"].size(1)
        states = values_full[:, prompt_length - 1 : prompt_length + num_tokens].float()  # (B, T + 1) V(s_0..s_T)
        lenvm_gamma = self.accelerator.unwrap_model(self.lenvm).config.gamma  # the γ of its training targets
        targets, labelled = value_targets(batch["lengths"], batch["finished"], num_tokens + 1, lenvm_gamma)
        stats = torch.stack([((states - targets).square() * labelled).sum(), labelled.sum().float()])
        total, count = self.accelerator.reduce(stats, reduction="sum").tolist()
        metrics["length/critic_mse"].append(total / count if count else float("nan"))
        if length is not None:
            stats = torch.stack([length.abs().sum(), output["completion_mask"].sum().to(length.dtype)])
            total, count = self.accelerator.reduce(stats, reduction="sum").tolist()
            metrics["length/mean_abs_advantage"].append(total / max(count, 1.0))

    def _generate_and_score_completions(self, inputs):
        start = time.perf_counter()
        output = super()._generate_and_score_completions(inputs)
        scoring_start = time.perf_counter()
        batch = self.describe_batch(output, inputs)
        task = self.task_advantages(output, batch)  # (B,) or (B, T)
        length = self.length_advantages(output, batch)  # (B, T) or None
        if length is not None or task.dim() == 2:
            mask = output["completion_mask"]  # (B, T)
            task = task[:, None] if task.dim() == 1 else task
            output["advantages"] = ((task + (0.0 if length is None else length)) * mask).float()  # (B, T)
        self.log_length_metrics(output, batch, length)
        update_time = 0.0
        if self.lenvm_optimizer is not None and self.model.training:
            update_start = time.perf_counter()
            self.update_lenvm(output, batch)  # after the advantages: they use the values before the update
            update_time = time.perf_counter() - update_start

        end = time.perf_counter()
        times = torch.tensor([end - scoring_start, end - start, update_time], device=self.accelerator.device)
        times = self.accelerator.reduce(times, "sum")
        metrics = self._metrics["train" if self.model.training else "eval"]
        metrics["length/scoring_time_s"].append(times[0].item() / self.accelerator.num_processes)
        metrics["length/scoring_time_share"].append((times[0] / times[1]).item())
        if self.lenvm_optimizer is not None and self.model.training:
            metrics["length/critic_update_time_s"].append(times[2].item() / self.accelerator.num_processes)
        return output

    # ---------------------------------------------------------------------------------------- live critic

    def update_lenvm(self, output: dict, batch: dict) -> None:
        """``lenvm_epochs`` passes of AdamW over this batch in chunks of ``lenvm_batch_size``, each chunk one step.

        The LenVM's own loss (``LenVMModel.forward``: token-mean MSE or BCE against the realised remaining-length
        returns, truncated rows dropped or bootstrapped as its config says), normalised by the labelled states of
        the chunk over all ranks, so that DDP's gradient average is the token mean of the gathered chunk.
        """
        args, lenvm = self.args, self.lenvm
        prompt_ids, completion_ids = output["prompt_ids"], output["completion_ids"]
        input_ids = torch.cat([prompt_ids, completion_ids], dim=1)  # (B, P + T)
        attention_mask = torch.cat([output["prompt_mask"], output["completion_mask"]], dim=1)  # (B, P + T)
        position_ids = (attention_mask.cumsum(1) - 1).clamp(min=0)
        states = prompt_ids.size(1) - 1 + torch.arange(completion_ids.size(1) + 1, device=input_ids.device)
        state_positions = states.expand(input_ids.size(0), -1)  # (B, T + 1): s_j ends at P - 1 + j
        bootstrap = self.accelerator.unwrap_model(lenvm).config.bootstrap_truncated
        labelled = batch["finished"] if not bootstrap else torch.ones_like(batch["finished"])
        lengths = batch["lengths"]
        losses = []
        lenvm.train()
        for _ in range(args.lenvm_epochs):
            for i in range(0, input_ids.size(0), args.lenvm_batch_size):
                rows = slice(i, i + args.lenvm_batch_size)
                count = ((torch.arange(states.numel(), device=lengths.device) <= lengths[rows, None])
                         & labelled[rows, None]).sum().float()
                count = self.accelerator.reduce(count, reduction="sum") / self.accelerator.num_processes
                loss = lenvm(
                    input_ids=input_ids[rows], attention_mask=attention_mask[rows], position_ids=position_ids[rows],
                    state_positions=state_positions[rows], completion_tokens=lengths[rows],
                    finished=batch["finished"][rows], num_items_in_batch=count.clamp(min=1.0),
                ).loss
                # Not accelerator.backward: it divides by the policy's accumulation steps and applies its loss scaler.
                loss.backward()
                if args.max_grad_norm is not None and args.max_grad_norm > 0:
                    torch.nn.utils.clip_grad_norm_(lenvm.parameters(), args.max_grad_norm)
                self.lenvm_optimizer.step()
                self.lenvm_optimizer.zero_grad(set_to_none=True)
                losses.append(loss.detach())
        lenvm.eval()
        mean_loss = self.accelerator.reduce(torch.stack(losses).mean(), reduction="mean")
        self._metrics["train"]["length/critic_update_loss"].append(mean_loss.item())

    def create_model_card(self, *args, **kwargs):
        """Nothing: TRL writes its card into output_dir at every checkpoint, where it could replace the user's own
        README.md; the run's card (``hub.model_card``) is written with the final save."""

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
                logger.warning("%s has no %s: the length advantage's scale is measured again on the next batch",
                               checkpoint, LENGTH_SCALE_FILE)
        if self.lenvm_optimizer is not None and checkpoint is not None:
            state = torch.load(os.path.join(checkpoint, LIVE_LENVM_OPTIMIZER), map_location=self.accelerator.device)
            self.lenvm_optimizer.load_state_dict(state)


def main(argv: list[str] | None = None) -> None:
    """`lenvm-rl grpo --config recipes/<Model>/grpo/config_<variant>.yaml`"""
    from lenvm_rl.train_policy import train_policy

    train_policy(argv, "grpo", LenVMGRPOConfig, LenVMGRPOTrainer)
