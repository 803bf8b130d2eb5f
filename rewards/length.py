"""Length rewards, all counted in tokens: L = len(completion_ids[i]) minus a trailing EOS (see
``TokenLengthReward``). Budgeted rewards read N from the ``budget_tokens`` column and reuse the score
formulas of ``rewards.scores``, the same ones the LenVM critic turns into per-token advantages. The segment
rewards (``thinking_length_score``, ``answer_length_score``) score one segment of a completion with a thinking
section (``rewards.segments``) against that segment's budget.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from trl.rewards import get_soft_overlong_punishment

from rewards.base import TokenLengthReward, budget_tokens, column, completion_text
from rewards.correctness import is_correct
from rewards.errors import ConfigError
from rewards.scores import BUDGET_KINDS, budget_kind_codes, l1_length_score, lifebench_length_score
from rewards.segments import THINKING_MARKERS, TokenPieces, segment_length_score, split_thinking


class LengthScore(TokenLengthReward):
    """LIFEBench length score in [0, 1] for the budget N and kind stated in the prompt.

    LD = (L - N) / N; exact: e^{5 LD} when short, e^{-2 LD} when long; at_most: 1 if L <= N else
    e^{-2 LD}; at_least: 1 if L >= N else e^{5 LD}. Reads ``budget_tokens`` and ``budget_kind``.

    >>> LengthScore()(prompts=["p", "p"], completions=["", ""], completion_ids=[[7] * 16, [7] * 32],
    ...               budget_tokens=[16, 16], budget_kind=["exact", "at_most"])
    [1.0, 0.1353352814912796]
    """

    __name__ = "length_score"
    formula = "LIFEBench: LD=(L-N)/N; exact e^{5LD} if L<N else e^{-2LD}; at_most 1 if L<=N; at_least 1 if L>=N"
    columns = ("budget_tokens", "budget_kind")

    def __call__(self, prompts, completions, completion_ids, **kwargs) -> list[float]:
        budgets = budget_tokens(kwargs, self.__name__)
        kinds = budget_kind_codes(column(kwargs, "budget_kind", self.__name__))
        return lifebench_length_score(self.lengths(completion_ids), budgets, kinds).tolist()


class L1Exact(TokenLengthReward):
    """L1-Exact length penalty (Aggarwal & Welleck, 2025): R = -α |L - N|, whatever the budget kind.

    Reads ``budget_tokens``. Combine with ``accuracy`` (L1 trains on correct - α|L - N|).

    >>> L1Exact(alpha=0.01)(prompts=["p"], completions=[""], completion_ids=[[7] * 150], budget_tokens=[100])
    [-0.5]
    """

    __name__ = "l1_exact"
    formula = "-alpha * |L - N|"
    columns = ("budget_tokens",)

    def __init__(self, alpha: float = 0.0003, eos_token_id: int | Sequence[int] | None = None):
        super().__init__(eos_token_id)
        self.alpha = alpha

    def __call__(self, prompts, completions, completion_ids, **kwargs) -> list[float]:
        budgets = budget_tokens(kwargs, self.__name__)
        exact = torch.full_like(budgets, BUDGET_KINDS.index("exact"), dtype=torch.long)
        return l1_length_score(self.lengths(completion_ids), budgets, exact, alpha=self.alpha).tolist()


class L1Max(TokenLengthReward):
    """L1-Max length reward: R = clip(α (N - L) + δ, 0, 1), whatever the budget kind.

    Reads ``budget_tokens``. The paper multiplies it by correctness; here weight it beside ``accuracy``.

    >>> L1Max(alpha=0.01)(prompts=["p", "p"], completions=["", ""], completion_ids=[[7] * 50, [7] * 150],
    ...                   budget_tokens=[100, 100])
    [1.0, 0.0]
    """

    __name__ = "l1_max"
    formula = "clip(alpha * (N - L) + delta, 0, 1)"
    columns = ("budget_tokens",)

    def __init__(self, alpha: float = 0.0003, delta: float = 0.5, eos_token_id: int | Sequence[int] | None = None):
        super().__init__(eos_token_id)
        self.alpha, self.delta = alpha, delta

    def __call__(self, prompts, completions, completion_ids, **kwargs) -> list[float]:
        budgets = budget_tokens(kwargs, self.__name__)
        at_most = torch.full_like(budgets, BUDGET_KINDS.index("at_most"), dtype=torch.long)
        lengths = self.lengths(completion_ids)
        return l1_length_score(lengths, budgets, at_most, alpha=self.alpha, delta=self.delta).tolist()


class SoftOverlong(TokenLengthReward):
    """DAPO soft overlong punishment (Eq. 13), with C = ``soft_cache_tokens``, M = ``max_completion_tokens``.

    R = 0 if L <= M - C; -(L - (M - C)) / C if M - C < L <= M; -1 if L > M. Reads no column.

    >>> SoftOverlong(100, 20)(prompts=["p"] * 3, completions=[""] * 3, completion_ids=[[7] * 80, [7] * 90, [7] * 101])
    [0.0, -0.5, -1.0]
    """

    __name__ = "soft_overlong"
    formula = "0 if L <= M-C; -(L - (M-C))/C if L <= M; -1 if L > M (M: max_completion_tokens, C: soft_cache_tokens)"
    columns = ()

    def __init__(
        self, max_completion_tokens: int, soft_cache_tokens: int, eos_token_id: int | Sequence[int] | None = None
    ):
        if not 0 < soft_cache_tokens <= max_completion_tokens:
            raise ConfigError(
                f"soft_cache_tokens: must be in (0, max_completion_tokens={max_completion_tokens}], "
                f"got {soft_cache_tokens}"
            )
        super().__init__(eos_token_id)
        # TRL's version counts len(ids), EOS included; it is fed the ids with the EOS cut off.
        self.dapo = get_soft_overlong_punishment(max_completion_tokens, soft_cache_tokens)

    def __call__(self, prompts, completions, completion_ids, **kwargs) -> list[float]:
        lengths = self.lengths(completion_ids).long().tolist()
        return self.dapo([ids[:length] for ids, length in zip(completion_ids, lengths, strict=True)])


class CosineLength(TokenLengthReward):
    """Correctness-aware cosine length reward ("Demystifying Long CoT", Yeo et al. 2025, App. C.1).

    p = min(L / M, 1); R = v_end + (v_start - v_end) (1 + cos(π p)) / 2, moving from v_start at L = 0 to
    v_end at L >= M. Correct: v_start = max_value_correct, v_end = min_value_correct (shorter is better);
    wrong: v_start = min_value_wrong, v_end = max_value_wrong (longer is penalised less). Reads ``answer``.
    Reimplemented rather than TRL's ``get_cosine_scaled_reward`` so that it uses the shared ``is_correct``.

    >>> CosineLength(max_completion_tokens=100)(prompts=["p"] * 2, completions=["#### 4", "#### 5"],
    ...                                         completion_ids=[[7] * 50] * 2, answer=["4", "4"])
    [0.75, -0.75]
    """

    __name__ = "cosine_length"
    formula = "v_end + (v_start - v_end)(1 + cos(pi min(L/M, 1)))/2; correct 1.0 -> 0.5, wrong -1.0 -> -0.5"
    columns = ("answer",)

    def __init__(
        self,
        max_completion_tokens: int,
        min_value_wrong: float = -1.0,
        max_value_wrong: float = -0.5,
        min_value_correct: float = 0.5,
        max_value_correct: float = 1.0,
        eos_token_id: int | Sequence[int] | None = None,
    ):
        if max_completion_tokens <= 0:
            raise ConfigError(f"max_completion_tokens: must be positive, got {max_completion_tokens}")
        super().__init__(eos_token_id)
        self.max_completion_tokens = max_completion_tokens
        self.min_value_wrong, self.max_value_wrong = min_value_wrong, max_value_wrong
        self.min_value_correct, self.max_value_correct = min_value_correct, max_value_correct

    def __call__(self, prompts, completions, completion_ids, **kwargs) -> list[float]:
        answers = column(kwargs, "answer", self.__name__)
        rewards = []
        for completion, answer, length in zip(completions, answers, self.lengths(completion_ids).tolist(), strict=True):
            if is_correct(completion_text(completion), answer):
                start, end = self.max_value_correct, self.min_value_correct
            else:
                start, end = self.min_value_wrong, self.max_value_wrong
            # Clamp at M: cos is periodic, so past M the schedule would swing back towards v_start.
            progress = min(length / self.max_completion_tokens, 1.0)
            rewards.append(end + (start - end) * (1.0 + math.cos(math.pi * progress)) / 2)
        return rewards


class ThinkingLengthScore(TokenLengthReward):
    """LIFEBench length score of the thinking section against the thinking budget; 0 when the thinking never closed.

    The thinking segment is the completion up to and including the closing marker (``rewards.segments``); a
    completion that does not think has 0 thinking tokens. Reads ``thinking_budget_tokens`` and
    ``thinking_budget_kind``. Needs the policy's tokenizer to read the markers in the token ids (``grpo`` and ``ppo``
    pass it, with the recipe's ``thinking_markers`` and whether the chat template opens the thinking).

    >>> class Words:  # a tokenizer: id -> text
    ...     def decode(self, ids, skip_special_tokens=False):
    ...         return ["<think>", "hm", "</think>", " 4"][ids[0]]
    >>> ThinkingLengthScore(Words())(prompts=["p"] * 2, completions=[""] * 2, completion_ids=[[0, 1, 2, 3], [0, 1, 1]],
    ...                              thinking_budget_tokens=[3, 3], thinking_budget_kind=["exact", "at_most"])
    [1.0, 0.0]
    """

    __name__ = "thinking_length_score"
    formula = "LIFEBench score of the thinking tokens (through </think>) vs thinking_budget_tokens; 0 if never closed"
    columns = ("thinking_budget_tokens", "thinking_budget_kind")
    segment = "thinking"

    def __init__(
        self,
        tokenizer,
        thinking_markers: Sequence[str] = THINKING_MARKERS,
        starts_in_thinking: bool = False,
        eos_token_id: int | Sequence[int] | None = None,
    ):
        super().__init__(eos_token_id)
        self.pieces, self.markers, self.starts_in_thinking = (
            TokenPieces(tokenizer),
            tuple(thinking_markers),
            starts_in_thinking,
        )

    def segments(self, completion_ids: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Thinking tokens, answer tokens (float64 (B,)) and whether the thinking closed (bool (B,))."""
        lengths = self.lengths(completion_ids).long().tolist()
        rows = [
            split_thinking(self.pieces(ids[:length]), self.markers, self.starts_in_thinking)
            for ids, length in zip(completion_ids, lengths, strict=True)
        ]
        thinking, answer, closed = zip(*rows) if rows else ((), (), ())
        return (
            torch.tensor(thinking, dtype=torch.float64),
            torch.tensor(answer, dtype=torch.float64),
            torch.tensor(closed, dtype=torch.bool),
        )

    def __call__(self, prompts, completions, completion_ids, **kwargs) -> list[float]:
        tokens_column, kinds_column = self.columns
        budgets = budget_tokens(kwargs, self.__name__, tokens_column, whole=False)
        kinds = budget_kind_codes(column(kwargs, kinds_column, self.__name__))
        thinking, answer, closed = self.segments(completion_ids)
        lengths = thinking if self.segment == "thinking" else answer
        return segment_length_score(lengths, budgets, kinds, closed).tolist()


class AnswerLengthScore(ThinkingLengthScore):
    """LIFEBench length score of the answer (the tokens after the thinking section) against ``budget_tokens``;
    0 when the thinking never closed (there is no answer). Without a thinking section the answer is the whole
    completion and this is ``length_score``. Reads ``budget_tokens`` and ``budget_kind``; needs the tokenizer.
    """

    __name__ = "answer_length_score"
    formula = "LIFEBench score of the tokens after </think> vs budget_tokens; 0 if the thinking never closed"
    columns = ("budget_tokens", "budget_kind")
    segment = "answer"
