"""Reward functions, one contract (TRL's), registered by name.

``fn(prompts, completions, completion_ids, **kwargs) -> list[float | None]``: one value per completion;
dataset columns (``answer``, ``budget_tokens``, ``budget_kind``, ...) arrive as kwargs, and extra kwargs
are ignored. Built-in rewards are small picklable classes whose instances carry a stable ``__name__``
(TRL logs each under ``rewards/<__name__>/mean``). A recipe names a reward from ``REWARDS`` or gives
the ``module:function`` path of its own; the CLI help and the README table come from ``describe_rewards``.
"""

from __future__ import annotations

import importlib
import inspect

from rewards.base import AsyncCheckedReward, CheckedReward
from rewards.correctness import Accuracy, extract_final_answer, is_correct
from rewards.errors import ConfigError
from rewards.format import AnswerFormat
from rewards.length import (
    AnswerLengthScore,
    CosineLength,
    L1Exact,
    L1Max,
    LengthScore,
    SoftOverlong,
    ThinkingLengthScore,
)

REWARDS: dict[str, type] = {
    "accuracy": Accuracy,
    "answer_format": AnswerFormat,
    "length_score": LengthScore,
    "l1_exact": L1Exact,
    "l1_max": L1Max,
    "soft_overlong": SoftOverlong,
    "cosine_length": CosineLength,
    "thinking_length_score": ThinkingLengthScore,
    "answer_length_score": AnswerLengthScore,
}


def get_reward(spec: str, **params):
    """The reward named ``spec`` in ``REWARDS``, or the object at the ``module:function`` path ``spec``.

    A class (every built-in) is instantiated with ``params``; a plain function takes none.

    >>> get_reward("l1_exact", alpha=0.001).__name__
    'l1_exact'
    """
    unknown = f"reward_funcs: unknown reward {spec!r}; known: {', '.join(REWARDS)}; or give a module:function path"
    if spec in REWARDS:
        reward = REWARDS[spec]
    elif ":" not in spec:
        raise ConfigError(unknown)
    else:
        module_name, attribute = spec.split(":", 1)
        try:
            reward = getattr(importlib.import_module(module_name), attribute)
        except (ImportError, AttributeError, ValueError) as error:  # ValueError: empty module name
            raise ConfigError(f"{unknown} ({spec} does not resolve: {error})") from None
        if not callable(reward):
            raise ConfigError(f"reward_funcs: {spec} is not callable")
    if not inspect.isclass(reward):
        if params:
            raise ConfigError(f"reward_funcs: {spec!r} is a function and takes no parameters, got {sorted(params)}")
    else:
        try:
            inspect.signature(reward).bind(**params)
        except TypeError as error:
            raise ConfigError(f"reward_funcs: bad parameters for {spec!r}: {error}") from None
        reward = reward(**params)
    if type(reward) in REWARDS.values():  # a built-in, by name or by path
        return reward
    # A user's reward: its outputs are checked at every call (one line naming it, not a traceback inside TRL).
    asynchronous = inspect.iscoroutinefunction(reward) or inspect.iscoroutinefunction(type(reward).__call__)
    return (AsyncCheckedReward if asynchronous else CheckedReward)(reward, spec)


def describe_rewards() -> list[dict]:
    """One row per registered reward: name, formula, dataset columns read, parameters (``name=default``)."""
    return [
        {
            "name": name,
            "formula": reward.formula,
            "columns": list(reward.columns),
            "params": [
                p.name if p.default is p.empty else f"{p.name}={p.default!r}"
                for p in inspect.signature(reward).parameters.values()
            ],
        }
        for name, reward in REWARDS.items()
    ]


def rewards_markdown_table() -> str:
    """``describe_rewards`` as a Markdown table (the README's reward table)."""
    lines = ["| name | formula | columns | parameters |", "| --- | --- | --- | --- |"]
    for row in describe_rewards():
        # A "|" splits a table cell even inside a code span, so it is escaped.
        formula = row["formula"].replace("|", "\\|")
        columns = ", ".join(f"`{c}`" for c in row["columns"]) or "-"
        params = ", ".join(f"`{p}`" for p in row["params"]) or "-"
        lines.append(f"| `{row['name']}` | `{formula}` | {columns} | {params} |")
    return "\n".join(lines)


__all__ = [
    "REWARDS",
    "Accuracy",
    "AnswerFormat",
    "AnswerLengthScore",
    "CosineLength",
    "L1Exact",
    "L1Max",
    "LengthScore",
    "SoftOverlong",
    "ThinkingLengthScore",
    "describe_rewards",
    "extract_final_answer",
    "get_reward",
    "is_correct",
    "rewards_markdown_table",
]
