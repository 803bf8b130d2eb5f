"""Guided exploration's baseline and adaptive guidance (docs/DESIGN.md §3.14): ``group_baseline`` against a plain loop
and hand cases, ``guided_baseline: plain`` against TRL's own advantage and a loop reference, ``guided_when:
plain_miss`` (guided rows only in groups whose plain rows all missed their budget, the group size kept), and the
refusals."""

import math

import pytest
import torch
from conftest import make_trainer
from test_guided import launch_guided_probe

from lenvm_rl.advantages import group_baseline
from lenvm_rl.errors import ConfigError
from lenvm_rl.grpo import LenVMGRPOConfig
from rewards.scores import budget_hit, budget_kind_codes

GUIDED = dict(guided_generations=2, guidance_beta=3.0)


def reference_baseline(scores, group_size, include):
    """One group at a time, one row at a time."""
    out = []
    for start in range(0, len(scores), group_size):
        rows = range(start, start + group_size)
        kept = [scores[i].item() for i in rows if include[i] and not math.isnan(scores[i].item())]
        if not kept:
            kept = [scores[i].item() for i in rows if not math.isnan(scores[i].item())]
        mean = sum(kept) / len(kept) if kept else math.nan
        out += [mean] * group_size
    return torch.tensor(out, dtype=torch.float64)


@pytest.mark.parametrize("group_size", [1, 2, 4])
def test_group_baseline_matches_a_loop_reference(group_size):
    torch.manual_seed(0)
    scores = torch.rand(24)
    scores[torch.rand(24) < 0.2] = math.nan
    include = torch.rand(24) < 0.5
    torch.testing.assert_close(
        group_baseline(scores, group_size, include), reference_baseline(scores, group_size, include), equal_nan=True
    )


def test_group_baseline_hand_cases():
    scores = torch.tensor([0.2, 1.0, 0.4, 0.6, 0.9, 0.1])
    # groups of 3: the first group's plain rows are 0 and 2 (mean 0.3); the second has none, so all rows (0.533)
    include = torch.tensor([True, False, True, False, False, False])
    expected = torch.tensor([0.3] * 3 + [1.6 / 3] * 3, dtype=torch.float64)
    torch.testing.assert_close(group_baseline(scores, 3, include), expected)
    # all rows included: the group mean (TRL's)
    torch.testing.assert_close(
        group_baseline(scores, 3, torch.ones(6, dtype=torch.bool)), torch.tensor([1.6 / 3] * 3 + [1.6 / 3] * 3).double()
    )
    # a NaN (unscorable) plain row is left out of the mean
    scores[0] = math.nan
    assert group_baseline(scores, 3, include)[0].item() == pytest.approx(0.4)


def reference_advantages(rewards_per_func, weights, guided, group_size):
    """TRL's sum_then_normalize, scale_rewards group, with each group's mean over its plain rows: a loop."""
    rewards = [sum(w * r for w, r in zip(weights, row, strict=True)) for row in rewards_per_func.tolist()]
    out = []
    for start in range(0, len(rewards), group_size):
        group = rewards[start : start + group_size]
        plain = [r for r, g in zip(group, guided[start : start + group_size].tolist(), strict=True) if not g]
        mean = sum(plain or group) / len(plain or group)
        std = (sum((r - sum(group) / len(group)) ** 2 for r in group) / (len(group) - 1)) ** 0.5
        out += [(r - mean) / (std + 1e-4) for r in group]
    return torch.tensor(out)


