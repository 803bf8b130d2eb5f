"""lenvm_rl.returns against plain-Python loop references (written here, independently) and hand cases."""

import math

import pytest
import torch

from lenvm_rl.advantages import expected_length_score, group_stats, length_advantages, lenvm_state_values
from lenvm_rl.returns import (
    auto_gamma,
    masked_gae,
    mean_relative_error,
    prompt_boundary_ground_truth,
    remaining_from_value,
    resolve_gamma,
    td_residuals,
    value_from_remaining,
    value_targets,
)
from rewards.scores import BUDGET_KINDS, budget_hit, budget_kind_codes, l1_length_score, lifebench_length_score

NAN = float("nan")


# ---------------------------------------------------------------------------------- loop references


def ref_lifebench(length, budget, kind):
    deviation = (length - budget) / budget
    if kind == "exact":
        return math.exp(5 * deviation) if deviation < 0 else math.exp(-2 * deviation)
    if kind == "at_most":
        return 1.0 if length <= budget else math.exp(-2 * deviation)
    return 1.0 if length >= budget else math.exp(5 * deviation)


def ref_l1(length, budget, kind, alpha=0.0003, delta=0.5):
    if kind == "exact":
        return -alpha * abs(length - budget)
    if kind == "at_most":
        return min(max(alpha * (budget - length) + delta, 0.0), 1.0)
    return min(max(alpha * (length - budget) + delta, 0.0), 1.0)


def ref_value_targets(lengths, finished, num_states, gamma, bootstrap=None):
    targets = [[0.0] * num_states for _ in lengths]
    mask = [[False] * num_states for _ in lengths]
    for b, (length, done) in enumerate(zip(lengths, finished)):
        if not done and bootstrap is None:
            continue
        for t in range(min(length, num_states - 1) + 1):
            targets[b][t] = -(1 - gamma ** (length - t))
            if not done:
                targets[b][t] += gamma ** (length - t) * bootstrap[b]
            mask[b][t] = True
    return targets, mask


def ref_gae(rewards, values, mask, gamma, lam):
    """A_t = sum of (γλ)^(k-t) δ_k from t to the end of t's run of valid positions."""
    advantages, returns = [], []
    for r, v, m in zip(rewards, values, mask):
        row_adv, row_ret = [], []
        for t in range(len(r)):
            if not m[t]:
                row_adv.append(0.0)
                row_ret.append(0.0)
                continue
            total, k = 0.0, t
            while k < len(r) and m[k]:
                total += (gamma * lam) ** (k - t) * (r[k] + gamma * v[k + 1] - v[k])
                k += 1
            row_adv.append(total)
            row_ret.append(total + v[t])
        advantages.append(row_adv)
        returns.append(row_ret)
    return advantages, returns


def ref_expected_score(value, gamma, start, cap, budget, kind, score):
    """E[S(start + n)] with P(n = k) = p (1 - p)^k below the cap and the remaining mass at the cap."""
    u = min(max(1 + value, 1e-12), 1.0)
    p = min(max(u * (1 - gamma) / (1 - u * gamma), 0.0), 1.0)
    total = sum(p * (1 - p) ** k * score(start + k, budget, kind) for k in range(cap))
    return total + (1 - p) ** cap * score(start + cap, budget, kind)


def ref_length_advantages(
    values,
    num_actions,
    finished,
    gamma,
    lam,
    mode,
    budget,
    kind,
    score,
    discount,
    eos_credit=False,
    potential="point",
    max_tokens=None,
    anchor=None,
):
    """One row. Actions j = 0 .. num_actions - 1; a finished row's last action is EOS (s_L -> terminal)."""
    d = gamma if discount is None else discount
    length = num_actions - 1 if finished else num_actions
    v = [values[j] for j in range(length + 1)]
    if finished and not eos_credit:
        v[length] = 0.0
    if mode == "budget":
        if potential == "point":
            phi = [score(j + math.log(1 + v[j]) / math.log(gamma), budget, kind) for j in range(length + 1)]
        else:
            phi = [
                ref_expected_score(v[j], gamma, j, max(max_tokens - j, 0), budget, kind, score)
                for j in range(length + 1)
            ]
        if anchor is not None:
            phi = [p - phi[0] + anchor for p in phi]
        if finished:
            if not eos_credit:
                phi[length] = score(length, budget, kind)
            phi.append(score(length, budget, kind))  # terminal state after EOS
        deltas = [d * phi[j + 1] - phi[j] for j in range(num_actions)]
    else:
        v.append(0.0)  # terminal after EOS (never read for a truncated row)
        rewards = [0.0 if mode == "shaping" or j == length else -(1 - gamma) for j in range(num_actions)]
        deltas = [rewards[j] + d * v[j + 1] - v[j] for j in range(num_actions)]
        if mode == "shaping":
            return deltas
    return [sum((d * lam) ** (k - j) * deltas[k] for k in range(j, num_actions)) for j in range(num_actions)]


