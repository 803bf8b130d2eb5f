"""Pure tensor math for two budgets in one completion: per-token length advantages per segment (thinking, answer).

A completion with a thinking section is T thinking tokens (through the closing marker), then L - T answer tokens
(``rewards.segments``). A two-value LenVM (``segment_values``) gives at every state the remaining thinking tokens and
the remaining answer tokens (``returns.segment_value_targets``). Here each token is credited against the budget of
its own segment, with that segment's value: thinking tokens against the thinking budget with V_think, answer tokens
against the answer budget with V_answer, each segment with its own potential (or TD residuals) and its own GAE, the
same modes, potentials, baselines and EOS conventions as ``advantages.length_advantages`` (docs/DESIGN.md §3.7-§3.9,
§3.15). Like ``advantages.py`` it has no trainer, accelerate or I/O imports and is tested against plain loops
(``tests/test_segment_advantages.py``). Index 0 of a last dimension of 2 is the thinking segment, 1 the answer.
"""

from __future__ import annotations

import torch

from lenvm_rl.advantages import LENGTH_ADVANTAGE_MODES, LENGTH_POTENTIALS, expected_length_score
from lenvm_rl.returns import masked_gae, remaining_from_value
from rewards.scores import LENGTH_SCORES


def segment_token_masks(
    completion_mask: torch.Tensor, thinking_lengths: torch.Tensor, thinking_closed: torch.Tensor
) -> torch.Tensor:
    """Which segment each completion token (action) belongs to, (B, T, 2) bool: thinking, answer.

    Token j < T_think is thinking; every later token is answer, the EOS included: it is chosen once the thinking has
    closed and ends the answer. A row whose thinking never closed is all thinking (T_think = L), its EOS too: it ended
    the completion mid-thought. The two masks partition ``completion_mask``.
    """
    mask = completion_mask.bool()
    tokens = torch.arange(mask.size(1), device=mask.device)
    thinking = mask & ((tokens[None, :] < thinking_lengths[:, None]) | ~thinking_closed.bool()[:, None])
    return torch.stack([thinking, mask & ~thinking], dim=-1)


def segment_realised_scores(
    lengths: torch.Tensor,
    thinking_lengths: torch.Tensor,
    thinking_closed: torch.Tensor,
    budgets: torch.Tensor,
    kinds: torch.Tensor,
    score: str = "lifebench",
) -> torch.Tensor:
    """Each segment's realised length score S(T_think, N_think) and S(L - T_think, N_answer), 0 for both when the
    thinking never closed (no answer was given: ``rewards.segments.segment_length_score``). Shapes: lengths,
    thinking_lengths, thinking_closed (B,), budgets and kinds (B, 2) -> (B, 2) float64."""
    segment_lengths = torch.stack([thinking_lengths, lengths - thinking_lengths], dim=-1).double()  # (B, 2)
    scores = LENGTH_SCORES[score](segment_lengths, budgets, kinds).double()
    return torch.where(thinking_closed.bool()[:, None], scores, 0.0)


