"""``SegmentAdvantages``: the GRPO / PPO trainers' part for prompts with thinking budgets (docs/DESIGN.md §3.15).

A prompt with thinking budgets carries two targets, the thinking's (``thinking_budget_tokens``) and the answer's
(``budget_tokens``). This mixin of ``LenVMGRPOTrainer`` (so also of ``LenVMPPOTrainer``) splits every completion of
the batch into its thinking and answer segments (``thinking.SegmentRecorder``), reads the two-value LenVM
(``segment_values``) and assembles the per-segment length advantages (``segment_advantages``): thinking tokens
against the thinking budget with V_think, answer tokens against the answer budget with V_answer, whitened and scaled
as the one-segment path. It logs each segment's length, score, hit rate and advantage (``length/thinking_*``,
``length/answer_*``) whether or not a LenVM is loaded, so that the sequence-level twin (the segment scores as
rewards) logs the same curves.
"""

from __future__ import annotations

import torch

from lenvm_rl.errors import ConfigError
from lenvm_rl.returns import remaining_from_value, segment_value_targets
from lenvm_rl.segment_advantages import segment_length_advantages, segment_realised_scores, segment_token_masks
from lenvm_rl.thinking import SegmentRecorder, starts_in_thinking
from rewards.scores import budget_hit, budget_kind_codes
from rewards.segments import SEGMENTS, THINKING_MARKERS

THINKING_COLUMNS = ("thinking_budget_tokens", "thinking_budget_kind", "budget_tokens", "budget_kind")


def check_thinking_recipe(columns, args, segment_values: bool | None) -> None:
    """The refusals for prompts with thinking budgets (``columns`` has ``thinking_budget_tokens``), each one line:
    a one-value LenVM (``segment_values`` False; None when not known yet), guidance and a live critic (one value
    only so far)."""
    if "thinking_budget_tokens" not in columns:
        return
    if "budget_tokens" not in columns and args.lenvm_model_path is not None:
        raise ConfigError(
            "budgets: these prompts carry thinking budgets but no answer budget (budget_tokens), which the two-value "
            "LenVM's advantages and metrics need; set budgets or budget_range (the answer's), or unset lenvm_model_path"
        )
    if args.lenvm_model_path is not None and segment_values is False:
        raise ConfigError(
            f"lenvm_model_path: {args.lenvm_model_path!r} is a one-value LenVM (whole completions), but these prompts "
            f"carry thinking budgets, whose advantages need a thinking value and an answer value; train one with "
            f"segment_values: true on rollouts with thinking budgets, or unset lenvm_model_path and set "
            f"length_objective: none (the segment scores as rewards)"
        )
    if args.guided_generations:
        raise ConfigError(
            "guided_generations: guidance steers one budget, and these prompts carry thinking budgets; set "
            "guided_generations: 0"
        )
    if args.lenvm_update == "live":
        raise ConfigError(
            "lenvm_update: 'live' trains a one-value LenVM, and these prompts carry thinking budgets; set "
            "lenvm_update: frozen"
        )


def read_segment_values(path: str | None) -> bool | None:
    """Whether the LenVM at ``path`` has two values (``segment_values``); None when there is none, or it cannot be read
    or is not a LenVM (``load_lenvm`` says why later)."""
    if path is None:
        return None
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(path)
    except (OSError, ValueError):
        return None
    return bool(config.segment_values) if config.model_type == "lenvm" else None  # not a LenVM: load_lenvm says so