def random_rl_batch(seed, batch_size=8, num_tokens=10, eos_values=False):
    """TRL-like batch: mask covers L tokens + EOS (finished) or L tokens (truncated); nan where unread.

    ``eos_values``: finished rows also hold a value for s_L (read with eos_credit)."""
    g = torch.Generator().manual_seed(seed)
    finished = torch.rand(batch_size, generator=g) < 0.5
    finished[:2] = torch.tensor([True, False])
    num_actions = torch.randint(1, num_tokens + 1, (batch_size,), generator=g)
    num_actions[1] = num_tokens  # a truncated row at the generation limit, as TRL makes them
    mask = torch.arange(num_tokens) < num_actions[:, None]
    values = -(0.02 + 0.93 * torch.rand(batch_size, num_tokens + 1, generator=g, dtype=torch.float64))
    for b in range(batch_size):
        length = int(num_actions[b]) - int(finished[b])
        values[b, length + (0 if finished[b] else 1) :] = NAN  # finished: V(s_L) := 0; truncated: V(s_L) bootstraps
        if finished[b]:
            values[b, length] = (
                -(0.02 + 0.93 * torch.rand(1, generator=g, dtype=torch.float64)).item() if eos_values else NAN
            )
    budgets = torch.randint(1, 2 * num_tokens, (batch_size,), generator=g)
    kinds = torch.randint(0, 3, (batch_size,), generator=g)
    return values, mask, finished, num_actions, budgets, kinds


# -------------------------------------------------------------------------------------- value <-> length


def test_value_from_remaining_hand_case():
    assert value_from_remaining(torch.tensor([2, 1, 0]), 0.5).tolist() == [-0.75, -0.5, 0.0]


def test_value_remaining_round_trip_float64():
    remaining = torch.arange(0, 5000, dtype=torch.float64)
    value = value_from_remaining(remaining, 0.999)
    assert value.dtype == torch.float64
    assert torch.allclose(value, torch.tensor([-(1 - 0.999**n) for n in range(5000)], dtype=torch.float64))
    back = remaining_from_value(value, 0.999)
    assert back.dtype == torch.float64
    assert torch.allclose(back, remaining, atol=1e-6)


def test_value_remaining_low_precision_inputs_are_computed_in_float64_and_returned_float32():
    value = torch.tensor([-0.99, -0.9, -0.5, -0.01, 0.0], dtype=torch.bfloat16)
    out = remaining_from_value(value, 0.99)
    assert out.dtype == torch.float32
    expected = [math.log(1 + float(v)) / math.log(0.99) for v in value.double()]
    assert torch.allclose(out, torch.tensor(expected), rtol=1e-6)
    remaining = torch.tensor([0, 3, 70], dtype=torch.bfloat16)
    assert value_from_remaining(remaining, 0.99).dtype == torch.float32
    assert value_from_remaining(torch.tensor([3]), 0.99).dtype == torch.float32  # integer input
    round_trip = remaining_from_value(value_from_remaining(remaining, 0.99), 0.99)
    assert torch.allclose(round_trip, remaining.float(), atol=1e-3)


def test_remaining_from_value_is_finite_at_the_edges():
    out = remaining_from_value(torch.tensor([-1.0, -1.5, 0.0, 0.2]), 0.99)
    assert torch.isfinite(out).all()
    assert out[0] > 2000 and out[1] == out[0]  # -1 (or below): large but finite
    assert out[2:].tolist() == [0.0, 0.0]  # a slightly positive prediction means nothing remains


# ---------------------------------------------------------------------------------------------- gamma


