"""Pure tensor math for the LenVM inside RL: per-token length advantages and PPO's task advantages and value loss.

The trainers (``grpo_trainer.py``, ``ppo.py``) call these on TRL's batch tensors; like ``returns.py`` this module has
no trainer, accelerate or I/O imports and is tested against plain loops in ``tests/test_returns.py``. The modes,
potentials, baselines and the EOS and truncation conventions are docs/DESIGN.md §3.6-§3.12. Dtypes and masking as in
``returns.py``: float64 inside, at least float32 out, masked positions exactly 0.
"""

from __future__ import annotations

import math

import torch

from lenvm_rl.returns import masked_gae, remaining_from_value
from rewards.scores import LENGTH_SCORES

# ------------------------------------------------------------------------------------ LenVM inside RL

LENGTH_ADVANTAGE_MODES = ("budget", "efficiency", "shaping")


def lenvm_state_values(
    values_full: torch.Tensor,
    prompt_length: int,
    completion_mask: torch.Tensor,
    finished: torch.Tensor,
    eos_credit: bool = False,
) -> torch.Tensor:
    """V(s_0) .. V(s_T) from a LenVM run on cat(prompt_ids, completion_ids).

    s_j ends at position P - 1 + j (prompts are left-padded to P). TRL's completion_mask includes the
    EOS token, so L = mask.sum() - 1 for a finished row and mask.sum() for a truncated one. Finished:
    V(s_L) := 0 (terminal) and 0 beyond, or, with ``eos_credit``, V(s_L) is kept (s_L is the state in
    which the EOS is chosen; the terminal state comes after it). Truncated: V(s_L) is kept as the
    bootstrap, 0 beyond.

    Shapes: values_full (B, P + T), completion_mask (B, T), finished (B,) bool -> (B, T + 1).
    """
    finished = finished.bool()
    num_tokens = completion_mask.shape[1]
    values = values_full[:, prompt_length - 1 : prompt_length + num_tokens]  # (B, T + 1)
    lengths = completion_mask.long().sum(1) - finished.long()  # (B,) L
    # finished keep s_0..s_{L-1} (s_0..s_L with eos_credit), truncated s_0..s_L
    last_kept = lengths - (finished.long() if not eos_credit else 0)  # (B,)
    keep = torch.arange(num_tokens + 1, device=values.device) <= last_kept[:, None]  # (B, T + 1)
    return torch.where(keep, values, 0.0)


def expected_length_score(
    values: torch.Tensor,
    gamma: float,
    max_remaining: torch.Tensor,
    budgets: torch.Tensor,
    kinds: torch.Tensor,
    score="lifebench",
    start: torch.Tensor | float = 0.0,
) -> torch.Tensor:
    """E[S(start + n, N)] for a remaining length n whose stop hazard is constant (a geometric law) and whose
    E[γ^n] is the LenVM's 1 + V, capped at ``max_remaining`` (the generation limit: the rest of the mass sits there).

    A LenVM value is one number per state, E[γ^n] = 1 + V; S is non-linear, so S(E[n]) is not E[S(n)]. With a
    constant per-token stop probability p, n ~ Geometric(p) on {0, 1, ...}: E[γ^n] = p / (1 - (1 - p) γ), so
    p = u (1 - γ) / (1 - u γ) with u = 1 + V. The policy a LenVM is first trained on often stops like that (the
    learning testbed's does by construction); how well it fits elsewhere is measured (docs/BENCHMARKS.md,
    calibration). P(n = k) = p (1 - p)^k for k < m, P(n = m) = (1 - p)^m, m = ``max_remaining``.

    Shapes broadcast: values (B, S), max_remaining (B, S) or (B, 1) tokens >= 0, budgets and kinds (B, 1),
    start (B, S) or a number (tokens already generated). ``score`` names a LENGTH_SCORES entry or is any
    f(lengths, budgets, kinds) (``budget_hit`` gives the probability of a hit). Returns (B, S) float64. One vectorised step per k up to
    max(max_remaining): O(T) small operations, no (B, S, T) tensor.

    V = 0 means stopping now (p = 1): 1 token written, at least 2 asked, S = e^{5 (1 - 2) / 2}.

    >>> expected_length_score(torch.tensor([[0.0]]), 0.9, torch.tensor([[5]]), torch.tensor([[2]]), torch.tensor([[2]]), start=1)
    tensor([[0.0821]], dtype=torch.float64)
    """
    scorer = LENGTH_SCORES[score] if isinstance(score, str) else score  # or f(lengths, budgets, kinds)
    u = (1.0 + values.double()).clamp(1e-12, 1.0)
    stop = (u * (1.0 - gamma) / (1.0 - u * gamma)).clamp(0.0, 1.0)  # (B, S) p
    start = torch.as_tensor(start, dtype=torch.float64, device=values.device)
    max_remaining = torch.as_tensor(max_remaining, device=values.device).long().clamp(min=0).expand_as(u)
    budgets, kinds = torch.as_tensor(budgets, device=values.device), torch.as_tensor(kinds, device=values.device)
    expected = torch.zeros_like(u)
    survive = torch.ones_like(u)  # (1 - p)^k
    for k in range(int(max_remaining.max()) + 1):
        probability = torch.where(max_remaining == k, survive, survive * stop)  # all the rest at the cap
        probability = torch.where(max_remaining < k, 0.0, probability)
        expected += probability * scorer(start + k, budgets, kinds).double()
        survive = survive * (1.0 - stop)
    return expected


