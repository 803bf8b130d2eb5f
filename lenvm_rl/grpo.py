"""GRPO with per-token LenVM length advantages (`lenvm-rl grpo --config recipes/<Model>/grpo/config_<variant>.yaml`).

How this departs from TRL's GRPO (DESIGN.md, "LenVM inside RL"):
- After TRL generates and scores a batch, a frozen Length Value Model scores cat(prompt, completion) once,
  without gradients, and its values V(s_0) .. V(s_T) become per-token length advantages A_len (B, T)
  (``returns.length_advantages``: budget / efficiency / shaping). The advantage TRL's loss sees is
  A_j = A_task + c · A_len_j on completion tokens and 0 on padding, with A_task TRL's group-normalised
  sequence advantage broadcast over tokens. ``length_objective: none`` leaves TRL's advantages untouched.
- EOS: TRL's completion_mask includes the EOS token. A completion is finished when its last masked token is
  one of TRL's ``eos_token_ids``; then L = mask.sum() - 1 (EOS excluded), V(s_L) := 0 and the EOS token is
  the action taken in s_L. A truncated completion (no EOS) bootstraps from V(s_T).
- Discount: the RL discount d of δ and of the GAE sum defaults to 1 (``length_discount``), because GRPO's
  objective is the undiscounted sequence reward; γ (the LenVM's) only turns values into lengths.
- Prompts are left-padded: the LenVM gets position ids cumsum(mask) - 1, as for the unpadded sequences it
  was trained on.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import ClassVar

import torch
from trl import GRPOConfig, GRPOTrainer
from trl.models import prepare_deepspeed, prepare_fsdp

from lenvm_rl.errors import ConfigError
from lenvm_rl.returns import (
    BUDGET_KINDS,
    LENGTH_ADVANTAGE_MODES,
    LENGTH_SCORES,
    budget_hit,
    budget_kind_codes,
    length_advantages,
    lenvm_state_values,
    remaining_from_value,
)

LENGTH_OBJECTIVES = (*LENGTH_ADVANTAGE_MODES, "none")
BUDGET_COLUMNS = ("budget_tokens", "budget_kind")


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
        default=False, metadata={"help": "Normalise A_len to mean 0, std 1 over the valid tokens of all ranks."}
    )
    lenvm_batch_size: int = field(default=8, metadata={"help": "Sequences per LenVM forward pass."})

    def __post_init__(self):
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


class LenVMGRPOTrainer(GRPOTrainer):
    """``GRPOTrainer`` whose advantages gain the LenVM's per-token length term (see the module docstring).

    Logged per generation batch, gathered over ranks: ``length/mean_abs_advantage`` (token mean of |c · A_len|),
    ``length/lenvm_boundary_pred_tokens`` (mean L̂ = ln(1 + V(s_0)) / ln γ; compare ``length/mean_length_tokens``,
    EOS excluded, whereas TRL's ``completions/mean_length`` counts it), ``length/online_mre`` (mean |L̂ - L| / L
    over finished completions with L > 0), ``length/budget_hit_rate``, ``length/mean_length_score``, and
    ``length/scoring_time_share``: the wall time this class adds after TRL's generation and scoring (LenVM
    forwards, advantage assembly, these metrics) over the wall time of the whole
    ``_generate_and_score_completions`` (generation, rewards, TRL's extra log-prob passes, plus that). The
    backward pass and the optimizer step are not in the denominator; ``length/scoring_time_s`` gives seconds.
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
        self.lenvm = None
        if args.lenvm_model_path is None:
            return
        from lenvm_rl.modeling import check_lenvm_tokenizer, load_lenvm

        lenvm = load_lenvm(args.lenvm_model_path, dtype=self.model.dtype)
        check_lenvm_tokenizer(args.lenvm_model_path, self._tokenizer)
        self.length_gamma = args.length_gamma or lenvm.config.gamma
        lenvm.eval().requires_grad_(False)
        # Prepared as TRL prepares its frozen reference model.
        if self.is_deepspeed_enabled:
            self.lenvm = prepare_deepspeed(lenvm, self.accelerator)
        elif self.is_fsdp_enabled:
            self.lenvm = prepare_fsdp(lenvm, self.accelerator)
        else:
            self.lenvm = self.accelerator.prepare_model(lenvm, evaluation_mode=True)

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

    def masked_whiten(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """(x - mean) / (std + 1e-8), mean and std over the valid tokens of all ranks; padding is not zeroed. (B, T)"""
        stats = torch.stack([(x * mask).sum(), (x.square() * mask).sum(), mask.sum().to(x.dtype)])
        total, total_sq, count = self.accelerator.reduce(stats, reduction="sum").tolist()
        mean = total / max(count, 1.0)
        std = max(total_sq / max(count, 1.0) - mean**2, 0.0) ** 0.5
        return (x - mean) / (std + 1e-8)

    def assemble_advantages(
        self, task_advantages, values_full, prompt_length, completion_mask, finished, budgets=None, kinds=None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """A = (A_task + c · A_len) · mask (B, T), and c · A_len (B, T), from the LenVM's values (B, P + T).

        task_advantages (B,) from TRL; finished (B,) bool; budgets (B,) tokens and kinds (B,) codes (budget mode).
        """
        args = self.args
        mask = completion_mask.bool()  # (B, T)
        values = lenvm_state_values(values_full, prompt_length, completion_mask, finished)  # (B, T + 1)
        length = length_advantages(
            values, completion_mask, finished, self.length_gamma, args.length_lambda, args.length_objective,
            budgets=budgets, kinds=kinds, score=args.length_score, discount=args.length_discount,
        )  # (B, T)
        if args.whiten_length_advantage:
            length = self.masked_whiten(length, mask)
        length = args.length_advantage_coef * length * mask  # (B, T)
        advantages = (task_advantages[:, None] + length) * mask  # (B, T)
        return advantages.to(task_advantages.dtype), length

    def _generate_and_score_completions(self, inputs):
        start = time.perf_counter()
        output = super()._generate_and_score_completions(inputs)
        has_budgets = all(name in inputs[0] for name in BUDGET_COLUMNS)
        if self.lenvm is None and not has_budgets:
            return output
        scoring_start = time.perf_counter()
        mode = "train" if self.model.training else "eval"
        metrics, gather, device = self._metrics[mode], self.accelerator.gather, self.accelerator.device
        completion_ids, completion_mask = output["completion_ids"], output["completion_mask"]  # (B, T)

        # Finished = the last masked token is an EOS (TRL's mask ends at and includes the first EOS). Rows that
        # mask_truncated_completions emptied are truncated; their length is their non-pad tokens.
        masked_tokens = completion_mask.sum(1)  # (B,)
        last_token = completion_ids.gather(1, (masked_tokens - 1).clamp(min=0)[:, None]).squeeze(1)  # (B,)
        eos_ids = torch.tensor(self.eos_token_ids, device=device)
        finished = (masked_tokens > 0) & torch.isin(last_token, eos_ids)  # (B,)
        lengths = torch.where(finished, masked_tokens - 1, (completion_ids != self._tokenizer.pad_token_id).sum(1))
        all_lengths = gather(lengths).float()  # (B_global,) L, EOS excluded
        metrics["length/mean_length_tokens"].append(all_lengths.mean().item())

        budgets = kinds = None
        if has_budgets:
            budgets = torch.tensor([float(x["budget_tokens"]) for x in inputs], device=device)  # (B,) local rows
            kinds = budget_kind_codes([x["budget_kind"] for x in inputs]).to(device)  # (B,)
            all_budgets, all_kinds = gather(budgets), gather(kinds)
            hit = budget_hit(all_lengths, all_budgets, all_kinds)
            metrics["length/budget_hit_rate"].append(hit.float().mean().item())
            score = LENGTH_SCORES[self.args.length_score](all_lengths, all_budgets, all_kinds)
            metrics["length/mean_length_score"].append(score.mean().item())

        if self.lenvm is not None:
            prompt_ids, prompt_mask = output["prompt_ids"], output["prompt_mask"]
            values_full = self.lenvm_values(prompt_ids, prompt_mask, completion_ids, completion_mask)  # (B, P + T)
            boundary = remaining_from_value(values_full[:, prompt_ids.size(1) - 1], self.length_gamma)  # (B,) L̂
            all_boundary, all_finished = gather(boundary), gather(finished)
            metrics["length/lenvm_boundary_pred_tokens"].append(all_boundary.mean().item())
            scored = all_finished & (all_lengths > 0)
            relative_error = (all_boundary - all_lengths).abs()[scored] / all_lengths[scored]
            metrics["length/online_mre"].append(relative_error.mean().item() if scored.any() else float("nan"))
            if self.args.length_objective != "none":
                output["advantages"], length = self.assemble_advantages(
                    output["advantages"], values_full, prompt_ids.size(1), completion_mask, finished, budgets, kinds
                )
                stats = torch.stack([length.abs().sum(), completion_mask.sum().to(length.dtype)])
                total, count = self.accelerator.reduce(stats, reduction="sum").tolist()
                metrics["length/mean_abs_advantage"].append(total / max(count, 1.0))

        end = time.perf_counter()
        times = self.accelerator.reduce(torch.tensor([end - scoring_start, end - start], device=device), "sum")
        metrics["length/scoring_time_s"].append(times[0].item() / self.accelerator.num_processes)
        metrics["length/scoring_time_share"].append((times[0] / times[1]).item())
        return output


def main(argv: list[str] | None = None) -> None:
    """`lenvm-rl grpo --config recipes/<Model>/grpo/config_<variant>.yaml`"""
    from lenvm_rl.train_policy import train_policy

    train_policy(argv, "grpo", LenVMGRPOConfig, LenVMGRPOTrainer)
