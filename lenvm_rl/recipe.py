"""Recipes: ``--config`` YAML plus ``--field value`` flags into a stage's dataclasses, with TRL's ``TrlParser``.

YAML values become defaults and flags override them. A recipe mistake (an unknown field, a bad value, a YAML
error, a library's own check) becomes one ``ConfigError`` line naming the field and the fix; ``cli.main`` prints it
and exits 2 (docs/DESIGN.md §2.4). Every stage's ``main(argv)`` parses with ``parse_recipe``.
"""

from __future__ import annotations

import dataclasses
import re
import sys
from pathlib import Path

from lenvm_rl.errors import ConfigError


def parse_recipe(dataclass_types: tuple, argv: list[str] | None):
    """Parse ``--config`` YAML and flags into the given dataclasses; recipe mistakes become ConfigError."""
    import yaml
    from trl import TrlParser

    parser = TrlParser(dataclass_types)
    parser.error = _flag_error  # argparse would print the whole usage and exit; one line instead
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[-1:] == ["--config"]:
        raise ConfigError(
            "config: --config needs a recipe path, e.g. --config recipes/<Model>/<stage>/config_<variant>.yaml"
        )
    recipes = [argv[i + 1] for i, a in enumerate(argv[:-1]) if a == "--config"] + [
        a[9:] for a in argv if a.startswith("--config=")
    ]
    if len(recipes) > 1:
        raise ConfigError(
            f"config: --config given {len(recipes)} times ({', '.join(recipes)}); give one recipe and override its "
            f"fields with flags (--field value)"
        )
    if recipes and Path(recipes[0]).is_dir():
        raise ConfigError(f"config: {recipes[0]!r} is a folder; give the recipe's YAML file inside it")
    try:
        parsed = parser.parse_args_and_config(argv)
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
    for instance in parsed:
        if dataclasses.is_dataclass(instance):
            check_numbers(instance)
    return parsed


# Ranges by field name, wherever the field appears: a name means the same in every stage's dataclasses (TRL's,
# transformers' and PEFT's included). None (unset) always passes; stage-specific bounds live in each __post_init__.
RANGES = {
    "top_p": (lambda v: 0 < v <= 1, "lie in (0, 1]"),
    "temperature": (lambda v: v >= 0, "be >= 0"),
    "beta": (lambda v: v >= 0, "be >= 0 (0 turns the KL term off)"),
    "epsilon": (lambda v: v > 0, "be > 0 (the clip range)"),
    "epsilon_high": (lambda v: v > 0, "be > 0 (the upper clip range)"),
    "max_grad_norm": (lambda v: v >= 0, "be >= 0 (0 turns clipping off)"),
    "num_iterations": (lambda v: v >= 1, "be a positive number of passes"),
    "gradient_accumulation_steps": (lambda v: v >= 1, "be a positive number of steps"),
    "lora_r": (lambda v: v >= 1, "be a positive rank"),
    "lora_alpha": (lambda v: v > 0, "be > 0"),
    "save_steps": (lambda v: v > 0, "be positive (steps, or a fraction of the run below 1)"),
    "logging_steps": (lambda v: v > 0, "be positive (steps, or a fraction of the run below 1)"),
    "eval_steps": (lambda v: v > 0, "be positive (steps, or a fraction of the run below 1)"),
    "warmup_steps": (lambda v: v >= 0, "be >= 0"),
    "num_train_epochs": (lambda v: v > 0, "be > 0"),
    "head_hidden_size": (lambda v: v >= 1, "be a positive width, or unset"),
    "max_sequence_tokens": (lambda v: v >= 1, "be a positive number of tokens, or unset"),
}


def check_numbers(instance) -> None:
    """Refuse, in any stage's dataclass and before any model loads: a NaN or infinite number in any field (a
    comparison with NaN is False, so a range check lets it through and it poisons the first step), a seed outside
    numpy's [0, 2**32 - 1], and a value outside its field's ``RANGES``."""
    import math

    for field in dataclasses.fields(instance):
        value = getattr(instance, field.name)
        for number in value if isinstance(value, (list, tuple)) else [value]:
            if isinstance(number, float) and not math.isfinite(number):
                raise ConfigError(f"{field.name}: must be a finite number, got {value!r}")
        is_seed = field.name == "seed" or field.name.endswith("_seed")
        if is_seed and isinstance(value, int) and not 0 <= value < 2**32:
            raise ConfigError(f"{field.name}: must be an integer in [0, 2**32 - 1], got {value}")
        in_range, bound = RANGES.get(field.name, (None, None))
        if in_range and isinstance(value, (int, float)) and not isinstance(value, bool) and not in_range(value):
            raise ConfigError(f"{field.name}: must {bound}, got {value}")


def _flag_error(message: str):
    """argparse's complaint about one flag or recipe value, e.g. "argument --num_prompts/--num-prompts: invalid
    int value: 'many'", as ``num_prompts: invalid int value: 'many'``."""
    match = re.match(r"argument --([\w-]+)(?:/--[\w-]+)*: (.*)", message)
    field, problem = match.groups() if match else ("recipe", message)
    raise ConfigError(f"{field}: {problem}; fix the value in the recipe or the flag")
