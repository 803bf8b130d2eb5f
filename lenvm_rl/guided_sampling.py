"""Guided exploration: k of each GRPO / PPO group sampled under the LenVM, corrected by importance weights.

``GuidedSampling`` is a mixin of ``LenVMGRPOTrainer`` (so PPO has it too); the design and the estimator are
docs/DESIGN.md §3.14. With ``guided_generations: k`` the last k completions of every group of ``num_generations``
(by their index in the global batch, so the rule does not depend on how the batch is split over processes) are drawn
by transformers' ``generate`` with ``LenVMGuidedLogitsProcessor`` in front of the sampler, from

    μ = (1 - ε) · guide(π_T) + ε · π_T        π_T = softmax(logits / temperature), TRL's π of the loss

and their per-token log μ is recorded where TRL keeps vLLM's sampling log-probs (``sampling_per_token_logps``). After
the advantages are assembled, the policy-gradient term of every guided token is multiplied by w = min(π_old / μ, C)
(``advantages.importance_weights``, TRL's vLLM modes); plain rows get w = 1. The rest is TRL's: the guided samples'
rewards join their group's baseline, the loss, clipping and KL are unchanged. Training batches only: evaluation
measures the policy.
"""

from __future__ import annotations

import math

import torch
from transformers import GenerationConfig, LogitsProcessorList, TemperatureLogitsWarper
from trl.models.utils import disable_gradient_checkpointing, unwrap_model_for_generation
from trl.trainer.utils import nanstd, pad

from lenvm_rl.advantages import group_baseline, importance_weights
from lenvm_rl.decoding import LenVMGuidedLogitsProcessor
from lenvm_rl.errors import ConfigError
from rewards.scores import budget_hit, budget_kind_codes


