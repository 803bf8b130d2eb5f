"""``LenVMGRPOTrainer``: TRL's ``GRPOTrainer`` whose advantages gain the LenVM's per-token length term.

The trainer of ``lenvm-rl grpo`` (``lenvm_rl.grpo`` lists how it departs from TRL's GRPO) and the base of
``lenvm_rl.ppo``'s; the design is docs/DESIGN.md §4.2. The math it calls is pure (``lenvm_rl.advantages``,
``lenvm_rl.returns``); this module holds the TRL plumbing: batch bookkeeping, metrics, the live critic, checkpoints.

Hooks for subclasses (``lenvm_rl.ppo`` uses them): ``task_advantages`` (A_task, (B,) or (B, T)),
``length_advantages`` (c · A_len (B, T) or None), ``prepare_side_model`` (a second model prepared for the
launch: frozen like TRL's reference model, or trained), and ``batch_rewards`` (every reward function's value for
the rows of the current generation batch, gathered over ranks, (B_global, F)).
"""

from __future__ import annotations

import time
from typing import ClassVar

import torch
from transformers.utils import logging
from trl import GRPOTrainer
from trl.models import prepare_deepspeed, prepare_fsdp

from lenvm_rl.advantages import group_stats, length_advantages, lenvm_state_values
from lenvm_rl.critic_checkpoints import LiveCriticCheckpoints
from lenvm_rl.errors import ConfigError
from lenvm_rl.grpo_config import BUDGET_COLUMNS, LenVMGRPOConfig
from lenvm_rl.guided_sampling import GuidedSampling
from lenvm_rl.returns import remaining_from_value, value_targets
from lenvm_rl.segment_trainer import SegmentAdvantages
from lenvm_rl.vllm_sampling import sync_by_reload_on_cpu, vllm_cpu_environment
from rewards.scores import BUDGET_KINDS, LENGTH_SCORES, budget_hit, budget_kind_codes

logger = logging.get_logger(__name__)