def segment_length_advantages(
    values: torch.Tensor,
    completion_mask: torch.Tensor,
    finished: torch.Tensor,
    thinking_lengths: torch.Tensor,
    thinking_closed: torch.Tensor,
    gamma: float,
    lam: float,
    mode: str,
    budgets: torch.Tensor | None = None,
    kinds: torch.Tensor | None = None,
    score: str = "lifebench",
    discount: float | None = None,
    eos_credit: bool = False,
    potential: str = "point",
    max_completion_tokens: int | None = None,
    anchors: torch.Tensor | None = None,
) -> torch.Tensor:
    """Per-token length advantages of each segment (B, T, 2): [..., 0] on thinking tokens, [..., 1] on answer tokens
    (``segment_token_masks``), 0 elsewhere; their sum over the last dimension is the row's A_len.

    Each segment h is scored as ``advantages.length_advantages`` scores a whole completion, over its own tokens and
    with its own value V_h, states s_j for j in the segment and one terminal state after it:

    - Ends. The thinking of a closed row ends at s_T (T = thinking tokens): the close is made, T is known, and
      Φ_think = S(T, N_think) from there on. Unclosed and finished (EOS mid-thought): the thinking ends like a
      finished completion (at s_L, or after the EOS with ``eos_credit``) with the score 0 (no answer was given).
      The answer of a finished closed row ends at s_L (after the EOS with ``eos_credit``), with S(L - T, N_answer).
      A truncated row bootstraps the open segment from its potential at s_L.
    - budget: Φ_think_j = S(j + n̂_think(V_think_j), N_think), Φ_answer_j = S((j - T) + n̂_answer(V_answer_j),
      N_answer) (``potential="point"``; ``"expected"``: E[S(start + n)] with n capped at ``max_completion_tokens``
      - j). δ_j = d Φ_{j+1} - Φ_j, GAE over the segment's tokens. With d = λ = 1 a thinking token gets
      S(T, N_think) - Φ_think_j and an answer token S(L - T, N_answer) - Φ_answer_j. ``anchors`` (B, 2) shift each
      segment's non-terminal potentials so that its first state's is the anchor (the group baseline).
    - efficiency: δ_j = r_j + d V_h(s_{j+1}) - V_h(s_j) with r_j = -(1 - γ) on the segment's non-EOS tokens, 0 on the
      EOS, and V_h := 0 at the segment's end: each segment's own TD residuals (``returns.segment_td_residuals``).
    - shaping: A_j = d Φ_{j+1} - Φ_j with Φ = V_h and Φ := 0 at the end; ``lam`` unused.

    Shapes: values (B, T + 1, 2) = (V_think, V_answer)(s_0 .. s_T) as the LenVM gives them (entries past a row's
    states are ignored), completion_mask (B, T) (TRL's, the EOS included), finished, thinking_closed (B,) bool,
    thinking_lengths (B,) tokens (L for an unclosed row), budgets and kinds (B, 2), anchors (B, 2). Returns (B, T, 2),
    dtype promoted to at least float32.
    """
    if mode not in LENGTH_ADVANTAGE_MODES:
        raise ValueError(
            f"mode: {mode!r} is not a length advantage mode; use one of {', '.join(LENGTH_ADVANTAGE_MODES)}"
        )
    if potential not in LENGTH_POTENTIALS:
        raise ValueError(f"potential: {potential!r} is unknown; use one of {', '.join(LENGTH_POTENTIALS)}")
    if mode != "budget" and (potential != "point" or anchors is not None):
        raise ValueError(f"mode: {mode!r} takes neither an expected-score potential nor anchors; use mode 'budget'")
    discount = gamma if discount is None else discount
    mask, finished, closed = completion_mask.bool(), finished.bool(), thinking_closed.bool()
    device, num_tokens = mask.device, mask.size(1)
    lengths = mask.long().sum(1) - finished.long()  # (B,) L, EOS excluded
    thinking = thinking_lengths.long().to(device)  # (B,) T
    if (thinking > lengths).any() or (thinking < 0).any() or (thinking[~closed] != lengths[~closed]).any():
        raise ValueError("thinking_lengths: must lie in [0, L] for every row, and be L where the thinking never closed")
    steps = torch.arange(num_tokens + 1, device=device)[None, :]  # (1, T + 1) state index j
    token_masks = segment_token_masks(mask, thinking, closed)  # (B, T, 2)
    completion_end = (finished & closed)[:, None] & (steps >= (lengths + int(eos_credit))[:, None])
    thinking_end = (closed[:, None] & (steps >= thinking[:, None])) | (
        (finished & ~closed)[:, None] & (steps >= (lengths + int(eos_credit))[:, None])
    )  # (B, T + 1): closed rows end the thinking at s_T, unclosed finished rows as a whole completion ends
    ends = torch.stack([thinking_end, completion_end], dim=-1)  # (B, T + 1, 2)
    dtype = torch.promote_types(values.dtype, torch.float32)
    values = values.to(dtype)
    zeros = torch.zeros_like(values[:, 1:, 0])  # (B, T)
    if mode in ("efficiency", "shaping"):
        values = values.masked_fill(ends, 0.0)
        eos_action = finished[:, None] & (steps[:, :-1] >= lengths[:, None])  # (B, T)
        rewards = torch.full_like(zeros, -(1.0 - gamma)).masked_fill(eos_action, 0.0)
        gae = (rewards, lam) if mode == "efficiency" else (zeros, 0.0)
        return torch.stack(
            [masked_gae(gae[0], values[..., h], token_masks[..., h], discount, gae[1])[0] for h in range(2)], dim=-1
        )
    if budgets is None or kinds is None:
        raise ValueError("mode: 'budget' needs both segments' budgets and kinds (B, 2)")
    if score not in LENGTH_SCORES:
        raise ValueError(f"score: {score!r} is not a length score; use one of {', '.join(LENGTH_SCORES)}")
    budgets, kinds = torch.as_tensor(budgets, device=device), torch.as_tensor(kinds, device=device)
    written = torch.stack([steps.expand_as(thinking_end), (steps - thinking[:, None]).clamp(min=0)], dim=-1)
    if potential == "expected":
        if max_completion_tokens is None:
            raise ValueError("max_completion_tokens: the expected-score potential needs the generation limit")
        max_remaining = (max_completion_tokens - steps).clamp(min=0)  # (1, T + 1)
        potentials = torch.stack(
            [
                expected_length_score(
                    values[..., h],
                    gamma,
                    max_remaining,
                    budgets[:, h : h + 1],
                    kinds[:, h : h + 1],
                    score,
                    written[..., h],
                )
                for h in range(2)
            ],
            dim=-1,
        )  # (B, T + 1, 2)
    else:
        predicted = written + remaining_from_value(values, gamma)  # (B, T + 1, 2) the segment's expected length
        potentials = LENGTH_SCORES[score](predicted, budgets[:, None, :], kinds[:, None, :]).double()
    realised = segment_realised_scores(lengths, thinking, closed, budgets, kinds, score)  # (B, 2)
    if anchors is not None:
        starts = torch.stack([torch.zeros_like(thinking), thinking], dim=-1)[:, None, :]  # (B, 1, 2) first state
        first = potentials.gather(1, starts)  # (B, 1, 2)
        potentials = potentials + (torch.as_tensor(anchors, device=device).double()[:, None, :] - first)
    potentials = torch.where(ends, realised[:, None, :], potentials).to(dtype)  # Φ(end) = the realised score
    return torch.stack(
        [masked_gae(zeros, potentials[..., h], token_masks[..., h], discount, lam)[0] for h in range(2)], -1
    )