def test_plain_baseline_equals_trls_advantage_without_guided_rows_and_a_loop_reference_with_them(
    tiny_model_path, tokenizer, dataset, lenvm_path, tmp_path
):
    trainer = make_trainer(
        tiny_model_path,
        tokenizer,
        dataset,
        tmp_path,
        lenvm_model_path=lenvm_path,
        max_steps=1,
        guided_baseline="plain",
        reward_weights=[1.0, 2.0],
        **GUIDED,
    )
    trainer.train()
    trainer.model.train()
    rows = trainer.batch_rewards.size(0)
    output = {"advantages": torch.zeros(rows), "completion_ids": torch.zeros(rows, 3, dtype=torch.long)}
    trls = torch.tensor(list(trainer._logs["advantages"])[-rows:])  # TRL's, over every row of the last batch
    guided = trainer.guided_mask.clone()
    assert guided.tolist() == [False, False, True, True] * 2
    trainer.guided_mask = torch.zeros(rows, dtype=torch.bool)
    torch.testing.assert_close(trainer.guided_task_advantages(output), trls, rtol=1e-5, atol=1e-5)
    trainer.guided_mask = guided
    expected = reference_advantages(trainer.batch_rewards, [1.0, 2.0], guided, 4)
    torch.testing.assert_close(trainer.guided_task_advantages(output), expected, rtol=1e-5, atol=1e-5)
    # by hand: rewards (plain, plain, guided, guided) = (0, 1, 1, 1): mean of the plain rows 0.5, std 0.5
    trainer.batch_rewards = torch.tensor([[0.0, 0.0], [1.0, 0.0], [1.0, 0.0], [0.0, 0.5]] * 2)
    hand = torch.tensor([-0.5, 0.5, 0.5, 0.5] * 2) / (0.5 + 1e-4)
    torch.testing.assert_close(trainer.guided_task_advantages(output), hand)
    # the anchors of length_baseline: group: the plain rows' mean, (0 + 1) / 2 and (4 + 5) / 2
    scores, mean = torch.arange(8.0).double(), torch.full((8,), -1.0).double()
    anchors = torch.tensor([0.5] * 4 + [4.5] * 4).double()
    torch.testing.assert_close(trainer.guided_group_mean(scores, 4, mean), anchors)
    trainer.model.eval()  # evaluation batches take TRL's advantage and anchors
    assert trainer.guided_task_advantages(output) is output["advantages"]
    assert trainer.guided_group_mean(scores, 4, mean) is mean


def test_plain_baseline_reaches_the_loss_without_a_length_objective(
    tiny_model_path, tokenizer, dataset, lenvm_path, tmp_path
):
    """The sequence-level arm (no A_len): the advantages the loss gets are the plain-baseline ones, not TRL's."""
    trainer = make_trainer(
        tiny_model_path,
        tokenizer,
        dataset,
        tmp_path,
        lenvm_model_path=lenvm_path,
        length_objective="none",
        max_steps=1,
        guided_baseline="plain",
        guided_importance_min=1.0,
        guided_importance_cap=1.0,  # w = 1: the advantages are the baseline's alone
        **GUIDED,
    )
    captured, correct = {}, trainer.correct_guided

    def capture(output, batch):
        correct(output, batch)
        captured["advantages"], captured["mask"] = output["advantages"].clone(), output["completion_mask"]

    trainer.correct_guided = capture
    trainer.train()
    expected = reference_advantages(trainer.batch_rewards, [1.0, 1.0], trainer.guided_mask, 4)
    advantages, mask = captured["advantages"], captured["mask"].bool()  # (B, T): A_task on every valid token
    assert advantages.shape == mask.shape and (advantages[~mask] == 0).all()
    torch.testing.assert_close(advantages, (expected.float()[:, None] * mask).float(), rtol=1e-5, atol=1e-5)
    trls = torch.tensor(list(trainer._logs["advantages"])[-8:])
    assert not torch.allclose(trls, expected.float())  # this batch's guided rows moved the baseline


