"""Pure tensor math for length values, returns, advantages and length scores.

No trainer, accelerate or I/O imports: everything here is a function of tensors and floats, tested
against plain-loop references in ``tests/test_returns.py``.

Conventions (see DESIGN.md §2): a completion has L generated tokens, EOS excluded. State s_t is the
prompt plus the first t completion tokens. The per-token length reward is r_t = -(1 - γ) for every
non-terminal step, so the return from s_t is G_t = -(1 - γ^(L - t)), in (-1, 0].

Dtypes: transforms run in float64 and return the input dtype promoted to at least float32 (a bf16
input gives float32); GAE runs in that promoted dtype. Padding never leaks into outputs: masked
positions come out as exactly 0.
"""

from __future__ import annotations

import math

import torch

BUDGET_KINDS = ("exact", "at_most", "at_least")


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
    exact, at_most = kinds == 0, kinds == 1
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
    return torch.where(kinds == 0, exact, torch.where(kinds == 1, lengths <= budgets, lengths >= budgets))


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
    score = torch.where(kinds == 0, exact, torch.where(kinds == 1, at_most, at_least))
    return score.float()


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

    With the defaults the 99th-percentile rollout length maps to a value of -0.99 (DESIGN.md §2).
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

    Index t is the transition s_t -> s_{t+1} made by the completion token at index t (DESIGN.md
    writes the same residual as s_{t+1}, indexed by the state it reaches). The reward -(1 - γ) is
    that of a non-EOS token: leave the EOS position out of ``mask`` (its reward is 0).

    Shapes: values (B, T + 1), mask (B, T) bool -> (B, T), dtype promoted to at least float32.
    """
    dtype = torch.promote_types(values.dtype, torch.float32)
    values = values.to(dtype)
    residuals = -(1.0 - gamma) + gamma * values[:, 1:] - values[:, :-1]  # (B, T)
    return torch.where(mask.bool(), residuals, 0.0)


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
    """MRE = mean |L̂ - L_GT| / L_GT over prompts (drop prompts with L_GT = 0). Shapes (P,), (P,) -> 0-dim."""
    return ((predicted - truth).abs() / truth).mean()


# ------------------------------------------------------------------------------------ LenVM inside RL

LENGTH_ADVANTAGE_MODES = ("budget", "efficiency", "shaping")
LENGTH_SCORES = {"lifebench": lifebench_length_score, "l1": l1_length_score}


def lenvm_state_values(
    values_full: torch.Tensor, prompt_length: int, completion_mask: torch.Tensor, finished: torch.Tensor
) -> torch.Tensor:
    """V(s_0) .. V(s_T) from a LenVM run on cat(prompt_ids, completion_ids).

    s_j ends at position P - 1 + j (prompts are left-padded to P). TRL's completion_mask includes the
    EOS token, so L = mask.sum() - 1 for a finished row and mask.sum() for a truncated one. Finished:
    V(s_L) := 0 (terminal) and 0 beyond. Truncated: V(s_L) is kept as the bootstrap, 0 beyond.

    Shapes: values_full (B, P + T), completion_mask (B, T), finished (B,) bool -> (B, T + 1).
    """
    finished = finished.bool()
    num_tokens = completion_mask.shape[1]
    values = values_full[:, prompt_length - 1 : prompt_length + num_tokens]  # (B, T + 1)
    lengths = completion_mask.long().sum(1) - finished.long()  # (B,) L
    last_kept = lengths - finished.long()  # (B,) finished keep s_0..s_{L-1}, truncated s_0..s_L
    keep = torch.arange(num_tokens + 1, device=values.device) <= last_kept[:, None]  # (B, T + 1)
    return torch.where(keep, values, 0.0)


def length_advantages(
    values: torch.Tensor,
    completion_mask: torch.Tensor,
    finished: torch.Tensor,
    gamma: float,
    lam: float,
    mode: str,
    budgets: torch.Tensor | None = None,
    kinds: torch.Tensor | None = None,
    score: str = "lifebench",
    discount: float | None = None,
) -> torch.Tensor:
    """Per-token length advantages A_len (B, T) from LenVM values, zero on padding.

    Actions. The completion token at index j is the action taken in s_j. A finished row (L tokens
    plus EOS; completion_mask covers L + 1 positions) has L + 1 actions: j < L goes s_j -> s_{j+1},
    j = L emits EOS and goes s_L -> terminal. V(s_j) for j >= L of a finished row is taken as 0
    (DESIGN.md's V(s_L) := 0) whatever ``values`` holds there. A truncated row (L = mask.sum()) has
    L actions, and the last one bootstraps from V(s_L) = values[:, L].

    ``gamma`` is the LenVM's γ (turns V into lengths, sets the step reward); ``discount`` (d, default
    γ, as in DESIGN.md) is the discount of δ and of the GAE sum. With modes:

    - budget: Λ_j = j + ln(1 + V_j) / ln γ, Φ_j = S(Λ_j, N, kind) for the states s_0 .. s_L, where
      S = LENGTH_SCORES[score]; Φ(s_L) = Φ(terminal) = S(L, N) for a finished row (a truncated row
      bootstraps from Φ(s_L) = S(Λ_L, N)). δ_j = d Φ_{j+1} - Φ_j, A_j = Σ_k (dλ)^k δ_{j+k}.
      With d = λ = 1: A_j = S(L, N) - Φ_j, and the EOS action gets 0 (it gets (d - 1) S(L, N) otherwise).
    - efficiency: r_j = -(1 - γ) for j < L and 0 for the EOS action, δ_j = r_j + d V_{j+1} - V_j,
      A_j = Σ_k (dλ)^k δ_{j+k}. With d = γ and λ = 1: A_j = G_j - V_j, realised return minus value.
    - shaping: A_j = F_j = d Φ_{j+1} - Φ_j with Φ = V, Φ(terminal) = 0; ``lam`` is unused.

    In efficiency and shaping modes the EOS action has δ = 0: the credit for stopping at L goes to the
    tokens before it, through V(s_L) = 0.

    Shapes: values (B, T + 1) = V(s_0..s_T) (see ``lenvm_state_values``), completion_mask (B, T),
    finished (B,) bool, budgets (B,) tokens, kinds (B,) codes from ``budget_kind_codes``.
    Returns (B, T), dtype promoted to at least float32.
    """
    if mode not in LENGTH_ADVANTAGE_MODES:
        valid = ", ".join(LENGTH_ADVANTAGE_MODES)
        raise ValueError(f"mode: {mode!r} is not a length advantage mode; use one of {valid}")
    discount = gamma if discount is None else discount
    mask, finished = completion_mask.bool(), finished.bool()
    num_tokens = mask.shape[1]
    lengths = mask.long().sum(1) - finished.long()  # (B,) L, EOS excluded
    steps = torch.arange(num_tokens + 1, device=values.device)  # (T + 1,) state index j
    terminal = finished[:, None] & (steps >= lengths[:, None])  # (B, T + 1) s_L and after, finished rows
    values = values.to(torch.promote_types(values.dtype, torch.float32)).masked_fill(terminal, 0.0)  # (B, T + 1)
    if mode == "efficiency":
        rewards = torch.full_like(values[:, 1:], -(1.0 - gamma)).masked_fill(terminal[:, :-1], 0.0)  # (B, T) EOS: 0
        return masked_gae(rewards, values, mask, discount, lam)[0]
    zeros = torch.zeros_like(values[:, 1:])  # (B, T)
    if mode == "shaping":
        return masked_gae(zeros, values, mask, discount, 0.0)[0]
    if budgets is None or kinds is None:
        raise ValueError("mode: 'budget' needs budgets and kinds (the budget_tokens and budget_kind columns)")
    if score not in LENGTH_SCORES:
        raise ValueError(f"score: {score!r} is not a length score; use one of {', '.join(LENGTH_SCORES)}")
    predicted = steps + remaining_from_value(values, gamma)  # (B, T + 1) Λ_j
    predicted = torch.where(terminal, lengths[:, None].to(predicted.dtype), predicted)
    budgets = torch.as_tensor(budgets, device=values.device)[:, None]  # (B, 1)
    kinds = torch.as_tensor(kinds, device=values.device)[:, None]  # (B, 1)
    potentials = LENGTH_SCORES[score](predicted, budgets, kinds)  # (B, T + 1) Φ_j
    return masked_gae(zeros, potentials, mask, discount, lam)[0]


# ------------------------------------------------------------------------------------ PPO task critic


def task_advantages(
    scores: torch.Tensor,
    values: torch.Tensor,
    completion_mask: torch.Tensor,
    gamma: float,
    lam: float,
    kl: torch.Tensor | None = None,
    kl_coef: float = 0.0,
    value_lam: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """PPO task advantages and returns: GAE(γ, λ) over the task score placed on the last completion token.

    The returns (the critic's targets) are A + V of GAE(γ, ``value_lam``), by default ``lam``: decoupled GAE
    (VC-PPO, Yuan et al. 2025) lets the actor use λ < 1 while the critic regresses on λ = 1 (Monte Carlo) returns.

    Row b has n = mask.sum() valid tokens (a prefix; TRL's mask ends at and includes the EOS). Per-token reward
    r_j = -kl_coef · kl_j for j < n, plus ``scores[b]`` at j = n - 1. Every completion ends the episode after its
    last valid token, finished or truncated: the task reward already scored the text as it stands, so there is no
    bootstrap (V after the last token := 0). ``values[:, j]`` = V(s_j), the critic's value of the state in which
    token j is chosen; entries at and beyond n are ignored. A row with n = 0 gets zeros.

    Shapes: scores (B,), values (B, T), completion_mask (B, T), kl (B, T) or None -> advantages (B, T), returns (B, T),
    0 on padding, dtype promoted to at least float32.
    """
    mask = completion_mask.bool()
    dtype = torch.promote_types(torch.promote_types(scores.dtype, values.dtype), torch.float32)
    lengths = mask.long().sum(1)  # (B,) n
    positions = torch.arange(mask.shape[1], device=mask.device)  # (T,)
    last = positions == (lengths - 1)[:, None]  # (B, T) the last valid token; no column for n = 0
    rewards = torch.where(last, scores.to(dtype)[:, None], 0.0)  # (B, T)
    if kl is not None and kl_coef != 0.0:
        rewards = rewards - kl_coef * torch.where(mask, kl.to(dtype), 0.0)
    states = torch.cat([values.to(dtype), values.new_zeros(values.shape[0], 1, dtype=dtype)], dim=1)  # (B, T + 1)
    states = torch.where(torch.arange(mask.shape[1] + 1, device=mask.device) < lengths[:, None], states, 0.0)
    advantages, returns = masked_gae(rewards, states, mask, gamma, lam)
    if value_lam is not None and value_lam != lam:
        _, returns = masked_gae(rewards, states, mask, gamma, value_lam)
    return advantages, returns


def clipped_value_loss(
    values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, cliprange: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """PPO's clipped value loss per token: ½ max((V - R)², (V_clip - R)²), V_clip = V_old + clip(V - V_old, ±ε).

    Also returns where the clipped term is the larger one (the clip is active). The caller masks and averages.

    >>> loss, clipped = clipped_value_loss(torch.tensor([1.0]), torch.tensor([0.0]), torch.tensor([2.0]), 0.2)
    >>> loss, clipped  # V_clip = 0.2: ½ (0.2 - 2)² = 1.62 > ½ (1 - 2)²
    (tensor([1.6200]), tensor([True]))

    Shapes: all (B, T) -> per-token loss (B, T), clipped (B, T) bool.
    """
    clipped_values = old_values + (values - old_values).clamp(-cliprange, cliprange)
    loss_unclipped, loss_clipped = (values - returns).square(), (clipped_values - returns).square()
    return 0.5 * torch.maximum(loss_unclipped, loss_clipped), loss_clipped > loss_unclipped
