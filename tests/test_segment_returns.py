"""The two-segment LenVM's targets (``returns.segment_value_targets``) against a Bellman loop and by hand."""

import random

import pytest
import torch

from lenvm_rl.returns import segment_td_residuals, segment_value_targets, td_residuals, value_targets


def reference_segment_targets(length, thinking, closed, finished, num_states, gamma, bootstrap=None):
    """Per state and value: walk the tokens backwards, G = -(1 - γ) + γ G on a token of the value's segment, G
    unchanged on the other's; start from 0 when the return is known, from the bootstrap value when not."""
    targets = [[0.0, 0.0] for _ in range(num_states)]
    mask = [[False, False] for _ in range(num_states)]
    for head in (0, 1):
        known = finished or (head == 0 and closed)
        if not known and bootstrap is None:
            continue
        for t in range(min(length, num_states - 1) + 1):
            g = 0.0 if known else bootstrap[head]
            for j in range(length - 1, t - 1, -1):
                if (j < thinking) == (head == 0):
                    g = -(1 - gamma) + gamma * g
            targets[t][head], mask[t][head] = g, True
    return targets, mask


@pytest.mark.parametrize("bootstrap", [False, True])
def test_segment_targets_match_the_bellman_loop(bootstrap):
    rng = random.Random(0)
    rows = []
    for _ in range(60):
        length = rng.randint(0, 9)
        thinking = rng.randint(0, length)
        closed = thinking < length or rng.random() < 0.5  # an unclosed thinking runs to the end
        rows.append((length, thinking, closed, rng.random() < 0.5, (rng.uniform(-1, 0), rng.uniform(-1, 0))))
    num_states, gamma = 11, 0.8
    lengths, thinking, closed, finished, boot = (torch.tensor(column) for column in zip(*rows))
    targets, mask = segment_value_targets(
        lengths, thinking, closed, finished, num_states, gamma, boot.double() if bootstrap else None
    )
    for i, (length, think, is_closed, is_finished, row_boot) in enumerate(rows):
        expected, expected_mask = reference_segment_targets(
            length, think, is_closed, is_finished, num_states, gamma, row_boot if bootstrap else None
        )
        assert mask[i].tolist() == expected_mask
        assert targets[i].double() == pytest.approx(torch.tensor(expected, dtype=torch.float64), abs=1e-6)


def test_segment_targets_by_hand():
    # L = 3: two thinking tokens, one answer token, finished. γ = 0.5.
    targets, mask = segment_value_targets(
        torch.tensor([3]), torch.tensor([2]), torch.tensor([True]), torch.tensor([True]), 5, 0.5
    )
    assert targets[0].tolist() == [[-0.75, -0.5], [-0.5, -0.5], [0.0, -0.5], [0.0, 0.0], [0.0, 0.0]]
    assert mask[0, :, 0].tolist() == [True, True, True, True, False]
    # Truncated mid-thought, without bootstrap: nothing is known; truncated in the answer: the thinking is.
    _, mask = segment_value_targets(
        torch.tensor([2, 2]), torch.tensor([2, 1]), torch.tensor([False, True]), torch.tensor([False, False]), 3, 0.5
    )
    assert not mask[0].any() and mask[1, :, 0].all() and not mask[1, :, 1].any()
    # Finished but never closed (EOS mid-thought): all thinking, the answer value 0 throughout.
    targets, _ = segment_value_targets(
        torch.tensor([2]), torch.tensor([2]), torch.tensor([False]), torch.tensor([True]), 3, 0.5
    )
    assert targets[0].tolist() == [[-0.75, 0.0], [-0.5, 0.0], [0.0, 0.0]]


def test_no_thinking_gives_the_one_segment_targets_for_the_answer():
    lengths, finished = torch.tensor([4, 3, 5]), torch.tensor([True, False, True])
    boot = torch.tensor([[0.0, -0.3], [0.0, -0.6], [0.0, -0.1]])
    two, two_mask = segment_value_targets(lengths, torch.zeros(3, dtype=torch.long), finished, finished, 6, 0.9, boot)
    one, one_mask = value_targets(lengths, finished, 6, 0.9, boot[:, 1])
    assert torch.equal(two[..., 1], one) and torch.equal(two_mask[..., 1], one_mask)
    assert (two[..., 0] == 0).all()


def test_thinking_longer_than_the_completion_is_refused():
    with pytest.raises(ValueError, match="thinking_tokens"):
        segment_value_targets(torch.tensor([2]), torch.tensor([3]), torch.tensor([True]), torch.tensor([True]), 4, 0.5)


def test_segment_td_residuals_match_a_loop_and_vanish_on_exact_targets():
    rng = random.Random(1)
    batch, steps, gamma = 5, 7, 0.8
    values = torch.tensor([[[rng.uniform(-1, 0) for _ in range(2)] for _ in range(steps + 1)] for _ in range(batch)])
    thinking = torch.tensor([rng.randint(0, steps) for _ in range(batch)])
    mask = torch.tensor([[t < rng.randint(1, steps) for t in range(steps)] for _ in range(batch)])
    residuals = segment_td_residuals(values, mask, thinking, gamma)
    for b in range(batch):
        for t in range(steps):
            for h in (0, 1):
                own = (t < thinking[b]) == (h == 0)
                expected = (
                    (-(1 - gamma) if own else 0.0) + (gamma if own else 1.0) * values[b, t + 1, h] - values[b, t, h]
                )
                assert float(residuals[b, t, h]) == pytest.approx(float(expected) if mask[b, t] else 0.0, abs=1e-6)
    # The exact targets of a finished row have zero residual on every token; without thinking, the answer's
    # residuals are the one-segment ones.
    targets, _ = segment_value_targets(
        torch.tensor([5]), torch.tensor([3]), torch.tensor([True]), torch.tensor([True]), 6, gamma
    )
    assert (
        segment_td_residuals(targets, torch.ones(1, 5, dtype=torch.bool), torch.tensor([3]), gamma).abs().max() < 1e-6
    )
    one = td_residuals(values[..., 1], mask, gamma)
    two = segment_td_residuals(values, mask, torch.zeros(batch, dtype=torch.long), gamma)
    assert torch.allclose(two[..., 1], one)