def test_auto_gamma_maps_the_99th_percentile_length_to_099():
    lengths = torch.randint(5, 900, (1000,), generator=torch.Generator().manual_seed(0))
    gamma = auto_gamma(lengths)
    length_99 = float(torch.quantile(lengths.double(), 0.99))
    assert 0 < gamma < 1
    assert math.isclose(1 - gamma**length_99, 0.99, rel_tol=1e-12)
    assert math.isclose(auto_gamma([100] * 10), 0.01 ** (1 / 100), rel_tol=1e-12)
    assert math.isclose(1 - auto_gamma([50] * 4, quantile=0.5, target_value=0.9) ** 50, 0.9, rel_tol=1e-12)


def test_auto_gamma_rejects_empty_or_too_short_lengths():
    with pytest.raises(ValueError, match="gamma: 'auto' needs rollout lengths"):
        auto_gamma(torch.tensor([]))
    with pytest.raises(ValueError, match="at least 1 token"):
        auto_gamma([0, 0, 0])


def test_resolve_gamma():
    assert resolve_gamma(0.99) == 0.99
    assert resolve_gamma("0.9") == 0.9  # a CLI flag arrives as text
    assert resolve_gamma("auto", lengths=[100] * 10) == auto_gamma([100] * 10)
    with pytest.raises(ValueError, match="gamma: 'auto' needs rollout lengths"):
        resolve_gamma("auto")
    for bad in (1.0, 0.0, -0.5, 1.5, "fast", None, True, float("nan")):
        with pytest.raises(ValueError, match=r"gamma: must be a number in \(0, 1\) or 'auto', got"):
            resolve_gamma(bad)


# ------------------------------------------------------------------------------------------- targets


def test_value_targets_hand_cases():
    targets, mask = value_targets(torch.tensor([2, 2]), torch.tensor([True, False]), 4, 0.5)
    assert targets[0].tolist() == [-0.75, -0.5, 0.0, 0.0]
    assert mask.tolist() == [[True, True, True, False], [False] * 4]  # truncated row dropped
    assert targets.dtype == torch.float32 and mask.dtype == torch.bool
    targets, mask = value_targets(torch.tensor([2]), torch.tensor([False]), 4, 0.5, torch.tensor([-0.5]))
    assert targets[0].tolist() == [-0.875, -0.75, -0.5, 0.0]  # -(1 - γ^n) + γ^n V_boot
    assert mask[0].tolist() == [True, True, True, False]


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_value_targets_against_loop(dtype):
    g = torch.Generator().manual_seed(1)
    lengths = torch.randint(0, 12, (9,), generator=g)
    finished = torch.rand(9, generator=g) < 0.5
    bootstrap = -torch.rand(9, generator=g, dtype=torch.float64).to(dtype)
    for boot in (None, bootstrap):
        targets, mask = value_targets(lengths, finished, 10, 0.9, boot)
        ref_t, ref_m = ref_value_targets(
            lengths.tolist(), finished.tolist(), 10, 0.9, None if boot is None else boot.double().tolist()
        )
        assert mask.tolist() == ref_m
        assert torch.allclose(targets, torch.tensor(ref_t, dtype=torch.float32), atol=1e-6)


# ----------------------------------------------------------------------------------------------- GAE


