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
            f"launch (with use_vllm, vllm_tensor_parallel_size spreads one model over several GPUs)"
        )


def changed_setting(previous: dict, current: dict, ignore: tuple[str, ...] = ()) -> str | None:
    """The first key (in sorted order) whose value differs between a run's saved settings and the current ones."""
    changed = sorted(k for k in (previous.keys() | current.keys()) - set(ignore) if previous.get(k) != current.get(k))
    return changed[0] if changed else None


def require_vllm(use_vllm: bool | None) -> None:
    """Refuse ``use_vllm: true`` where vLLM is not installed."""
    import importlib.util

    if use_vllm and importlib.util.find_spec("vllm") is None:
        raise ConfigError("use_vllm: vLLM is not installed; `pip install 'lenvm-rl[vllm]'` on a GPU machine, or set use_vllm: false")
