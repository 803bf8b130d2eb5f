"""`lenvm-rl <stage> --config recipe.yaml [--field value ...]` (also `python -m lenvm_rl`).

Every stage parses its recipe with TRL's ``TrlParser``: YAML values become defaults, flags override
them. A mistake a user can fix (``ConfigError``, or a recipe field the stage does not know) is printed
as one line naming the field and the fix, with exit status 2 and no traceback; so is a disk that fills up
(rollout shards are renamed in whole and evaluate's lines fsynced, so the same command finishes the work).
"""

from __future__ import annotations

import sys

from lenvm_rl.errors import ConfigError

STAGES = {
    "rollout": ("lenvm_rl.rollout", "sample K completions per prompt into a rollout dataset"),
    "train-lenvm": ("lenvm_rl.train_lenvm", "train a Length Value Model on rollouts"),
    "predict-length": (
        "lenvm_rl.predict_length",
        "compare the LenVM's prompt-boundary prediction with sampled lengths",
    ),
    "grpo": ("lenvm_rl.grpo", "GRPO with per-token LenVM length advantages"),
    "ppo": ("lenvm_rl.ppo", "PPO with a learned task critic plus the LenVM's per-token length advantages"),
    "length-tokens": ("lenvm_rl.length_tokens", "the tokens whose LenVM TD residual most often passes ±threshold"),
    "evaluate": ("lenvm_rl.evaluate", "accuracy, tokens, length score and hit rate per budget; table and plots"),
    "rewards": ("lenvm_rl.cli", "list the reward registry (name, formula, columns read)"),
    "push": ("lenvm_rl.push", "upload a trained adapter or LenVM with a generated model card to the Hub"),
}


def rewards_main(argv: list[str] | None = None) -> None:
    """`lenvm-rl rewards`: the registry, one reward a line. Takes no arguments, and says so when given some."""
    from rewards import describe_rewards

    argv = list(argv or ())
    if argv[:1] in (["-h"], ["--help"]):
        print("usage: lenvm-rl rewards   (lists the reward registry: name, formula, columns read)")
        return
    if argv:
        raise ConfigError(f"rewards: takes no arguments, got {' '.join(argv)!r}; run `lenvm-rl rewards`")

    rows = describe_rewards()
    width = max(len(r["name"]) for r in rows)
    for row in rows:
        print(f"{row['name']:<{width}}  {row['formula']}  [reads: {', '.join(row['columns']) or '-'}]")


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] not in STAGES and argv[0] not in ("-h", "--help"):
        print(f"lenvm-rl: error: unknown stage {argv[0]!r}; use one of {', '.join(STAGES)}", file=sys.stderr)
        sys.exit(2)
    if not argv or argv[0] in ("-h", "--help"):
        print("usage: lenvm-rl <stage> --config recipe.yaml [--field value ...]\n\nstages:")
        for name, (_, summary) in STAGES.items():
            print(f"  {name:<15} {summary}")
        sys.exit(0 if argv else 2)
    stage, rest = argv[0], argv[1:]
    try:
        if stage == "rewards":
            rewards_main(rest)
        else:
            import importlib

            importlib.import_module(STAGES[stage][0]).main(rest)
    except ConfigError as error:
        print(f"lenvm-rl {stage}: error: {error}", file=sys.stderr)
        sys.exit(2)
    except Exception as error:  # a full disk in any stage (training stages say which checkpoint themselves)
        from lenvm_rl.outputs import full_disk

        if not full_disk(error):
            raise
        detail = str(error).splitlines()[0][:120]
        print(
            f"lenvm-rl {stage}: error: output_dir: the disk is full ({detail}); what was written before is kept "
            f"whole: free space and rerun the same command",
            file=sys.stderr,
        )
        sys.exit(2)