def random_gae_batch(seed, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    batch_size, num_tokens = 6, 9
    valid = torch.randint(0, num_tokens + 1, (batch_size,), generator=g)
    mask = torch.arange(num_tokens) < valid[:, None]
    mask[0] = torch.tensor([True, True, False, True, True, True, False, False, False])  # a hole cuts the sum
    rewards = torch.randn(batch_size, num_tokens, generator=g, dtype=torch.float64)
    values = torch.randn(batch_size, num_tokens + 1, generator=g, dtype=torch.float64)
    rewards[~mask] = NAN  # padding is never read ...
    read = torch.cat([mask, torch.zeros(batch_size, 1, dtype=torch.bool)], 1)
    read[:, 1:] |= mask  # ... except the value right after a valid step (the bootstrap)
    values[~read] = NAN
    return rewards.to(dtype), values.to(dtype), mask


@pytest.mark.parametrize("gamma,lam", [(0.9, 0.95), (1.0, 1.0), (0.5, 0.0), (0.0, 0.7), (0.99, 1.0)])
@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_masked_gae_against_loop(gamma, lam, dtype):
    rewards, values, mask = random_gae_batch(2, dtype)
    advantages, returns = masked_gae(rewards, values, mask, gamma, lam)
    assert advantages.dtype == returns.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    ref_adv, ref_ret = ref_gae(rewards.double().tolist(), values.double().tolist(), mask.tolist(), gamma, lam)
    assert torch.allclose(advantages.double(), torch.tensor(ref_adv, dtype=torch.float64), atol=1e-5)
    assert torch.allclose(returns.double(), torch.tensor(ref_ret, dtype=torch.float64), atol=1e-5)
    assert (advantages[~mask] == 0).all() and (returns[~mask] == 0).all()


def test_masked_gae_lambda_one_gamma_one_is_reward_to_go_minus_value():
    rewards = torch.tensor([[1.0, 2.0, 3.0, 0.0], [1.0, 1.0, 1.0, 1.0]])
    values = torch.tensor([[0.5, 0.25, 2.0, 7.0, 9.0], [1.0, 2.0, 3.0, 4.0, 10.0]])
    mask = torch.tensor([[True, True, True, False], [True, True, True, True]])
    advantages, returns = masked_gae(rewards, values, mask, 1.0, 1.0)
    # row 0: bootstrap values[0, 3] = 7; row 1: bootstrap values[1, 4] = 10
    assert advantages.tolist() == [
        [6 + 7 - 0.5, 5 + 7 - 0.25, 3 + 7 - 2.0, 0.0],
        [14 - 1.0, 13 - 2.0, 12 - 3.0, 11 - 4.0],
    ]
    assert returns.tolist() == [[13.0, 12.0, 10.0, 0.0], [14.0, 13.0, 12.0, 11.0]]


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_td_residuals_against_loop(dtype):
    _, values, mask = random_gae_batch(3, dtype)
    out = td_residuals(values, mask, 0.9)
    v = values.double().tolist()
    ref = [
        [-(1 - 0.9) + 0.9 * v[b][t + 1] - v[b][t] if mask[b, t] else 0.0 for t in range(mask.shape[1])]
        for b in range(mask.shape[0])
    ]
    assert torch.allclose(out.double(), torch.tensor(ref, dtype=torch.float64), atol=1e-5)
    # A perfect LenVM has zero residuals: V_t = -(1 - γ^(L - t)).
    perfect = value_from_remaining(torch.arange(5, -1, -1), 0.9)[None]  # (1, 6), L = 5
    assert torch.allclose(td_residuals(perfect, torch.ones(1, 5, dtype=torch.bool), 0.9), torch.zeros(1, 5), atol=1e-7)


# ------------------------------------------------------------------------------------ prompt boundary


def test_prompt_boundary_ground_truth_of_equal_lengths_is_that_length():
    lengths = torch.tensor([[7] * 5, [120] * 5, [0] * 5])
    expected = torch.tensor([7.0, 120.0, 0.0], dtype=torch.float64)
    assert torch.allclose(prompt_boundary_ground_truth(lengths, 0.97), expected)


def test_prompt_boundary_ground_truth_against_loop_ragged():
    lengths = [torch.tensor([3, 10, 40]), torch.tensor([5]), torch.tensor([100, 1, 20, 7])]
    gamma = 0.95
    ref = []
    for row in lengths:
        mu = sum(1 - gamma ** int(length) for length in row) / len(row)
        ref.append(math.log(1 - mu) / math.log(gamma))
    out = prompt_boundary_ground_truth(lengths, gamma)
    assert out.dtype == torch.float64
    assert torch.allclose(out, torch.tensor(ref, dtype=torch.float64))
    assert out[0] < sum([3, 10, 40]) / 3  # certainty equivalent, below the mean length (Jensen)


def test_mean_relative_error_hand_case():
    mre = mean_relative_error(torch.tensor([11.0, 8.0]), torch.tensor([10.0, 10.0]))
    assert math.isclose(float(mre), (0.1 + 0.2) / 2, rel_tol=1e-6)


# ------------------------------------------------------------------------------------------------ scores


def test_length_scores_against_loop():
    lengths = torch.tensor([1.0, 8.0, 15.5, 16.0, 17.0, 32.0, 3000.0] * 3)
    budgets = torch.tensor([16.0] * 21)
    kind_names = [name for name in BUDGET_KINDS for _ in range(7)]
    kinds = budget_kind_codes(kind_names)
    for score, ref in ((lifebench_length_score, ref_lifebench), (l1_length_score, ref_l1)):
        expected = [ref(float(length), 16.0, kind) for length, kind in zip(lengths, kind_names)]
        assert torch.allclose(score(lengths, budgets, kinds), torch.tensor(expected), atol=1e-7)
    with pytest.raises(ValueError, match="budget_kind: 'around'"):
        budget_kind_codes(["exact", "around"])


# -------------------------------------------------------------------------------------- LenVM inside RL


def test_lenvm_state_values_against_loop():
    g = torch.Generator().manual_seed(4)
    batch_size, prompt_length, num_tokens = 6, 3, 7
    values_full = -torch.rand(batch_size, prompt_length + num_tokens, generator=g)
    finished = torch.tensor([True, False, True, False, True, True])
    num_masked = torch.tensor([3, 7, 7, 2, 1, 5])  # finished: L + 1 (EOS included); truncated: L
    mask = torch.arange(num_tokens) < num_masked[:, None]
    out = lenvm_state_values(values_full, prompt_length, mask, finished)
    assert out.shape == (batch_size, num_tokens + 1)
    for b in range(batch_size):
        length = int(num_masked[b]) - int(finished[b])
        for j in range(num_tokens + 1):
            kept = j < length if finished[b] else j <= length  # finished: V(s_L) := 0
            assert out[b, j] == (values_full[b, prompt_length - 1 + j] if kept else 0.0)


@pytest.mark.parametrize("mode", ["budget", "efficiency", "shaping"])
@pytest.mark.parametrize("gamma,lam,discount", [(0.9, 0.95, None), (0.8, 1.0, 1.0), (0.95, 0.0, None)])
def test_length_advantages_against_loop(mode, gamma, lam, discount):
    values, mask, finished, num_actions, budgets, kinds = random_rl_batch(5)
    for score, ref_score in (("lifebench", ref_lifebench), ("l1", ref_l1)):
        out = length_advantages(values, mask, finished, gamma, lam, mode, budgets, kinds, score, discount=discount)
        assert out.shape == mask.shape and torch.isfinite(out).all()
        assert (out[~mask] == 0).all()
        for b in range(len(values)):
            ref = ref_length_advantages(
                values[b].tolist(),
                int(num_actions[b]),
                bool(finished[b]),
                gamma,
                lam,
                mode,
                int(budgets[b]),
                BUDGET_KINDS[kinds[b]],
                ref_score,
                discount,
            )
            assert torch.allclose(
                out[b, : int(num_actions[b])].double(), torch.tensor(ref, dtype=torch.float64), atol=1e-5
            ), (mode, score, b)


def test_length_advantages_bf16_values():
    values, mask, finished, num_actions, budgets, kinds = random_rl_batch(6)
    low = values.to(torch.bfloat16)
    for mode in ("budget", "efficiency", "shaping"):
        out = length_advantages(low, mask, finished, 0.9, 0.95, mode, budgets, kinds)
        assert out.dtype == torch.float32
        expected = length_advantages(low.double(), mask, finished, 0.9, 0.95, mode, budgets, kinds)
        assert torch.allclose(out.double(), expected, atol=1e-5)


def test_budget_mode_telescopes_with_lambda_one_and_no_discount():
    """d = λ = 1: A_j = S(L, N) - Φ_j (finished) or Φ(s_T) - Φ_j (truncated); the EOS action gets 0."""
    gamma = 0.8
    values, mask, finished, num_actions, budgets, kinds = random_rl_batch(7)
    out = length_advantages(values, mask, finished, gamma, 1.0, "budget", budgets, kinds, discount=1.0)
    for b in range(len(values)):
        length = int(num_actions[b]) - int(finished[b])
        kind, budget = BUDGET_KINDS[kinds[b]], int(budgets[b])
        predicted = [j + math.log(1 + float(values[b, j])) / math.log(gamma) for j in range(length + 1)]  # Λ_j
        phi = [ref_lifebench(total, budget, kind) for total in predicted]
        final = ref_lifebench(length if finished[b] else predicted[length], budget, kind)
        expected = [final - p for p in phi[:length]] + ([0.0] if finished[b] else [])
        assert torch.allclose(
            out[b, : int(num_actions[b])].double(), torch.tensor(expected, dtype=torch.float64), atol=1e-6
        )


def test_efficiency_mode_with_lambda_one_is_realised_return_minus_value():
    gamma = 0.9
    values, mask, finished, num_actions, _, _ = random_rl_batch(8)
    out = length_advantages(values, mask, finished, gamma, 1.0, "efficiency")
    for b in torch.nonzero(finished).flatten().tolist():
        length = int(num_actions[b]) - 1
        expected = [-(1 - gamma ** (length - j)) - float(values[b, j]) for j in range(length)] + [0.0]
        assert torch.allclose(out[b, : length + 1].double(), torch.tensor(expected, dtype=torch.float64), atol=1e-9)


def test_shaping_mode_sums_to_minus_initial_value_without_discount():
    values, mask, finished, _, _, _ = random_rl_batch(9)
    out = length_advantages(values, mask, finished, 0.9, 0.5, "shaping", discount=1.0)
    assert torch.allclose(out[finished].sum(1), -values[finished, 0])


def test_length_advantages_hand_case_one_finished_one_truncated():
    """γ = 0.5, P = 2, T = 4. Row 0: L = 2 then EOS. Row 1: truncated at T = 4."""
    values_full = torch.tensor(
        [
            [9.0, -0.5, -0.25, 0.9, 0.7, 0.3],  # 0.9 .. 0.3: V(s_2) and beyond, overwritten
            [9.0, -0.5, -0.5, -0.5, -0.5, -0.5],
        ]
    )
    mask = torch.tensor([[True, True, True, False], [True, True, True, True]])
    finished = torch.tensor([True, False])
    values = lenvm_state_values(values_full, 2, mask, finished)
    assert values.tolist() == [[-0.5, -0.25, 0.0, 0.0, 0.0], [-0.5] * 5]

    efficiency = length_advantages(values, mask, finished, 0.5, 1.0, "efficiency")
    # row 0: A_j = G_j - V_j = [-0.75 + 0.5, -0.5 + 0.25], EOS 0; row 1: -(1 - γ^(4-j)) + γ^(4-j) V_4 - V_j
    assert efficiency.tolist() == [[-0.25, -0.25, 0.0, 0.0], [-0.46875, -0.4375, -0.375, -0.25]]

    shaping = length_advantages(values, mask, finished, 0.5, 1.0, "shaping")
    assert shaping.tolist() == [[0.375, 0.25, 0.0, 0.0], [0.25] * 4]

    budgets, kinds = torch.tensor([2, 8]), budget_kind_codes(["exact", "at_most"])
    budget = length_advantages(values, mask, finished, 0.5, 1.0, "budget", budgets, kinds, discount=1.0)
    # row 0: Λ_0 = 0 + 1 = 1, Λ_1 = 1 + log2(4/3); A_j = S(2, 2) - S(Λ_j, 2) = 1 - e^{5 (Λ_j - 2) / 2}
    lambda_1 = 1 + math.log(0.75) / math.log(0.5)
    expected_0 = [1 - math.exp(-2.5), 1 - math.exp(2.5 * (lambda_1 - 2)), 0.0, 0.0]
    assert torch.allclose(budget[0].double(), torch.tensor(expected_0, dtype=torch.float64), atol=1e-6)
    assert budget[1].tolist() == [0.0] * 4  # Λ_j = j + 1 <= 8: at_most satisfied everywhere


def test_length_advantages_rejects_bad_arguments():
    values, mask, finished, _, budgets, kinds = random_rl_batch(10)
    with pytest.raises(ValueError, match="mode: 'length' is not a length advantage mode; use one of budget, effici"):
        length_advantages(values, mask, finished, 0.9, 0.95, "length")
    with pytest.raises(ValueError, match="needs budgets and kinds"):
        length_advantages(values, mask, finished, 0.9, 0.95, "budget")
    with pytest.raises(ValueError, match="score: 'l2' is not a length score; use one of lifebench, l1"):
        length_advantages(values, mask, finished, 0.9, 0.95, "budget", budgets, kinds, score="l2")


@pytest.mark.parametrize("mode", ["budget", "efficiency", "shaping"])
@pytest.mark.parametrize("lam,discount", [(0.95, None), (1.0, 1.0)])
def test_eos_credit_against_loop(mode, lam, discount):
    gamma = 0.9
    values, mask, finished, num_actions, budgets, kinds = random_rl_batch(11, eos_values=True)
    out = length_advantages(
        values, mask, finished, gamma, lam, mode, budgets, kinds, discount=discount, eos_credit=True
    )
    assert torch.isfinite(out).all() and (out[~mask] == 0).all()
    for b in range(len(values)):
        ref = ref_length_advantages(
            values[b].tolist(),
            int(num_actions[b]),
            bool(finished[b]),
            gamma,
            lam,
            mode,
            int(budgets[b]),
            BUDGET_KINDS[kinds[b]],
            ref_lifebench,
            discount,
            eos_credit=True,
        )
        assert torch.allclose(
            out[b, : int(num_actions[b])].double(), torch.tensor(ref, dtype=torch.float64), atol=1e-5
        ), (mode, b)


def test_eos_credit_hand_case_only_the_stop_differs():
    """Two rows share their first two tokens and their LenVM values; row 0 stops after 2 tokens, row 1 writes a
    third and stops. Exactly 3 tokens asked, γ = 0.5, d = λ = 1. V(s_2) = -0.5 (one more token expected):
    Λ_2 = 2 + 1 = 3, Φ(s_2) = S(3, 3) = 1. Without EOS credit s_2 is terminal for row 0, and its EOS gets 0; with it,
    row 0's EOS gets S(2, 3) - Φ(s_2) = e^{5 (2 - 3) / 3} - 1 < 0 (it stopped too early) and row 1's third token
    gets S(3, 3) - Φ(s_2) = 0, its EOS S(3, 3) - Φ(s_3) with V(s_3) = -0.5 -> Λ_3 = 4: 1 - e^{-2 / 3} > 0."""
    values = torch.tensor([[-0.75, -0.75, -0.5, 0.0, 0.0], [-0.75, -0.75, -0.5, -0.5, 0.0]], dtype=torch.float64)
    mask = torch.tensor([[True, True, True, False], [True, True, True, True]])
    finished = torch.tensor([True, True])
    budgets, kinds = torch.tensor([3, 3]), budget_kind_codes(["exact", "exact"])
    plain = length_advantages(values, mask, finished, 0.5, 1.0, "budget", budgets, kinds, discount=1.0)
    credit = length_advantages(
        values, mask, finished, 0.5, 1.0, "budget", budgets, kinds, discount=1.0, eos_credit=True
    )
    assert plain[0, 2] == 0.0 and plain[1, 3] == 0.0  # the stop decision carries nothing
    assert math.isclose(credit[0, 2], math.exp(-5 / 3) - 1, abs_tol=1e-6)
    assert math.isclose(credit[1, 2], 0.0, abs_tol=1e-6)
    assert math.isclose(credit[1, 3], 1 - math.exp(-2 / 3), abs_tol=1e-6)
    assert torch.equal(plain[:, :2], credit[:, :2])  # the tokens before s_2 are the same in both


@pytest.mark.parametrize("lam", [1.0, 0.9])
def test_expected_score_potential_against_loop(lam):
    gamma, max_tokens = 0.8, 12
    values, mask, finished, num_actions, budgets, kinds = random_rl_batch(12)
    out = length_advantages(
        values,
        mask,
        finished,
        gamma,
        lam,
        "budget",
        budgets,
        kinds,
        discount=1.0,
        potential="expected",
        max_completion_tokens=max_tokens,
    )
    assert torch.isfinite(out).all() and (out[~mask] == 0).all()
    for b in range(len(values)):
        ref = ref_length_advantages(
            values[b].tolist(),
            int(num_actions[b]),
            bool(finished[b]),
            gamma,
            lam,
            "budget",
            int(budgets[b]),
            BUDGET_KINDS[kinds[b]],
            ref_lifebench,
            1.0,
            potential="expected",
            max_tokens=max_tokens,
        )
        assert torch.allclose(
            out[b, : int(num_actions[b])].double(), torch.tensor(ref, dtype=torch.float64), atol=1e-5
        ), b


def test_expected_length_score_hand_cases():
    """γ = 0.5, V = -0.5: u = 0.5, p = 0.5 · 0.5 / 0.75 = 1/3. Cap 2: P(0) = 1/3, P(1) = 2/9, P(2) = 4/9."""
    at_most = budget_kind_codes(["at_most"])[None, :]
    out = expected_length_score(torch.tensor([[-0.5]]), 0.5, torch.tensor([[2]]), torch.tensor([[1]]), at_most)
    expected = 1 / 3 + 2 / 9 + 4 / 9 * math.exp(-2.0)  # S(0) = S(1) = 1, S(2, at most 1) = e^{-2}
    assert math.isclose(out.item(), expected, rel_tol=1e-7)  # the scores are float32
    # the uncapped geometric law's E[γ^n] is 1 + V: check on a far cap
    values = torch.tensor([[-0.9, -0.5, -0.1]])
    u = 1 + values.double()
    p = u * 0.5 / (1 - u * 0.5)
    assert torch.allclose(p / (1 - (1 - p) * 0.5), u)


def test_expected_hit_probability_hand_case():
    """A callable score: budget_hit gives P(hit). Same law as above (P(0) = 1/3, P(1) = 2/9, P(2) = 4/9), 1 token
    already written: at most 2 tokens is hit by n <= 1 (5/9); at least 3 by n = 2 (4/9)."""
    kinds = budget_kind_codes(["at_most", "at_least"])[:, None]
    out = expected_length_score(
        torch.tensor([[-0.5], [-0.5]]),
        0.5,
        torch.tensor([[2], [2]]),
        torch.tensor([[2], [3]]),
        kinds,
        score=budget_hit,
        start=1,
    )
    assert torch.allclose(out, torch.tensor([[5 / 9], [4 / 9]], dtype=torch.float64))


@pytest.mark.parametrize("lam", [1.0, 0.95])
def test_group_anchored_potentials_against_loop(lam):
    gamma = 0.8
    values, mask, finished, num_actions, budgets, kinds = random_rl_batch(13)
    anchors = torch.rand(len(values), generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    for potential in ("point", "expected"):
        out = length_advantages(
            values,
            mask,
            finished,
            gamma,
            lam,
            "budget",
            budgets,
            kinds,
            discount=1.0,
            potential=potential,
            max_completion_tokens=12,
            anchors=anchors,
        )
        for b in range(len(values)):
            ref = ref_length_advantages(
                values[b].tolist(),
                int(num_actions[b]),
                bool(finished[b]),
                gamma,
                lam,
                "budget",
                int(budgets[b]),
                BUDGET_KINDS[kinds[b]],
                ref_lifebench,
                1.0,
                potential=potential,
                max_tokens=12,
                anchor=float(anchors[b]),
            )
            assert torch.allclose(
                out[b, : int(num_actions[b])].double(), torch.tensor(ref, dtype=torch.float64), atol=1e-5
            ), (potential, b)


def test_group_anchored_hand_case():
    """d = λ = 1: A_j = S(L, N) - anchor - (Φ_j - Φ_0); the first action's advantage is S(L, N) - group mean."""
    gamma = 0.5
    values = torch.tensor([[-0.75, -0.5, 0.0], [-0.75, -0.75, -0.5]], dtype=torch.float64)  # Λ_0 = 2 in both
    mask = torch.tensor([[True, True], [True, True]])
    finished = torch.tensor([True, False])  # row 0: L = 1 then EOS; row 1: truncated at 2
    budgets, kinds = torch.tensor([2, 2]), budget_kind_codes(["exact", "exact"])
    scores = lifebench_length_score(torch.tensor([1.0, 2.0]), budgets, kinds)  # realised S: e^{-2.5}, 1
    mean, std = group_stats(scores.double(), 2)
    out = length_advantages(values, mask, finished, gamma, 1.0, "budget", budgets, kinds, discount=1.0, anchors=mean)
    assert math.isclose(out[0, 0], scores[0].item() - mean[0].item(), abs_tol=1e-6)
    # row 0, action 1 is the EOS from s_1 (terminal without eos_credit): 0
    assert out[0, 1] == 0.0
    # row 1 is truncated: it bootstraps from Φ(s_2) = S(2 + 1, 2) (Φ(s_1) = S(1 + 2, 2), both e^{-1}), so the shift
    # cancels: a truncated row has no realised score to compare with the group's
    phi_1 = phi_2 = math.exp(-1.0)
    phi_0 = 1.0  # Λ_0 = 2
    assert math.isclose(out[1, 0], phi_2 - phi_0, abs_tol=1e-6)
    assert math.isclose(out[1, 1], phi_2 - phi_1, abs_tol=1e-6)
    assert torch.allclose(std, torch.tensor([1 - math.exp(-2.5)] * 2, dtype=torch.float64) / math.sqrt(2))
