"""The one exception type for mistakes a user can fix; the CLI prints it as one line and exits 2."""


class ConfigError(ValueError):
    """A bad recipe field, dataset, path or model: the message names the field and the fix."""


def require_single_process(stage: str) -> None:
    """Refuse a multi-process launch of a stage that writes its output from one process."""
    import os

    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1:
        raise ConfigError(
            f"{stage}: runs as one process (launched as {world}); run `lenvm-rl {stage} ...` without accelerate "
            f"launch (with use_vllm, vLLM spreads generation over the GPUs itself)"
        )
