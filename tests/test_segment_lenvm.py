"""The two-value LenVM (``segment_values``): it trains on rollouts with thinking segments, counts its labelled
(state, value) pairs as its loss does, reports per-segment metrics, and the stages that read one value refuse it."""

import json
import math

import pytest
import torch
from conftest import write_rollout_shard
from test_train_lenvm import training_config
from trl import ModelConfig

from lenvm_rl.critic_metrics import collate_states, labelled_states
from lenvm_rl.errors import ConfigError
from lenvm_rl.modeling import load_lenvm
from lenvm_rl.rollout_data import load_rollouts
from lenvm_rl.train_lenvm import LenVMTrainer, build_lenvm

TRAIN_LENGTHS = torch.tensor([2.0, 3.0, 4.0], dtype=torch.float64)


@pytest.fixture(scope="module")
def segment_rows(rollouts_dir):
    """The tiny rollouts with made-up segments: the first half thinking, every third row's thinking never closed."""

    def segments(row, index):
        length = row["completion_tokens"]
        unclosed = index % 3 == 0
        return {"thinking_tokens": length if unclosed else length // 2, "thinking_closed": not unclosed}

    return load_rollouts(rollouts_dir).map(segments, with_indices=True)


def make_trainer(model_path, tokenizer, rows, output_dir):
    config = training_config(output_dir, segment_values=True, truncated_rollouts="bootstrap")
    model = build_lenvm(ModelConfig(model_name_or_path=model_path), config, 0.9, TRAIN_LENGTHS)
    finished = rows.filter(lambda row: row["finished"])
    return LenVMTrainer(model, config, train_dataset=rows, eval_dataset=finished, processing_class=tokenizer)


def test_two_values_train_and_report_per_segment(tiny_model_path, tokenizer, segment_rows, tmp_path):
    trainer = make_trainer(tiny_model_path, tokenizer, segment_rows, tmp_path)
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    trainer.train()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert len(losses) == 3 and all(math.isfinite(loss) for loss in losses)
    assert all(not torch.equal(p, before[n]) for n, p in trainer.model.named_parameters() if p.requires_grad)
    assert trainer.model.head.out.weight.shape[0] == 2
    metrics = trainer.evaluate()
    for name in ("value_mse", "thinking_boundary_value_mae", "answer_boundary_value_mae", "thinking_boundary_mre"):
        assert math.isfinite(metrics[f"eval_{name}"]), name
    trainer.save_model(str(tmp_path / "lenvm"))
    tokenizer.save_pretrained(str(tmp_path / "lenvm"))
    with pytest.raises(ConfigError, match=r"^lenvm_model_path: .* is a two-value LenVM"):
        load_lenvm(str(tmp_path / "lenvm"))

    # predict-length reads it per segment.
    from lenvm_rl.predict_length import main as predict_length

    rollouts = write_rollout_shard(tmp_path / "rollouts", segment_rows.to_list())
    out = tmp_path / "predict"
    predict_length(
        ["--lenvm_model_path", str(tmp_path / "lenvm"), "--rollouts_path", str(rollouts), "--output_dir", str(out)]
    )
    result = json.loads((out / "predictions.json").read_text())
    assert math.isfinite(result["metrics"]["thinking_boundary_mre"]) and "boundary_mre" not in result["metrics"]
    for prompt in result["prompts"]:
        assert prompt["thinking_predicted_tokens"] >= 0 and prompt["answer_ground_truth_tokens"] >= 0
    assert (out / "value_trace_thinking.png").stat().st_size > 0 and (out / "value_trace_answer.png").stat().st_size > 0

    # length-tokens gives each token the residual of its own segment's value.
    from lenvm_rl.length_tokens import main as length_tokens

    out = tmp_path / "tokens"
    length_tokens(
        [
            "--lenvm_model_path",
            str(tmp_path / "lenvm"),
            "--rollouts_path",
            str(rollouts),
            "--output_dir",
            str(out),
            "--min_count",
            "1",
        ]
    )
    stats = json.loads((out / "length_tokens.json").read_text())
    assert stats


@pytest.mark.parametrize("drop", [True, False])
def test_labelled_pairs_are_counted_as_the_loss_labels_them(tokenizer, segment_rows, drop):
    rows = [segment_rows[i] for i in range(len(segment_rows))]
    batch = collate_states(rows, tokenizer.pad_token_id)
    expected = 0
    for row in rows:
        states = row["completion_tokens"] + 1
        thinking_known = row["finished"] or row["thinking_closed"]
        expected += states * ((thinking_known or not drop) + (row["finished"] or not drop))
    assert int(labelled_states(batch, drop, segment_values=True)) == expected
    assert not all(row["finished"] for row in rows)  # the truncated rows are what the count is about


def test_two_values_need_rollouts_with_segments(tiny_model_path, tokenizer, rollouts_dir, tmp_path):
    rows = load_rollouts(rollouts_dir)
    trainer = make_trainer(tiny_model_path, tokenizer, rows, tmp_path)
    with pytest.raises(ConfigError, match=r"^rollouts_path: a segment_values LenVM trains on rollouts with thinking"):
        trainer.model(**collate_states([rows[0]], tokenizer.pad_token_id))
    from lenvm_rl.critic_metrics import require_segments

    with pytest.raises(ConfigError, match=r"^rollouts_path: these rollouts have no thinking_tokens"):
        require_segments(rows, "rollouts_path")


def test_each_token_gets_its_own_segments_residual(tokenizer):
    from lenvm_rl.length_tokens import token_residual_stats
    from lenvm_rl.returns import segment_value_targets

    ids = tokenizer.encode("ab|cd", add_special_tokens=False)  # "a", "b", "|" thinking; "c", "d" the answer
    row = {"completion_ids": ids, "completion_tokens": 5, "thinking_tokens": 3}
    one, two = torch.tensor([True]), torch.tensor([5])
    exact = segment_value_targets(two, torch.tensor([3]), one, one, 6, 0.9)[0][0]  # (6, 2)
    stats = token_residual_stats([exact], [row], tokenizer, 0.9, 0.01, two_values=True)
    assert all(entry["up"] == entry["down"] == 0 for entry in stats.values())
    # Raise the thinking value after "b" (the rest of the thinking looks shorter): "b" moves it up, "|" down; a change
    # to the answer value there is not the thinking token's.
    moved = exact.clone()
    moved[2, 0] += 0.2
    moved[2, 1] += 0.3
    stats = token_residual_stats([moved], [row], tokenizer, 0.9, 0.01, two_values=True)
    assert stats["b"]["up"] == 1 and stats["|"]["down"] == 1
    assert stats["a"]["up"] == stats["c"]["up"] == stats["c"]["down"] == 0


def test_grpo_trains_on_the_segment_rewards(tiny_model_path, tmp_path):
    """The grpo entry point hands the segment rewards the tokenizer and markers and trains a step with them."""
    from test_faults import grpo_recipe

    from lenvm_rl.cli import main

    rewards = ["accuracy", "thinking_length_score", "answer_length_score"]
    recipe = grpo_recipe(tmp_path, tiny_model_path, thinking_budgets=[4], budgets=[2], reward_funcs=rewards)
    main(["grpo", "--config", str(recipe)])
    logged = json.loads((tmp_path / "out" / "trainer_state.json").read_text())["log_history"]
    assert any("rewards/thinking_length_score/mean" in entry for entry in logged)
    assert any(math.isfinite(entry.get("rewards/answer_length_score/mean", math.nan)) for entry in logged)
