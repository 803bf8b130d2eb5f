"""lenvm_rl.segment_advantages against a plain-Python loop reference (written here, independently), a hand case,
and the one-segment path it must reduce to."""

import math

import pytest
import torch
from test_returns import ref_lifebench

from lenvm_rl.advantages import expected_length_score, length_advantages
from lenvm_rl.segment_advantages import segment_length_advantages, segment_token_masks
from rewards.scores import BUDGET_KINDS


def ref_segment_advantages(values, rows, gamma, lam, mode, budgets, kinds, d, eos_credit, potential, cap, anchors):
    """One row, one segment, one token at a time. ``rows``: (n valid tokens, finished, T, closed) per row."""
    out = torch.zeros(len(rows), values.shape[1] - 1, 2, dtype=torch.float64)
    for b, (n, finished, thinking, closed) in enumerate(rows):
        length = n - int(finished)
        for h in (0, 1):
            if h == 0:
                tokens = list(range(thinking)) if closed else list(range(n))
            else:
                tokens = list(range(thinking, n)) if closed else []
            if not tokens:
                continue
            budget, kind = float(budgets[b][h]), BUDGET_KINDS[int(kinds[b][h])]
            if h == 0 and closed:
                end, final = thinking, ref_lifebench(thinking, budget, kind)
            elif finished:
                end = length + int(eos_credit)
                final = ref_lifebench(length - thinking, budget, kind) if (h == 1 and closed) else 0.0
            else:
                end, final = None, None
            start = 0 if h == 0 else thinking

            def raw(j, h=h, b=b, budget=budget, kind=kind, start=start):
                v = float(values[b, j, h])
                if mode != "budget":
                    return v
                written = j - start
                if potential == "expected":
                    return float(
                        expected_length_score(
                            torch.tensor([[v]]),
                            gamma,
                            torch.tensor([[max(cap - j, 0)]]),
                            torch.tensor([[budget]]),
                            torch.tensor([[int(kinds[b][h])]]),
                            start=written,
                        )
                    )
                return ref_lifebench(written + math.log(1 + max(v, -1 + 1e-12)) / math.log(gamma), budget, kind)

            shift = 0.0 if anchors is None else float(anchors[b][h]) - raw(start)

            def phi(j, raw=raw, end=end, final=final, shift=shift):
                if end is not None and j >= end:
                    return final if mode == "budget" else 0.0
                return raw(j) + shift

            running = 0.0
            for j in reversed(tokens):
                reward = -(1 - gamma) if (mode == "efficiency" and not (finished and j >= length)) else 0.0
                delta = reward + d * phi(j + 1) - phi(j)
                running = delta + d * (0.0 if mode == "shaping" else lam) * running
                out[b, j, h] = running
    return out


# (valid tokens incl. an EOS when finished, finished, thinking tokens, closed); width 7
ROWS = [
    (6, True, 2, True),  # 2 thinking, 3 answer, EOS
    (7, False, 3, True),  # truncated after the close: the answer bootstraps
    (5, True, 4, False),  # EOS mid-thought: all thinking
    (7, False, 7, False),  # truncated mid-thought
    (4, True, 0, True),  # no thinking at all
    (4, True, 3, True),  # closes, then the EOS at once: the answer is the EOS alone
    (0, False, 0, False),  # emptied by mask_truncated_completions
]


def batch(seed=0):
    generator = torch.Generator().manual_seed(seed)
    width = 7
    mask = torch.tensor([[j < n for j in range(width)] for n, *_ in ROWS])
    finished = torch.tensor([row[1] for row in ROWS])
    thinking = torch.tensor([row[2] for row in ROWS])
    closed = torch.tensor([row[3] for row in ROWS])
    values = -torch.rand(len(ROWS), width + 1, 2, generator=generator, dtype=torch.float64) * 0.95
    budgets = torch.randint(1, 6, (len(ROWS), 2), generator=generator).double()
    kinds = torch.randint(0, 3, (len(ROWS), 2), generator=generator)
    return values, mask, finished, thinking, closed, budgets, kinds


@pytest.mark.parametrize("mode", ["budget", "efficiency", "shaping"])
@pytest.mark.parametrize("eos_credit", [False, True])
@pytest.mark.parametrize("d, lam", [(1.0, 1.0), (0.9, 0.7)])
def test_matches_the_loop(mode, eos_credit, d, lam):
    values, mask, finished, thinking, closed, budgets, kinds = batch()
    got = segment_length_advantages(
        values, mask, finished, thinking, closed, 0.8, lam, mode, budgets, kinds, discount=d, eos_credit=eos_credit
    )
    ref = ref_segment_advantages(values, ROWS, 0.8, lam, mode, budgets, kinds, d, eos_credit, "point", 7, None)
    torch.testing.assert_close(got, ref, atol=1e-6, rtol=0)
    # each token carries its own segment's advantage only
    masks = segment_token_masks(mask, thinking, closed)
    assert not got[~masks].any()
    assert torch.equal(masks.sum(-1), mask.long())


