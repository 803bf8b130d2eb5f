"""Reading what ``lenvm-rl rollout`` wrote: its manifest's name and the shards as one dataset.

The stages that read rollouts (``train-lenvm``, ``predict-length``, ``length-tokens``) import this module, not the
rollout stage. Row columns: docs/DESIGN.md §2.1.
"""

from __future__ import annotations

from pathlib import Path

from datasets import Dataset, concatenate_datasets, load_from_disk

from lenvm_rl.errors import ConfigError

MANIFEST = "rollout_args.json"


def load_rollouts(path: str | Path) -> Dataset:
    """All shards of a rollout folder as one dataset, in prompt order."""
    shard_dir = Path(path) / "shards"
    shards = sorted(shard_dir.glob("shard-*")) if shard_dir.is_dir() else []
    if not shards:
        raise ConfigError(f"rollouts_path: {path} holds no rollout shards; run `lenvm-rl rollout` into it first")
    return concatenate_datasets([load_shard(shard) for shard in shards])


def load_shard(shard: Path) -> Dataset:
    try:
        dataset = load_from_disk(str(shard))
        dataset.data.validate(full=True)  # the columns are memory-mapped: a cut-off file shows only when read
        return dataset
    except Exception as error:  # a truncated arrow file, a cut-off state.json: pyarrow and json raise many types
        raise ConfigError(
            f"rollouts_path: the shard {shard} is corrupt ({type(error).__name__}: {str(error).splitlines()[0][:80]}); "
            f"delete that folder and rerun `lenvm-rl rollout` with the same recipe: it samples that shard again"
        ) from None


def check_rollout_tokenizer(rollouts_path: str, backbone: str, tokenizer) -> None:
    """Refuse a LenVM backbone whose vocabulary differs from the policy's that sampled the rollouts."""
    import json

    from lenvm_rl.loading import load_tokenizer

    manifest = Path(rollouts_path) / MANIFEST
    policy = json.loads(manifest.read_text())["model_name_or_path"] if manifest.exists() else None
    if policy is None or policy == backbone:
        return
    try:
        policy_vocab = load_tokenizer(policy).get_vocab()
    except ConfigError:  # the policy folder moved or was deleted since the rollouts were sampled
        raise ConfigError(
            f"rollouts_path: {rollouts_path} was sampled from the policy {policy!r} ({manifest}), which cannot be "
            f'loaded now; if it moved, set "model_name_or_path" in {manifest} to its new path'
        ) from None
    if policy_vocab != tokenizer.get_vocab():
        raise ConfigError(
            f"model_name_or_path: the LenVM backbone {backbone!r} has another tokenizer than the policy {policy!r} "
            f"that sampled {rollouts_path}; a LenVM must share its policy's vocabulary: use a backbone of that family"
        )
