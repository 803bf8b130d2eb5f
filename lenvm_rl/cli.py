"""`lenvm-rl <stage> --config recipe.yaml [--field value ...]` (also `python -m lenvm_rl`).

Every stage parses its recipe with TRL's ``TrlParser``: YAML values become defaults, flags override
them. A mistake a user can fix (``ConfigError``, or a recipe field the stage does not know) is printed
as one line naming the field and the fix, with exit status 2 and no traceback.
"""

from __future__ import annotations

import dataclasses
import re
import sys
from pathlib import Path

from lenvm_rl.errors import ConfigError

STAGES = {
    "rollout": ("lenvm_rl.rollouts", "sample K completions per prompt into a rollout dataset"),
    "train-lenvm": ("lenvm_rl.lenvm_trainer", "train a Length Value Model on rollouts"),
    "predict-length": ("lenvm_rl.predict", "compare the LenVM's prompt-boundary prediction with sampled lengths"),
    "grpo": ("lenvm_rl.grpo", "GRPO with per-token LenVM length advantages"),
    "ppo": ("lenvm_rl.ppo", "PPO with a learned task critic plus the LenVM's per-token length advantages"),
    "length-tokens": ("lenvm_rl.length_tokens", "the tokens whose LenVM TD residual most often passes ±threshold"),
    "evaluate": ("lenvm_rl.evaluate", "accuracy, tokens, length score and hit rate per budget; table and plots"),
    "rewards": ("lenvm_rl.cli", "list the reward registry (name, formula, columns read)"),
    "push": ("lenvm_rl.hub", "upload a trained adapter or LenVM with a generated model card to the Hub"),
}


def parse_recipe(dataclass_types: tuple, argv: list[str] | None):
    """Parse ``--config`` YAML and flags into the given dataclasses; recipe mistakes become ConfigError."""
    import yaml
    from trl import TrlParser

    parser = TrlParser(dataclass_types)
    parser.error = _flag_error  # argparse would print the whole usage and exit; one line instead
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[-1:] == ["--config"]:
        raise ConfigError("config: --config needs a recipe path, e.g. --config recipes/<Model>/<stage>/config_<variant>.yaml")
    recipes = [argv[i + 1] for i, a in enumerate(argv[:-1]) if a == "--config"] + [a[9:] for a in argv if a.startswith("--config=")]
    if len(recipes) > 1:
        raise ConfigError(
            f"config: --config given {len(recipes)} times ({', '.join(recipes)}); give one recipe and override its "
            f"fields with flags (--field value)"
        )
    if recipes and Path(recipes[0]).is_dir():
        raise ConfigError(f"config: {recipes[0]!r} is a folder; give the recipe's YAML file inside it")
    try:
        return parser.parse_args_and_config(argv)
    except ConfigError:
        raise
    except FileNotFoundError as error:
        raise ConfigError(f"config: no recipe file {error.filename!r}; give an existing YAML path") from None
    except yaml.YAMLError as error:
        where = getattr(error, "problem_mark", None)
        raise ConfigError(
            f"config: the recipe is not valid YAML ({getattr(error, 'problem', None) or type(error).__name__}"
            f"{f' at line {where.line + 1}' if where else ''}); write one `field: value` per line"
        ) from None
    except ValueError as error:
        message = str(error).splitlines()[0]
        if "Unknown arguments" in message:
            fields = ", ".join(re.findall(r"'--([^']+)'", message))
            message = f"recipe: unknown field(s) {fields}; fix the spelling or remove them (`--help` lists the fields)"
        elif "not used by the HfArgumentParser" in message:
            flags = ", ".join(re.findall(r"'(--?[^']+)'", message))
            message = f"{flags}: unknown flag(s); fix the spelling or remove them (`--help` lists the fields)"
        elif "must contain a YAML mapping" in message:
            message = "config: the recipe must be a YAML mapping of `field: value` lines, not a list or a scalar"
        elif not re.match(r"\w+: ", message):  # a library's own check: name the fields it is about
            names = {f.name for t in dataclass_types for f in dataclasses.fields(t)}
            mentioned = [w for w in dict.fromkeys(re.findall(r"\w+", message)) if w in names] or ["recipe"]
            message = f"{' / '.join(mentioned)}: {message}"
        raise ConfigError(message) from None


def _flag_error(message: str):
    """argparse's complaint about one flag or recipe value, e.g. "argument --num_prompts/--num-prompts: invalid
    int value: 'many'", as ``num_prompts: invalid int value: 'many'``."""
    match = re.match(r"argument --([\w-]+)(?:/--[\w-]+)*: (.*)", message)
    field, problem = match.groups() if match else ("recipe", message)
    raise ConfigError(f"{field}: {problem}; fix the value in the recipe or the flag")


def rewards_main(argv: list[str] | None = None) -> None:
    from rewards import describe_rewards

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