class LenVMGRPOTrainer(SegmentAdvantages, GuidedSampling, LiveCriticCheckpoints, GRPOTrainer):
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
        if args.guided_generations and missing:
            raise ConfigError(
                f"guided_generations: guidance steers towards each prompt's budget and needs the dataset columns "
                f"{', '.join(missing)}; set budgets or budget_range in the recipe, or guided_generations: 0"
            )
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
        if args.use_vllm and args.vllm_mode == "colocate":
            vllm_cpu_environment()  # TRL starts the engine inside super().__init__
        super().__init__(model, reward_funcs, args, train_dataset, **kwargs)
        if args.use_vllm:
            self.keep_heads_out_of_vllm(self.vllm_generation)
            sync_by_reload_on_cpu(self.vllm_generation)
        self.lenvm = self.lenvm_optimizer = None
        self.length_scale = None  # length_advantage_scale first: the std of the first training batch's A_len
        self.batch_rewards = None  # (B_global, F), set by _calculate_rewards for the current generation batch
        self.generation_inputs = None  # the rows of the batch being generated: the guided sampler reads their budgets
        self.guided_cost = torch.zeros(2, dtype=torch.float64)  # guidance's LenVM seconds and tokens this batch
        if args.guided_generations:
            self.check_guided_sampling()
        if args.lenvm_model_path is None:
            return
        lenvm = self.load_length_critic(args)  # two values for prompts with thinking budgets (SegmentAdvantages)
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
        """A_task, (B,) or (B, T): TRL's group-normalised sequence advantage (its group mean over the plain rows only
        with ``guided_baseline: plain``). PPO returns its critic's (B, T)."""
        return self.guided_task_advantages(output)

    def length_advantages(self, output: dict, batch: dict) -> torch.Tensor | None:
        """c · A_len (B, T), 0 on padding, from the LenVM's values (``batch["values_full"]``, (B, P + T)); None without
        a length objective. ``batch`` is ``describe_batch``'s dict."""
        args = self.args
        if args.length_objective == "none" or batch["values_full"] is None:
            return None
        if self.segments is not None:  # thinking budgets: each token against its own segment's budget
            return self.segment_length_advantages(output, batch)
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
            anchors = self.guided_group_mean(batch["all_scores"], group_size, mean)[local]
            # Whitened, the batch sets the scale. A group's std does not bound the LenVM's part Φ_j - Φ_0, so
            # dividing by it blows up groups of (nearly) equal scores: at 2 completions per prompt that collapsed
            # the testbed runs (docs/BENCHMARKS.md); only an unwhitened run takes TRL's scaling.
            if not args.whiten_length_advantage and self.scale_rewards == "group":
                scale = std[local]
            elif not args.whiten_length_advantage and self.scale_rewards == "batch":
                scale = batch["all_scores"].std().expand_as(anchors)
        length = length_advantages(
            values,
            completion_mask,
            batch["finished"],
            self.length_gamma,
            args.length_lambda,
            args.length_objective,
            budgets=batch["budgets"],
            kinds=batch["kinds"],
            score=args.length_score,
            discount=args.length_discount,
            eos_credit=args.eos_credit,
            potential=args.length_potential,
            max_completion_tokens=args.max_completion_length,
            anchors=anchors,
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
        return torch.cat(
            [
                self.lenvm(
                    input_ids=input_ids[i : i + size],
                    attention_mask=attention_mask[i : i + size],
                    position_ids=position_ids[i : i + size],
                    use_cache=False,
                ).length_values
                for i in range(0, input_ids.size(0), size)
            ]
        )

    def ranks_sum(self, *totals: torch.Tensor) -> list[float]:
        """Each 0-d tensor summed over all ranks, in one collective: every cross-rank metric and moment uses it."""
        return self.accelerator.reduce(torch.stack(totals), reduction="sum").tolist()

    def masked_moments(self, x: torch.Tensor, mask: torch.Tensor) -> tuple[float, float]:
        """Mean and std of ``x`` (B, T) over the valid tokens of all ranks."""
        total, total_sq, count = self.ranks_sum((x * mask).sum(), (x.square() * mask).sum(), mask.sum().to(x.dtype))
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
            "finished": finished,
            "lengths": lengths,
            "all_finished": gather(finished),
            "all_lengths": gather(lengths).float(),
            "budgets": None,
            "kinds": None,
            "all_scores": None,
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
            )  # (B, P + T), (B, P + T, 2) with two values
        if self.segments is not None:
            self.describe_segments(output, batch, inputs)
        return batch

    def log_length_metrics(self, output: dict, batch: dict, length: torch.Tensor | None) -> None:
        """The ``length/*`` metrics of this generation batch (class docstring), gathered over ranks."""
        if self.segments is not None:
            return self.log_segment_metrics(output, batch, length)
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
        total, count = self.ranks_sum(((states - targets).square() * labelled).sum(), labelled.sum().float())
        metrics["length/critic_mse"].append(total / count if count else float("nan"))
        if length is not None:
            total, count = self.ranks_sum(length.abs().sum(), output["completion_mask"].sum().to(length.dtype))
            metrics["length/mean_abs_advantage"].append(total / max(count, 1.0))

    def _generate_and_score_completions(self, inputs):
        start = time.perf_counter()
        self.generation_inputs = inputs
        output = super()._generate_and_score_completions(inputs)
        scoring_start = time.perf_counter()
        batch = self.describe_batch(output, inputs)
        task = self.task_advantages(output, batch)  # (B,) or (B, T)
        length = self.length_advantages(output, batch)  # (B, T) or None
        output["advantages"] = task  # TRL's own unless guided_baseline: plain
        if length is not None or task.dim() == 2:
            mask = output["completion_mask"]  # (B, T)
            task = task[:, None] if task.dim() == 1 else task
            output["advantages"] = ((task + (0.0 if length is None else length)) * mask).float()  # (B, T)
        if self.args.guided_generations and self.model.training:
            self.correct_guided(output, batch)  # w · A on guided rows, (B, T)
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
                count = (
                    (
                        (torch.arange(states.numel(), device=lengths.device) <= lengths[rows, None])
                        & labelled[rows, None]
                    )
                    .sum()
                    .float()
                )
                count = self.accelerator.reduce(count, reduction="sum") / self.accelerator.num_processes
                loss = lenvm(
                    input_ids=input_ids[rows],
                    attention_mask=attention_mask[rows],
                    position_ids=position_ids[rows],
                    state_positions=state_positions[rows],
                    completion_tokens=lengths[rows],
                    finished=batch["finished"][rows],
                    num_items_in_batch=count.clamp(min=1.0),
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