class SegmentAdvantages:
    """Thinking and answer segments in the GRPO / PPO batch (module docstring). ``segments``: the trainer's keyword
    for the ``SegmentRecorder`` of the recipe's markers (``train_policy`` passes it); unset, the default markers."""

    def __init__(self, model, reward_funcs=None, args=None, train_dataset=None, segments=None, **kwargs):
        columns = train_dataset.column_names if train_dataset is not None else ()
        check_thinking_recipe(columns, args, read_segment_values(args.lenvm_model_path))
        super().__init__(model, reward_funcs, args, train_dataset, **kwargs)
        self.segments = None
        if all(name in columns for name in THINKING_COLUMNS):  # both budgets: the per-segment advantages and metrics
            self.segments = segments or SegmentRecorder(
                self._tokenizer,
                THINKING_MARKERS,
                starts_in_thinking(
                    self._tokenizer,
                    train_dataset[0]["prompt"],
                    THINKING_MARKERS,
                    "thinking_budgets",
                    args.chat_template_kwargs,
                ),
                "thinking_budgets",
            )

    def load_length_critic(self, args):
        """The LenVM of ``args.lenvm_model_path``, its tokenizer checked: two values for prompts with thinking
        budgets, one otherwise (``load_lenvm`` refuses the other kind)."""
        from lenvm_rl.modeling import check_lenvm_tokenizer, load_lenvm

        lenvm = load_lenvm(args.lenvm_model_path, dtype=self.model.dtype, two_values=self.segments is not None)
        check_lenvm_tokenizer(args.lenvm_model_path, self._tokenizer)
        if self.segments is not None:
            check_thinking_recipe(THINKING_COLUMNS, args, lenvm.config.segment_values)
        return lenvm

    def describe_segments(self, output: dict, batch: dict, inputs: list[dict]) -> None:
        """Adds to ``describe_batch``'s dict: ``thinking_tokens`` (B,), ``thinking_closed`` (B,), the two budgets and
        kinds ``segment_budgets`` / ``segment_kinds`` (B, 2), and gathered over ranks ``all_segment_lengths`` (B_global,
        2), ``all_thinking_closed``, ``all_segment_budgets``, ``all_segment_kinds`` and ``all_segment_scores`` (the
        realised segment scores, 0 where the thinking never closed)."""
        gather, device = self.accelerator.gather, self.accelerator.device
        ids, lengths = output["completion_ids"], batch["lengths"]
        split = [self.segments(ids[i, : int(lengths[i])].tolist()) for i in range(ids.size(0))]
        batch["thinking_tokens"] = torch.tensor([row["thinking_tokens"] for row in split], device=device)
        batch["thinking_closed"] = torch.tensor([row["thinking_closed"] for row in split], device=device)
        batch["segment_budgets"] = torch.tensor(
            [[float(x["thinking_budget_tokens"]), float(x["budget_tokens"])] for x in inputs], device=device
        )  # (B, 2)
        batch["segment_kinds"] = torch.stack(
            [budget_kind_codes([x[name] for x in inputs]) for name in ("thinking_budget_kind", "budget_kind")], dim=-1
        ).to(device)  # (B, 2)
        for name in ("thinking_tokens", "thinking_closed", "segment_budgets", "segment_kinds"):
            batch[f"all_{name}"] = gather(batch[name])
        all_lengths = batch["all_lengths"].to(batch["all_thinking_tokens"].dtype)
        thinking = batch["all_thinking_tokens"]
        batch["all_segment_lengths"] = torch.stack([thinking, all_lengths - thinking], dim=-1).float()  # (B_global, 2)
        batch["all_segment_scores"] = segment_realised_scores(
            all_lengths,
            thinking,
            batch["all_thinking_closed"],
            batch["all_segment_budgets"],
            batch["all_segment_kinds"],
            self.args.length_score,
        )  # (B_global, 2)

    def state_values(self, output: dict, batch: dict) -> torch.Tensor:
        """(V_think, V_answer)(s_0 .. s_T) (B, T + 1, 2) from the LenVM's values at every position."""
        start = output["prompt_ids"].size(1) - 1
        return batch["values_full"][:, start : start + output["completion_ids"].size(1) + 1]

    def segment_length_advantages(self, output: dict, batch: dict) -> torch.Tensor:
        """c · A_len (B, T), 0 on padding: each token's advantage against its own segment's budget
        (``segment_advantages.segment_length_advantages``), the group baseline per segment, whitened or scaled over
        all valid tokens as the one-segment path (``LenVMGRPOTrainer.length_advantages``). Keeps the per-segment
        parts of c · A_len in ``batch["segment_advantages"]`` (B, T, 2) for the metrics."""
        args, mask = self.args, output["completion_mask"].bool()
        anchors = scale = None
        if args.length_baseline == "group":
            group_size = self.num_generations if self.model.training else self.num_generations_eval
            grouped = batch["all_segment_scores"].view(-1, group_size, 2)  # (groups, G, 2)
            local = batch["local_rows"]
            anchors = grouped.mean(1, keepdim=True).expand_as(grouped).reshape(-1, 2)[local]  # (B, 2)
            if not args.whiten_length_advantage and self.scale_rewards == "group":
                std = grouped.std(1, keepdim=True) if grouped.size(1) > 1 else torch.zeros_like(grouped[:, :1])
                scale = std.expand_as(grouped).reshape(-1, 2)[local]
            elif not args.whiten_length_advantage and self.scale_rewards == "batch":
                scale = batch["all_segment_scores"].std(0, keepdim=True).expand_as(anchors)
        parts = segment_length_advantages(
            self.state_values(output, batch),
            mask,
            batch["finished"],
            batch["thinking_tokens"],
            batch["thinking_closed"],
            self.length_gamma,
            args.length_lambda,
            args.length_objective,
            budgets=batch["segment_budgets"],
            kinds=batch["segment_kinds"],
            score=args.length_score,
            discount=args.length_discount,
            eos_credit=args.eos_credit,
            potential=args.length_potential,
            max_completion_tokens=args.max_completion_length,
            anchors=anchors,
        )  # (B, T, 2)
        if scale is not None:
            parts = parts / (scale[:, None, :] + 1e-4)  # TRL's group scaling, per segment
        length = parts.sum(-1)  # (B, T): the segments partition the tokens
        if args.whiten_length_advantage and args.length_advantage_scale == "batch":
            length = self.masked_whiten(length, mask)
        elif args.whiten_length_advantage:
            length = length / (self.first_batch_scale(length, mask) + 1e-8)
        length = args.length_advantage_coef * length * mask
        batch["segment_advantages"] = length[..., None] * segment_token_masks(
            mask, batch["thinking_tokens"], batch["thinking_closed"]
        )
        return length

    def log_segment_metrics(self, output: dict, batch: dict, length: torch.Tensor | None) -> None:
        """Per segment h (thinking, answer), gathered over ranks: ``length/{h}_mean_tokens``,
        ``length/{h}_mean_length_score`` and ``length/{h}_budget_hit_rate`` (0 / not hit where the thinking never
        closed), ``length/thinking_closed_rate``; with a LenVM ``length/{h}_lenvm_boundary_pred_tokens`` (L̂ from
        V_h(s_0)), ``length/{h}_online_mre`` (finished rows with a segment of > 0 tokens) and ``length/critic_mse``
        (both values against this batch's realised segment returns); with the advantage ``length/{h}_mean_abs_advantage``
        (token mean of |c · A_len| over the segment's tokens) and ``length/mean_abs_advantage``."""
        metrics = self._metrics["train" if self.model.training else "eval"]
        metrics["length/mean_length_tokens"].append(batch["all_lengths"].mean().item())
        closed, lengths = batch["all_thinking_closed"], batch["all_segment_lengths"]  # (B_global,), (B_global, 2)
        hits = budget_hit(lengths, batch["all_segment_budgets"], batch["all_segment_kinds"]) & closed[:, None]
        metrics["length/thinking_closed_rate"].append(closed.float().mean().item())
        for h, name in enumerate(SEGMENTS):
            metrics[f"length/{name}_mean_tokens"].append(lengths[:, h].mean().item())
            metrics[f"length/{name}_mean_length_score"].append(batch["all_segment_scores"][:, h].mean().item())
            metrics[f"length/{name}_budget_hit_rate"].append(hits[:, h].float().mean().item())
        if batch["values_full"] is not None:
            values = self.state_values(output, batch).float()  # (B, T + 1, 2)
            boundary = self.accelerator.gather(remaining_from_value(values[:, 0], self.length_gamma))  # (B_global, 2)
            for h, name in enumerate(SEGMENTS):
                metrics[f"length/{name}_lenvm_boundary_pred_tokens"].append(boundary[:, h].mean().item())
                scored = batch["all_finished"] & closed & (lengths[:, h] > 0)
                error = (boundary[scored, h] - lengths[scored, h]).abs() / lengths[scored, h]
                metrics[f"length/{name}_online_mre"].append(error.mean().item() if scored.any() else float("nan"))
            lenvm_gamma = self.accelerator.unwrap_model(self.lenvm).config.gamma
            targets, labelled = segment_value_targets(
                batch["lengths"],
                batch["thinking_tokens"],
                batch["thinking_closed"],
                batch["finished"],
                values.size(1),
                lenvm_gamma,
            )  # (B, T + 1, 2)
            total, count = self.ranks_sum(((values - targets).square() * labelled).sum(), labelled.sum().float())
            metrics["length/critic_mse"].append(total / count if count else float("nan"))
        if length is not None:
            masks = segment_token_masks(output["completion_mask"], batch["thinking_tokens"], batch["thinking_closed"])
            sums = self.ranks_sum(*batch["segment_advantages"].abs().sum((0, 1)), *masks.sum((0, 1)).float())
            for h, name in enumerate(SEGMENTS):
                metrics[f"length/{name}_mean_abs_advantage"].append(sums[h] / max(sums[2 + h], 1.0))
            metrics["length/mean_abs_advantage"].append((sums[0] + sums[1]) / max(sums[2] + sums[3], 1.0))
