"""The `grpo` and `ppo` entry point: recipe -> data -> policy -> rewards -> trainer -> train -> save -> push.

One straight-line function in the style of open-r1's ``grpo.py``; the trainer class and its config are the only
things that differ between the two stages (``lenvm_rl.grpo``, ``lenvm_rl.ppo``).
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field

from lenvm_rl.budgets import check_reachable_budgets
from lenvm_rl.data import DatasetArguments
from lenvm_rl.errors import ConfigError, require_launched_world
from lenvm_rl.hub import defer_push, model_card, push_folder, record_run


@dataclass
class GRPOScriptArguments(DatasetArguments):
    reward_funcs: list[str] = field(
        default_factory=lambda: ["accuracy"],
        metadata={"help": "Rewards by registry name (`lenvm-rl rewards` lists them) or module:function path."},
    )
    overwrite_output_dir: bool = field(
        default=False,
        metadata={"help": "Replace an earlier run in output_dir (its checkpoints are deleted); else one is refused."},
    )
    eval_num_prompts: int = field(
        default=0,
        metadata={
            "help": "Held-out prompts (after the training slice, no shared text) for TRL's evaluation; set "
            "eval_strategy: steps and eval_steps to score them during training (logged as eval_length/*)."
        },
    )


def build_reward_funcs(names: list[str], tokenizer, model, config, segments=None) -> list:
    """The recipe's reward functions by name; length rewards get the EOS ids TRL stops on and the completion cap,
    segment rewards the thinking markers of ``segments`` (a ``SegmentRecorder``)."""
    from lenvm_rl.generation import eos_token_ids
    from rewards import REWARDS, get_reward
    from rewards.base import TokenLengthReward
    from rewards.length import ThinkingLengthScore

    # Length rewards count tokens without the EOS that ended the completion: any id TRL stops on.
    eos_ids = sorted(eos_token_ids(tokenizer, model.generation_config))
    reward_funcs = []
    for name in names:
        reward_class, params = REWARDS.get(name), {}
        if reward_class is not None and issubclass(reward_class, TokenLengthReward):
            params["eos_token_id"] = eos_ids
            if "max_completion_tokens" in inspect.signature(reward_class).parameters:
                params["max_completion_tokens"] = config.max_completion_length
        if reward_class is not None and issubclass(reward_class, ThinkingLengthScore):
            params.update(
                tokenizer=tokenizer, thinking_markers=segments.markers, starts_in_thinking=segments.starts_inside
            )
        reward_funcs.append(get_reward(name, **params))
    return reward_funcs


def train_policy(argv: list[str] | None, stage: str, config_class: type, trainer_class: type) -> None:
    """The `grpo` and `ppo` entry points: parse the recipe into ``config_class``, train with ``trainer_class``."""
    from transformers import set_seed
    from trl import ModelConfig, get_peft_config

    from lenvm_rl.critic_checkpoints import check_resumed_critic
    from lenvm_rl.data import load_prompt_splits
    from lenvm_rl.data_parallel import launched_ranks
    from lenvm_rl.faults import SaveOnSigterm, resume_checkpoint, train
    from lenvm_rl.loading import load_causal_lm, load_tokenizer
    from lenvm_rl.outputs import check_output_dir, claim_output_dir, final_save
    from lenvm_rl.recipe import parse_recipe
    from lenvm_rl.segment_trainer import check_thinking_recipe, read_segment_values
    from lenvm_rl.thinking import SegmentRecorder
    from rewards import REWARDS
    from rewards.length import ThinkingLengthScore

    script_args, config, model_args = parse_recipe((GRPOScriptArguments, config_class, ModelConfig), argv)
    if config.reward_weights is not None and len(config.reward_weights) != len(script_args.reward_funcs):
        raise ConfigError(
            f"reward_weights: {len(config.reward_weights)} weight(s) for {len(script_args.reward_funcs)} reward_funcs "
            f"({', '.join(script_args.reward_funcs)}); give one weight per reward, or drop reward_weights"
        )
    budgets = (script_args.budgets, script_args.budget_range, script_args.budget_kinds)
    check_reachable_budgets(*budgets, config.max_completion_length, "max_completion_length")
    inputs = {
        "model_name_or_path": model_args.model_name_or_path,
        "lenvm_model_path": config.lenvm_model_path,
        "dataset_name": script_args.dataset_name,
    }
    check_output_dir(config.output_dir, inputs, final_save=True)  # before any model loads, as are the checks below
    require_launched_world(config.world_size)
    resume_from = resume_checkpoint(config.resume_from_checkpoint, config.output_dir)
    check_resumed_critic(resume_from, config.lenvm_update)
    set_seed(config.seed)
    hub_model_id = defer_push(config)  # pushed once after saving, never by the Trainer (hub.defer_push)

    ################ Data
    dataset, eval_dataset = load_prompt_splits(script_args, script_args.eval_num_prompts)
    if config.eval_strategy != "no" and eval_dataset is None:
        raise ConfigError(
            f"eval_strategy: {config.eval_strategy!r} needs held-out prompts; set eval_num_prompts, or eval_strategy: no"
        )
    # TRL samples whole generation batches of distinct prompts and drops a partial one: fewer prompts train nothing.
    prompts_per_batch = config.generation_batch_size // config.num_generations
    if len(dataset) < prompts_per_batch:
        raise ConfigError(
            f"num_prompts: {len(dataset)} prompt(s) is fewer than one generation batch of {prompts_per_batch} "
            f"(per_device_train_batch_size x processes x steps_per_generation / num_generations), so no step would "
            f"run; give more prompts or a smaller batch"
        )
    for name in script_args.reward_funcs:  # a reward reads its columns at the first step, after the models load
        missing = [c for c in (REWARDS[name].columns if name in REWARDS else ()) if c not in dataset.column_names]
        if missing:
            raise ConfigError(
                f"reward_funcs: {name!r} reads the dataset column {missing[0]!r}, which {script_args.dataset_name!r} "
                f"lacks (columns: {', '.join(dataset.column_names)}); add it (budgets: [...] adds budget_tokens and "
                f"budget_kind) or drop the reward"
            )
    # Thinking budgets: a two-value LenVM, no guidance or live critic yet (one line each, before any model loads).
    check_thinking_recipe(dataset.column_names, config, read_segment_values(config.lenvm_model_path))
    claim = lambda: claim_output_dir(config.output_dir, True, resume_from is not None, script_args.overwrite_output_dir)
    launched_ranks().main_first(claim)  # the recipe passed every check: the folder is this run's from here on

    ################ Tokenizer and policy
    from lenvm_rl.precision import resolve_dtype, training_device

    model_args.dtype = resolve_dtype(model_args.dtype, training_device(config.use_cpu))  # recorded as resolved
    tokenizer = load_tokenizer(model_args.model_name_or_path)
    model = load_causal_lm(
        model_args.model_name_or_path, dtype=model_args.dtype, attn_implementation=model_args.attn_implementation
    )

    ################ Rewards
    # Segment rewards read the thinking markers in the token ids, knowing whether the chat template opened the section.
    wants_segments = any(
        issubclass(REWARDS.get(name, object), ThinkingLengthScore) for name in script_args.reward_funcs
    )
    segments = SegmentRecorder.for_recipe(
        script_args,
        tokenizer,
        dataset[0]["prompt"],
        config.chat_template_kwargs,
        "reward_funcs" if wants_segments else None,
    )
    reward_funcs = build_reward_funcs(script_args.reward_funcs, tokenizer, model, config, segments)

    ################ Trainer
    sigterm = SaveOnSigterm()
    trainer = trainer_class(
        model=model,
        reward_funcs=reward_funcs,
        args=config,
        train_dataset=dataset,
        eval_dataset=eval_dataset,
        processing_class=tokenizer,
        peft_config=get_peft_config(model_args),
        callbacks=[sigterm],
        segments=segments,  # the recipe's markers, for the per-segment advantages and metrics
    )

    ################ Train
    train(trainer, resume_from)  # a full disk while checkpointing is said as one line
    sigterm.exit_if_stopped(trainer)  # SIGTERM: a checkpoint is saved; exit 143 without a final model

    ################ Save (the adapter alone with LoRA; the tokenizer beside it; ppo adds its task value head)
    # Written aside, then moved in: a failed save leaves a model already in output_dir intact (outputs.final_save).
    with final_save(config.output_dir, trainer.is_world_process_zero()) as staging:
        trainer.save_model(str(staging))
        if trainer.is_world_process_zero():
            trainer.state.save_to_json(f"{staging}/trainer_state.json")  # every logged metric, for curves
            record_run(staging, stage, argv, script_args, config, model_args)  # the command and the recipe
            model_card(staging, hub_model_id, saved_as=config.output_dir).save(f"{staging}/README.md")

    ################ Push (the model files and the card, not checkpoints: hub.push_folder)
    if hub_model_id and trainer.is_world_process_zero():
        url = push_folder(
            config.output_dir, hub_model_id, config.hub_private_repo, config.hub_revision, config.hub_token
        )
        print(f"pushed {config.output_dir} to {hub_model_id}: {url}")
