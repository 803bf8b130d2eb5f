"""Pure tensor math for length values, returns and the critic's ground truth.

No trainer, accelerate or I/O imports: everything here is a function of tensors and floats, tested
against plain-loop references in ``tests/test_returns.py``.

Conventions (docs/DESIGN.md §3.1, §3.2): a completion has L generated tokens, EOS excluded. State s_t is the
prompt plus the first t completion tokens. The per-token length reward is r_t = -(1 - γ) for every
non-terminal step, so the return from s_t is G_t = -(1 - γ^(L - t)), in (-1, 0].

Dtypes: transforms run in float64 and return the input dtype promoted to at least float32 (a bf16
input gives float32); GAE runs in that promoted dtype. Padding never leaks into outputs: masked
positions come out as exactly 0.
"""

from __future__ import annotations

import math

import torch

# ------------------------------------------------------------------------------------- value <-> length


def value_from_remaining(remaining_tokens: torch.Tensor, gamma: float) -> torch.Tensor:
    """V = -(1 - γ^n) for n remaining tokens, γ in (0, 1]. Any shape.

    Computed in float64; returned in the input's dtype promoted to at least float32 (so integer or
    bf16/fp16 input gives float32, float64 stays float64).

    >>> value_from_remaining(torch.tensor([2, 1, 0]), 0.5)
    tensor([-0.7500, -0.5000,  0.0000])
    """
    remaining_tokens = torch.as_tensor(remaining_tokens)
    value = gamma ** remaining_tokens.double() - 1.0
    return value.to(torch.promote_types(remaining_tokens.dtype, torch.float32))


def remaining_from_value(value: torch.Tensor, gamma: float) -> torch.Tensor:
    """n = ln(1 + V) / ln γ, the inverse of ``value_from_remaining``, γ in (0, 1). Any shape.

    V is clamped into [-1 + 1e-12, 0] first, so V = 0 (or a slightly positive prediction) gives 0
    and V = -1 gives ln(1e-12) / ln γ ≈ 27.6 / (1 - γ) tokens: large but finite, never inf or nan.
    Same dtype rule as ``value_from_remaining`` (float64 inside; bf16/fp16 lengths would be off by
    up to 8 tokens at 1000, and fp16 overflows at 65504).
    """
    value = torch.as_tensor(value)
    clamped = value.double().clamp(-1.0 + 1e-12, 0.0)
    return (torch.log1p(clamped) / math.log(gamma)).to(torch.promote_types(value.dtype, torch.float32))


# ------------------------------------------------------------------------------------------ choice of γ


def auto_gamma(lengths, quantile: float = 0.99, target_value: float = 0.99) -> float:
    """γ = (1 - target)^(1 / L_q), so that 1 - γ^(L_q) = target, with L_q the ``quantile`` of ``lengths``.

    With the defaults the 99th-percentile rollout length maps to a value of -0.99 (docs/DESIGN.md §3.2).
    ``lengths``: 1-D tensor or list of completion lengths in tokens (finished rollouts).
    """
    lengths = torch.as_tensor(lengths, dtype=torch.float64).flatten()
    if lengths.numel() == 0:
        raise ValueError("gamma: 'auto' needs rollout lengths to choose γ from, got none; set a number in (0, 1)")
    if not 0.0 < target_value < 1.0:
        raise ValueError(f"gamma: 'auto' needs target_value in (0, 1), got {target_value!r}")
    length_q = float(torch.quantile(lengths, quantile))
    if length_q < 1.0:
        raise ValueError(
            f"gamma: 'auto' needs the {quantile:.0%} quantile of rollout lengths to be at least 1 token, "
            f"got {length_q}; set a number in (0, 1)"
        )
    return (1.0 - target_value) ** (1.0 / length_q)


def resolve_gamma(gamma: float | str, lengths=None) -> float:
    """γ from a recipe field: a number in (0, 1) (also as text, as a CLI flag delivers it) or "auto".

    "auto" calls ``auto_gamma(lengths)``; anything else raises ``ValueError``.
    """
    if gamma == "auto":
        if lengths is None:
            raise ValueError("gamma: 'auto' needs rollout lengths to choose γ from; set a number in (0, 1)")
        return auto_gamma(lengths)
    try:
        value = float(gamma)
    except (TypeError, ValueError):
        value = None
    if isinstance(gamma, bool) or value is None or not 0.0 < value < 1.0:
        raise ValueError(f"gamma: must be a number in (0, 1) or 'auto', got {gamma!r}")
    return value


# ------------------------------------------------------------------------------------- LenVM targets