def test_plain_miss_guides_only_groups_whose_plain_rows_all_missed(
    tiny_model_path, tokenizer, dataset, lenvm_path, tmp_path
):
    """Groups of 4, k = 2: at_least 0 is always hit (its slots stay plain), exact 1000 never (its slots are guided)."""
    trainer = make_trainer(
        tiny_model_path,
        tokenizer,
        dataset,
        tmp_path,
        lenvm_model_path=lenvm_path,
        max_steps=1,
        guided_when="plain_miss",
        **GUIDED,
    )
    trainer.model.train()
    budgets = [(0, "at_least"), (1000, "exact"), (1000, "exact"), (0, "at_least")]
    inputs = [
        {**dataset[g], "budget_tokens": n, "budget_kind": kind} for g, (n, kind) in enumerate(budgets) for _ in range(4)
    ]
    trainer.generation_inputs = inputs
    prompt_ids = trainer._tokenize_prompts([row["prompt"] for row in inputs])[0]
    completions, logps = trainer._generate_single_turn(prompt_ids, None, {}, 4)
    expected = torch.tensor([False] * 4 + [False, False, True, True] * 2 + [False] * 4)
    assert trainer.guided_mask.tolist() == expected.tolist()
    assert all(ids is not None and len(ids) > 0 for ids in completions)  # the group size is kept
    for i, row_logps in enumerate(logps):
        assert all(math.isfinite(x) for x in row_logps) if expected[i] else all(math.isnan(x) for x in row_logps)
    eos = set(trainer.eos_token_ids)
    lengths = torch.tensor([len(ids) - (ids[-1] in eos) for ids in completions])
    kinds = budget_kind_codes([row["budget_kind"] for row in inputs])
    hits = budget_hit(lengths, torch.tensor([float(row["budget_tokens"]) for row in inputs]), kinds)
    assert hits.view(4, 4)[[0, 3]].all() and not hits.view(4, 4)[[1, 2], :2].any()


def test_plain_miss_trains_and_logs(tiny_model_path, tokenizer, dataset, lenvm_path, tmp_path):
    trainer = make_trainer(
        tiny_model_path,
        tokenizer,
        dataset,
        tmp_path,
        lenvm_model_path=lenvm_path,
        guided_when="plain_miss",
        guided_baseline="plain",
        length_baseline="group",
        **GUIDED,
    )
    trainer.train()
    entries = [e for e in trainer.state.log_history if "guided/guided_share" in e]
    assert len(entries) == 2 and all(0.0 <= e["guided/guided_share"] <= 0.5 for e in entries)
    assert all(math.isfinite(e["loss"]) for e in trainer.state.log_history if "loss" in e)


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        (dict(guided_generations=1, guided_baseline="guided"), "guided_baseline"),
        (dict(guided_generations=1, guided_when="sometimes"), "guided_when"),
        (dict(guided_generations=4, guided_when="plain_miss"), "guided_when"),
        (
            dict(guided_generations=1, guided_baseline="plain", multi_objective_aggregation="normalize_then_sum"),
            "guided_baseline",
        ),
    ],
)
def test_bad_baseline_fields_refused(overrides, field, tmp_path):
    fields = dict(output_dir=str(tmp_path), use_cpu=True, num_generations=4, lenvm_model_path=str(tmp_path))
    with pytest.raises(ConfigError, match=f"^{field}:"):
        LenVMGRPOConfig(**{**fields, **overrides})


def test_two_processes_judge_a_group_over_both_ranks(tiny_model_path, lenvm_path, tmp_path):
    """2 CPU processes, 2 rows each, groups of 4, k = 1, plain_miss: the guided slot (rank 1's second row) is guided
    exactly when the group's three plain rows, two of them on rank 0, all missed their budget."""
    dumps = launch_guided_probe(
        tmp_path,
        tiny_model_path,
        lenvm_path,
        budget_kinds=["exact", "at_least"],
        max_steps=4,
        guided_when="plain_miss",
        guided_baseline="plain",
    )
    calls = len(list(dumps.glob("rank0_*.pt")))
    assert calls >= 2
    guided_groups = 0
    for call in range(calls):
        ranks = [torch.load(dumps / f"rank{r}_{call}.pt") for r in range(2)]
        assert ranks[0]["guided"].tolist() == [False, False]
        lengths = torch.cat([d["lengths"] for d in ranks])
        hits = budget_hit(lengths, torch.cat([d["budgets"] for d in ranks]), torch.cat([d["kinds"] for d in ranks]))
        assert ranks[1]["guided"].tolist() == [False, not hits[:3].any().item()]
        guided_groups += int(ranks[1]["guided"][1])
        for d in ranks:
            guided, mask = d["guided"], d["mask"].bool()
            assert d["sampling"][~guided][mask[~guided]].isnan().all()
            assert d["sampling"][guided][mask[guided]].isfinite().all()
    assert 0 < guided_groups < calls  # seed 0: some groups guided, some not (the rule was exercised both ways)
    state = (tmp_path / "out" / "trainer_state.json").read_text()
    assert "guided/guided_share" in state
