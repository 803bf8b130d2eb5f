"""The budget transform: give every prompt a token budget N and a kind, and state them in the prompt.

Adds the columns ``budget_tokens`` (int) and ``budget_kind`` (exact, at_most or at_least) that the
length rewards and the LenVM critic read, and writes the matching instruction ("Answer in exactly
{N} tokens.") into the last user message. A second budget, for the thinking section of a completion
(``segment="thinking"``), adds ``thinking_budget_tokens`` and ``thinking_budget_kind`` and the instruction
"Think for at most {N} tokens."; ``budget_tokens`` is then the answer's budget (the tokens after the thinking,
``rewards.segments``). Without a thinking section the answer is the whole completion.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import numpy as np
from datasets import Dataset

from lenvm_rl.errors import ConfigError
from rewards.scores import BUDGET_KINDS

DEFAULT_TEMPLATES = {
    "exact": "Answer in exactly {N} tokens.",
    "at_most": "Answer in at most {N} tokens.",
    "at_least": "Answer in at least {N} tokens.",
}
# The phrasing of L1 (Aggarwal & Welleck, 2025), which has no at_least variant.
L1_TEMPLATES = {"exact": "Think for {N} tokens.", "at_most": "Think for maximum {N} tokens."}
THINKING_TEMPLATES = {
    "exact": "Think for exactly {N} tokens.",
    "at_most": "Think for at most {N} tokens.",
    "at_least": "Think for at least {N} tokens.",
}
# The columns each segment's budget goes into; "answer" is the whole completion when there is no thinking section.
BUDGET_COLUMNS = {
    "answer": ("budget_tokens", "budget_kind"),
    "thinking": ("thinking_budget_tokens", "thinking_budget_kind"),
}


def check_budget_choices(budgets, budget_range, kinds, kinds_field: str = "kinds", prefix: str = "") -> None:
    """Refuse budgets, a budget range or kinds the transform cannot draw from: the one check, run by ``add_budgets``
    and, before any model loads or file is written, by ``DatasetArguments`` (whose field is ``budget_kinds``).
    ``prefix`` names the fields of the thinking budget (``thinking_budgets``, ``thinking_budget_range``)."""
    if budgets is not None and not (budgets and all(b == int(b) and b > 0 for b in budgets)):
        raise ConfigError(
            f"{prefix}budgets: need a non-empty list of positive integer token counts, e.g. [16, 32, 64]; got {budgets}"
        )
    if budget_range is not None and not (len(budget_range) == 2 and 0 < budget_range[0] <= budget_range[1]):
        raise ConfigError(f"{prefix}budget_range: need [low, high] with 0 < low <= high tokens, got {budget_range}")
    if not kinds:
        raise ConfigError(f"{kinds_field}: give at least one budget kind ({', '.join(BUDGET_KINDS)})")
    unknown = [kind for kind in kinds if kind not in BUDGET_KINDS]
    if unknown:
        raise ConfigError(f"{kinds_field}: {unknown} not budget kinds; use some of {', '.join(BUDGET_KINDS)}")


def check_reachable_budgets(budgets, budget_range, kinds, max_tokens: int, max_field: str) -> None:
    """Refuse budgets of which none can be met within the generation limit ``max_tokens`` (``max_field``), and warn
    (one line on stderr) about each that cannot: an exact budget beyond its 10 % tolerance, an at_least budget above
    the limit (an at_most budget always can). Its hit and length reward would never be earned, without a word."""
    import sys

    import torch

    from rewards.scores import budget_hit, budget_kind_codes

    name, candidates = ("budgets", budgets) if budgets else ("budget_range", budget_range)
    pairs = [(budget, kind) for budget in candidates or [] for kind in kinds]
    unreachable = [
        (budget, kind)
        for budget, kind in pairs  # the length nearest the budget that a completion can have is min(N, max_tokens)
        if not budget_hit(torch.tensor([min(budget, max_tokens)]), torch.tensor([budget]), budget_kind_codes([kind]))
    ]
    if not unreachable:
        return
    budget, kind = unreachable[0] if len(unreachable) == len(pairs) else unreachable[-1]
    problem = (
        f"{name}: the {kind} budget of {budget} tokens cannot be met within {max_field} {max_tokens}, so its reward "
        f"would never be earned; raise {max_field} or lower the budgets"
    )
    if len(unreachable) == len(pairs):
        raise ConfigError(problem.replace("the ", "even the smallest " if len(pairs) > 1 else "the ", 1))
    print(f"lenvm-rl: warning: {problem}", file=sys.stderr)


def add_budgets(
    dataset: Dataset,
    budgets: Sequence[int] | None = None,
    budget_range: tuple[int, int] | None = None,
    kinds: Sequence[str] = ("exact",),
    seed: int = 0,
    templates: dict[str, str] | None = None,
    prompt_column: str = "prompt",
    segment: str = "answer",
) -> Dataset:
    """Draw a budget and a kind per row and write the instruction ``templates[kind]`` with {N} = budget.

    Budgets come uniformly from ``budgets``, or log-uniformly from ``budget_range`` = (low, high):
    N = floor(exp(u)), u ~ U[ln low, ln(high + 1)), so every integer in [low, high] can come out and
    each doubling of N is equally likely. Kinds are uniform over ``kinds``. The prompt may be chat
    messages (the last user message gets the instruction) or a plain string. An instruction written
    by any known template (``DEFAULT_TEMPLATES``, ``L1_TEMPLATES``, ``templates``) is replaced, not
    repeated, so applying the transform twice re-draws the budgets.

    ``segment="thinking"`` draws the thinking section's budget instead: columns ``thinking_budget_tokens`` and
    ``thinking_budget_kind``, ``THINKING_TEMPLATES``, its own random stream (independent of the answer's draw with
    the same seed), and only thinking instructions are replaced. Apply it before the answer's transform, so that
    the prompt reads "Think for ... Answer in ...".

    >>> ds = Dataset.from_dict({"prompt": [[{"role": "user", "content": "What is 2 + 2?"}]]})
    >>> row = add_budgets(add_budgets(ds, budgets=[64]), budgets=[32], kinds=["at_most"])[0]
    >>> row["prompt"][0]["content"], row["budget_tokens"], row["budget_kind"]
    ('What is 2 + 2?\\nAnswer in at most 32 tokens.', 32, 'at_most')
    >>> row = add_budgets(add_budgets(ds, budgets=[256], kinds=["at_most"], segment="thinking"), budgets=[32])[0]
    >>> row["prompt"][0]["content"], row["thinking_budget_tokens"], row["budget_tokens"]
    ('What is 2 + 2?\\nThink for at most 256 tokens.\\nAnswer in exactly 32 tokens.', 256, 32)
    """
    if segment not in BUDGET_COLUMNS:
        raise ConfigError(f"segment: {segment!r} is not a segment; use one of {', '.join(BUDGET_COLUMNS)}")
    prefix = "thinking_" if segment == "thinking" else ""
    if templates is None:
        templates = THINKING_TEMPLATES if segment == "thinking" else DEFAULT_TEMPLATES
    if (budgets is None) == (budget_range is None):
        raise ConfigError(
            f"{prefix}budgets: give exactly one of {prefix}budgets (a list of token counts) or {prefix}budget_range "
            f"(low, high)"
        )
    check_budget_choices(budgets, budget_range, kinds, prefix=prefix)
    for kind in kinds:
        if kind not in templates:
            raise ConfigError(f"templates: no template for budget kind {kind!r}; give one containing {{N}}")
    for kind, template in templates.items():
        if "{N}" not in template:
            raise ConfigError(f"templates: the {kind!r} template {template!r} has no {{N}} where the budget goes")
    if prompt_column not in dataset.column_names:
        raise ConfigError(
            f"prompt_column: the dataset has no column {prompt_column!r} (columns: {', '.join(dataset.column_names)})"
        )

    # The answer's stream is the seed's own (as before there were two segments); the thinking's is another one.
    rng = np.random.default_rng([seed, 1] if segment == "thinking" else seed)
    if budgets is not None:
        drawn = rng.choice(np.asarray(budgets, dtype=np.int64), size=len(dataset))
    else:
        low, high = budget_range
        # The clip guards the float edge exp(ln(high + 1)) rounding up to high + 1.
        drawn = np.floor(np.exp(rng.uniform(np.log(low), np.log(high + 1), size=len(dataset)))).clip(low, high)
    budget_column = drawn.astype(np.int64).tolist()
    kind_column = [kinds[i] for i in rng.integers(len(kinds), size=len(dataset))]

    # Any instruction a known template of this segment wrote, with the whitespace that separated it from the prompt.
    if segment == "thinking":
        known = {*THINKING_TEMPLATES.values(), *templates.values()}
    else:
        known = {*DEFAULT_TEMPLATES.values(), *L1_TEMPLATES.values(), *templates.values()}
    previous = re.compile(r"\s*(?:" + "|".join(re.escape(t).replace(r"\{N\}", r"\d+") for t in known) + ")")

    def write(row, index):
        instruction = templates[kind_column[index]].replace("{N}", str(budget_column[index]))
        prompt = row[prompt_column]
        if isinstance(prompt, str):
            prompt = f"{previous.sub('', prompt)}\n{instruction}"
        else:
            prompt = [dict(message) for message in prompt]
            users = [message for message in prompt if message["role"] == "user"]
            if not users:
                raise ConfigError(f"{prompt_column}: a prompt has no user message to write the budget into: {prompt}")
            users[-1]["content"] = f"{previous.sub('', users[-1]['content'])}\n{instruction}"
        tokens_column, kinds_column = BUDGET_COLUMNS[segment]
        return {prompt_column: prompt, tokens_column: budget_column[index], kinds_column: kind_column[index]}

    return dataset.map(write, with_indices=True)
