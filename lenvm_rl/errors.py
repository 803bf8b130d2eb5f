"""``ConfigError``, the one exception for mistakes a user can fix (the CLI prints it as one line and exits 2), and
the refusals several stages share: a launch the stage cannot run under, counts a Trainer would misread.

``ConfigError`` is defined in ``rewards.errors`` (rewards raise it and import nothing from ``lenvm_rl``); import it
from here inside ``lenvm_rl`` (docs/DESIGN.md §2.4).
"""

from rewards.errors import ConfigError

__all__ = ["ConfigError", "check_training_counts", "require_launched_world"]


def require_launched_world(world_size: int) -> None:
    """Refuse a run that sees fewer processes than its launcher started: each would train alone as rank 0 and
    write the same output_dir (a torchrun-style WORLD_SIZE with a recipe that lets accelerate pick a GPU setup)."""
    import os

    launched = int(os.environ.get("WORLD_SIZE", "1"))
    if launched > 1 and world_size != launched:
        raise ConfigError(
            f"use_cpu: launched as {launched} processes (WORLD_SIZE) but this run sees {world_size}, so each would "
            f"train alone and write the same output_dir; on a machine without GPUs set use_cpu: true in the recipe, "
            f"else make every process's GPU visible (accelerate launch sets LOCAL_RANK)"
        )


def check_training_counts(config) -> None:
    """Refuse TrainingArguments counts a Trainer would crash on or silently reinterpret (max_steps 0 trains
    num_train_epochs); called before ``TrainingArguments.__post_init__``, some of whose checks divide by them."""
    if config.max_steps == 0 or config.max_steps < -1:
        raise ConfigError(f"max_steps: must be positive, or -1 to train num_train_epochs; got {config.max_steps}")
    if config.per_device_train_batch_size < 1:
        raise ConfigError(f"per_device_train_batch_size: must be positive, got {config.per_device_train_batch_size}")
    if config.learning_rate < 0:
        raise ConfigError(f"learning_rate: must be >= 0, got {config.learning_rate}")