def value_targets(
    completion_lengths: torch.Tensor,
    finished: torch.Tensor,
    num_states: int,
    gamma: float,
    bootstrap_values: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Regression targets for V(s_0) .. V(s_{num_states - 1}) and the mask of labelled states.

    Finished row of length L: target_t = -(1 - γ^(L - t)) for t <= L (t = L gives 0).
    Truncated row (T = completion_lengths, no EOS): dropped (mask all False) when
    ``bootstrap_values`` is None, never labelled as if it ended at the limit; otherwise
    target_t = -(1 - γ^(T - t)) + γ^(T - t) V_boot for t <= T (t = T gives V_boot itself).

    Shapes: completion_lengths (B,), finished (B,) bool, bootstrap_values (B,) = V(s_T).
    Returns targets (B, num_states) float32, 0 where unlabelled, and mask (B, num_states) bool.
    """
    device = completion_lengths.device
    finished = finished.bool()[:, None]  # (B, 1)
    remaining = completion_lengths.double()[:, None] - torch.arange(num_states, device=device)  # (B, S)
    mask = remaining >= 0  # (B, S)
    targets = value_from_remaining(remaining.clamp(min=0), gamma)  # (B, S) float64
    if bootstrap_values is None:
        mask &= finished
    else:
        bootstrapped = targets + (1 + targets) * bootstrap_values.double()[:, None]  # 1 + target = γ^(T - t)
        targets = torch.where(finished, targets, bootstrapped)
    return torch.where(mask, targets, 0.0).float(), mask


def segment_value_targets(
    completion_lengths: torch.Tensor,
    thinking_lengths: torch.Tensor,
    thinking_closed: torch.Tensor,
    finished: torch.Tensor,
    num_states: int,
    gamma: float,
    bootstrap_values: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Targets of the two-segment LenVM's two values, remaining thinking tokens and remaining answer tokens.

    A completion of L tokens is T thinking tokens, then L - T answer tokens (``rewards.segments``). Each value is a
    length return of its own segment: the thinking value's reward is -(1 - γ) on thinking tokens, the answer
    value's on answer tokens, and a step discounts a value only on a token of that value's segment (γ), not on the
    other's (1). So, for t <= L, with n_think = max(T - t, 0) and n_answer = L - max(t, T):

        G_think_t = -(1 - γ^n_think)     G_answer_t = -(1 - γ^n_answer)

    While thinking, the answer value is the whole answer to come; from the closing marker on, the thinking value is 0
    and the answer value is the one-segment return of the rest. Both satisfy G_t = r_t + γ_t G_{t+1}.

    A return is known when the row finished (EOS), and the thinking's also once the thinking closed. An unknown
    return (a truncated row: the answer's always, the thinking's when still open) is dropped (mask False) when
    ``bootstrap_values`` is None, else bootstrapped from the model's own values at the cut, as ``value_targets``
    does: G_t = -(1 - γ^n) + γ^n V_boot.

    Shapes: completion_lengths, thinking_lengths (B,) with T <= L; thinking_closed, finished (B,) bool;
    bootstrap_values (B, 2) = (V_think(s_L), V_answer(s_L)). Returns targets (B, num_states, 2) float32, 0 where
    unlabelled, and mask (B, num_states, 2) bool; index 0 is the thinking value, 1 the answer value.
    """
    if (thinking_lengths > completion_lengths).any() or (thinking_lengths < 0).any():
        raise ValueError("thinking_tokens: must lie in [0, completion_tokens] for every row")
    device = completion_lengths.device
    steps = torch.arange(num_states, device=device, dtype=torch.float64)  # t
    length, thinking = completion_lengths.double()[:, None], thinking_lengths.double()[:, None]  # (B, 1)
    remaining = torch.stack(
        [(thinking - steps).clamp(min=0), (length - torch.maximum(steps, thinking)).clamp(min=0)], dim=-1
    )  # (B, S, 2)
    targets = value_from_remaining(remaining, gamma)  # (B, S, 2) float64
    finished = finished.bool()
    known = torch.stack([finished | thinking_closed.bool(), finished], dim=-1)[:, None, :]  # (B, 1, 2)
    mask = (steps <= length)[..., None].expand_as(targets).clone()  # (B, S, 2), writable by the caller
    if bootstrap_values is None:
        mask = mask & known
    else:
        bootstrapped = targets + (1 + targets) * bootstrap_values.double()[:, None, :]  # 1 + target = γ^n
        targets = torch.where(known, targets, bootstrapped)
    return torch.where(mask, targets, 0.0).float(), mask


# ------------------------------------------------------------------------------- advantages and TD


def masked_gae(
    rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float, lam: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation over the valid prefix of each row.

    δ_t = r_t + γ V_{t+1} - V_t and A_t = Σ_k (γλ)^k δ_{t+k}, the sum running over mask-True
    positions only; returns R_t = A_t + V_t. The caller puts the value after the last valid step in
    ``values[:, t + 1]``: 0 for a finished row, the bootstrap V(s_T) for a truncated one. A False
    position cuts the sum (a hole starts a new segment) and gets advantage and return 0; its reward and
    value never reach the output, so padding may hold anything, nan included. γ, λ in [0, 1].

    Shapes: rewards (B, T), values (B, T + 1), mask (B, T) bool -> advantages (B, T), returns (B, T),
    in the inputs' dtype promoted to at least float32.
    """
    dtype = torch.promote_types(torch.promote_types(rewards.dtype, values.dtype), torch.float32)
    values = values.to(dtype)
    mask = mask.bool()
    deltas = rewards.to(dtype) + gamma * values[:, 1:] - values[:, :-1]  # (B, T)
    running = torch.zeros_like(deltas[:, 0])  # (B,) A_{t+1}
    advantages = []
    for t in reversed(range(deltas.shape[1])):  # reverse scan: O(T) steps, each vectorised over the batch
        running = torch.where(mask[:, t], deltas[:, t] + gamma * lam * running, 0.0)
        advantages.append(running)
    advantages = torch.stack(advantages[::-1], dim=1)  # (B, T)
    return advantages, torch.where(mask, advantages + values[:, :-1], 0.0)


def td_residuals(values: torch.Tensor, mask: torch.Tensor, gamma: float) -> torch.Tensor:
    """Length TD residuals s_t = -(1 - γ) + γ V_{t+1} - V_t, 0 where mask is False (paper §4.6).

    Index t is the transition s_t -> s_{t+1} made by the completion token at index t (docs/DESIGN.md
    §3.4; the same residual is often written s_{t+1}, indexed by the state it reaches). The reward -(1 - γ) is
    that of a non-EOS token: leave the EOS position out of ``mask`` (its reward is 0).

    Shapes: values (B, T + 1), mask (B, T) bool -> (B, T), dtype promoted to at least float32.
    """
    dtype = torch.promote_types(values.dtype, torch.float32)
    values = values.to(dtype)
    residuals = -(1.0 - gamma) + gamma * values[:, 1:] - values[:, :-1]  # (B, T)
    return torch.where(mask.bool(), residuals, 0.0)


def segment_td_residuals(
    values: torch.Tensor, mask: torch.Tensor, thinking_lengths: torch.Tensor, gamma: float
) -> torch.Tensor:
    """TD residuals of the two-segment values (``segment_value_targets``): for the token at index t and value h,
    s_t,h = r_t,h + γ_t,h V_h(s_{t+1}) - V_h(s_t), where a token of h's segment has r = -(1 - γ), γ_t,h = γ, and a
    token of the other segment r = 0, γ_t,h = 1 (token t is thinking when t < T). 0 where mask is False.

    Shapes: values (B, T + 1, 2) (thinking, answer), mask (B, T) bool, thinking_lengths (B,) -> (B, T, 2).
    """
    dtype = torch.promote_types(values.dtype, torch.float32)
    values = values.to(dtype)
    steps = torch.arange(mask.size(1), device=values.device)
    thinking = steps[None, :] < thinking_lengths[:, None]  # (B, T)
    own = torch.stack([thinking, ~thinking], dim=-1)  # (B, T, 2): the token is of value h's segment
    reward = torch.where(own, -(1.0 - gamma), 0.0).to(dtype)
    discount = torch.where(own, gamma, 1.0).to(dtype)
    residuals = reward + discount * values[:, 1:] - values[:, :-1]  # (B, T, 2)
    return torch.where(mask.bool()[..., None], residuals, 0.0)


# ---------------------------------------------------------------------------- prompt-boundary metric


def prompt_boundary_ground_truth(lengths_per_prompt, gamma: float) -> torch.Tensor:
    """L_GT = ln(1 - μ_u) / ln γ with μ_u = mean_i (1 - γ^(L_i)) over a prompt's N sampled lengths.

    ``lengths_per_prompt``: (P, N) tensor or a list of P 1-D tensors (N may differ per prompt).
    Returns (P,) float64. The certainty-equivalent length whose value is the mean realised value
    (paper §4.4), not the mean length.
    """
    mean_values = torch.stack(
        [value_from_remaining(torch.as_tensor(lengths).double(), gamma).mean() for lengths in lengths_per_prompt]
    )  # (P,)
    return remaining_from_value(mean_values, gamma)  # (P,) since μ_u = -mean V, L_GT = ln(1 + mean V) / ln γ


def mean_relative_error(predicted: torch.Tensor, truth: torch.Tensor) -> torch.Tensor:
    """MRE = mean |L̂ - L_GT| / L_GT over L_GT > 0 (``length_metrics`` drops the rest). (P,), (P,) -> 0-dim."""
    return ((predicted - truth).abs() / truth).mean()