@pytest.mark.parametrize("potential, anchored", [("expected", False), ("point", True), ("expected", True)])
def test_expected_potential_and_anchors_match_the_loop(potential, anchored):
    values, mask, finished, thinking, closed, budgets, kinds = batch(1)
    anchors = torch.rand(len(ROWS), 2, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    anchors = anchors if anchored else None
    got = segment_length_advantages(
        values, mask, finished, thinking, closed, 0.8, 1.0, "budget", budgets, kinds, discount=1.0,
        potential=potential, max_completion_tokens=7, anchors=anchors,
    )  # fmt: skip
    ref = ref_segment_advantages(values, ROWS, 0.8, 1.0, "budget", budgets, kinds, 1.0, False, potential, 7, anchors)
    torch.testing.assert_close(got, ref, atol=1e-6, rtol=0)


def test_hand_case_thinking_tokens_against_the_thinking_budget_only():
    """2 thinking tokens, 1 answer token, EOS; both budgets exactly 2 tokens, γ = 0.5, d = λ = 1. The values are the
    exact segment returns except V_think(s_0), which says 1 thinking token is left instead of 2."""
    v = lambda n: 0.5**n - 1.0  # noqa: E731  V for n remaining tokens
    values = torch.tensor([[[v(1), v(1)], [v(1), v(1)], [0.0, v(1)], [0.0, 0.0], [0.0, 0.0]]])  # (1, 5, 2)
    mask = torch.tensor([[True, True, True, True]])
    advantages = segment_length_advantages(
        values, mask, torch.tensor([True]), torch.tensor([2]), torch.tensor([True]), 0.5, 1.0, "budget",
        torch.tensor([[2.0, 2.0]]), torch.tensor([[0, 0]]), discount=1.0,
    )  # fmt: skip
    # Token 0: realised S(2, 2) = 1 against Φ_0 = S(0 + 1, 2) = e^(5 (1 - 2) / 2); token 1 was predicted right.
    # The answer (1 token for an exact 2: S = e^-2.5 realised and predicted) gets 0, and so does the EOS.
    expected = torch.tensor([[[1 - math.exp(-2.5), 0.0], [0.0, 0.0], [0.0, 0.0], [0.0, 0.0]]])
    torch.testing.assert_close(advantages, expected.float(), atol=1e-6, rtol=0)
    # An unclosed finished row: the thinking is scored 0, so every thinking token gets -Φ_j.
    unclosed = segment_length_advantages(
        values, mask, torch.tensor([True]), torch.tensor([3]), torch.tensor([False]), 0.5, 1.0, "budget",
        torch.tensor([[2.0, 2.0]]), torch.tensor([[1, 0]]), discount=1.0,
    )  # fmt: skip
    # at_most 2: Φ_0 = S(1) = 1, Φ_1 = S(2) = 1, Φ_2 = S(2 + 0) = 1; the EOS action (s_3 is the end) gets 0.
    torch.testing.assert_close(unclosed[0, :, 0], torch.tensor([-1.0, -1.0, -1.0, 0.0]))
    assert not unclosed[..., 1].any()


@pytest.mark.parametrize("mode", ["budget", "efficiency", "shaping"])
def test_without_thinking_the_answer_is_the_one_segment_advantage(mode):
    values, mask, finished, _, _, budgets, kinds = batch(3)
    keep = torch.tensor([not (n == 0) for n, *_ in ROWS])
    values, mask, finished, budgets, kinds = values[keep], mask[keep], finished[keep], budgets[keep], kinds[keep]
    none, closed = torch.zeros(len(mask), dtype=torch.long), torch.ones(len(mask), dtype=torch.bool)
    for eos_credit in (False, True):
        got = segment_length_advantages(
            values, mask, finished, none, closed, 0.8, 0.9, mode, budgets, kinds, discount=0.95, eos_credit=eos_credit
        )
        single = length_advantages(
            values[..., 1], mask, finished, 0.8, 0.9, mode, budgets[:, 1], kinds[:, 1], discount=0.95,
            eos_credit=eos_credit,
        )  # fmt: skip
        torch.testing.assert_close(got[..., 1], single, atol=1e-6, rtol=0)
        assert not got[..., 0].any()


def test_bad_thinking_lengths_are_refused():
    values, mask, finished, thinking, closed, budgets, kinds = batch()
    with pytest.raises(ValueError, match="thinking_lengths"):
        segment_length_advantages(
            values, mask, finished, thinking + 1, closed, 0.8, 1.0, "budget", budgets, kinds, discount=1.0
        )