def group_stats(scores: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and (unbiased, like TRL's ``nanstd``) std of each group of ``group_size`` consecutive rows, repeated
    for every row of the group. (B,) -> (B,), (B,); a group of one has std 0.

    >>> group_stats(torch.tensor([1.0, 3.0, 0.0, 0.0]), 2)
    (tensor([2., 2., 0., 0.]), tensor([1.4142, 1.4142, 0.0000, 0.0000]))
    """
    grouped = scores.view(-1, group_size)  # (B / G, G)
    std = grouped.std(1) if group_size > 1 else torch.zeros_like(grouped[:, 0])
    return grouped.mean(1).repeat_interleave(group_size), std.repeat_interleave(group_size)


def group_baseline(scores: torch.Tensor, group_size: int, include: torch.Tensor) -> torch.Tensor:
    """Mean of each group of ``group_size`` consecutive rows over its included, non-NaN rows, repeated for every row
    of the group; a group with no such row takes the mean of all its non-NaN rows (NaN if it has none).

    ``guided_baseline: plain`` (docs/DESIGN.md §3.14): the baseline of a group from its plain rows only, an estimate
    of the policy's own expected reward that the guided rows' rewards do not shift.

    >>> group_baseline(torch.tensor([1.0, 3.0, 0.0, 4.0]), 2, torch.tensor([True, False, False, False]))
    tensor([1., 1., 2., 2.], dtype=torch.float64)

    Shapes: scores (B,), include (B,) bool -> (B,) float64.
    """
    grouped = scores.double().view(-1, group_size)  # (B / G, G)
    finite = ~grouped.isnan()
    kept = include.view(-1, group_size) & finite
    kept = torch.where(kept.any(1, keepdim=True), kept, finite)  # no included row: every scored row
    total = torch.where(kept, grouped, 0.0).sum(1)
    mean = total / kept.sum(1)  # NaN where a group has no scored row
    return mean.repeat_interleave(group_size)


LENGTH_POTENTIALS = ("point", "expected")


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
    eos_credit: bool = False,
    potential: str = "point",
    max_completion_tokens: int | None = None,
    anchors: torch.Tensor | None = None,
) -> torch.Tensor:
    """Per-token length advantages A_len (B, T) from LenVM values, zero on padding.

    Actions. The completion token at index j is the action taken in s_j. A finished row (L tokens
    plus EOS; completion_mask covers L + 1 positions) has L + 1 actions: j < L goes s_j -> s_{j+1},
    j = L emits EOS and goes s_L -> terminal. A truncated row (L = mask.sum()) has L actions, and the
    last one bootstraps from V(s_L) = values[:, L].

    EOS. By default V(s_j) for j >= L of a finished row is taken as 0 (s_L is treated as terminal)
    whatever ``values`` holds there, so the EOS action gets no length advantage and the credit for
    stopping goes to the tokens before it. With ``eos_credit`` the LenVM's V(s_L) is used: s_L is the
    state in which the policy chose to stop, the terminal state follows the EOS, and the EOS action
    gets δ_L = d Φ(terminal) - Φ(s_L) (budget) or d · 0 - V(s_L) (efficiency, shaping): stopping
    here against the LenVM's expectation of going on.

    ``gamma`` is the LenVM's γ (turns V into lengths, sets the step reward); ``discount`` (d, default
    γ) is the discount of δ and of the GAE sum. With modes:

    - budget: Φ_j = S(Λ_j, N, kind) with Λ_j = j + ln(1 + V_j) / ln γ (``potential="point"``: the
      score of the expected length), or Φ_j = E[S(j + n, N)] under a constant stop hazard matched to
      V_j, n capped at ``max_completion_tokens`` - j (``potential="expected"``, see
      ``expected_length_score``); S = LENGTH_SCORES[score]. Φ(terminal) = S(L, N) for a finished
      row (a truncated row bootstraps from Φ(s_L)). δ_j = d Φ_{j+1} - Φ_j, A_j = Σ_k (dλ)^k δ_{j+k}.
      With d = λ = 1: A_j = S(L, N) - Φ_j.
      ``anchors`` (B,), the group-anchored baseline: every non-terminal potential is shifted by
      anchor - Φ_0, so that Φ'(s_0) = anchor (the group's mean realised score): with d = λ = 1,
      A_j = S(L, N) - anchor - (Φ_j - Φ_0). The shift is constant within a row, so only the
      transition into the terminal state changes.
    - efficiency: r_j = -(1 - γ) for j < L and 0 for the EOS action, δ_j = r_j + d V_{j+1} - V_j,
      A_j = Σ_k (dλ)^k δ_{j+k}. With d = γ and λ = 1: A_j = G_j - V_j, realised return minus value.
    - shaping: A_j = F_j = d Φ_{j+1} - Φ_j with Φ = V, Φ(terminal) = 0; ``lam`` is unused.

    Shapes: values (B, T + 1) = V(s_0..s_T) (see ``lenvm_state_values``), completion_mask (B, T),
    finished (B,) bool, budgets (B,) tokens, kinds (B,) codes from ``budget_kind_codes``, anchors (B,).
    Returns (B, T), dtype promoted to at least float32.
    """
    if mode not in LENGTH_ADVANTAGE_MODES:
        valid = ", ".join(LENGTH_ADVANTAGE_MODES)
        raise ValueError(f"mode: {mode!r} is not a length advantage mode; use one of {valid}")
    if potential not in LENGTH_POTENTIALS:
        raise ValueError(f"potential: {potential!r} is unknown; use one of {', '.join(LENGTH_POTENTIALS)}")
    if mode != "budget" and (potential != "point" or anchors is not None):
        raise ValueError(f"mode: {mode!r} takes neither an expected-score potential nor anchors; use mode 'budget'")
    discount = gamma if discount is None else discount
    mask, finished = completion_mask.bool(), finished.bool()
    num_tokens = mask.shape[1]
    lengths = mask.long().sum(1) - finished.long()  # (B,) L, EOS excluded
    steps = torch.arange(num_tokens + 1, device=values.device)  # (T + 1,) state index j
    first_terminal = lengths + (1 if eos_credit else 0)  # (B,) finished rows: s_L, or the state after the EOS
    terminal = finished[:, None] & (steps >= first_terminal[:, None])  # (B, T + 1)
    values = values.to(torch.promote_types(values.dtype, torch.float32)).masked_fill(terminal, 0.0)  # (B, T + 1)
    if mode == "efficiency":
        eos_action = finished[:, None] & (steps[:-1] >= lengths[:, None])  # (B, T) the EOS and after
        rewards = torch.full_like(values[:, 1:], -(1.0 - gamma)).masked_fill(eos_action, 0.0)  # (B, T) EOS: 0
        return masked_gae(rewards, values, mask, discount, lam)[0]
    zeros = torch.zeros_like(values[:, 1:])  # (B, T)
    if mode == "shaping":
        return masked_gae(zeros, values, mask, discount, 0.0)[0]
    if budgets is None or kinds is None:
        raise ValueError("mode: 'budget' needs budgets and kinds (the budget_tokens and budget_kind columns)")
    if score not in LENGTH_SCORES:
        raise ValueError(f"score: {score!r} is not a length score; use one of {', '.join(LENGTH_SCORES)}")
    budgets = torch.as_tensor(budgets, device=values.device)[:, None]  # (B, 1)
    kinds = torch.as_tensor(kinds, device=values.device)[:, None]  # (B, 1)
    if potential == "expected":
        if max_completion_tokens is None:
            raise ValueError("max_completion_tokens: the expected-score potential needs the generation limit")
        max_remaining = (max_completion_tokens - steps).clamp(min=0)[None, :]  # (1, T + 1)
        potentials = expected_length_score(values, gamma, max_remaining, budgets, kinds, score, start=steps[None, :])
    else:
        predicted = steps + remaining_from_value(values, gamma)  # (B, T + 1) Λ_j
        potentials = LENGTH_SCORES[score](predicted, budgets, kinds).double()  # (B, T + 1) Φ_j
    realised = LENGTH_SCORES[score](lengths[:, None], budgets, kinds).double()  # (B, 1) S(L, N)
    if anchors is not None:
        shift = torch.as_tensor(anchors, device=values.device).double()[:, None] - potentials[:, :1]  # (B, 1)
        potentials = potentials + shift
    potentials = torch.where(terminal, realised, potentials).to(values.dtype)  # Φ(terminal) = S(L, N)
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


# ------------------------------------------------------------------------------------ guided exploration

IMPORTANCE_MODES = ("token_truncate", "token_mask", "sequence_truncate", "sequence_mask")  # TRL's vLLM modes


def floored_log_probs(guided_log_probs: torch.Tensor, policy_log_probs: torch.Tensor, floor: float) -> torch.Tensor:
    """log μ for μ = (1 - ε) q + ε π: the guided distribution q mixed with the policy π at weight ε = ``floor``.

    The support rule of guided sampling: μ(x) >= ε π(x) for every token, so every token π can emit stays reachable
    (q is 0 outside the guide's candidates) and the importance weight π / μ is at most 1 / ε. Both inputs are
    normalised log-probabilities (-inf where q is 0); the result is normalised too.

    >>> q = torch.tensor([0.0, -float("inf")])  # the guide keeps token 0 only
    >>> floored_log_probs(q, torch.tensor([0.5, 0.5]).log(), 0.2).exp()  # 0.8 · [1, 0] + 0.2 · [0.5, 0.5]
    tensor([0.9000, 0.1000])

    Shapes: (..., V) -> (..., V).
    """
    if not 0.0 < floor <= 1.0:
        raise ValueError(f"floor: must lie in (0, 1], got {floor}")
    if floor == 1.0:
        return policy_log_probs.clone()
    return torch.logaddexp(guided_log_probs + math.log1p(-floor), policy_log_probs + math.log(floor))


def importance_weights(
    policy_logps: torch.Tensor,
    sampling_logps: torch.Tensor,
    completion_mask: torch.Tensor,
    cap: float,
    mode: str = "token_truncate",
    cap_min: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Truncated importance weights of sampled tokens, w = π_old / μ, with TRL's four vLLM correction modes.

    ρ_t = exp(log π_old(y_t) - log μ(y_t)). token_truncate: w_t = clip(ρ_t, C_min, C); token_mask: ρ_t, or 0 where
    ρ_t lies outside [C_min, C]; sequence_truncate / sequence_mask: the same on the sequence ratio Π_t ρ_t (one weight
    per row), as TRL's ``vllm_importance_sampling_clip_min`` / ``_max``. C_min = C = 1 gives w = 1: no correction. A
    NaN sampling log-prob (a token not drawn by the guided sampler) gives ρ = 1, as in TRL. Also returns where a bound
    acted (clipped or masked). The policy-gradient term of token t is multiplied by w_t, the KL and entropy terms are
    not.

    Shapes: policy_logps, sampling_logps, completion_mask (B, T) -> weights and acted (B, T) for token modes, (B, 1)
    for sequence modes; token weights are 0 on padding; weights float32.
    """
    if mode not in IMPORTANCE_MODES:
        raise ValueError(f"mode: {mode!r} is not one of {', '.join(IMPORTANCE_MODES)}")
    mask = completion_mask.bool()
    log_ratio = torch.where(mask, (policy_logps.double() - sampling_logps.double()).nan_to_num(nan=0.0), 0.0)
    if mode.startswith("sequence"):
        log_ratio = log_ratio.sum(1, keepdim=True)  # (B, 1)
    ratio = log_ratio.exp()
    acted = (ratio > cap) | (ratio < cap_min)
    weights = ratio.clamp(cap_min, cap) if mode.endswith("truncate") else torch.where(acted, 0.0, ratio)
    if mode.startswith("token"):
        weights, acted = torch.where(mask, weights, 0.0), acted & mask
    return weights.float(), acted
