"""What every reward shares: the completion's text, its length in tokens, and the dataset columns it reads.

The contract is TRL's: ``fn(prompts, completions, completion_ids, **kwargs) -> list[float | None]``, one
value per completion. Dataset columns arrive as kwargs (one value per completion); so do TRL's
``trainer_state``, ``log_extra`` and ``log_metric``, which rewards here ignore.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence

import torch

from rewards.errors import ConfigError

BUDGET_FIX = "add budgets with the budget transform: dataset.budgets in the recipe, or lenvm_rl.budgets.add_budgets"
THINKING_BUDGET_FIX = "add thinking budgets: thinking_budgets in the recipe, or add_budgets(..., segment='thinking')"
COLUMN_FIXES = {
    "answer": "give each prompt its reference answer, e.g. '72' or a GSM8K solution ending in '#### 72'",
    "budget_tokens": BUDGET_FIX,
    "budget_kind": BUDGET_FIX,
    "thinking_budget_tokens": THINKING_BUDGET_FIX,
    "thinking_budget_kind": THINKING_BUDGET_FIX,
}


def completion_text(completion: str | list[dict]) -> str:
    """The text of a plain completion, or the last message's content of a conversational one."""
    return completion if isinstance(completion, str) else completion[-1]["content"]


def column(kwargs: dict, name: str, reward_name: str) -> list:
    """The dataset column ``name`` from the reward kwargs; raise naming the column and the fix when absent."""
    if name not in kwargs:
        raise ConfigError(f"{reward_name} needs the dataset column {name!r} ({COLUMN_FIXES[name]})")
    return kwargs[name]


def budget_tokens(kwargs: dict, reward_name: str, name: str = "budget_tokens", whole: bool = True) -> torch.Tensor:
    """The column ``name`` (``budget_tokens``, or ``thinking_budget_tokens``) as a float64 tensor (B,); every
    budget must be positive (LD divides by N). ``whole``: the reward scores the whole completion's length, which
    prompts with a thinking budget do not ask for (their ``budget_tokens`` is the answer's budget)."""
    if whole and "thinking_budget_tokens" in kwargs:
        raise ConfigError(
            f"reward_funcs: {reward_name} scores the whole completion against budget_tokens, but these prompts carry "
            f"thinking budgets, so budget_tokens is the answer's budget; use thinking_length_score and "
            f"answer_length_score instead"
        )
    budgets = torch.tensor(column(kwargs, name, reward_name), dtype=torch.float64)
    if (budgets <= 0).any():
        raise ConfigError(f"{name}: every budget must be a positive number of tokens, got {budgets.min():g}")
    return budgets


class TokenLengthReward:
    """Base of the length rewards: L = number of completion tokens, a trailing EOS excluded.

    TRL's ``completion_ids`` carry no padding but keep the EOS token that ended the completion; give the
    tokenizer's ``eos_token_id`` (one id or several) so that it is not counted, as L is defined in
    docs/DESIGN.md §3.1. Without it, L = len(completion_ids[i]).
    """

    def __init__(self, eos_token_id: int | Sequence[int] | None = None):
        self.eos_token_ids = (eos_token_id,) if isinstance(eos_token_id, int) else tuple(eos_token_id or ())

    def lengths(self, completion_ids: list[list[int]]) -> torch.Tensor:
        """Token lengths L, float64 (B,)."""
        return torch.tensor(
            [len(ids) - (len(ids) > 0 and ids[-1] in self.eos_token_ids) for ids in completion_ids],
            dtype=torch.float64,
        )


def check_reward_values(values, count: int, spec: str) -> list:
    """A user reward's output as TRL reads it, refused with one line naming the reward unless it is one real number or
    None per completion. None means "no reward for this completion" (TRL leaves it out of the sum); NaN, which TRL
    reads the same way, and infinities are refused, as they come from a bug far more often than on purpose."""
    if isinstance(values, (str, bytes, dict)) or not hasattr(values, "__len__"):
        raise ConfigError(
            f"reward_funcs: {spec!r} returned a {type(values).__name__}, not a list; return one number (or None) "
            f"per completion"
        )
    values = list(values)
    if len(values) != count:
        raise ConfigError(
            f"reward_funcs: {spec!r} returned {len(values)} rewards for {count} completions; return one number "
            f"(or None) per completion"
        )
    for index, value in enumerate(values):
        if isinstance(value, torch.Tensor) and value.numel() == 1:
            value = values[index] = value.item()
        if value is None:
            continue
        if not isinstance(value, numbers.Real):
            raise ConfigError(
                f"reward_funcs: {spec!r} returned {type(value).__name__} {value!r} for completion {index}; return a "
                f"number, or None for no reward"
            )
        if not math.isfinite(value):
            raise ConfigError(
                f"reward_funcs: {spec!r} returned {value} for completion {index}; return finite numbers, or None "
                f"where a completion has no reward"
            )
    return values


class CheckedReward:
    """A user's reward (a ``module:function`` path) whose every output is checked by ``check_reward_values``. Keeps
    the reward's ``__name__``, under which TRL logs it."""

    def __init__(self, reward, spec: str):
        self.reward, self.spec = reward, spec
        self.__name__ = getattr(reward, "__name__", type(reward).__name__)

    def __call__(self, *args, **kwargs):  # TRL passes keywords; the contract's order is (prompts, completions, ...)
        return check_reward_values(self.reward(*args, **kwargs), completion_count(args, kwargs), self.spec)


class AsyncCheckedReward(CheckedReward):
    """``CheckedReward`` for an async reward, which TRL awaits alongside the others."""

    async def __call__(self, *args, **kwargs):
        return check_reward_values(await self.reward(*args, **kwargs), completion_count(args, kwargs), self.spec)


def completion_count(args: tuple, kwargs: dict) -> int:
    return len(kwargs["completions"] if "completions" in kwargs else args[1])
