"""Train a Length Value Model on rollouts with transformers' Trainer.

Departures from a plain regression Trainer, each for a reason:
- The loss is a token mean over all valid states of the *whole accumulated batch*: the model divides
  the summed loss by ``num_items_in_batch``, which ``_get_num_items_in_batch`` counts as valid states
  (not ``labels``). A mean over sequences would reweight states by 1/L and shift the target.
- Truncated rollouts are dropped (default) or bootstrapped from the model's own detached V(s_T);
  they are never labelled as if they ended at the limit.
- ``evaluate`` scores held-out rollouts and logs the length metrics of ``critic_metrics``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from functools import partial

import torch
from datasets import Dataset
from transformers import Trainer, TrainingArguments

from lenvm_rl.critic_metrics import (
    collate_states,
    labelled_states,
    lenvm_metrics,
    require_segments,
    score_rollouts,
)
from lenvm_rl.errors import ConfigError, check_training_counts
from lenvm_rl.hub import defer_push, model_card, push_folder, record_run
from lenvm_rl.precision import resolve_bf16, resolve_dtype, training_device
from lenvm_rl.returns import prompt_boundary_ground_truth, resolve_gamma


@dataclass
class LenVMScriptArguments:
    rollouts_path: str = field(default="runs/rollouts", metadata={"help": "Rollout folder from `lenvm-rl rollout`."})
    eval_rollouts_path: str | None = field(
        default=None, metadata={"help": "Held-out rollouts; unset = hold out eval_prompt_fraction of the prompts."}
    )
    eval_prompt_fraction: float = field(default=0.1, metadata={"help": "Share of prompts held out when no eval set."})
    overwrite_output_dir: bool = field(
        default=False,
        metadata={"help": "Replace an earlier run in output_dir (its checkpoints are deleted); else one is refused."},
    )

    def __post_init__(self):
        if not 0 < self.eval_prompt_fraction < 1:
            raise ConfigError(f"eval_prompt_fraction: must lie in (0, 1), got {self.eval_prompt_fraction}")


@dataclass
class LenVMTrainingConfig(TrainingArguments):
    """transformers' `TrainingArguments` plus the LenVM's own fields (docs/DESIGN.md §3.2-§3.3, §4.1).

    Parameters:
        > Parameters that control the targets and the loss (docs/DESIGN.md §3.2-§3.3)

        gamma (`str`, *optional*, defaults to `"auto"`):
            Discount γ in (0, 1), or 'auto': 1 - γ^L99 = 0.99 on training lengths.
        value_loss (`str`, *optional*, defaults to `"mse"`):
            'mse' on V, or 'bce' on the logit.
        truncated_rollouts (`str`, *optional*, defaults to `"drop"`):
            'drop' truncated rollouts, or 'bootstrap' them from V(s_T).
        segment_values (`bool`, *optional*, defaults to `False`):
            Two values, remaining thinking and answer tokens (rollouts with thinking_tokens; rewards.segments).

        > Parameters that control the model

        head_hidden_size (`int` or `None`, *optional*):
            Head MLP width (default: hidden size).
        freeze_backbone (`bool`, *optional*, defaults to `False`):
            Train the head only.
        trainable_top_layers (`int` or `None`, *optional*):
            Train only the top N decoder layers, the final norm and the head (cheap on a CPU).
        cache_frozen_layers (`str`, *optional*, defaults to `"auto"`):
            With trainable_top_layers: epochs after the first reuse the frozen layers' states (lenvm_rl.trunk_cache);
            auto = where the recipe allows it, true = refuse a recipe that does not, false = off.

        > Parameters that control the data

        max_sequence_tokens (`int` or `None`, *optional*):
            Skip rollouts whose prompt + completion exceed this many tokens.
        remove_unused_columns (`bool`, *optional*, defaults to `False`):
            Kept False: the collator reads raw rows.

        > Parameters that control precision (docs/DESIGN.md §7)

        bf16 (`str`, *optional*, defaults to `"auto"`):
            bf16 autocast: true, false, or auto (bf16 where the device computes it natively, float32 elsewhere;
            lenvm_rl.precision). Resolved to true / false before training.
    """

    gamma: str = field(
        default="auto", metadata={"help": "Discount γ in (0, 1), or 'auto': 1 - γ^L99 = 0.99 on training lengths."}
    )
    head_hidden_size: int | None = field(default=None, metadata={"help": "Head MLP width (default: hidden size)."})
    value_loss: str = field(default="mse", metadata={"help": "'mse' on V, or 'bce' on the logit."})
    truncated_rollouts: str = field(
        default="drop", metadata={"help": "'drop' truncated rollouts, or 'bootstrap' them from V(s_T)."}
    )
    segment_values: bool = field(
        default=False, metadata={"help": "Two values, remaining thinking and answer tokens (rollouts with segments)."}
    )
    freeze_backbone: bool = field(default=False, metadata={"help": "Train the head only."})
    trainable_top_layers: int | None = field(
        default=None,
        metadata={"help": "Train only the top N decoder layers, the final norm and the head (cheap on a CPU)."},
    )
    cache_frozen_layers: str = field(
        default="auto", metadata={"help": "Reuse the frozen layers' states after epoch 1: auto, true or false."}
    )
    max_sequence_tokens: int | None = field(
        default=None, metadata={"help": "Skip rollouts whose prompt + completion exceed this many tokens."}
    )
    remove_unused_columns: bool = field(default=False, metadata={"help": "Kept False: the collator reads raw rows."})
    bf16: str = field(
        default="auto",
        metadata={
            "help": "bf16 autocast: true, false, or auto (bf16 where the device computes it natively, float32 "
            "elsewhere; lenvm_rl.precision). Resolved to true / false before training."
        },
    )

    def __post_init__(self):
        self.bf16 = resolve_bf16(self.bf16, self.use_cpu, self.fp16)
        check_training_counts(self)  # before TrainingArguments' own checks, some of which divide by them
        super().__post_init__()
        if self.gamma != "auto":
            try:
                self.gamma = resolve_gamma(self.gamma)
            except ValueError as error:
                raise ConfigError(str(error)) from None
        if self.value_loss not in ("mse", "bce"):
            raise ConfigError(f"value_loss: must be 'mse' or 'bce', got {self.value_loss!r}")
        if self.trainable_top_layers is not None and (self.trainable_top_layers < 1 or self.freeze_backbone):
            raise ConfigError(
                f"trainable_top_layers: must be a positive number of layers and cannot be combined with "
                f"freeze_backbone (got {self.trainable_top_layers}); for the head only set freeze_backbone: true"
            )
        self.cache_frozen_layers = str(self.cache_frozen_layers).lower()
        if self.cache_frozen_layers not in ("auto", "true", "false"):
            raise ConfigError(f"cache_frozen_layers: must be auto, true or false, got {self.cache_frozen_layers!r}")
        if self.truncated_rollouts not in ("drop", "bootstrap"):
            raise ConfigError(f"truncated_rollouts: must be 'drop' or 'bootstrap', got {self.truncated_rollouts!r}")


class LenVMTrainer(Trainer):
    """``Trainer`` with the token-count normalisation and length evaluation described above."""

    def __init__(
        self, model, args: LenVMTrainingConfig, train_dataset, eval_dataset=None, processing_class=None, **kwargs
    ):
        pad = processing_class.pad_token_id
        super().__init__(
            model=model,
            args=args,
            train_dataset=train_dataset,
            eval_dataset=eval_dataset,
            processing_class=processing_class,
            data_collator=partial(collate_states, pad_token_id=pad),
            **kwargs,
        )

    def _get_num_items_in_batch(self, batch_samples: list, device: torch.device) -> torch.Tensor:
        # Valid states of every micro-batch of this optimizer step (and of every rank), masked as the loss is.
        drop = self.args.truncated_rollouts == "drop"
        count = sum(labelled_states(batch, drop, self.args.segment_values) for batch in batch_samples).to(device)
        if self.args.average_tokens_across_devices and self.args.world_size > 1:
            count = self.accelerator.gather(count).sum()
        return count

    def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix: str = "eval") -> dict[str, float]:
        dataset = eval_dataset if eval_dataset is not None else self.eval_dataset
        model = self.accelerator.unwrap_model(self.model)
        with self.accelerator.autocast():  # the training precision (bf16 autocast when `bf16` is set)
            values = score_rollouts(
                model, dataset, self.processing_class.pad_token_id, self.args.per_device_eval_batch_size
            )
        metrics = lenvm_metrics(model.config, dataset, values)
        metrics = {f"{metric_key_prefix}_{k}": v for k, v in metrics.items()}
        self.log(metrics)
        self.control = self.callback_handler.on_evaluate(self.args, self.state, self.control, metrics)
        return metrics


def prepare_rollouts(rollouts: Dataset, truncated: str, max_sequence_tokens: int | None, name: str) -> Dataset:
    """Keep the rows a LenVM can learn from; refuse a set with no finished completion."""
    if "finished" not in rollouts.column_names:
        raise ConfigError(f"{name}: not a rollout dataset (no 'finished' column); make one with `lenvm-rl rollout`")
    if not any(rollouts["finished"]):
        raise ConfigError(
            f"{name}: none of its {len(rollouts)} rollouts finished within the generation limit; raise "
            f"max_completion_tokens in the rollout recipe, or set truncated_rollouts: bootstrap"
        )
    if truncated == "drop":
        rollouts = rollouts.filter(lambda finished: finished, input_columns="finished")
    if max_sequence_tokens is not None:
        rollouts = rollouts.filter(
            lambda p, c: len(p) + len(c) <= max_sequence_tokens, input_columns=["prompt_ids", "completion_ids"]
        )
    return rollouts


def split_by_prompt(rollouts: Dataset, fraction: float, seed: int) -> tuple[Dataset, Dataset]:
    """Hold out whole prompts (all their samples), never single samples: no prompt leaks into eval."""
    prompt_ids = sorted(set(rollouts["prompt_id"]))
    generator = torch.Generator().manual_seed(seed)
    order = [prompt_ids[i] for i in torch.randperm(len(prompt_ids), generator=generator).tolist()]
    held_out = set(order[: max(1, round(fraction * len(order)))])
    if len(held_out) == len(order):
        raise ConfigError("eval_prompt_fraction: holds out every prompt; lower it or give eval_rollouts_path")
    train = rollouts.filter(lambda p: p not in held_out, input_columns="prompt_id")
    evaluation = rollouts.filter(lambda p: p in held_out, input_columns="prompt_id")
    return train, evaluation


def build_lenvm(model_args, config: LenVMTrainingConfig, gamma: float, train_lengths: torch.Tensor):
    """A LenVM on the policy backbone, in one of three modes: full fine-tune, LoRA, frozen backbone."""
    from lenvm_rl.loading import load_causal_lm
    from lenvm_rl.modeling import LenVMModel

    backbone = load_causal_lm(model_args.model_name_or_path, dtype=model_args.dtype)
    model = LenVMModel.from_backbone(
        backbone,
        gamma=gamma,
        head_hidden_size=config.head_hidden_size,
        value_loss=config.value_loss,
        bootstrap_truncated=config.truncated_rollouts == "bootstrap",
        segment_values=config.segment_values,
        train_length_mean=float(train_lengths.mean()),
        train_boundary_tokens=float(prompt_boundary_ground_truth([train_lengths], gamma)[0]),
    )
    if config.freeze_backbone or config.trainable_top_layers:
        model.backbone.requires_grad_(False)
    if config.trainable_top_layers:
        layers, norm = getattr(model.backbone, "layers", None), getattr(model.backbone, "norm", None)
        if layers is None or norm is None:
            raise ConfigError(
                f"trainable_top_layers: the {type(model.backbone).__name__} backbone has no `layers` and `norm`; "
                f"use freeze_backbone, LoRA or a full fine-tune"
            )
        if config.trainable_top_layers > len(layers):
            raise ConfigError(
                f"trainable_top_layers: the backbone has {len(layers)} layers, got {config.trainable_top_layers}"
            )
        layers[-config.trainable_top_layers :].requires_grad_(True)
        norm.requires_grad_(True)
    if model_args.use_peft:
        from peft import LoraConfig, get_peft_model

        lora = LoraConfig(
            r=model_args.lora_r,
            lora_alpha=model_args.lora_alpha,
            lora_dropout=model_args.lora_dropout,
            target_modules=model_args.lora_target_modules or "all-linear",
            exclude_modules=["head.dense", "head.out"],
            modules_to_save=["head"],
        )
        try:
            model = get_peft_model(model, lora)
        except ValueError as error:
            names = sorted(
                {n.rsplit(".", 1)[-1] for n, m in model.backbone.named_modules() if isinstance(m, torch.nn.Linear)}
            )
            raise ConfigError(
                f"lora_target_modules: {model_args.lora_target_modules} not found in the backbone ({str(error).splitlines()[0][:120]}); "
                f"use some of: {', '.join(names)}"
            ) from None
    return model


def main(argv: list[str] | None = None) -> None:
    """`lenvm-rl train-lenvm --config recipes/<Model>/lenvm/config_<variant>.yaml`"""
    from trl import ModelConfig

    from lenvm_rl.critic_metrics import check_token_ids
    from lenvm_rl.data_parallel import launched_ranks
    from lenvm_rl.errors import require_launched_world
    from lenvm_rl.faults import SaveOnSigterm, resume_checkpoint, train
    from lenvm_rl.loading import load_tokenizer, model_vocab_size
    from lenvm_rl.outputs import check_output_dir, claim_output_dir, final_save
    from lenvm_rl.recipe import parse_recipe
    from lenvm_rl.returns import auto_gamma
    from lenvm_rl.rollout_data import check_rollout_tokenizer, load_rollouts
    from lenvm_rl.trunk_cache import attach_trunk_cache

    script_args, config, model_args = parse_recipe((LenVMScriptArguments, LenVMTrainingConfig, ModelConfig), argv)
    inputs = {
        "model_name_or_path": model_args.model_name_or_path,
        "rollouts_path": script_args.rollouts_path,
        "eval_rollouts_path": script_args.eval_rollouts_path,
    }
    check_output_dir(config.output_dir, inputs, final_save=True)  # before any model loads, as are the checks below
    require_launched_world(config.world_size)
    resume_from = resume_checkpoint(config.resume_from_checkpoint, config.output_dir)
    torch.manual_seed(config.seed)
    hub_model_id = defer_push(config)  # pushed once after saving, never by the Trainer (hub.defer_push)

    ################ Data
    rollouts = load_rollouts(script_args.rollouts_path)
    if script_args.eval_rollouts_path:
        train_rows, eval_rows = rollouts, load_rollouts(script_args.eval_rollouts_path)
    else:
        train_rows, eval_rows = split_by_prompt(rollouts, script_args.eval_prompt_fraction, config.seed)
    vocab_size = model_vocab_size(model_args.model_name_or_path)  # from its config: no weights load
    check_token_ids(rollouts, vocab_size, "rollouts_path", script_args.rollouts_path)
    if script_args.eval_rollouts_path:
        check_token_ids(eval_rows, vocab_size, "eval_rollouts_path", script_args.eval_rollouts_path)
    train_rows = prepare_rollouts(train_rows, config.truncated_rollouts, config.max_sequence_tokens, "rollouts_path")
    eval_rows = prepare_rollouts(eval_rows, "drop", config.max_sequence_tokens, "eval rollouts")
    if config.segment_values:
        require_segments(train_rows, "rollouts_path")
        require_segments(eval_rows, "eval_rollouts_path")
    for name, rows in (("training", train_rows), ("held-out", eval_rows)):
        if len(rows) == 0:
            raise ConfigError(
                f"max_sequence_tokens: no {name} rollout is left to use (finished and at most "
                f"{config.max_sequence_tokens} tokens); raise max_sequence_tokens or sample more rollouts"
            )
    finished_lengths = torch.tensor(
        [l for l, f in zip(train_rows["completion_tokens"], train_rows["finished"]) if f], dtype=torch.float64
    )
    try:
        gamma = auto_gamma(finished_lengths) if config.gamma == "auto" else config.gamma
    except ValueError as error:  # e.g. every finished completion is empty
        raise ConfigError(str(error)) from None
    print(f"train rollouts: {len(train_rows)}, eval rollouts: {len(eval_rows)}, γ = {gamma:.5f}")
    claim = lambda: claim_output_dir(config.output_dir, True, resume_from is not None, script_args.overwrite_output_dir)
    launched_ranks().main_first(claim)  # the recipe passed every check: the folder is this run's from here on

    ################ Model and tokenizer (the rollouts' token ids must mean the same to the LenVM)
    model_args.dtype = resolve_dtype(model_args.dtype, training_device(config.use_cpu))  # recorded as resolved
    tokenizer = load_tokenizer(model_args.model_name_or_path)
    check_rollout_tokenizer(script_args.rollouts_path, model_args.model_name_or_path, tokenizer)
    model = build_lenvm(model_args, config, gamma, finished_lengths)

    ################ Train
    sigterm = SaveOnSigterm()
    trainer = LenVMTrainer(
        model, config, train_dataset=train_rows, eval_dataset=eval_rows, processing_class=tokenizer, callbacks=[sigterm]
    )
    zero3 = trainer.is_deepspeed_enabled and trainer.accelerator.state.deepspeed_plugin.zero_stage == 3
    if model_args.use_peft and (zero3 or trainer.is_fsdp_enabled):
        raise ConfigError(
            "use_peft: a LoRA LenVM is merged into a plain LenVM when saved, which needs its whole weights on one "
            "process; launch it with DDP or ZeRO-2, or train a full or top-layer LenVM under ZeRO-3 / FSDP"
        )
    tokens = sum(len(p) + len(c) for p, c in zip(train_rows["prompt_ids"], train_rows["completion_ids"]))
    trunk_cache = attach_trunk_cache(trainer, config, model_args, tokens)
    train(trainer, resume_from)  # a full disk while checkpointing is said as one line
    if trunk_cache is not None:
        print(f"cache_frozen_layers: {trunk_cache.hits} training batches skipped the frozen layers")
    sigterm.exit_if_stopped(trainer)  # SIGTERM: a checkpoint is saved; exit 143 without a final model
    metrics = trainer.evaluate()

    ################ Save (every rank: ZeRO-3 and FSDP gather the sharded weights; a LoRA LenVM is merged first)
    # Written aside, then moved in: a failed save leaves a model already in output_dir intact (outputs.final_save).
    with final_save(config.output_dir, trainer.is_world_process_zero()) as staging:
        trainer.accelerator.wait_for_everyone()  # the main process has made the staging folder
        if model_args.use_peft:
            if trainer.is_world_process_zero():
                trainer.accelerator.unwrap_model(trainer.model).merge_and_unload().save_pretrained(staging)
        else:
            trainer.save_model(str(staging))  # the Trainer's gathering save
        if trainer.is_world_process_zero():
            tokenizer.save_pretrained(staging)
            (staging / "eval_results.json").write_text(json.dumps(metrics, indent=4, sort_keys=True) + "\n")
            record_run(staging, "train-lenvm", argv, script_args, config, model_args)  # the command and the recipe
            model_card(staging, hub_model_id, saved_as=config.output_dir).save(f"{staging}/README.md")
    if trainer.is_world_process_zero() and config.segment_values:
        mres = [f"{k[5:]} {v:.3f}" for k, v in metrics.items() if k.endswith("_boundary_mre")]
        print(f"held-out prompt-boundary MRE per segment: {', '.join(mres)}")
    elif trainer.is_world_process_zero():
        print(
            f"held-out prompt-boundary MRE: LenVM {metrics['eval_boundary_mre']:.3f}; constant predictors: mean "
            f"training length {metrics['eval_constant_mre']:.3f}, best constant in value space "
            f"{metrics['eval_constant_value_mre']:.3f}"
        )

    ################ Push (config, weights, tokenizer and the card: hub.push_folder)
    if hub_model_id and trainer.is_world_process_zero():
        url = push_folder(
            config.output_dir, hub_model_id, config.hub_private_repo, config.hub_revision, config.hub_token
        )
        print(f"pushed {config.output_dir} to {hub_model_id}: {url}")