class GuidedSampling:
    """The guided half of generation and its importance correction (see the module docstring).

    Logged per training batch, over all ranks: ``guided/hit_rate`` and ``guided/length_score`` of the guided samples
    against ``guided/plain_hit_rate`` and ``guided/plain_length_score`` of the rest, ``guided/weight_mean`` and
    ``guided/weight_max`` (w over guided tokens), ``guided/clipped_share`` (guided tokens, or rows in sequence modes,
    where C acted), ``guided/lenvm_forward_time_s`` (the LenVM's candidate forwards, summed over ranks),
    ``guided/lenvm_scored_tokens`` (tokens those forwards processed: guidance's cost), ``guided/tokens`` (generated
    tokens of guided samples, EOS excluded; TRL's ``num_tokens`` counts them with the rest) and ``guided/guided_share``
    (the share of rows guided: k / G, or less with ``guided_when: plain_miss``).
    """

    def check_guided_sampling(self) -> None:
        """Refuse what guided sampling does not support, before the first batch."""
        if self.tools or self.rollout_func is not None or self.environment_factories is not None:
            raise ConfigError(
                "guided_generations: guided sampling draws single-turn text completions; without tools, rollout_func "
                "or environments set guided_generations: 0"
            )
        if self.is_fsdp_enabled or (
            self.is_deepspeed_enabled and self.accelerator.state.deepspeed_plugin.zero_stage == 3
        ):
            raise ConfigError(
                "guided_generations: the LenVM's step-by-step forwards run on one process, DDP or ZeRO-1/2; under "
                "ZeRO-3 or FSDP set guided_generations: 0"
            )

    def guided_rows(self, rows: int) -> torch.Tensor:
        """(rows,) bool: which of this process's generation rows are guided: the last k of each group, by global
        index (process p holds rows p · rows .. (p + 1) · rows - 1 of the gathered batch, as TRL slices it)."""
        k = self.args.guided_generations
        if k == 0 or not self.model.training:
            return torch.zeros(rows, dtype=torch.bool)
        index = self.accelerator.process_index * rows + torch.arange(rows)
        return index % self.num_generations >= self.num_generations - k

    def _generate_single_turn(self, prompt_ids, images, multimodal_fields, num_generations, has_tool_images=False):
        slots = self.guided_rows(len(prompt_ids))  # (rows,) the last k of each group
        self.guided_mask = slots.clone()  # the rows actually guided this batch (correct_guided reads it)
        if self.args.guided_generations == 0 or not self.model.training:
            return super()._generate_single_turn(
                prompt_ids, images, multimodal_fields, num_generations, has_tool_images
            )
        if images is not None or multimodal_fields:
            raise ConfigError("guided_generations: guided sampling takes text prompts only; set guided_generations: 0")
        completions, logps = [None] * len(prompt_ids), [None] * len(prompt_ids)
        self.plain_generate(prompt_ids, ~slots, completions, logps, num_generations)
        if self.args.guided_when == "plain_miss":  # the rest of the slots: guided where the plain rows all missed
            self.guided_mask = slots & self.missed_groups(completions)
            self.plain_generate(prompt_ids, slots & ~self.guided_mask, completions, logps, num_generations)
        chosen = self.guided_mask.nonzero().squeeze(1).tolist()
        if chosen:
            guided_ids, guided_logps = self.guided_generate(
                [prompt_ids[i] for i in chosen], [self.generation_inputs[i] for i in chosen]
            )
            for i, ids, row_logps in zip(chosen, guided_ids, guided_logps, strict=True):
                completions[i], logps[i] = ids, row_logps
        return completions, logps

    def plain_generate(self, prompt_ids, rows: torch.Tensor, completions: list, logps: list, num_generations) -> None:
        """TRL's own sampler for the ``rows`` (bool (rows,)) into ``completions``; their log μ is NaN (w = 1)."""
        plain = rows.nonzero().squeeze(1).tolist()
        if plain:
            plain_ids, _ = super()._generate_single_turn([prompt_ids[i] for i in plain], None, {}, num_generations)
            for i, ids in zip(plain, plain_ids, strict=True):
                completions[i], logps[i] = ids, [math.nan] * len(ids)

    def missed_groups(self, completions: list) -> torch.Tensor:
        """(rows,) bool: whether every plain row of the row's group (over all ranks) missed its budget; the rows
        still None (not generated) do not count. Length as ``describe_batch`` counts it: EOS excluded."""
        eos, hits = set(self.eos_token_ids), []
        for ids, row in zip(completions, self.generation_inputs, strict=True):
            if ids is None:
                hits.append(False)
                continue
            length = len(ids) - (1 if ids and ids[-1] in eos else 0)
            kind = budget_kind_codes([row["budget_kind"]])
            hits.append(bool(budget_hit(torch.tensor([length]), torch.tensor([float(row["budget_tokens"])]), kind)))
        device = self.accelerator.device
        all_hits = self.accelerator.gather(torch.tensor(hits, device=device))  # (B_global,)
        missed = ~all_hits.view(-1, self.num_generations).any(1)  # (B_global / G,)
        rows = len(completions)
        index = self.accelerator.process_index * rows + torch.arange(rows)
        return missed.cpu()[index // self.num_generations]

    def plain_rows_mask(self) -> torch.Tensor | None:
        """(B_global,) bool: the plain rows of the training batch, all ranks; None where ``guided_baseline: all``
        (or outside training): the baseline of TRL, over every row."""
        if self.args.guided_baseline != "plain" or not self.args.guided_generations or not self.model.training:
            return None
        return ~self.accelerator.gather(self.guided_mask.to(self.accelerator.device))

    def guided_group_mean(self, scores: torch.Tensor, group_size: int, mean: torch.Tensor) -> torch.Tensor:
        """The group anchors of ``length_baseline: group``: ``mean`` (all rows), or over the plain rows only."""
        plain = self.plain_rows_mask()
        return mean if plain is None else group_baseline(scores, group_size, plain).to(mean.dtype)

    def guided_task_advantages(self, output: dict) -> torch.Tensor:
        """A_task (B,): TRL's, or with ``guided_baseline: plain`` TRL's sum_then_normalize advantage recomputed with
        each group's mean over its plain rows (``group_baseline``); the std and its scaling are TRL's, over every row
        (``scale_rewards``), and unscorable rows (every reward NaN) get 0, as TRL does."""
        plain = self.plain_rows_mask()
        if plain is None:
            return output["advantages"]
        per_func = self.batch_rewards  # (B_global, F)
        rewards = (per_func * self.reward_weights.to(per_func.device)[None]).nansum(1)
        rewards[per_func.isnan().all(1)] = math.nan
        group = self.num_generations
        advantages = rewards - group_baseline(rewards, group, plain.to(rewards.device)).to(rewards.dtype)
        if self.scale_rewards == "group":
            advantages = advantages / (nanstd(rewards.view(-1, group), dim=1).repeat_interleave(group) + 1e-4)
        elif self.scale_rewards == "batch":
            advantages = advantages / (nanstd(rewards) + 1e-4)
        rows = output["completion_ids"].size(0)
        local = slice(self.accelerator.process_index * rows, (self.accelerator.process_index + 1) * rows)
        return advantages.nan_to_num(nan=0.0)[local].to(output["advantages"].dtype)

    @torch.no_grad()
    def guided_generate(self, prompt_ids: list[list[int]], rows: list[dict]) -> tuple[list, list]:
        """Sample one completion per prompt from μ (module docstring); return the token ids (cut after the first EOS,
        as TRL cuts) and log μ of each sampled token."""
        args, device = self.args, self.accelerator.device
        prompts = [torch.tensor(ids) for ids in prompt_ids]
        input_ids = pad(prompts, padding_value=self._tokenizer.pad_token_id, padding_side="left").to(device)
        attention_mask = pad([torch.ones_like(t) for t in prompts], padding_value=0, padding_side="left").to(device)
        lenvm = self.accelerator.unwrap_model(self.lenvm)
        guide = LenVMGuidedLogitsProcessor(
            lenvm,
            budgets=[float(row["budget_tokens"]) for row in rows],
            kinds=[row["budget_kind"] for row in rows],
            prompt_lengths=[len(ids) for ids in prompt_ids],
            eos_token_ids=set(self.eos_token_ids),
            mode=args.guidance_mode,
            top_k=args.guidance_top_k,
            beta=args.guidance_beta,
            gamma=self.length_gamma,
            floor=args.guidance_floor,
        )
        # The guide sees π_T and its output is μ itself: TRL's sampling warpers are off, the temperature goes first.
        settings = {**self.generation_kwargs, "temperature": 1.0, "top_p": 1.0, "top_k": 0, "min_p": None}
        config = GenerationConfig(**settings, disable_compile=True, output_scores=True, return_dict_in_generate=True)
        processors = LogitsProcessorList([TemperatureLogitsWarper(self.temperature), guide])
        if self.temperature == 1.0:
            processors = LogitsProcessorList([guide])
        with (
            unwrap_model_for_generation(
                self.model_wrapped,
                self.accelerator,
                gather_deepspeed3_params=args.ds3_gather_for_generation,
                generation_kwargs=settings,
                gradient_checkpointing_kwargs=args.gradient_checkpointing_kwargs,
            ) as unwrapped_model,
            self._dist.summon_full_params(self.model_wrapped, recurse=False),
        ):
            generated = unwrapped_model.generate(
                input_ids=input_ids,
                attention_mask=attention_mask,
                generation_config=config,
                logits_processor=processors,
            )
        tokens = generated.sequences[:, input_ids.size(1) :]  # (R, T)
        logps = torch.stack(
            [
                step.float().log_softmax(-1).gather(1, tokens[:, t, None]).squeeze(1)
                for t, step in enumerate(generated.scores)
            ],
            dim=1,
        )  # (R, T) log μ of the sampled tokens
        is_eos = torch.isin(tokens, torch.tensor(self.eos_token_ids, device=tokens.device))
        ends = torch.where(is_eos.any(1), is_eos.int().argmax(1) + 1, tokens.size(1)).tolist()  # EOS included
        self.guided_cost += torch.tensor([guide.forward_seconds, guide.scored_tokens], dtype=torch.float64)
        return (
            [row[:end].tolist() for row, end in zip(tokens.cpu(), ends, strict=True)],
            [row[:end].tolist() for row, end in zip(logps.cpu(), ends, strict=True)],
        )

    def guided_policy_logps(self, output: dict, guided: torch.Tensor) -> torch.Tensor:
        """log π_old of the completion tokens (B, T): TRL's ``old_per_token_logps`` when it computed them, else one
        no-grad forward of the unwrapped policy over the guided rows (NaN elsewhere, where w = 1 anyway): unwrapped,
        because processes hold different numbers of guided rows and a DDP forward would wait for the others."""
        if output.get("old_per_token_logps") is not None:
            return output["old_per_token_logps"]
        logps = torch.full(output["completion_ids"].shape, math.nan, device=guided.device)
        if guided.any():
            input_ids = torch.cat([output["prompt_ids"], output["completion_ids"]], dim=1)[guided]
            attention_mask = torch.cat([output["prompt_mask"], output["completion_mask"]], dim=1)[guided]
            with torch.no_grad(), disable_gradient_checkpointing(self.model, self.args.gradient_checkpointing_kwargs):
                logps[guided], _, _ = self._get_per_token_logps_and_entropies(
                    self.accelerator.unwrap_model(self.model),
                    input_ids,
                    attention_mask,
                    output["completion_ids"].size(1),
                    batch_size=self.args.per_device_train_batch_size,
                )
        return logps

    def correct_guided(self, output: dict, batch: dict) -> None:
        """Multiply the advantages (B,) or (B, T) by the guided rows' importance weights into (B, T), and log.

        For every loss TRL offers except vespo, the per-token policy loss is linear in the advantage with a non-negative
        factor (-min(ρ A, clip(ρ) A) = -w min(ρ A', clip(ρ) A') for A = w A', w >= 0), so this is the product TRL forms
        with its vLLM ratio in ``_compute_loss``; the KL and entropy terms stay unweighted there as here.
        """
        args, device = self.args, self.accelerator.device
        mask = output["completion_mask"]  # (B, T)
        guided = self.guided_mask.to(device)  # (B,) the rows guided this batch
        sampling = output["sampling_per_token_logps"]  # (B, T) log μ, NaN on plain rows
        weights, acted = importance_weights(
            self.guided_policy_logps(output, guided),
            torch.where(guided[:, None], sampling, math.nan),
            mask,
            args.guided_importance_cap,
            args.guided_importance_mode,
            args.guided_importance_min,
        )  # (B, T) or (B, 1)
        advantages = output["advantages"]
        advantages = advantages[:, None] if advantages.dim() == 1 else advantages
        output["advantages"] = (advantages * weights * mask).float()  # (B, T)

        metrics = self._metrics["train"]
        counted = (mask.bool() & guided[:, None]) if weights.size(1) > 1 else guided[:, None]  # what w is over
        count, total, clipped = self.ranks_sum(
            counted.sum().double(), (weights.double() * counted).sum(), (acted & counted).sum().double()
        )
        largest = torch.where(counted, weights, 0.0).max() if counted.any() else torch.zeros((), device=device)
        metrics["guided/weight_mean"].append(total / max(count, 1.0))
        metrics["guided/weight_max"].append(self.accelerator.gather(largest[None]).max().item())
        metrics["guided/clipped_share"].append(clipped / max(count, 1.0))
        seconds, scored_tokens, tokens = self.ranks_sum(
            *self.guided_cost.to(device), (batch["lengths"] * guided).sum().double()
        )
        self.guided_cost.zero_()
        metrics["guided/lenvm_forward_time_s"].append(seconds)
        metrics["guided/lenvm_scored_tokens"].append(scored_tokens)
        metrics["guided/tokens"].append(tokens)
        guided_count, rows = self.ranks_sum(guided.sum().double(), torch.tensor(float(guided.numel()), device=device))
        metrics["guided/guided_share"].append(guided_count / max(rows, 1.0))
        if batch["all_scores"] is None:
            return
        all_guided = self.accelerator.gather(guided)
        hits = budget_hit(batch["all_lengths"], batch["all_budgets"], batch["all_kinds"]).float()
        for name, rows in (("", all_guided), ("plain_", ~all_guided)):
            empty = not rows.any()
            metrics[f"guided/{name}hit_rate"].append(math.nan if empty else hits[rows].mean().item())
            metrics[f"guided/{name}length_score"].append(math.nan if empty else batch["all_scores"][rows].mean().item())
