"""Length scores S(L, N, kind) of a completion of L tokens against a budget of N: rewards and the critic share them.

The length rewards (``rewards.length``) score a whole completion with them; the LenVM's budget potentials
(``lenvm_rl.advantages``) score predicted lengths with the same functions, so the sequence-level reward and the
critic's per-token advantage can differ only in credit assignment (docs/DESIGN.md §3.5). Pure tensor functions:
shapes broadcast, lengths may be fractional, kinds are ``BudgetKind`` codes (``budget_kind_codes``).
"""

from __future__ import annotations

from enum import IntEnum

import torch


class BudgetKind(IntEnum):
    """A budget's kind as the code a tensor holds; ``BUDGET_KINDS[code]`` is its name in datasets and recipes."""

    EXACT = 0  # L = N (within EXACT_TOLERANCE for a hit)
    AT_MOST = 1  # L <= N
    AT_LEAST = 2  # L >= N


BUDGET_KINDS = tuple(kind.name.lower() for kind in BudgetKind)  # ("exact", "at_most", "at_least")


def budget_kind_codes(kinds) -> torch.Tensor:
    """Map budget kind names to integer codes (index in ``BUDGET_KINDS``). Unknown names raise."""
    codes = []
    for kind in kinds:
        if kind not in BUDGET_KINDS:
            raise ValueError(f"budget_kind: {kind!r} is not one of {', '.join(BUDGET_KINDS)}")
        codes.append(BUDGET_KINDS.index(kind))
    return torch.tensor(codes, dtype=torch.long)


def lifebench_length_score(lengths: torch.Tensor, budgets: torch.Tensor, kinds: torch.Tensor) -> torch.Tensor:
    """LIFEBench length score in [0, 1] (the benchmark's LS / 100).

    LD = (L - N) / N. exact: e^{5 LD} if LD < 0, e^{-2 LD} if LD > 0; at_most: 1 if L <= N else
    e^{-2 LD}; at_least: 1 if L >= N else e^{5 LD}.  ``kinds`` holds codes from ``budget_kind_codes``.
    Shapes broadcast; lengths may be fractional (predicted lengths).

    >>> lifebench_length_score(torch.tensor([8., 16., 32.]), torch.tensor([16., 16., 16.]), torch.tensor([0, 0, 0]))
    tensor([0.0821, 1.0000, 0.1353])
    """
    lengths, budgets = torch.as_tensor(lengths).double(), torch.as_tensor(budgets).double()
    deviation = (lengths - budgets) / budgets
    short = torch.exp(5.0 * deviation.clamp(max=0.0))  # penalty for being too short
    long = torch.exp(-2.0 * deviation.clamp(min=0.0))  # penalty for being too long
    exact, at_most = kinds == BudgetKind.EXACT, kinds == BudgetKind.AT_MOST
    score = torch.where(exact, short * long, torch.where(at_most, long, short))
    return score.float()


EXACT_TOLERANCE = 0.10  # an exact budget counts as hit when |L - N| / N <= 10 %


def budget_hit(lengths: torch.Tensor, budgets: torch.Tensor, kinds: torch.Tensor) -> torch.Tensor:
    """Whether each length meets its budget: exact |L - N| / N <= 10 %, at_most L <= N, at_least L >= N.

    >>> budget_hit(torch.tensor([30, 40, 40]), torch.tensor([32, 32, 32]), torch.tensor([0, 0, 2]))
    tensor([ True, False,  True])
    """
    lengths, budgets = torch.as_tensor(lengths).double(), torch.as_tensor(budgets).double()
    exact = (lengths - budgets).abs() / budgets <= EXACT_TOLERANCE
    is_exact, is_at_most = kinds == BudgetKind.EXACT, kinds == BudgetKind.AT_MOST
    return torch.where(is_exact, exact, torch.where(is_at_most, lengths <= budgets, lengths >= budgets))


def l1_length_score(
    lengths: torch.Tensor, budgets: torch.Tensor, kinds: torch.Tensor, alpha: float = 0.0003, delta: float = 0.5
) -> torch.Tensor:
    """L1 (Aggarwal & Welleck, 2025) length scores.

    exact: -α |L - N| (L1-Exact); at_most: clip(α (N - L) + δ, 0, 1) (L1-Max); at_least mirrors
    L1-Max: clip(α (L - N) + δ, 0, 1).
    """
    lengths, budgets = torch.as_tensor(lengths).double(), torch.as_tensor(budgets).double()
    exact = -alpha * (lengths - budgets).abs()
    at_most = (alpha * (budgets - lengths) + delta).clamp(0.0, 1.0)
    at_least = (alpha * (lengths - budgets) + delta).clamp(0.0, 1.0)
    score = torch.where(kinds == BudgetKind.EXACT, exact, torch.where(kinds == BudgetKind.AT_MOST, at_most, at_least))
    return score.float()


LENGTH_SCORES = {"lifebench": lifebench_length_score, "l1": l1_length_score}  # GRPOConfig's length_score
